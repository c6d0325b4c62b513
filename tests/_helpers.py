"""Helpers shared by the test modules (import them as ``from _helpers import ...``)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cmd(args, cwd=REPO, env=None, timeout=900, check=True):
    """Run a command with the test interpreter first on PATH; return the CompletedProcess."""
    full_env = dict(os.environ)
    full_env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + full_env.get("PATH", "")
    full_env["PYTHON"] = sys.executable
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    proc = subprocess.run(args, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout ---\n{proc.stdout[-6000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def detectron2_stock_tool() -> Path:
    """detectron2's own tools/lazyconfig_train_net.py, as the wheel installs it in site-packages."""
    import importlib.util

    spec = importlib.util.find_spec("tools.lazyconfig_train_net")
    assert spec is not None and "site-packages" in spec.origin, spec
    return Path(spec.origin)


# A 2-layer, 32-wide ViM on 64x64 images and few proposals per image keep every detectron2 OFAT run to
# seconds on 2 CPU cores (the 4-conv box heads over 512 sampled RoIs per image cost ~10 s a step otherwise).
TINY = [
    "dataloader.image_size=64",
    "model.backbone.net.depth=2",
    "model.backbone.net.embed_dim=32",
    "model.backbone.net.checkpoint=",
    "model.roi_heads.batch_size_per_image=16",
    "model.proposal_generator.pre_nms_topk=[64,64]",
    "model.proposal_generator.post_nms_topk=[32,32]",
    "dataloader.train.num_workers=0",
    "dataloader.test.num_workers=0",
    "dataloader.final_test.num_workers=0",
    "train.device=cpu",
    "train.log_period=1",
]


def assert_same_weights(path, reference, key: str) -> None:
    """The checkpoints' weights (``checkpoint[key]``) are equal tensor for tensor."""
    import torch

    weights, expected = (torch.load(p, map_location="cpu", weights_only=False)[key] for p in (path, reference))
    assert weights.keys() == expected.keys()
    differing = [k for k in expected if not torch.equal(weights[k], expected[k])]
    assert not differing, f"{len(differing)} of {len(expected)} tensors differ, e.g. {differing[:3]}"


def tiny_ofat_command(out, *flags, batch: int = 2):
    """tools/lazyconfig_train_net.py on the OFAT baseline at TINY sizes, one epoch of the 8-image sample
    (``batch`` images a step), logging every iteration, into ``out``; ``flags`` go before the overrides."""
    import sys

    config = REPO / "projects/ViTDet/configs/OFAT/baseline_lr0.001_bs8_adamw_ep100.py"
    return [
        sys.executable,
        "tools/lazyconfig_train_net.py",
        "--config-file",
        str(config),
        *flags,
        *TINY,
        "train.epochs=1",
        f"dataloader.train.total_batch_size={batch}",
        "train.warmup_iters=1",
        "train.log_period=1",
        f"train.output_dir={out}",
    ]


def reference_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan written out one time step at a time (mamba-ssm's semantics): (y, last state)."""
    import torch
    import torch.nn.functional as F

    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    per_group = dim // B.shape[1]
    s = u.new_zeros(batch, dim, A.shape[1])
    ys = []
    for t in range(L):
        Bt = B[:, :, :, t].repeat_interleave(per_group, dim=1)  # [batch, dim, state]
        Ct = C[:, :, :, t].repeat_interleave(per_group, dim=1)
        s = torch.exp(delta[:, :, t, None] * A) * s + (delta[:, :, t] * u[:, :, t])[:, :, None] * Bt
        ys.append((Ct * s).sum(-1))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(batch, dim, 0)
    if D is not None:
        y = y + D[:, None] * u
    if z is not None:
        y = y * F.silu(z)
    return y, s


def recurrent_yolox_cfg(embed_dim=8, num_classes=3, head_width=8, patch_size=4, out_indices=(1, 2, 3), **overrides):
    """A small mmdet ``RecurrentYOLOX``: MaxViT-RNN (tiny layout at ``embed_dim``, head dim 8,
    ``partition_split`` 1) -> RVT PAFPN with head stems of ``head_width`` -> mmdet's YOLOX head, RVT's
    SimOTA assigner, every score kept. ``overrides``: top-level keys; a dict updates that part."""
    from mmengine.config import ConfigDict

    cfg = dict(
        type="RecurrentYOLOX",
        data_preprocessor=dict(type="EventClipDataPreprocessor"),
        backbone=dict(
            type="MaxViTRNN",
            variant="tiny",
            embed_dim=embed_dim,
            dim_head=8,
            patch_size=patch_size,
            partition_split=1,
            out_indices=tuple(out_indices),
        ),
        neck=dict(
            type="RVTPAFPN", in_channels=[embed_dim * 2**i for i in out_indices], depth=0.33, out_channels=head_width
        ),
        bbox_head=dict(
            type="YOLOXHead",
            num_classes=num_classes,
            in_channels=head_width,
            feat_channels=head_width,
            strides=tuple(patch_size * 2**i for i in out_indices),
        ),
        train_cfg=dict(assigner=dict(type="RVTSimOTAAssigner")),
        test_cfg=dict(score_thr=0.0, nms=dict(type="nms", iou_threshold=0.45)),
    )
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return ConfigDict(cfg)  # a ConfigDict, as the Runner passes (heads read cfg.score_thr)
