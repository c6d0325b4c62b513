"""RVT's neck, its SimOTA assigner and a size-aware YOLOX head for mmdet: ``type='RVTPAFPN'``,
``type='RVTSimOTAAssigner'``, ``type='SizeAwareYOLOXHead'``."""

from typing import Optional, Sequence, Tuple

import torch
from mmdet.models.dense_heads import YOLOXHead
from mmdet.models.task_modules.assigners import SimOTAAssigner
from mmdet.models.utils import multi_apply
from mmdet.registry import MODELS as MMDET_MODELS, TASK_UTILS as MMDET_TASK_UTILS
from mmdet.utils import OptInstanceList, reduce_mean
from mmengine.model import BaseModule
from torch import Tensor

from ..models.size_aware_loss import box_areas, check_size_weight_args, size_aware_weights
from ..models.yolox_pafpn import YoloxPafpn, load_rvt_fpn

__all__ = ["RVTPAFPN", "RVTSimOTAAssigner", "SizeAwareYOLOXHead"]


@MMDET_MODELS.register_module()
class RVTPAFPN(BaseModule):
    """:class:`rat_plugins.models.yolox_pafpn.YoloxPafpn` as an mmdet neck (tuple in, tuple out).

    Args:
        in_channels: backbone channels of the inputs, fine to coarse (e.g. ``MaxViTRNN.out_channels``).
        depth: CSP depth multiplier (RVT tiny 0.33, small / base 0.67).
        depthwise: depthwise-separable 3x3 convs.
        act: ``silu`` / ``relu`` / ``lrelu``.
        out_channels: None keeps per-level channels (RVT); mmdet's ``YOLOXHead`` needs one width, so
            set it to the head's ``in_channels`` (RVT's head width is ``int(256 * C_last / 1024)``;
            the 1x1 ``out_convs`` are RVT's head ``stems``).
        checkpoint: an official RVT Lightning checkpoint whose ``mdl.fpn.*`` (and, with
            ``out_channels``, ``mdl.yolox_head.stems.*``) weights :meth:`init_weights` loads strictly;
            three levels only.
        init_cfg: mmengine init config (None: PyTorch's default init, as RVT).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        depth: float = 1.0,
        depthwise: bool = False,
        act: str = "silu",
        out_channels: Optional[int] = None,
        checkpoint: Optional[str] = None,
        init_cfg=None,
    ):
        super().__init__(init_cfg)
        self.net = YoloxPafpn(in_channels, depth=depth, depthwise=depthwise, act=act, out_channels=out_channels)
        self.checkpoint = checkpoint or None
        self.checkpoint_report = None

    @property
    def out_channels(self) -> Tuple[int, ...]:
        return self.net.out_channels

    def init_weights(self):
        super().init_weights()
        if self.checkpoint:
            self.checkpoint_report = load_rvt_fpn(self.net, self.checkpoint)

    def forward(self, inputs: Sequence[Tensor]) -> Tuple[Tensor, ...]:
        return self.net(inputs)


@MMDET_TASK_UTILS.register_module()
class RVTSimOTAAssigner(SimOTAAssigner):
    """mmdet's SimOTA with the candidate rule of RVT's YOLOX (``get_geometry_constraint``).

    mmdet's assigner (the original YOLOX's) takes as candidates the priors whose centre lies inside
    a ground-truth box *or* within ``center_radius`` (2.5) strides of its centre, and penalises
    pairs that are not both. RVT's head (a later YOLOX version) takes only the priors within 1.5
    strides of a box centre, and penalises pairs outside that centre region. Costs (class BCE on
    ``sqrt(cls * obj)``, ``3 * -log IoU``), dynamic k (top 10 IoUs) and the tie rule are the same
    in both, so with this assigner mmdet's ``YOLOXHead`` loss is RVT's.

    Args:
        center_radius: the centre region's half size in strides (RVT: 1.5).
        **kwargs: ``SimOTAAssigner`` arguments.
    """

    def __init__(self, center_radius: float = 1.5, **kwargs):
        super().__init__(center_radius=center_radius, **kwargs)

    def get_in_gt_and_in_center_info(self, priors: Tensor, gt_bboxes: Tensor) -> Tuple[Tensor, Tensor]:
        """``(candidate mask [priors], in-centre mask [candidates, gts])``; priors are centre points."""
        x, y = priors[:, 0:1], priors[:, 1:2]
        reach_x, reach_y = self.center_radius * priors[:, 2:3], self.center_radius * priors[:, 3:4]
        gt_cx = (gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2.0
        gt_cy = (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2.0
        # the four margins to the centre region's sides, all positive inside (RVT's form, so that
        # priors on a side fall out the same way)
        margins = torch.stack(
            [x - (gt_cx - reach_x), y - (gt_cy - reach_y), (gt_cx + reach_x) - x, (gt_cy + reach_y) - y], dim=-1
        )
        in_centre = margins.min(dim=-1).values > 0.0  # [priors, gts]
        candidates = in_centre.any(dim=1)
        return candidates, in_centre[candidates]


@MMDET_MODELS.register_module()
class SizeAwareYOLOXHead(YOLOXHead):
    """mmdet's ``YOLOXHead`` whose positive-sample loss terms are weighted by object size.

    Everything but the loss reduction is mmdet's: layers, SimOTA assignment and targets
    (``_get_targets_single``, unchanged), the loss modules, inference. Each positive prior gets the
    weight :func:`rat_plugins.models.size_aware_loss.size_aware_weights` gives the area of its
    assigned ground-truth box (``bbox_target`` from ``_get_targets_single`` already is that box,
    xyxy in network-input pixels, so no extra target is needed): 1 for large objects,
    ``size_aware_weight`` for all small ones.

    Weighted terms (``weighted_losses``, all by default): ``bbox`` (IoU loss) and ``l1`` (positives
    only), ``cls`` (computed on positives only, all classes of a positive share its weight), and
    ``obj`` for its positive entries; negative objectness entries keep weight 1, because they
    belong to no object and size says nothing about them.

    Normalisation (``normalizer``): mmdet divides every term by ``N = max(mean over GPUs of
    num_pos, 1)``.

    - ``'num_pos'`` (default) keeps that ``N``: weights are true per-object multipliers, so small
      objects' terms grow by up to ``W`` in absolute size and the total loss by the batch's mean
      weight (at most ``W``), e.g. a batch of only small objects has exactly ``W`` times mmdet's
      bbox / cls / l1 loss. This is what "a small object counts W times" means.
    - ``'weight_sum'`` divides each term by ``max(mean over GPUs of the sum of that term's weights
      over the positives, 1)`` instead (``num_pos`` again for an unweighted term): a weighted mean,
      so the loss scale stays mmdet's and only the balance between objects of different sizes
      changes (a batch of only small objects gives mmdet's loss back).

    With ``size_aware_weight=1`` both reduce to mmdet's ``YOLOXHead`` loss.

    Args:
        size_aware_weight: ``W`` (> 0).
        small_threshold: area (px²) up to which the full weight applies (COCO small: 32² = 1024).
        medium_threshold: area (px²) from which the weight is 1 (COCO large: 96² = 9216).
        weight_type: ``exponential`` / ``linear`` / ``step``.
        weighted_losses: subset of ``('bbox', 'cls', 'obj', 'l1')`` to weight.
        normalizer: ``'num_pos'`` or ``'weight_sum'``.
        **kwargs: ``YOLOXHead`` arguments.
    """

    LOSS_TERMS = ("bbox", "cls", "obj", "l1")

    def __init__(
        self,
        *args,
        size_aware_weight: float = 2.0,
        small_threshold: float = 1024.0,
        medium_threshold: float = 9216.0,
        weight_type: str = "exponential",
        weighted_losses: Sequence[str] = LOSS_TERMS,
        normalizer: str = "num_pos",
        **kwargs,
    ):
        check_size_weight_args(size_aware_weight, small_threshold, medium_threshold, weight_type)
        unknown = set(weighted_losses) - set(self.LOSS_TERMS)
        if unknown:
            raise ValueError(f"weighted_losses must be a subset of {self.LOSS_TERMS}, got unknown {sorted(unknown)}")
        if normalizer not in ("num_pos", "weight_sum"):
            raise ValueError(f"normalizer must be 'num_pos' or 'weight_sum', got {normalizer!r}")
        super().__init__(*args, **kwargs)
        self.size_aware_weight = float(size_aware_weight)
        self.small_threshold = float(small_threshold)
        self.medium_threshold = float(medium_threshold)
        self.weight_type = weight_type
        self.weighted_losses = tuple(weighted_losses)
        self.normalizer = normalizer

    def size_weights(self, gt_bboxes: Tensor) -> Tensor:
        """Weights of positives from their assigned ground-truth boxes (xyxy)."""
        return size_aware_weights(
            box_areas(gt_bboxes), self.size_aware_weight, self.small_threshold, self.medium_threshold, self.weight_type
        )

    def _normalizer(self, weights: Tensor, num_pos: int):
        """``max(mean over GPUs of (num_pos or the sum of weights), 1)``, mmdet's form."""
        if self.normalizer == "weight_sum":
            total = weights.detach().float().sum()
        else:
            total = torch.tensor(float(num_pos), dtype=torch.float, device=weights.device)
        return max(reduce_mean(total), 1.0)

    def loss_by_feat(
        self,
        cls_scores: Sequence[Tensor],
        bbox_preds: Sequence[Tensor],
        objectnesses: Sequence[Tensor],
        batch_gt_instances,
        batch_img_metas: Sequence[dict],
        batch_gt_instances_ignore: OptInstanceList = None,
    ) -> dict:
        """``YOLOXHead.loss_by_feat`` with per-positive size weights (same arguments and keys)."""
        num_imgs = len(batch_img_metas)
        if batch_gt_instances_ignore is None:
            batch_gt_instances_ignore = [None] * num_imgs

        def flatten(maps: Sequence[Tensor], channels: int) -> Tensor:  # levels -> [B, priors, channels]
            return torch.cat([m.permute(0, 2, 3, 1).reshape(num_imgs, -1, channels) for m in maps], dim=1)

        priors = torch.cat(
            self.prior_generator.grid_priors(
                [s.shape[2:] for s in cls_scores],
                dtype=cls_scores[0].dtype,
                device=cls_scores[0].device,
                with_stride=True,
            )
        )
        cls_flat = flatten(cls_scores, self.cls_out_channels)
        reg_flat = flatten(bbox_preds, 4)
        obj_flat = flatten(objectnesses, 1)[..., 0]
        decoded = self._bbox_decode(priors, reg_flat)

        pos_masks, cls_targets, obj_targets, bbox_targets, l1_targets, num_pos_per_img = multi_apply(
            self._get_targets_single,
            priors.unsqueeze(0).repeat(num_imgs, 1, 1),
            cls_flat.detach(),
            decoded.detach(),
            obj_flat.detach(),
            batch_gt_instances,
            batch_img_metas,
            batch_gt_instances_ignore,
        )
        # per image, positives come in prior order, so they line up with the masked predictions below
        pos_mask = torch.cat(pos_masks, 0)
        cls_targets = torch.cat(cls_targets, 0)
        obj_targets = torch.cat(obj_targets, 0)
        bbox_targets = torch.cat(bbox_targets, 0)
        num_pos = sum(num_pos_per_img)

        weights = self.size_weights(bbox_targets).to(cls_flat.dtype)  # [num_pos]
        ones = torch.ones_like(weights)
        w = {term: weights if term in self.weighted_losses else ones for term in self.LOSS_TERMS}
        if self.normalizer == "weight_sum":  # each term is a weighted mean over its own weights
            norm = {term: self._normalizer(w[term], num_pos) for term in self.LOSS_TERMS}
        else:  # one all-reduce, as mmdet
            norm = dict.fromkeys(self.LOSS_TERMS, self._normalizer(weights, num_pos))

        obj_weights = torch.ones_like(obj_targets)
        obj_weights[pos_mask] = w["obj"].unsqueeze(-1)
        losses = dict(loss_obj=self.loss_obj(obj_flat.reshape(-1, 1), obj_targets, weight=obj_weights) / norm["obj"])
        if num_pos > 0:
            losses["loss_cls"] = (
                self.loss_cls(
                    cls_flat.reshape(-1, self.num_classes)[pos_mask], cls_targets, weight=w["cls"].unsqueeze(-1)
                )
                / norm["cls"]
            )
            losses["loss_bbox"] = (
                self.loss_bbox(decoded.reshape(-1, 4)[pos_mask], bbox_targets, weight=w["bbox"]) / norm["bbox"]
            )
        else:  # zero losses that still reach every branch (mmdet issue 7298)
            losses["loss_cls"] = cls_flat.sum() * 0
            losses["loss_bbox"] = decoded.sum() * 0
        if self.use_l1:
            if num_pos > 0:
                losses["loss_l1"] = (
                    self.loss_l1(
                        reg_flat.reshape(-1, 4)[pos_mask], torch.cat(l1_targets, 0), weight=w["l1"].unsqueeze(-1)
                    )
                    / norm["l1"]
                )
            else:
                losses["loss_l1"] = reg_flat.sum() * 0
        return {k: losses[k] for k in ("loss_cls", "loss_bbox", "loss_obj", "loss_l1") if k in losses}
