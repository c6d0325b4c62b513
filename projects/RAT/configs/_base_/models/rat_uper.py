# RAT backbone (rat_plugins.mm.rat.RAT) + mmseg UPerHead on every map; 2 classes (background, lesion).
# Maps: one per pyramid level and block, named level<l>_block<b>, stride 2 ** (level + block + 1)
# (grouping conv kernel 5, stride 2). out_features='by_stride' returns them all, finest first (ties:
# finer level first), so UPerHead's top-down path runs coarse -> fine and its pyramid pooling sits
# on the coarsest map. Experiment configs set scales / num_blocks and the head's in_channels / in_index.
_base_ = ["../../../../_base_/models/mmseg_imagenet_preprocessor.py"]
norm_cfg = dict(type="BN", requires_grad=True)  # set sync_bn='torch' for multi-GPU runs
feature_dims = 128
model = dict(
    type="EncoderDecoder",
    data_preprocessor=dict(size=(256, 256)),
    backbone=dict(
        type="RAT",
        input_features=3,
        feature_dims=feature_dims,
        num_blocks=4,
        num_heads=8,
        iters=3,
        sga_kernel_size=5,
        stride=2,
        scales=(1.0,),
        # local grouping attention in the first half of the blocks (the finest grids), dense after:
        # a dense first block at 256x256 would hold a 16384 x 65536 matrix per head
        attention="mixed",
        # positional encoding: the package's learnable RoSE (learnable frequencies and spacing scale)
        learnable_rose=True,
        learnable_rose_scaling=True,
        rose_initial_scaling="log",
        rotary_ratio=0.5,
        out_features="by_stride",
    ),
    decode_head=dict(
        type="UPerHead",
        in_channels=[feature_dims] * 4,
        in_index=(0, 1, 2, 3),
        pool_scales=(1, 2, 3, 6),
        channels=128,
        dropout_ratio=0.1,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
