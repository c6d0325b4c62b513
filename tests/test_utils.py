"""The shared helpers: atomic writes, the weights-only checkpoint reader, config-key errors and the
multi-scale feature contract."""

import argparse
import errno
import json
import os

import pytest
import torch

from rat_plugins.models.features import FeatureInfo, resolve_out_features, select_features
from rat_plugins.utils import atomic
from rat_plugins.utils.atomic import (
    DiskFullError,
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
)
from rat_plugins.utils.checkpoint_io import find_state_dict, read_checkpoint
from rat_plugins.utils.config_keys import ConfigError, config_keys, did_you_mean, unknown_key_error


# -- atomic writes -----------------------------------------------------------------------------
def test_atomic_writers_replace_whole_files(tmp_path):
    atomic_write_text(tmp_path / "sub" / "a.txt", "one\r\ntwo")
    assert (tmp_path / "sub" / "a.txt").read_bytes() == b"one\r\ntwo"  # newlines as given, folder made
    atomic_write_json(tmp_path / "b.json", {"x": [1, 2]})
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2]}
    assert (tmp_path / "b.json").read_text().endswith("\n")
    atomic_write_bytes(tmp_path / "c.bin", b"\x00\x01")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    with atomic_path(tmp_path / "d.pt") as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".pt" and tmp.exists()
        torch.save({"w": torch.ones(2)}, tmp)
    assert torch.equal(torch.load(tmp_path / "d.pt")["w"], torch.ones(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json", "c.bin", "d.pt", "sub"]  # no temp file left


def test_new_files_get_the_umask_mode_and_old_files_keep_theirs(tmp_path):
    umask = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o644
        (tmp_path / "old.txt").write_text("y")
        os.chmod(tmp_path / "old.txt", 0o640)
        atomic_write_text(tmp_path / "old.txt", "z")
        assert (tmp_path / "old.txt").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(umask)


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_disk_full_is_reported_with_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    target = tmp_path / "table.md"
    target.write_text("old")

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "replace", full)
    with pytest.raises(DiskFullError, match=r"disk full while writing .*table\.md"):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.md"]


# -- checkpoint reading ------------------------------------------------------------------------
def test_read_checkpoint_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"X checkpoint not found: .*nope\.pth.*put it there"):
        read_checkpoint(tmp_path / "nope.pth", what="X checkpoint", missing_fix="put it there")
    (tmp_path / "text.pth").write_text("abcd")
    with pytest.raises(ValueError, match=r"text\.pth is not a loadable X checkpoint \(torch\.load"):
        read_checkpoint(tmp_path / "text.pth", what="X checkpoint")
    good = tmp_path / "good.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, good)
    with pytest.raises(ValueError, match=r"objects of class argparse\.Namespace.*refuses; re-save"):
        read_checkpoint(good, what="X checkpoint", unsafe_fix="re-save")
    obj = read_checkpoint(good, what="X checkpoint", allow=[argparse.Namespace])
    assert obj["args"].lr == 1
    torch.save({"w": torch.zeros(1)}, tmp_path / "trunc.pth")
    data = (tmp_path / "trunc.pth").read_bytes()
    (tmp_path / "trunc.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a loadable X checkpoint"):
        read_checkpoint(tmp_path / "trunc.pth", what="X checkpoint")


def test_find_state_dict_unwraps_and_strips_ddp_prefix():
    w = torch.zeros(1)
    assert find_state_dict({"model": {"module.a": w}}, path="p", what="weights") == {"a": w}
    assert find_state_dict({"state_dict": {"a": w}}, path="p", what="weights") == {"a": w}
    assert find_state_dict({"a": w}, path="p", what="weights") == {"a": w}
    with pytest.raises(ValueError, match=r"p holds no weights .*found a dict with keys epoch, lr"):
        find_state_dict({"epoch": 1, "lr": 2}, path="p", what="weights")


# -- config keys -------------------------------------------------------------------------------
def test_config_keys_and_did_you_mean():
    cfg = {"train": {"max_iter": 1, "checkpointer": {"period": 2}}, "hooks": [{"type": "A"}]}
    keys = config_keys(cfg)
    assert {"train.max_iter", "train.checkpointer.period", "hooks.0.type"} <= keys
    assert did_you_mean("train.max_itr", keys) == " Did you mean train.max_iter?"
    assert did_you_mean("zzz", keys) == ""
    err = unknown_key_error("train.max_itr", keys, "override", fix="prefix with '+' to add it")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    assert str(err) == (
        "override key 'train.max_itr' is not in the config. Did you mean train.max_iter? prefix with '+' to add it"
    )


# -- the feature contract ----------------------------------------------------------------------
def test_resolve_and_select_features():
    info = [FeatureInfo("a", 4, 8), FeatureInfo("b", 8, 16)]
    assert resolve_out_features(info) == ("a", "b")
    assert resolve_out_features(info, ["b", 0]) == ("b", "a")
    assert resolve_out_features(info, 1) == ("b",)
    with pytest.raises(ValueError, match=r"unknown feature 'c': the backbone returns \['a', 'b'\]"):
        resolve_out_features(info, ["c"])
    with pytest.raises(ValueError, match="unknown feature 2"):
        resolve_out_features(info, [2])
    maps = {"a": torch.zeros(1), "b": torch.ones(1)}
    assert list(select_features(maps, ["b", "a"])) == ["b", "a"]
    with pytest.raises(KeyError, match="not in the backbone output"):
        select_features(maps, ["c"])
