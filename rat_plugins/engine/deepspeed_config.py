"""The DeepSpeed configuration of a run, from the project's words for it (framework-neutral).

``--deepspeed zero2|zero3 [--offload-optimizer cpu] [--offload-param cpu]`` and the run's batch,
accumulation, gradient clipping and precision become one DeepSpeed JSON, written into the work dir
so that what ran can be read. Precision: fp32 unless asked; bf16 works on CPU and CUDA, fp16 (with
dynamic loss scaling) needs CUDA.
"""

from typing import Optional

from ..utils.config_keys import ConfigError

__all__ = ["STAGES", "zero_stage", "deepspeed_config"]

STAGES = {"zero2": 2, "zero3": 3}
OFFLOAD_DEVICES = ("cpu",)


def zero_stage(name) -> int:
    """``zero2`` / ``zero3`` (or 2 / 3) -> the ZeRO stage."""
    if isinstance(name, int) and name in STAGES.values():
        return name
    if str(name) in STAGES:
        return STAGES[str(name)]
    raise ConfigError(f"deepspeed stage {name!r}: choose zero2 or zero3")


def deepspeed_config(
    stage: int,
    micro_batch: int,
    accumulation: int = 1,
    clip_grad: Optional[float] = None,
    precision: str = "fp32",
    offload_optimizer: Optional[str] = None,
    offload_param: Optional[str] = None,
    cuda: bool = False,
) -> dict:
    """The DeepSpeed config of one run (micro-batch per process, accumulation steps, ZeRO section).

    A client optimizer is allowed with ZeRO (the config's AdamW / SGD) and with offload (DeepSpeed
    would otherwise demand its compiled ``DeepSpeedCPUAdam``; a config may still name it).
    """
    for what, device in (("offload-optimizer", offload_optimizer), ("offload-param", offload_param)):
        if device is not None and device not in OFFLOAD_DEVICES:
            raise ConfigError(f"--{what} {device!r}: only {', '.join(OFFLOAD_DEVICES)} is supported")
    if offload_param is not None and stage != 3:
        raise ConfigError("--offload-param: parameters are partitioned (and offloaded) by ZeRO stage 3 only: use zero3")
    if micro_batch < 1 or accumulation < 1:
        raise ConfigError(f"deepspeed: micro-batch {micro_batch} and accumulation {accumulation} must be >= 1")
    zero = dict(stage=stage, contiguous_gradients=True, overlap_comm=cuda)
    if offload_optimizer is not None:
        zero["offload_optimizer"] = dict(device=offload_optimizer, pin_memory=cuda)
    if offload_param is not None:
        zero["offload_param"] = dict(device=offload_param, pin_memory=cuda)
    config = dict(
        train_micro_batch_size_per_gpu=int(micro_batch),
        gradient_accumulation_steps=int(accumulation),
        zero_optimization=zero,
        zero_allow_untested_optimizer=True,
        zero_force_ds_cpu_optimizer=False,
    )
    if clip_grad is not None:
        config["gradient_clipping"] = float(clip_grad)
    if precision == "bf16":
        config["bf16"] = dict(enabled=True)
    elif precision == "fp16":
        if not cuda:
            raise ConfigError("deepspeed fp16 needs a CUDA device; on CPU use --amp-dtype bfloat16 or full precision")
        config["fp16"] = dict(enabled=True, loss_scale=0, initial_scale_power=16)
    elif precision != "fp32":
        raise ConfigError(f"deepspeed precision {precision!r}: choose fp32, bf16 or fp16")
    return config
