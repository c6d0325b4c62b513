"""DeepSpeed ZeRO for OpenMMLab configs: mmengine's ``FlexibleRunner`` with its ``DeepSpeedStrategy``.

``tools/train.py CONFIG --deepspeed zero2|zero3 [--offload-optimizer cpu] [--offload-param cpu]`` (or
a top-level ``deepspeed = dict(stage='zero2', offload_optimizer=None, offload_param=None)`` in the
config) turns the config's ``Runner`` run into a ``FlexibleRunner`` one:

- the optimizer wrapper becomes ``DeepSpeedOptimWrapper`` over the config's optimizer, with its
  parameter-wise settings and constructor. ZeRO partitions only the parameters that require
  gradients: a frozen SETR encoder or ViM gets no optimizer state (tested), and stays in the
  checkpoints, so a converted one loads strictly;
- micro-batch (the loader's batch), accumulation (``accumulative_counts``), gradient clipping
  (``clip_grad.max_norm``) and precision (``--amp`` / ``--amp-dtype`` or an ``AmpOptimWrapper``)
  go into the DeepSpeed config (:mod:`rat_plugins.engine.deepspeed_config`), which is written to
  ``<work_dir>/deepspeed_config.json``;
- checkpoints are DeepSpeed's folders (``iter_4.pth/`` with the model states and one ZeRO shard
  per rank), written under a hidden name and renamed into place once every rank has written
  (:class:`SafeDeepSpeedStrategy`); ``--resume`` continues from them, and
  ``tools/convert_deepspeed_checkpoint.py`` turns one into a plain checkpoint for ``tools/test.py``.
- one process without a launcher is a world of one (DeepSpeed always needs a process group).
"""

import os
import os.path as osp
import shutil

import torch
from mmengine._strategy import DeepSpeedStrategy
from mmengine.dist import barrier, is_main_process
from mmengine.registry import STRATEGIES

from ..cluster.environment import free_port
from ..engine.deepspeed_config import deepspeed_config, zero_stage
from ..utils.config_keys import ConfigError

__all__ = [
    "SafeDeepSpeedStrategy",
    "use_deepspeed",
    "to_plain_checkpoint",
    "CONFIG_FILE",
]

CONFIG_FILE = "deepspeed_config.json"
_OPTIM_WRAPPERS = ("OptimWrapper", "AmpOptimWrapper")


@STRATEGIES.register_module()
class SafeDeepSpeedStrategy(DeepSpeedStrategy):
    """``DeepSpeedStrategy`` (same arguments) whose checkpoints appear whole or not at all.

    DeepSpeed writes a checkpoint as a folder, file by file and rank by rank; a kill in between
    would leave a folder that looks like a checkpoint. Here every rank writes into
    ``.<name>.partial`` and rank 0 renames it to ``<name>`` after all have written.
    """

    def save_checkpoint(self, filename: str, **kwargs) -> None:
        folder, name = osp.split(filename)
        partial = osp.join(folder, f".{name}.partial")
        if is_main_process() and osp.lexists(partial):
            _remove(partial)  # the unfinished save of an interrupted run
        barrier()
        super().save_checkpoint(partial, **kwargs)
        barrier()
        if is_main_process():
            stale = osp.join(folder, f".{name}.stale")
            if osp.lexists(filename):
                os.replace(filename, stale)
            os.replace(partial, filename)
            if osp.lexists(stale):
                _remove(stale)
        barrier()


def _remove(path: str) -> None:
    if osp.isdir(path) and not osp.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _precision(optim_wrapper, args) -> str:
    dtype = getattr(args, "amp_dtype", None)
    if dtype is None and optim_wrapper.get("type") == "AmpOptimWrapper":
        dtype = optim_wrapper.get("dtype") or "float16"
    elif dtype is None and getattr(args, "amp", False):
        dtype = "float16"
    return {None: "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(dtype, str(dtype))


def _clip_norm(optim_wrapper):
    clip = optim_wrapper.get("clip_grad")
    if not clip:
        return None
    if "max_norm" not in clip or clip.get("type", "norm") != "norm" or float(clip.get("norm_type", 2)) != 2.0:
        raise ConfigError(
            f"deepspeed: optim_wrapper.clip_grad={dict(clip)} — DeepSpeed clips the global L2 norm only: "
            "use clip_grad=dict(max_norm=1.0) (or --clip-grad 1.0)"
        )
    return float(clip["max_norm"])


def use_deepspeed(cfg, args) -> None:
    """Turn ``cfg`` (loaded, ``--cfg-options`` merged, launcher resolved) into a DeepSpeed run, in place."""
    _require_deepspeed()
    section = dict(cfg.get("deepspeed") or {})
    stage = zero_stage(getattr(args, "deepspeed", None) or section.get("stage", "zero2"))
    if getattr(args, "auto_batch", False):
        raise ConfigError(
            "--auto-batch with --deepspeed: DeepSpeed fixes the micro-batch when it starts; set it with "
            "train_dataloader.batch_size and optim_wrapper.accumulative_counts instead"
        )
    optim_wrapper = cfg.optim_wrapper
    if optim_wrapper.get("type", "OptimWrapper") not in _OPTIM_WRAPPERS:
        raise ConfigError(
            f"--deepspeed needs optim_wrapper.type OptimWrapper or AmpOptimWrapper, got {optim_wrapper.type}"
        )
    cuda = torch.cuda.is_available()
    config = deepspeed_config(
        stage,
        micro_batch=int(cfg.train_dataloader.batch_size),
        accumulation=int(optim_wrapper.get("accumulative_counts", 1)),
        clip_grad=_clip_norm(optim_wrapper),
        precision=_precision(optim_wrapper, args),
        offload_optimizer=getattr(args, "offload_optimizer", None) or section.get("offload_optimizer"),
        offload_param=getattr(args, "offload_param", None) or section.get("offload_param"),
        cuda=cuda,
    )
    cfg.optim_wrapper = dict(
        type="DeepSpeedOptimWrapper",
        optimizer=optim_wrapper.optimizer,
    )
    if optim_wrapper.get("constructor"):
        cfg.optim_wrapper["constructor"] = optim_wrapper.constructor
    if optim_wrapper.get("paramwise_cfg"):
        cfg.optim_wrapper["paramwise_cfg"] = optim_wrapper.paramwise_cfg
    cfg.runner_type = "FlexibleRunner"
    # the frozen parameters stay in the checkpoint: a converted one then loads strictly for testing
    cfg.strategy = dict(type="SafeDeepSpeedStrategy", config=config, exclude_frozen_parameters=False)
    zero = config["zero_optimization"]
    cfg.deepspeed = dict(
        stage=f"zero{stage}",
        offload_optimizer=zero.get("offload_optimizer", {}).get("device"),
        offload_param=zero.get("offload_param", {}).get("device"),
    )
    cfg.pop("model_wrapper_cfg", None)  # DeepSpeed wraps the model itself
    if cfg.get("launcher", "none") == "none":
        # one process: a world of one, on loopback (DeepSpeed needs a process group)
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        cfg.launcher = "pytorch"
        if not cuda:
            cfg.setdefault("env_cfg", {}).setdefault("dist_cfg", {})["backend"] = "gloo"


def _require_deepspeed():
    import importlib.util

    install = (
        "`pip install -e .[deepspeed]` (with DS_BUILD_OPS=0 and --no-build-isolation; deepspeed 0.19.6 is "
        "the last release mmengine 0.10.7 works with)"
    )
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(f"DeepSpeed is not installed: {install}")
    try:  # mmengine swallows this ImportError and later asserts 'DeepSpeed is not installed'
        import deepspeed  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"DeepSpeed is installed but does not import ({error}): {install}") from None


def to_plain_checkpoint(folder, out) -> dict:
    """A DeepSpeed checkpoint folder (any ZeRO stage, any number of ranks) as a plain mmengine checkpoint
    ``{'state_dict': fp32 weights, 'meta': ...}`` at ``out`` (written atomically), for ``tools/test.py``
    and the other ordinary tools. Returns the state dict."""
    from ..engine.checkpoints import atomic_torch_save, checkpoint_problem

    _require_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    folder = osp.abspath(str(folder))
    problem = checkpoint_problem(folder) if osp.isdir(folder) else "it is not a DeepSpeed checkpoint folder"
    if problem is not None:
        raise ConfigError(f"{folder}: {problem}")
    model_states = sorted(f for f in os.listdir(folder) if f.endswith("model_states.pt"))[0]
    client_state = torch.load(osp.join(folder, model_states), map_location="cpu", weights_only=False)
    state_dict = get_fp32_state_dict_from_zero_checkpoint(osp.dirname(folder), tag=osp.basename(folder))
    state_dict = {k: v.contiguous() for k, v in state_dict.items()}  # views of flat buffers: saved compactly
    meta = dict(client_state.get("meta") or {}, converted_from=folder)
    atomic_torch_save({"state_dict": state_dict, "meta": meta}, out)
    return state_dict
