# Positive control of the RAT study, single scale: the context task (data: `python -m
# rat_plugins.data.synthetic isic-context --out datasets/isic2018`; the lesion counts only when the
# image is dark from 0.39 of the side around it, 18+ pixels beyond its edge at 64x64). Attention is
# local everywhere: one block, kernels 3, grouping windows of 3 tokens, per-token heads, each
# multi-resolution token sees 4 tokens of each level each side, so a level-0 output sees 14 pixels
# each side, decoder (FPNHead on the level-0 map, no global pooling) included: this model cannot see
# the surround. Run by tools/run_rat_controls.py.
_base_ = [
    "../_base_/models/rat_uper.py",
    "../_base_/datasets/isic2018.py",
    "../../../_base_/schedules/mmseg_adamw_cosine_20k.py",
    "../../../_base_/mmseg_runtime.py",
]
norm_cfg = dict(type="BN", requires_grad=True)
width = 16
model = dict(
    data_preprocessor=dict(size=(64, 64)),
    backbone=dict(
        feature_dims=width,
        num_blocks=1,
        num_heads=4,
        iters=1,
        sga_kernel_size=3,
        proj_kernel_size=3,
        scales=(1.0,),
        attention="local",
        local_window=dict(neighborhood_kernel=3),
        mr_window=4,
        head_layout="per_token",
    ),
    decode_head=dict(
        _delete_=True,
        type="FPNHead",
        in_channels=[width],
        in_index=(0,),  # the one map of a single level (stride 2)
        feature_strides=[2],
        channels=width,
        dropout_ratio=0.1,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        # the lesion (about 1 % of the pixels) weighs 10x: a model that cannot tell the two surrounds
        # apart then marks every lesion (Dice about 67) instead of none, and one that can scores near 100
        loss_decode=dict(
            type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True, class_weight=[1.0, 10.0]
        ),
        # PyTorch's default init for the classifier: with mmseg's (normal, std 0.01) a few hundred
        # iterations end predicting no lesion at all, whatever the model sees
        init_cfg=None,
    ),
)
# a short run (tools/run_rat_controls.py: a few hundred iterations): ten times the study's lr
optim_wrapper = dict(optimizer=dict(lr=1e-2))
