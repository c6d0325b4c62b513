"""The frozen-feature cache: hits, misses, invalidation, storage format, safety."""

import logging

import pytest
import torch

from rat_plugins.models.feature_cache import CachedFrozenForward, FrozenFeatureCache, module_fingerprint
from rat_plugins.models.vim import VimBackbone


def tiny_vim(**kw):
    torch.manual_seed(0)
    kw.setdefault("frozen", True)
    return VimBackbone(embed_dim=32, depth=2, pt_hw_seq_len=4, **kw)


def cache_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_second_call_is_served_from_disk_and_equals_the_first(tmp_path):
    net = tiny_vim()
    cached = CachedFrozenForward(net, tmp_path)
    x = torch.randn(3, 3, 64, 48)
    first = cached(x)
    assert (cached.cache.hits, cached.cache.misses) == (0, 3)
    assert len(cache_files(tmp_path)) == 3
    second = cached(x)
    assert (cached.cache.hits, cached.cache.misses) == (3, 3)
    assert torch.equal(first, second)  # a hit returns exactly what the miss returned
    direct = net(x)
    assert first.dtype == direct.dtype and first.shape == direct.shape
    torch.testing.assert_close(first, direct, rtol=1e-3, atol=1e-3)  # float16 storage
    # a fresh process (new wrapper) finds the same entries
    again = CachedFrozenForward(tiny_vim(), tmp_path)
    assert torch.equal(again(x), first) and again.cache.misses == 0


def test_mixed_batch_keeps_order(tmp_path):
    cached = CachedFrozenForward(tiny_vim(), tmp_path)
    a, b = torch.randn(1, 3, 32, 32), torch.randn(1, 3, 32, 32)
    feat_a = cached(a)
    out = cached(torch.cat([b, a, b]))
    assert (cached.cache.hits, cached.cache.misses) == (1, 3)  # b computed once per call batch slot
    assert torch.equal(out[1:2], feat_a)
    assert torch.equal(out[0], out[2])


def test_every_key_part_invalidates(tmp_path):
    x = torch.randn(1, 3, 32, 32)
    base = module_fingerprint(tiny_vim())
    assert module_fingerprint(tiny_vim()) == base  # deterministic
    other_weights = tiny_vim()
    other_weights.pos_embed.data += 1e-3  # another checkpoint's content
    assert module_fingerprint(other_weights) != base
    assert module_fingerprint(tiny_vim(last_layer_process="none")) != base  # same weights, other output
    assert module_fingerprint(tiny_vim(if_rope=False)) != base
    assert FrozenFeatureCache.input_key(x) != FrozenFeatureCache.input_key(x.flip(-1))  # other view
    assert FrozenFeatureCache.input_key(x) != FrozenFeatureCache.input_key(x.double())

    cached = CachedFrozenForward(tiny_vim(), tmp_path)
    cached(x)
    changed = CachedFrozenForward(other_weights, tmp_path)
    changed(x)
    assert changed.cache.misses == 1 and changed.cache.root != cached.cache.root


def test_storage_is_float16_unless_values_do_not_fit(tmp_path):
    class Scale(torch.nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.register_buffer("factor", torch.tensor(factor))

        def forward(self, x):
            return x * self.factor

    small = CachedFrozenForward(Scale(1.0), tmp_path)
    small(torch.ones(1, 2, 2))
    large = CachedFrozenForward(Scale(1e6), tmp_path)
    out = large(torch.ones(1, 2, 2))
    assert torch.equal(out, torch.full((1, 2, 2), 1e6))  # kept exact in float32
    dtypes = {torch.load(p, weights_only=True)["outputs"][0].dtype for p in cache_files(tmp_path)}
    assert dtypes == {torch.float16, torch.float32}


def test_unreadable_entry_is_recomputed(tmp_path, caplog):
    cached = CachedFrozenForward(tiny_vim(), tmp_path)
    x = torch.randn(1, 3, 32, 32)
    good = cached(x)
    (entry,) = cache_files(tmp_path)
    entry.write_bytes(b"truncated")
    with caplog.at_level(logging.WARNING):
        assert torch.equal(cached(x), good)
    assert "unreadable" in caplog.text
    assert torch.equal(torch.load(entry, weights_only=True)["outputs"][0].float(), good[0])
    assert not [p for p in cache_files(tmp_path) if ".tmp" in p.name]


def test_a_trainable_module_is_refused(tmp_path):
    with pytest.raises(ValueError, match="frozen module"):
        CachedFrozenForward(tiny_vim(frozen=False), tmp_path)


def test_detectron2_backbone_uses_the_cache_only_when_frozen(tmp_path):
    from rat_plugins.detectron2.vim import ViM

    x = torch.randn(2, 3, 32, 32)
    frozen = ViM(embed_dim=32, depth=2, pt_hw_seq_len=4, frozen=True, feature_cache_dir=str(tmp_path / "on"))
    out = frozen(x)["last_feat"]
    assert out.shape == (2, 32, 2, 2) and len(cache_files(tmp_path / "on")) == 2
    assert set(frozen.state_dict()) == set(frozen.net.state_dict(prefix="net."))  # keys not duplicated
    trainable = ViM(embed_dim=32, depth=2, pt_hw_seq_len=4, frozen=False, feature_cache_dir=str(tmp_path / "off"))
    trainable(x)["last_feat"].sum().backward()
    assert not (tmp_path / "off").exists()


def test_several_outputs_per_image(tmp_path):
    class Layers(torch.nn.Module):  # like a ViT returning the layers an MLA neck reads
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4).requires_grad_(False)

        def forward(self, x):
            return tuple(self.proj(x) * k for k in range(1, 5))

    cached = CachedFrozenForward(Layers(), tmp_path)
    x = torch.randn(3, 2, 4)
    first = cached(x)
    second = cached(x[[2, 0]])
    assert isinstance(first, tuple) and len(first) == 4 and cached.cache.hits == 2
    for a, b in zip(first, second):
        assert torch.equal(a[[2, 0]], b)


def test_named_features_keep_their_names_and_order(tmp_path):
    net = tiny_vim()
    cached = CachedFrozenForward(net, tmp_path, compute=net.forward_features)
    x = torch.randn(2, 3, 32, 32)
    first = cached(x)
    second = cached(x)
    assert list(first) == list(second) == ["last_feat"] and cached.cache.hits == 2
    assert torch.equal(first["last_feat"], second["last_feat"])
    torch.testing.assert_close(first["last_feat"], net(x), rtol=1e-3, atol=1e-3)
    # what computes the features is part of the key: forward's entries are not read as named ones
    plain = CachedFrozenForward(net, tmp_path)
    assert plain.cache.root != cached.cache.root
    assert torch.is_tensor(plain(x)) and plain.cache.misses == 2
    assert module_fingerprint(net, method="forward_features") != module_fingerprint(net)


def test_code_fingerprint_reads_each_source_once_per_process(tmp_path, monkeypatch):
    from pathlib import Path

    from rat_plugins.models import feature_cache

    feature_cache._clear_code_cache()
    reads = []
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self) or real_read(self))
    net = tiny_vim()
    first = feature_cache.code_fingerprint(net)
    assert any(p.name == "vim.py" for p in reads) and any(p.suffix == ".cpp" for p in reads)
    count = len(reads)
    assert feature_cache.code_fingerprint(tiny_vim(if_rope=False)) == first and len(reads) == count
    # the code fingerprint is part of the module's: other code, other cache folder
    before = module_fingerprint(net)
    monkeypatch.setattr(feature_cache, "code_fingerprint", lambda module: "edited")
    assert module_fingerprint(net) != before
