"""Bad inputs of the frozen-feature cache: edited code, damaged entries, a full disk, the size cap."""

import errno
import importlib.util
import io
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

from rat_plugins.models import feature_cache
from rat_plugins.models.feature_cache import CachedFrozenForward, FrozenFeatureCache, code_files, module_fingerprint
from rat_plugins.models.vim import VimBackbone
from rat_plugins.utils.config_keys import ConfigError

from _helpers import REPO

LOGGER = "rat_plugins.models.feature_cache"


class Frozen(torch.nn.Module):
    """A frozen module whose output is easy to predict: x * 2 + bias."""

    def __init__(self):
        super().__init__()
        self.register_buffer("bias", torch.tensor(0.5))

    def forward(self, x):
        return x * 2 + self.bias


def entries(root):
    """The finished entries (temporary files start with a dot)."""
    return sorted(p for p in root.rglob("*.pt") if p.is_file() and not p.name.startswith("."))


def _import_file(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


MODEL_SOURCE = """
import torch

class Model(torch.nn.Module):
    def forward(self, x):
        return x * {factor}
"""


@pytest.fixture
def fresh_code_cache():
    feature_cache._clear_code_cache()
    yield
    feature_cache._clear_code_cache()


# -- the key covers the code ---------------------------------------------------------------------


def test_edited_model_code_misses_in_the_next_process(tmp_path):
    """A later run with an edited forward computes afresh instead of serving the old features."""
    (tmp_path / "edited_model.py").write_text(MODEL_SOURCE.format(factor=2))
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]
        from edited_model import Model
        from rat_plugins.models.feature_cache import CachedFrozenForward
        cached = CachedFrozenForward(Model(), {str(tmp_path / "cache")!r})
        out = cached(torch.ones(1, 3))
        print(cached.cache.hits, cached.cache.misses, float(out[0, 0]))
        """
    )

    def run():
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.split()

    assert run() == ["0", "1", "2.0"]
    assert run() == ["1", "0", "2.0"]  # same code: a hit
    (tmp_path / "edited_model.py").write_text(MODEL_SOURCE.format(factor=3))
    assert run() == ["0", "1", "3.0"]  # before: ["1", "0", "2.0"], the stale features


def test_kernel_source_is_part_of_the_key(tmp_path, fresh_code_cache):
    package = tmp_path / "kernelpkg"
    (package / "csrc").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "model.py").write_text(MODEL_SOURCE.format(factor=2))
    kernel = package / "csrc" / "scan.cpp"
    kernel.write_text("// version 1\n")
    model = _import_file(package / "model.py", "kernelpkg_model").Model()
    before = module_fingerprint(model)
    assert kernel.resolve() in code_files(model)
    kernel.write_text("// version 2: another recurrence\n")
    feature_cache._clear_code_cache()  # a new process reads the files again
    assert module_fingerprint(model) != before


def test_vim_key_covers_its_module_the_scan_and_the_kernel():
    files = {p.relative_to(REPO).as_posix() for p in code_files(VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4))}
    assert {
        "rat_plugins/models/vim.py",
        "rat_plugins/models/ops/selective_scan.py",
        "rat_plugins/models/ops/bimamba_fused.py",
        "rat_plugins/models/ops/csrc/selective_scan.cpp",
    } <= files


def test_same_class_from_another_source_gets_another_key(tmp_path, fresh_code_cache):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "model.py").write_text(MODEL_SOURCE.format(factor=2))
    (tmp_path / "b" / "model.py").write_text(MODEL_SOURCE.format(factor=2) + "# edited\n")
    first = _import_file(tmp_path / "a" / "model.py", "same_name_model").Model()
    second = _import_file(tmp_path / "b" / "model.py", "same_name_model").Model()
    assert module_fingerprint(first) != module_fingerprint(second)


# -- damaged entries -------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "zero bytes", "not an entry"])
def test_damaged_entry_is_recomputed_and_replaced(tmp_path, caplog, damage):
    cached = CachedFrozenForward(Frozen(), tmp_path)
    x = torch.randn(2, 4)
    good = cached(x)
    path = entries(tmp_path)[0]
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "zero bytes":
        path.write_bytes(b"")
    else:
        torch.save(torch.zeros(3), path)
    fresh = CachedFrozenForward(Frozen(), tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(fresh(x), good)
    assert (fresh.cache.hits, fresh.cache.misses) == (1, 1)
    assert str(path) in caplog.text and "recomputing" in caplog.text
    assert isinstance(torch.load(path, weights_only=True)["outputs"][0], torch.Tensor)  # replaced


def test_entry_vanishing_between_check_and_read_is_a_quiet_miss(tmp_path, caplog):
    cached = CachedFrozenForward(Frozen(), tmp_path)
    x = torch.randn(1, 4)
    good = cached(x)
    entries(tmp_path)[0].unlink()  # another process evicted it
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert torch.equal(cached(x), good)
    assert cached.cache.misses == 2 and not caplog.text


def test_cache_folder_that_is_a_file_is_a_config_error(tmp_path):
    path = tmp_path / "cache"
    path.write_text("not a folder")
    with pytest.raises(ConfigError, match="feature cache folder .*cache is a file.*feature_cache_dir"):
        CachedFrozenForward(Frozen(), path)(torch.ones(1, 2))
    assert path.read_text() == "not a folder"


# -- disk full -------------------------------------------------------------------------------------


def test_disk_full_while_writing_keeps_the_run_going(tmp_path, caplog, monkeypatch):
    class FullDisk(io.FileIO):
        def write(self, data):
            super().write(bytes(data)[:100])
            raise OSError(errno.ENOSPC, "No space left on device")

    # the cache's own open(), so that only its writes fail
    monkeypatch.setattr(feature_cache, "open", FullDisk, raising=False)
    cached = CachedFrozenForward(Frozen(), tmp_path)
    x = torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = cached(x)
        again = cached(x)
    assert torch.equal(out, again) and torch.allclose(out, x * 2 + 0.5, atol=1e-2)
    assert cached.cache.failed_writes == 6 and cached.cache.misses == 6
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # once, not once per image
    assert "disk full" in warnings[0].getMessage() and str(tmp_path) in warnings[0].getMessage()
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial file left behind


@pytest.fixture
def small_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True)
    if proc.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_real_full_disk_keeps_the_run_going(small_tmpfs, caplog):
    (small_tmpfs / "filler").write_bytes(b"\0" * (2 * 2**20 - 64 * 2**10))  # leave 64 KB
    cached = CachedFrozenForward(Frozen(), small_tmpfs / "cache", max_gb=1)
    x = torch.randn(4, 16384)  # 32 KB per entry in float16
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = cached(x)
    assert torch.allclose(out, x * 2 + 0.5, atol=1e-2)
    assert cached.cache.failed_writes >= 2
    assert "disk full" in caplog.text and str(small_tmpfs / "cache") in caplog.text
    assert all(torch.load(p, weights_only=True)["outputs"] for p in entries(small_tmpfs))  # whole files only
    assert not [p for p in small_tmpfs.rglob(".*.tmp*")]


# -- size cap --------------------------------------------------------------------------------------


def _fill(cache, n, width=256):
    """n entries of about width * 2 bytes + pickle overhead, the oldest first."""
    for i in range(n):
        key = f"{i:02d}" + "0" * 38
        cache.save(key, {"outputs": [torch.full((width,), float(i), dtype=torch.float16)], "sequence": False})
        if cache._path(key).exists():  # not evicted at once
            os.utime(cache._path(key), (time.time() - 1000 + i, time.time() - 1000 + i))
    return [f"{i:02d}" + "0" * 38 for i in range(n)]


def test_cap_evicts_least_recently_used_first(tmp_path, caplog):
    probe = FrozenFeatureCache(tmp_path / "probe", "x", max_gb=1)
    one = probe._path(_fill(probe, 1)[0]).stat().st_size
    cache = FrozenFeatureCache(tmp_path / "cache", "fp", max_gb=5.5 * one / 2**30)
    keys = _fill(cache, 5)
    assert cache.load(keys[0]) is not None  # a hit marks the oldest entry as just used
    with caplog.at_level(logging.INFO, logger=LOGGER):
        _fill(FrozenFeatureCache(tmp_path / "cache", "other", max_gb=5.5 * one / 2**30), 2)
    kept = {p.stem for p in entries(tmp_path / "cache") if p.parent.parent.name == "fp"}
    assert keys[0] in kept and keys[1] not in kept and keys[4] in kept
    assert sum(p.stat().st_size for p in entries(tmp_path / "cache")) <= 5.5 * one
    assert "least recently used" in caplog.text


def test_cap_from_the_environment(tmp_path, monkeypatch):
    probe = FrozenFeatureCache(tmp_path / "probe", "x", max_gb=1)
    cap = 3.5 * probe._path(_fill(probe, 1)[0]).stat().st_size
    monkeypatch.setenv("RAT_FEATURE_CACHE_MAX_GB", str(cap / 2**30))
    cache = FrozenFeatureCache(tmp_path / "cache", "fp")
    _fill(cache, 8)
    assert cache.evicted > 0 and len(entries(tmp_path / "cache")) == 3


@pytest.mark.parametrize("value", ["four", "0", "-1", "nan"])
def test_bad_cap_is_a_config_error_naming_the_variable(tmp_path, monkeypatch, value):
    monkeypatch.setenv("RAT_FEATURE_CACHE_MAX_GB", value)
    with pytest.raises(ConfigError, match="RAT_FEATURE_CACHE_MAX_GB") as info:
        CachedFrozenForward(Frozen(), tmp_path)
    assert "positive number" in str(info.value)
    assert not list(tmp_path.iterdir())


def test_eviction_tolerates_entries_removed_by_another_process(tmp_path):
    cache = FrozenFeatureCache(tmp_path, "fp", max_gb=1e-9)
    _fill(cache, 3)
    listed = cache._entries()
    for _, _, path in listed[:2]:
        os.unlink(path)  # the other process was faster
    cache._entries = lambda: listed
    cache.evict()  # before: FileNotFoundError
    assert not entries(tmp_path)


def test_concurrent_writers_and_evictions_stay_under_the_cap(tmp_path):
    caches = [FrozenFeatureCache(tmp_path, f"writer{i}", max_gb=20000 / 2**30) for i in range(3)]
    errors = []

    def write(cache, seed):
        try:
            for i in range(40):
                key = f"{seed}{i:03d}" + "0" * 36
                cache.save(key, {"outputs": [torch.randn(256).half()], "sequence": False})
                cache.load(key)
        except Exception as e:  # collected: an exception in a thread would not fail the test
            errors.append(e)

    threads = [threading.Thread(target=write, args=(c, i)) for i, c in enumerate(caches)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sum(c.evicted for c in caches) > 0
    caches[0].evict()
    assert sum(p.stat().st_size for p in entries(tmp_path)) <= 20000


def test_stale_temporary_files_are_removed_by_eviction(tmp_path):
    cache = FrozenFeatureCache(tmp_path, "fp", max_gb=1)
    _fill(cache, 1)
    stale = cache.root / "00" / ".0000.pt.abc123.tmp.pt"
    stale.write_bytes(b"left by a killed writer")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    recent = cache.root / "00" / ".0001.pt.def456.tmp.pt"
    recent.write_bytes(b"being written right now")
    cache.evict()
    assert not stale.exists() and recent.exists() and len(entries(tmp_path)) == 1
