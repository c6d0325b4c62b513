"""Activation checkpointing of a backbone's blocks (timm's switch: ``set_grad_checkpointing``).

A block run through :func:`run_block` keeps no activations for backward when checkpointing is on
and gradients are being recorded: they are recomputed in the backward pass (one extra forward of
the block, memory of one block's activations instead of all of them). Frozen backbones and
evaluation (no grad) run the blocks as they are.
"""

import torch
from torch.utils.checkpoint import checkpoint

__all__ = ["GradCheckpointing", "run_block", "enable_activation_checkpointing"]


def run_block(block, *args, enabled: bool):
    """``block(*args)``, checkpointed when ``enabled`` and autograd records (inputs may be nested)."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class GradCheckpointing:
    """Mixin: ``grad_checkpointing`` (off by default) and timm's ``set_grad_checkpointing(enable)``."""

    grad_checkpointing = False

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = bool(enable)


def enable_activation_checkpointing(model) -> list:
    """Turn on activation checkpointing in every module of ``model`` that has it: the project's backbones
    (``set_grad_checkpointing``, timm's switch) and OpenMMLab's layers (``with_cp``, e.g. mmseg's ViT).
    Returns the names of the modules switched; an empty list: nothing to checkpoint."""
    switched = []
    for name, module in model.named_modules():
        if callable(getattr(module, "set_grad_checkpointing", None)):
            if not any(name.startswith(outer + ".") for outer in switched):  # the outer switch covers its blocks
                module.set_grad_checkpointing(True)
                switched.append(name)
        elif isinstance(getattr(module, "with_cp", None), bool):  # each layer checks its own flag
            module.with_cp = True
            switched.append(name)
    return switched
