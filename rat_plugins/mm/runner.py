"""Shared logic of tools/train.py and tools/test.py for mmseg / mmdet configs (OpenMMLab CLI)."""

import argparse
import logging
import os
import os.path as osp
import time

import torch
from mmengine.config import Config, DictAction
from mmengine.logging import print_log
from mmengine.registry import RUNNERS
from mmengine.runner import Runner

from ..utils.config_keys import ConfigError, did_you_mean

__all__ = [
    "train_parser",
    "test_parser",
    "check_options",
    "load_config",
    "build_runner",
    "unique_instance_names",
    "ConfigError",
]


def _common(parser):
    parser.add_argument("config", help="config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models")
    parser.add_argument(
        "--cfg-options", nargs="+", action=DictAction, help="override settings, key=value (as OpenMMLab's tools)"
    )
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser


def train_parser():
    p = _common(argparse.ArgumentParser(description="Train an mmseg / mmdet config"))
    p.add_argument("--resume", action="store_true", help="resume from the latest checkpoint in the work dir")
    p.add_argument("--amp", action="store_true", help="automatic mixed precision")
    return p


def test_parser():
    p = _common(argparse.ArgumentParser(description="Evaluate an mmseg / mmdet checkpoint"))
    p.add_argument("checkpoint", help="checkpoint file")
    p.add_argument("--out", help="dump predictions (mmseg: folder, mmdet: .pkl)")
    return p


def check_options(cfg, options) -> None:
    """Refuse --cfg-options keys whose parent exists but the leaf does not (likely a typo)."""
    for key in options or {}:
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if isinstance(node, (list, tuple)) and part.isdigit():
                node = node[int(part)]
                continue
            if not hasattr(node, "keys") or part not in node:
                known = list(node.keys()) if hasattr(node, "keys") else []
                if i == len(parts) - 1 and "type" in known:
                    break  # adding a constructor argument to a registered type is legitimate
                raise ConfigError(
                    f"--cfg-options key {key!r}: {'.'.join(parts[: i + 1])!r} is not in the config."
                    f"{did_you_mean(part, known)}"
                )
            node = node[part]


_check_options = check_options  # earlier name


def load_config(args) -> Config:
    if not osp.isfile(args.config):
        raise ConfigError(f"config file not found: {args.config}")
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    check_options(cfg, args.cfg_options)
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(args.config))[0])
    if args.launcher != "none" and not torch.cuda.is_available():
        # CPU processes cannot use NCCL; gloo is the CPU backend of torch.distributed. DDP takes
        # no device ids for CPU modules.
        cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"
        if cfg.get("model_wrapper_cfg") is None:
            cfg.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None)
    if getattr(args, "amp", False):
        if cfg.optim_wrapper.type == "AmpOptimWrapper":
            print_log("AMP training is already enabled in your config.", logger="current", level=logging.WARNING)
        elif cfg.optim_wrapper.type != "OptimWrapper":
            raise ConfigError(f"--amp needs optim_wrapper.type OptimWrapper, got {cfg.optim_wrapper.type}")
        else:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    if getattr(args, "resume", False):
        cfg.resume = True
    return cfg


def unique_instance_names(cfg: Config) -> Config:
    """Give this run's visualizer a name no earlier Runner of the process used.

    mmengine keeps visualizers by name, process-wide, and the configs name theirs 'visualizer':
    a second Runner in the same process (a sweep, a test after a train) would get the first run's
    visualizer back and write its scalars into the first run's work dir.
    """
    from mmengine.visualization import Visualizer

    def subclasses(cls):
        yield cls
        for sub in cls.__subclasses__():
            yield from subclasses(sub)

    vis = cfg.get("visualizer")
    # every class keeps its own instances (SegLocalVisualizer, DetLocalVisualizer, ...)
    if isinstance(vis, dict) and any(
        c.check_instance_created(vis.get("name", "visualizer")) for c in subclasses(Visualizer)
    ):
        vis["name"] = f"{vis.get('name', 'visualizer')}_{time.time_ns()}"
    return cfg


def build_runner(cfg: Config) -> Runner:
    unique_instance_names(cfg)
    if "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = "0"
    if cfg.get("launcher", "none") != "none" and not torch.cuda.is_available():
        import torch.distributed as dist

        # mmengine's init_dist calls torch.cuda.set_device unconditionally; starting the gloo
        # group first makes the Runner skip it (it only initialises when none exists).
        if not dist.is_initialized():
            dist.init_process_group("gloo")
    return Runner.from_cfg(cfg) if "runner_type" not in cfg else RUNNERS.build(cfg)
