# SETR-MLA on a ViT-B/16 encoder in timm layout: mmseg's VisionTransformer (through the plugin's
# FrozenVisionTransformer), MLANeck and SETRMLAHead; 2 classes (background, vessel).
_base_ = ["../../../../_base_/models/mmseg_imagenet_preprocessor.py"]
norm_cfg = dict(type="BN", requires_grad=True)  # set sync_bn='torch' for multi-GPU runs
patch_size = 16
embed_dims = 768
# SETR-MLA predicts at stride 4: each of the 4 streams is upsampled from the patch grid
# (stride patch_size) by patch_size // 4; the segmentor resizes the logits to the input size.
head_stride = 4
model = dict(
    type="EncoderDecoder",
    backbone=dict(
        type="FrozenVisionTransformer",
        img_size=(224, 224),  # the pretraining size; experiment configs set crop_size
        patch_size=patch_size,
        in_channels=3,
        embed_dims=embed_dims,
        num_layers=12,
        num_heads=12,
        mlp_ratio=4,  # MLP 3072
        out_indices=(2, 5, 8, 11),
        qkv_bias=True,
        patch_bias=True,  # timm's patch_embed.proj has a bias
        final_norm=True,  # timm's final `norm` -> mmseg `ln1`
        with_cls_token=True,
        norm_cfg=dict(type="LN", eps=1e-6),
        act_cfg=dict(type="GELU"),
        interpolate_mode="bicubic",
        frozen=True,
        pretrained_timm="VFM_Fundus_weights.pth",
    ),
    neck=dict(
        type="MLANeck", in_channels=[embed_dims] * 4, out_channels=256, norm_cfg=norm_cfg, act_cfg=dict(type="ReLU")
    ),
    decode_head=dict(
        type="SETRMLAHead",
        in_channels=(256, 256, 256, 256),
        channels=512,  # 4 streams x mla_channels
        in_index=(0, 1, 2, 3),
        mla_channels=128,
        up_scale=patch_size // head_stride,
        dropout_ratio=0,
        num_classes=2,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0, avg_non_ignore=True),
    ),
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
