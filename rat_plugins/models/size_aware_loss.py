"""Per-object loss weights that grow as the ground-truth box gets smaller (small-object emphasis).

The mmdet head that applies them is ``rat_plugins.mm.yolox_rvt.SizeAwareYOLOXHead``.
"""

from typing import Tuple

import torch

__all__ = ["SIZE_WEIGHT_TYPES", "check_size_weight_args", "size_aware_weights", "box_areas"]

SIZE_WEIGHT_TYPES: Tuple[str, ...] = ("exponential", "linear", "step")


def check_size_weight_args(
    size_aware_weight: float, small_threshold: float, medium_threshold: float, weight_type: str
) -> None:
    """Raise ValueError for arguments the formulas do not define."""
    if weight_type not in SIZE_WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {SIZE_WEIGHT_TYPES}, got {weight_type!r}")
    if not size_aware_weight > 0:
        raise ValueError(f"size_aware_weight must be > 0, got {size_aware_weight}")
    if not 0 < small_threshold < medium_threshold:
        raise ValueError(f"need 0 < small_threshold < medium_threshold, got {small_threshold} and {medium_threshold}")


def box_areas(boxes_xyxy: torch.Tensor) -> torch.Tensor:
    """Areas of ``[..., 4]`` (x1, y1, x2, y2) boxes in float32 (fp16 overflows above 65504 px²)."""
    boxes = boxes_xyxy.float()
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def size_aware_weights(
    areas: torch.Tensor,
    size_aware_weight: float = 2.0,
    small_threshold: float = 1024.0,
    medium_threshold: float = 9216.0,
    weight_type: str = "exponential",
) -> torch.Tensor:
    """Loss weight per object from its box area ``a`` (px², negative areas count as 0).

    With ``W = size_aware_weight``, ``s = small_threshold``, ``m = medium_threshold`` and
    ``t = clamp((a - s) / (m - s), 0, 1)``::

        exponential   w = W ** (1 - t)
        linear        w = W - (W - 1) * t
        step          w = W if a < s (COCO small), (W + 1) / 2 if s <= a < m (medium), 1 if a >= m

    Large objects weigh 1, every small object ``W``; exponential and linear are continuous in
    ``a``. ``W = 1`` gives 1 everywhere; ``0 < W < 1`` de-emphasises small objects instead.

    Args:
        areas: box areas in px², any shape.
        size_aware_weight: ``W``, the weight of small objects.
        small_threshold: area up to which an object gets the full weight (COCO small: < 32²).
        medium_threshold: area from which an object gets weight 1 (COCO large: >= 96²).
        weight_type: ``exponential`` / ``linear`` / ``step``.

    Returns:
        float32 weights, the shape of ``areas``.
    """
    check_size_weight_args(size_aware_weight, small_threshold, medium_threshold, weight_type)
    a = areas.float().clamp(min=0)
    w = torch.as_tensor(float(size_aware_weight), dtype=a.dtype, device=a.device)
    if weight_type == "step":
        medium = (w + 1) / 2
        return torch.where(a < small_threshold, w, torch.where(a < medium_threshold, medium, torch.ones_like(a)))
    t = ((a - small_threshold) / (medium_threshold - small_threshold)).clamp(0, 1)
    if weight_type == "linear":
        return w - (w - 1) * t
    return w ** (1 - t)
