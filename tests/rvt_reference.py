"""RVT's detector step by step, evaluated straight from a state dict in RVT's official layout.

Written from RVT's code (github.com/uzh-rpg/RVT: ``models/detection/recurrent_backbone/maxvit_rnn.py``,
``models/layers/maxvit/maxvit.py``, ``models/layers/rnn.py``, ``yolox_extension/models/yolo_pafpn.py``,
``yolox/models/yolo_head.py``, ``yolox/utils/boxes.py``) as plain functions of tensors: it never
builds a module of the package, so a test comparing the package against it compares two
independent implementations. Eval mode throughout (batch norms on their running statistics).

``official_rvt_state_dict`` writes random weights under every key RVT's tiny-layout detector has
(``mdl.backbone.*``, ``mdl.fpn.*``, ``mdl.yolox_head.*``) with RVT's shapes.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torchvision

Tensor = torch.Tensor
BN_EPS = 1e-5  # PyTorch's default, which RVT's BaseConv keeps
LN_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# official keys and shapes


def _base_conv_shapes(prefix: str, cin: int, cout: int, k: int, groups: int = 1) -> Dict[str, tuple]:
    """RVT's BaseConv: ``conv`` (no bias) + ``bn``."""
    shapes = {f"{prefix}.conv.weight": (cout, cin // groups, k, k)}
    shapes.update({f"{prefix}.bn.{n}": (cout,) for n in ("weight", "bias", "running_mean", "running_var")})
    shapes[f"{prefix}.bn.num_batches_tracked"] = ()
    return shapes


def _csp_shapes(prefix: str, cin: int, cout: int, blocks: int) -> Dict[str, tuple]:
    hidden = cout // 2
    shapes = {}
    shapes.update(_base_conv_shapes(f"{prefix}.conv1", cin, hidden, 1))
    shapes.update(_base_conv_shapes(f"{prefix}.conv2", cin, hidden, 1))
    shapes.update(_base_conv_shapes(f"{prefix}.conv3", 2 * hidden, cout, 1))
    for b in range(blocks):
        shapes.update(_base_conv_shapes(f"{prefix}.m.{b}.conv1", hidden, hidden, 1))
        shapes.update(_base_conv_shapes(f"{prefix}.m.{b}.conv2", hidden, hidden, 3))
    return shapes


def official_rvt_shapes(
    embed_dim: int, in_chans: int = 20, patch: int = 4, num_classes: int = 3, fpn_blocks: int = 1
) -> Dict[str, tuple]:
    """Every key of an RVT detector (one block pair per stage, PAFPN on stages 2-4) and its shape."""
    dims = [embed_dim * 2**s for s in range(4)]
    shapes: Dict[str, tuple] = {}
    cin = in_chans
    for s, dim in enumerate(dims):
        p = f"mdl.backbone.stages.{s}."
        f = patch if s == 0 else 2
        shapes[p + "downsample_cf2cl.conv.weight"] = (dim, cin, 2 * f - 1, 2 * f - 1)
        shapes[p + "downsample_cf2cl.norm.weight"] = shapes[p + "downsample_cf2cl.norm.bias"] = (dim,)
        for kind in ("att_window", "att_grid"):
            q = f"{p}att_blocks.0.{kind}."
            if kind == "att_grid":  # the first window block of a stage takes the normed downsample output
                shapes[q + "norm1.weight"] = shapes[q + "norm1.bias"] = (dim,)
            shapes.update(
                {
                    q + "self_attn.qkv.weight": (3 * dim, dim),
                    q + "self_attn.qkv.bias": (3 * dim,),
                    q + "self_attn.proj.weight": (dim, dim),
                    q + "self_attn.proj.bias": (dim,),
                    q + "ls1.gamma": (dim,),
                    q + "norm2.weight": (dim,),
                    q + "norm2.bias": (dim,),
                    q + "mlp.net.0.0.weight": (4 * dim, dim),
                    q + "mlp.net.0.0.bias": (4 * dim,),
                    q + "mlp.net.2.weight": (dim, 4 * dim),
                    q + "mlp.net.2.bias": (dim,),
                    q + "ls2.gamma": (dim,),
                }
            )
        shapes[p + "lstm.conv1x1.weight"] = (4 * dim, 2 * dim, 1, 1)
        shapes[p + "lstm.conv1x1.bias"] = (4 * dim,)
        cin = dim

    c0, c1, c2 = dims[1:]
    fpn = "mdl.fpn."
    shapes.update(_base_conv_shapes(fpn + "lateral_conv0", c2, c1, 1))
    shapes.update(_csp_shapes(fpn + "C3_p4", 2 * c1, c1, fpn_blocks))
    shapes.update(_base_conv_shapes(fpn + "reduce_conv1", c1, c0, 1))
    shapes.update(_csp_shapes(fpn + "C3_p3", 2 * c0, c0, fpn_blocks))
    shapes.update(_base_conv_shapes(fpn + "bu_conv2", c0, c0, 3))
    shapes.update(_csp_shapes(fpn + "C3_n3", 2 * c0, c1, fpn_blocks))
    shapes.update(_base_conv_shapes(fpn + "bu_conv1", c1, c1, 3))
    shapes.update(_csp_shapes(fpn + "C3_n4", 2 * c1, c2, fpn_blocks))

    hidden = int(256 * c2 / 1024)  # RVT's head width
    head = "mdl.yolox_head."
    for i, c in enumerate((c0, c1, c2)):
        shapes.update(_base_conv_shapes(f"{head}stems.{i}", c, hidden, 1))
        for branch in ("cls_convs", "reg_convs"):
            for j in range(2):
                shapes.update(_base_conv_shapes(f"{head}{branch}.{i}.{j}", hidden, hidden, 3))
        for name, out in (("cls_preds", num_classes), ("reg_preds", 4), ("obj_preds", 1)):
            shapes[f"{head}{name}.{i}.weight"] = (out, hidden, 1, 1)
            shapes[f"{head}{name}.{i}.bias"] = (out,)
    return shapes


def official_rvt_state_dict(embed_dim: int = 16, num_classes: int = 3, seed: int = 0, **kwargs) -> Dict[str, Tensor]:
    """Random weights at every official key, scaled so activations stay of order one through the net.

    Prediction biases are set so that scores straddle the postprocess threshold (objectness / class
    logits near -1) and neighbouring boxes overlap enough for the NMS to act (about 4 strides wide).
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_rvt_shapes(embed_dim, num_classes=num_classes, **kwargs).items():
        if key.endswith("num_batches_tracked"):
            sd[key] = torch.tensor(100, dtype=torch.long)
        elif key.endswith("running_var") or key.endswith(("bn.weight", "norm.weight", "norm1.weight", "norm2.weight")):
            sd[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("gamma"):  # LayerScale: large enough that attention and MLP matter
            sd[key] = 0.3 * torch.randn(shape, generator=g)
        elif key.endswith("bias") and "reg_preds" in key:  # boxes about 4 strides wide: neighbours overlap
            sd[key] = torch.tensor([0.0, 0.0, 1.4, 1.4]) + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("bias") and ("cls_preds" in key or "obj_preds" in key):
            sd[key] = -1.0 + torch.randn(shape, generator=g)
        elif key.endswith("weight") and "_preds." in key:  # scores that differ from prior to prior
            sd[key] = 4.0 * torch.randn(shape, generator=g) / math.sqrt(math.prod(shape[1:]))
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        else:
            sd[key] = 0.1 * torch.randn(shape, generator=g)
    return sd


# ------------------------------------------------------------------------------------------------
# backbone (MaxViT-RNN), one time step


def _layer_norm(x: Tensor, sd, prefix: str) -> Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], LN_EPS)


def _window_partition(x: Tensor, p: Tuple[int, int]) -> Tensor:
    B, H, W, C = x.shape
    x = x.view(B, H // p[0], p[0], W // p[1], p[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, p[0] * p[1], C)


def _window_reverse(t: Tensor, p: Tuple[int, int], H: int, W: int) -> Tensor:
    C = t.shape[-1]
    x = t.view(-1, H // p[0], W // p[1], p[0], p[1], C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def _grid_partition(x: Tensor, p: Tuple[int, int]) -> Tensor:
    B, H, W, C = x.shape
    x = x.view(B, p[0], H // p[0], p[1], W // p[1], C)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, p[0] * p[1], C)


def _grid_reverse(t: Tensor, p: Tuple[int, int], H: int, W: int) -> Tensor:
    C = t.shape[-1]
    x = t.view(-1, H // p[0], W // p[1], p[0], p[1], C)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(-1, H, W, C)


def _attention(t: Tensor, sd, prefix: str, dim_head: int) -> Tensor:
    """RVT's channels-last attention: qkv viewed [tokens, heads, 3 * dim_head] (per-head q | k | v)."""
    N, T, C = t.shape
    heads = C // dim_head
    qkv = F.linear(t, sd[prefix + "qkv.weight"], sd[prefix + "qkv.bias"])
    q, k, v = qkv.view(N, T, heads, 3 * dim_head).transpose(1, 2).chunk(3, dim=3)
    attn = ((q @ k.transpose(-2, -1)) * dim_head**-0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(N, T, C)
    return F.linear(out, sd[prefix + "proj.weight"], sd[prefix + "proj.bias"])


def _partition_block(x: Tensor, sd, prefix: str, kind: str, p: Tuple[int, int], dim_head: int) -> Tensor:
    B, H, W, C = x.shape
    y = _layer_norm(x, sd, prefix + "norm1.") if prefix + "norm1.weight" in sd else x
    if kind == "window":
        y = _window_reverse(_attention(_window_partition(y, p), sd, prefix + "self_attn.", dim_head), p, H, W)
    else:
        y = _grid_reverse(_attention(_grid_partition(y, p), sd, prefix + "self_attn.", dim_head), p, H, W)
    x = x + sd[prefix + "ls1.gamma"] * y
    h = _layer_norm(x, sd, prefix + "norm2.")
    h = F.linear(
        F.gelu(F.linear(h, sd[prefix + "mlp.net.0.0.weight"], sd[prefix + "mlp.net.0.0.bias"])),
        *(
            sd[prefix + "mlp.net.2.weight"],
            sd[prefix + "mlp.net.2.bias"],
        ),
    )
    return x + sd[prefix + "ls2.gamma"] * h


def _lstm(x: Tensor, state: Optional[Tuple[Tensor, Tensor]], sd, prefix: str) -> Tuple[Tensor, Tensor]:
    h, c = state if state is not None else (torch.zeros_like(x), torch.zeros_like(x))
    mix = F.conv2d(torch.cat([x, h], 1), sd[prefix + "conv1x1.weight"], sd[prefix + "conv1x1.bias"])
    dim = x.shape[1]
    gates, cell_input = torch.tensor_split(mix, [3 * dim], dim=1)
    forget, inp, out = torch.tensor_split(torch.sigmoid(gates), 3, dim=1)
    c = forget * c + inp * torch.tanh(cell_input)
    return out * torch.tanh(c), c


def backbone_step(
    sd: Dict[str, Tensor],
    x: Tensor,
    states: Optional[List[Tuple[Tensor, Tensor]]],
    patch: int = 4,
    dim_head: int = 8,
    partition_split: int = 1,
) -> Tuple[List[Tensor], List[Tuple[Tensor, Tensor]]]:
    """One step of RVT's ``RNNDetector.forward``: stage maps 1-4 (NCHW) and the new LSTM states.

    ``x`` must already be padded to a multiple of ``32 * partition_split``; the partition size is
    the padded size divided by that multiple, the same in every stage (RVT's config modifier).
    """
    multiple = 32 * partition_split
    partition = (x.shape[-2] // multiple, x.shape[-1] // multiple)
    states = states or [None] * 4
    maps, new_states = [], []
    for s in range(4):
        p = f"mdl.backbone.stages.{s}."
        w = sd[p + "downsample_cf2cl.conv.weight"]
        f = patch if s == 0 else 2
        x = F.conv2d(x, w, stride=f, padding=(w.shape[-1] - 1) // 2)
        x = _layer_norm(x.permute(0, 2, 3, 1), sd, p + "downsample_cf2cl.norm.")
        x = _partition_block(x, sd, p + "att_blocks.0.att_window.", "window", partition, dim_head)
        x = _partition_block(x, sd, p + "att_blocks.0.att_grid.", "grid", partition, dim_head)
        h, c = _lstm(x.permute(0, 3, 1, 2), states[s], sd, p + "lstm.")
        maps.append(h)
        new_states.append((h, c))
        x = h
    return maps, new_states


# ------------------------------------------------------------------------------------------------
# PAFPN and head


def base_conv(sd, name: str, x: Tensor, stride: int = 1, groups: int = 1) -> Tensor:
    """RVT's BaseConv (conv, eval batch norm, SiLU) from ``<name>.conv`` / ``<name>.bn``."""
    w = sd[f"{name}.conv.weight"]
    x = F.conv2d(x, w, stride=stride, padding=(w.shape[-1] - 1) // 2, groups=groups)
    bn = f"{name}.bn."
    x = F.batch_norm(x, sd[bn + "running_mean"], sd[bn + "running_var"], sd[bn + "weight"], sd[bn + "bias"], eps=BN_EPS)
    return F.silu(x)


def csp(sd, name: str, x: Tensor) -> Tensor:
    """RVT's CSPLayer without shortcut: ``conv3(cat[m(conv1(x)), conv2(x)])``."""
    a = base_conv(sd, f"{name}.conv1", x)
    b = 0
    while f"{name}.m.{b}.conv1.conv.weight" in sd:
        a = base_conv(sd, f"{name}.m.{b}.conv2", base_conv(sd, f"{name}.m.{b}.conv1", a))
        b += 1
    return base_conv(sd, f"{name}.conv3", torch.cat([a, base_conv(sd, f"{name}.conv2", x)], 1))


def pafpn(sd, feats: Sequence[Tensor], prefix: str = "mdl.fpn.") -> Tuple[Tensor, Tensor, Tensor]:
    """RVT's three-level ``YOLOPAFPN.forward`` (nearest-exact 2x upsampling)."""

    def up(x):
        return F.interpolate(x, scale_factor=2, mode="nearest-exact")

    x2, x1, x0 = feats
    fpn_out0 = base_conv(sd, prefix + "lateral_conv0", x0)
    f_out0 = csp(sd, prefix + "C3_p4", torch.cat([up(fpn_out0), x1], 1))
    fpn_out1 = base_conv(sd, prefix + "reduce_conv1", f_out0)
    pan_out2 = csp(sd, prefix + "C3_p3", torch.cat([up(fpn_out1), x2], 1))
    pan_out1 = csp(sd, prefix + "C3_n3", torch.cat([base_conv(sd, prefix + "bu_conv2", pan_out2, 2), fpn_out1], 1))
    pan_out0 = csp(sd, prefix + "C3_n4", torch.cat([base_conv(sd, prefix + "bu_conv1", pan_out1, 2), fpn_out0], 1))
    return pan_out2, pan_out1, pan_out0


def head_raw(sd, feats: Sequence[Tensor], prefix: str = "mdl.yolox_head.") -> List[Tuple[Tensor, Tensor, Tensor]]:
    """Per level ``(reg [B, 4, H, W], obj logits [B, 1, H, W], class logits [B, C, H, W])``."""
    out = []
    for k, x in enumerate(feats):
        x = base_conv(sd, f"{prefix}stems.{k}", x)
        cls_feat = base_conv(sd, f"{prefix}cls_convs.{k}.1", base_conv(sd, f"{prefix}cls_convs.{k}.0", x))
        reg_feat = base_conv(sd, f"{prefix}reg_convs.{k}.1", base_conv(sd, f"{prefix}reg_convs.{k}.0", x))

        out.append(
            tuple(
                F.conv2d(feat, sd[f"{prefix}{name}.{k}.weight"], sd[f"{prefix}{name}.{k}.bias"])
                for name, feat in (("reg_preds", reg_feat), ("obj_preds", reg_feat), ("cls_preds", cls_feat))
            )
        )
    return out


def decode(raw: Sequence[Tuple[Tensor, Tensor, Tensor]], strides: Sequence[int]) -> Tensor:
    """RVT's inference output ``[B, priors, 5 + C]``: cx, cy, w, h in input pixels, objectness and
    class probabilities (``cat[reg, obj.sigmoid(), cls.sigmoid()]``, then ``decode_outputs``)."""
    outputs, grids, level_strides = [], [], []
    for (reg, obj, cls), stride in zip(raw, strides):
        outputs.append(torch.cat([reg, obj.sigmoid(), cls.sigmoid()], 1).flatten(start_dim=2))
        h, w = reg.shape[-2:]
        yv, xv = torch.meshgrid(torch.arange(h, dtype=reg.dtype), torch.arange(w, dtype=reg.dtype), indexing="ij")
        grids.append(torch.stack((xv, yv), 2).view(1, -1, 2))
        level_strides.append(torch.full((1, h * w, 1), float(stride)))
    out = torch.cat(outputs, dim=2).permute(0, 2, 1)
    grid, stride = torch.cat(grids, 1), torch.cat(level_strides, 1)
    return torch.cat([(out[..., :2] + grid) * stride, torch.exp(out[..., 2:4]) * stride, out[..., 4:]], dim=-1)


def postprocess(prediction: Tensor, num_classes: int, conf_thre: float = 0.1, nms_thre: float = 0.45) -> List[Tensor]:
    """RVT's ``postprocess``: per image ``[N, 7]`` = x1, y1, x2, y2, obj, class conf, class (class-wise NMS)."""
    boxes = torch.cat(
        [prediction[..., :2] - prediction[..., 2:4] / 2, prediction[..., :2] + prediction[..., 2:4] / 2], -1
    )
    prediction = torch.cat([boxes, prediction[..., 4:]], -1)
    output = []
    for image_pred in prediction:
        class_conf, class_pred = torch.max(image_pred[:, 5 : 5 + num_classes], 1, keepdim=True)
        conf_mask = image_pred[:, 4] * class_conf.squeeze(1) >= conf_thre
        detections = torch.cat((image_pred[:, :5], class_conf, class_pred.float()), 1)[conf_mask]
        keep = torchvision.ops.batched_nms(
            detections[:, :4], detections[:, 4] * detections[:, 5], detections[:, 6], nms_thre
        )
        output.append(detections[keep])
    return output


# ------------------------------------------------------------------------------------------------
# loss (RVT's YOLOXHead.get_losses with its SimOTA)


def _bboxes_iou_cxcywh(a: Tensor, b: Tensor) -> Tensor:
    tl = torch.max(a[:, None, :2] - a[:, None, 2:] / 2, b[:, :2] - b[:, 2:] / 2)
    br = torch.min(a[:, None, :2] + a[:, None, 2:] / 2, b[:, :2] + b[:, 2:] / 2)
    area_a, area_b = torch.prod(a[:, 2:], 1), torch.prod(b[:, 2:], 1)
    en = (tl < br).type(tl.type()).prod(dim=2)
    area_i = torch.prod(br - tl, 2) * en
    return area_i / (area_a[:, None] + area_b - area_i)


def _iou_loss(pred: Tensor, target: Tensor) -> Tensor:
    tl = torch.max(pred[:, :2] - pred[:, 2:] / 2, target[:, :2] - target[:, 2:] / 2)
    br = torch.min(pred[:, :2] + pred[:, 2:] / 2, target[:, :2] + target[:, 2:] / 2)
    area_p, area_g = torch.prod(pred[:, 2:], 1), torch.prod(target[:, 2:], 1)
    en = (tl < br).type(tl.type()).prod(dim=1)
    area_i = torch.prod(br - tl, 1) * en
    iou = area_i / (area_p + area_g - area_i + 1e-16)
    return 1 - iou**2


def _assign(gt_boxes, gt_classes, box_preds, strides, x_shifts, y_shifts, cls_logits, obj_logits, num_classes):
    """RVT's ``get_assignments``: centre-region candidates (1.5 strides), SimOTA dynamic k."""
    x_centres = ((x_shifts + 0.5) * strides)[None]
    y_centres = ((y_shifts + 0.5) * strides)[None]
    reach = strides[None] * 1.5
    deltas = torch.stack(
        [
            x_centres - (gt_boxes[:, 0:1] - reach),
            y_centres - (gt_boxes[:, 1:2] - reach),
            (gt_boxes[:, 0:1] + reach) - x_centres,
            (gt_boxes[:, 1:2] + reach) - y_centres,
        ],
        2,
    )
    in_centres = deltas.min(dim=-1).values > 0.0
    fg_mask = in_centres.sum(dim=0) > 0
    geometry = in_centres[:, fg_mask]
    preds = box_preds[fg_mask]
    ious = _bboxes_iou_cxcywh(gt_boxes, preds)
    onehot = F.one_hot(gt_classes.long(), num_classes).float()
    scores = (cls_logits[fg_mask].float().sigmoid() * obj_logits[fg_mask].float().sigmoid()).sqrt()
    num_gt, num_cand = gt_boxes.shape[0], preds.shape[0]
    cls_cost = F.binary_cross_entropy(
        scores[None].repeat(num_gt, 1, 1), onehot[:, None].repeat(1, num_cand, 1), reduction="none"
    ).sum(-1)
    cost = cls_cost + 3.0 * -torch.log(ious + 1e-8) + 1e6 * (~geometry)

    matching = torch.zeros_like(cost, dtype=torch.uint8)
    topk_ious, _ = torch.topk(ious, min(10, ious.size(1)), dim=1)
    dynamic_ks = torch.clamp(topk_ious.sum(1).int(), min=1)
    for g in range(num_gt):
        _, pos = torch.topk(cost[g], k=int(dynamic_ks[g]), largest=False)
        matching[g][pos] = 1
    per_anchor = matching.sum(0)
    if per_anchor.max() > 1:
        multiple = per_anchor > 1
        _, argmin = torch.min(cost[:, multiple], dim=0)
        matching[:, multiple] *= 0
        matching[argmin, multiple] = 1
    fg_in = matching.sum(0) > 0
    fg_mask = fg_mask.clone()
    fg_mask[fg_mask.clone()] = fg_in
    matched = matching[:, fg_in].argmax(0)
    pred_ious = (matching * ious).sum(0)[fg_in]
    return gt_classes[matched], fg_mask, pred_ious, matched


def yolox_loss(
    raw: Sequence[Tuple[Tensor, Tensor, Tensor]], strides: Sequence[int], labels: Sequence[Tensor], num_classes: int
) -> Dict[str, Tensor]:
    """RVT's training loss for per-level raw outputs and per-image labels ``[n, 5]`` = class, cx, cy, w, h.

    Returns RVT's terms: ``iou_loss`` (already times 5), ``conf_loss``, ``cls_loss`` and ``loss``.
    """
    outputs, xs, ys, ss = [], [], [], []
    for (reg, obj, cls), stride in zip(raw, strides):
        B, _, h, w = reg.shape
        out = torch.cat([reg, obj, cls], 1).permute(0, 2, 3, 1).reshape(B, h * w, -1)
        yv, xv = torch.meshgrid(torch.arange(h, dtype=reg.dtype), torch.arange(w, dtype=reg.dtype), indexing="ij")
        grid = torch.stack((xv, yv), 2).view(-1, 2)
        out = torch.cat([(out[..., :2] + grid) * stride, torch.exp(out[..., 2:4]) * stride, out[..., 4:]], -1)
        outputs.append(out)
        xs.append(grid[:, 0])
        ys.append(grid[:, 1])
        ss.append(torch.full((h * w,), float(stride)))
    outputs = torch.cat(outputs, 1)
    x_shifts, y_shifts, strides_all = torch.cat(xs), torch.cat(ys), torch.cat(ss)
    box_preds, obj_preds, cls_preds = outputs[..., :4], outputs[..., 4:5], outputs[..., 5:]

    cls_targets, reg_targets, obj_targets, fg_masks, num_fg = [], [], [], [], 0
    for b, lab in enumerate(labels):
        if lab.shape[0] == 0:
            cls_targets.append(outputs.new_zeros((0, num_classes)))
            reg_targets.append(outputs.new_zeros((0, 4)))
            obj_targets.append(outputs.new_zeros((outputs.shape[1], 1)))
            fg_masks.append(outputs.new_zeros(outputs.shape[1]).bool())
            continue
        with torch.no_grad():
            classes, fg_mask, pred_ious, matched = _assign(
                lab[:, 1:5],
                lab[:, 0],
                box_preds[b],
                strides_all,
                x_shifts,
                y_shifts,
                cls_preds[b],
                obj_preds[b],
                num_classes,
            )
        num_fg += int(fg_mask.sum())
        cls_targets.append(F.one_hot(classes.long(), num_classes) * pred_ious[:, None])
        reg_targets.append(lab[matched, 1:5])
        obj_targets.append(fg_mask[:, None].to(outputs.dtype))
        fg_masks.append(fg_mask)
    cls_t, reg_t, obj_t, fg = map(torch.cat, (cls_targets, reg_targets, obj_targets, fg_masks))
    num_fg = max(num_fg, 1)
    bce = torch.nn.BCEWithLogitsLoss(reduction="none")
    iou_loss = 5.0 * _iou_loss(box_preds.reshape(-1, 4)[fg], reg_t).sum() / num_fg
    conf_loss = bce(obj_preds.reshape(-1, 1), obj_t).sum() / num_fg
    cls_loss = bce(cls_preds.reshape(-1, num_classes)[fg], cls_t).sum() / num_fg
    return dict(loss=iou_loss + conf_loss + cls_loss, iou_loss=iou_loss, conf_loss=conf_loss, cls_loss=cls_loss)
