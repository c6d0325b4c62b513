"""Whole RVT detector checkpoints (backbone, PAFPN, YOLOX head) into mmdet's ``RecurrentYOLOX``.

RVT's Lightning files hold ``mdl.backbone.*`` (MaxViT-RNN), ``mdl.fpn.*`` (YOLOPAFPN) and
``mdl.yolox_head.*`` (YOLOX's head). The backbone and the PAFPN keep their loaders
(:func:`~rat_plugins.models.maxvit_rnn.load_rvt_checkpoint`,
:func:`~rat_plugins.models.yolox_pafpn.load_rvt_fpn`: the head's 1x1 ``stems`` become the neck's
``out_convs``); the rest of the head maps module by module onto mmdet's ``YOLOXHead``:

==================================  ==========================================
RVT (``mdl.yolox_head.``)           mmdet (``bbox_head.``)
==================================  ==========================================
``cls_convs.<level>.<i>.conv|bn``   ``multi_level_cls_convs.<level>.<i>.conv|bn``
``reg_convs.<level>.<i>.conv|bn``   ``multi_level_reg_convs.<level>.<i>.conv|bn``
``cls_preds.<level>``               ``multi_level_conv_cls.<level>``
``reg_preds.<level>``               ``multi_level_conv_reg.<level>``
``obj_preds.<level>``               ``multi_level_conv_obj.<level>``
==================================  ==========================================

With ``depthwise=True`` RVT's ``DWConv`` parts ``dconv`` / ``pconv`` are mmcv's
``DepthwiseSeparableConvModule`` ``depthwise_conv`` / ``pointwise_conv``. Key layout and semantics:
docs/formats.md, "RVT checkpoints".
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple, Union

import torch
from torch import Tensor

from ..models.maxvit_rnn import RVT_BACKBONE_PREFIX, load_rvt_checkpoint, read_rvt_checkpoint, with_lightning_prefix
from ..models.yolox_pafpn import RVT_FPN_PREFIX, RVT_HEAD_STEMS_PREFIX, load_rvt_fpn

__all__ = [
    "RVT_HEAD_PREFIX",
    "RVT_HEAD_MODULES",
    "RVTDetectorReport",
    "convert_rvt_head",
    "load_rvt_head",
    "load_rvt_detector",
]

logger = logging.getLogger(__name__)

RVT_HEAD_PREFIX = "mdl.yolox_head."
RVT_HEAD_MODULES: Dict[str, str] = {
    "cls_convs": "multi_level_cls_convs",
    "reg_convs": "multi_level_reg_convs",
    "cls_preds": "multi_level_conv_cls",
    "reg_preds": "multi_level_conv_reg",
    "obj_preds": "multi_level_conv_obj",
}
_DWCONV_PARTS = {"dconv": "depthwise_conv", "pconv": "pointwise_conv"}
# RVT builds every batch norm with PyTorch's defaults (YOLOX's eps 1e-3 / momentum 0.03 is never set)
RVT_BN_EPS = 1e-5


def convert_rvt_head(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """RVT head keys -> mmdet ``YOLOXHead`` keys (without ``bbox_head.``); pure function.

    Only ``mdl.yolox_head.*`` keys other than the ``stems`` (they belong to the neck) are taken; a
    head module this map does not know raises ``ValueError`` naming it.
    """
    converted, unknown = {}, []
    for key, value in with_lightning_prefix(state_dict).items():
        if not key.startswith(RVT_HEAD_PREFIX) or key.startswith(RVT_HEAD_STEMS_PREFIX):
            continue
        module, rest = key[len(RVT_HEAD_PREFIX) :].split(".", 1)
        if module not in RVT_HEAD_MODULES:
            unknown.append(key)
            continue
        parts = [_DWCONV_PARTS.get(p, p) for p in rest.split(".")]
        converted[f"{RVT_HEAD_MODULES[module]}.{'.'.join(parts)}"] = value
    if unknown:
        raise ValueError(
            f"RVT head keys of unknown modules {unknown[:3]}{' ...' if len(unknown) > 3 else ''}: RVT's YOLOX "
            f"head has {', '.join(['stems', *RVT_HEAD_MODULES])}. Fix: point to an RVT (YOLOX head) checkpoint"
        )
    return converted


def _rvt_head_sizes(head: Mapping[str, Tensor]) -> dict:
    """num_classes, width, levels and depthwise, read off converted head keys."""
    levels = sorted({int(k.split(".")[1]) for k in head if k.startswith("multi_level_conv_cls.")})
    cls = head.get("multi_level_conv_cls.0.weight")
    return dict(
        num_classes=None if cls is None else int(cls.shape[0]),
        width=None if cls is None else int(cls.shape[1]),
        levels=len(levels),
        depthwise=any(".depthwise_conv." in k for k in head),
    )


def load_rvt_head(bbox_head, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]]) -> int:
    """Load RVT's head (all but the ``stems``) into an mmdet ``YOLOXHead``, strictly.

    Returns the number of tensors loaded. Raises ``ValueError`` naming what differs (classes,
    width, levels, depthwise convs) and the config key that fixes it.
    """
    if isinstance(checkpoint, Mapping):
        state_dict, source = checkpoint, "state dict"
    else:
        source = os.fspath(checkpoint)
        state_dict, _ = read_rvt_checkpoint(source)
    head = convert_rvt_head(state_dict)
    if not head:
        raise ValueError(f"{source} holds no RVT head weights ('{RVT_HEAD_PREFIX}*'). Fix: point to an RVT detector")
    found = _rvt_head_sizes(head)
    want = dict(
        num_classes=int(bbox_head.num_classes),
        width=int(bbox_head.feat_channels),
        levels=len(bbox_head.strides),
        depthwise=bool(getattr(bbox_head, "use_depthwise", False)),
    )
    fixes = dict(
        num_classes=f"bbox_head.num_classes={found['num_classes']}",
        width=f"bbox_head.in_channels=bbox_head.feat_channels={found['width']} (and neck.out_channels)",
        levels=f"{found['levels']} levels (bbox_head.strides, neck and backbone out_indices)",
        depthwise=f"bbox_head.use_depthwise={found['depthwise']}",
    )
    differs = [k for k in want if found[k] != want[k]]
    if differs:
        raise ValueError(
            f"{source}: the RVT head does not fit bbox_head ("
            + "; ".join(f"{k}: checkpoint {found[k]}, model {want[k]}" for k in differs)
            + "). Fix: "
            + ", ".join(fixes[k] for k in differs)
        )
    try:
        bbox_head.load_state_dict(head, strict=True)
    except RuntimeError as e:
        detail = " ".join(str(e).split())
        raise ValueError(
            f"{source}: RVT head weights do not load strictly into {type(bbox_head).__name__} ({detail}). "
            "Fix: use mmdet's YOLOXHead with stacked_convs=2 and in_channels = feat_channels = RVT's head width"
        ) from e
    return len(head)


@dataclass
class RVTDetectorReport:
    """What :func:`load_rvt_detector` loaded: tensors per part, Lightning metadata, warnings."""

    source: str
    backbone: int = 0
    neck: int = 0
    head: int = 0
    stem: str = "loaded"
    meta: Dict[str, object] = field(default_factory=dict)
    warnings: List[str] = field(default_factory=list)

    @property
    def loaded(self) -> int:
        return self.backbone + self.neck + self.head

    def __str__(self) -> str:
        text = (
            f"{self.source}: loaded {self.loaded} RVT tensors (backbone {self.backbone}, PAFPN + head stems "
            f"{self.neck}, head {self.head}); stem {self.stem}"
        )
        return text + "".join(f"; warning: {w}" for w in self.warnings)


def _batch_norm_warnings(detector) -> List[str]:
    """RVT's batch norms use eps 1e-5; another eps changes the outputs slightly (mmdet's YOLOX uses 1e-3)."""
    eps = {
        name: m.eps
        for part in ("neck", "bbox_head")
        for name, m in getattr(detector, part).named_modules(prefix=part)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.eps != RVT_BN_EPS
    }
    if not eps:
        return []
    first = next(iter(eps))
    return [
        f"{len(eps)} batch norms (e.g. {first}, eps {eps[first]:g}) do not use RVT's eps {RVT_BN_EPS:g}, so outputs "
        f"differ slightly from RVT's. Fix: bbox_head.norm_cfg=dict(type='BN', momentum=0.1, eps={RVT_BN_EPS:g})"
    ]


def _split(state_dict: Mapping[str, Tensor]) -> Tuple[Dict[str, Tensor], List[str]]:
    known = (RVT_BACKBONE_PREFIX, RVT_FPN_PREFIX, RVT_HEAD_PREFIX)
    state_dict = with_lightning_prefix(state_dict)
    return state_dict, [k for k in state_dict if not k.startswith(known)]


def load_rvt_detector(
    detector, checkpoint: Union[str, os.PathLike, Mapping[str, Tensor]], stem_mismatch: str = "error"
) -> RVTDetectorReport:
    """Load a whole RVT detector checkpoint into a ``RecurrentYOLOX``, every tensor, strictly.

    Args:
        detector: a ``RecurrentYOLOX`` whose neck is ``RVTPAFPN`` over three levels with
            ``out_channels`` (RVT's head width) and whose head is mmdet's ``YOLOXHead`` (or a
            subclass with its layers, e.g. ``SizeAwareYOLOXHead``).
        checkpoint: an official Lightning ``.ckpt`` or a state dict (``mdl.*`` or detector keys).
        stem_mismatch: ``'error'`` (default: a whole checkpoint should fit) or ``'reinit'``, as
            :func:`~rat_plugins.models.maxvit_rnn.load_rvt_checkpoint`.

    Returns:
        :class:`RVTDetectorReport` (also logged).

    Raises:
        ValueError: a key no part takes, or a part that does not fit (the message names the config
            key that fixes it).
    """
    from .yolox_rvt import RVTPAFPN

    if isinstance(checkpoint, Mapping):
        raw, meta, source = checkpoint, {}, "state dict"
    else:
        source = os.fspath(checkpoint)
        raw, meta = read_rvt_checkpoint(source)
    state_dict, unknown = _split(raw)
    if unknown:
        raise ValueError(
            f"{source}: keys outside RVT's detector ({unknown[:3]}{' ...' if len(unknown) > 3 else ''}); RVT "
            f"checkpoints hold only {RVT_BACKBONE_PREFIX}*, {RVT_FPN_PREFIX}* and {RVT_HEAD_PREFIX}*. Fix: point to "
            "an RVT Lightning checkpoint"
        )
    if not isinstance(detector.neck, RVTPAFPN) or detector.neck.net.out_convs is None:
        raise ValueError(
            f"{source}: RVT's head stems load into the neck's out_convs, so the neck must be "
            "type='RVTPAFPN' with out_channels = RVT's head width (int(256 * C_last / 1024)); this one is "
            f"{type(detector.neck).__name__}"
            + ("" if not isinstance(detector.neck, RVTPAFPN) else " without out_channels")
        )
    report = RVTDetectorReport(source=source, meta=meta)
    try:
        backbone = load_rvt_checkpoint(detector.backbone.net, state_dict, stem_mismatch)
    except ValueError as e:
        raise ValueError(f"{source}: backbone: {e}") from e
    report.backbone, report.stem = backbone.loaded, backbone.stem
    try:
        report.neck = load_rvt_fpn(detector.neck.net, state_dict)["loaded"]
    except ValueError as e:
        raise ValueError(f"{source}: PAFPN: {e}") from e
    report.head = load_rvt_head(detector.bbox_head, state_dict)
    consumed = report.loaded + (0 if report.stem == "loaded" else 1)
    if consumed != len(state_dict):  # every tensor of the file has a place: nothing silently dropped
        raise ValueError(
            f"{source}: {len(state_dict)} tensors in the checkpoint but {consumed} loaded; RVT's detector "
            "has tensors this model has no place for. Fix: build the model with the checkpoint's sizes"
        )
    report.warnings = _batch_norm_warnings(detector)
    logger.info("%s", report)
    for warning in report.warnings:
        logger.warning("%s: %s", source, warning)
    return report


def build_detector_from_config(config: str, cfg_options: Union[Mapping, None] = None):
    """The ``model`` of an mmdet config (with ``--cfg-options`` style overrides), in eval mode."""
    from mmdet.registry import MODELS
    from mmengine.config import Config
    from mmengine.registry import DefaultScope

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(dict(cfg_options))
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope", "mmdet")):
        detector = MODELS.build(cfg.model)
    return detector.eval()


def convert_rvt_checkpoint(
    rvt_checkpoint: Union[str, os.PathLike], out: Union[str, os.PathLike], detector
) -> RVTDetectorReport:
    """Write an mmengine checkpoint of ``detector`` filled from an RVT Lightning file.

    The file holds the detector's whole ``state_dict`` (so ``tools/test.py`` loads it strictly) and,
    under ``meta``, where it came from (``rvt_checkpoint``, RVT's epoch / global step). It is written
    to a temporary file and renamed, so an existing ``out`` is replaced only by a complete file.
    """
    from ..utils.atomic import atomic_path

    report = load_rvt_detector(detector, rvt_checkpoint)
    meta = dict(rvt_checkpoint=os.path.abspath(os.fspath(rvt_checkpoint)), rvt=dict(report.meta), report=str(report))
    state = {"meta": meta, "state_dict": {k: v.detach().cpu() for k, v in detector.state_dict().items()}}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    return report
