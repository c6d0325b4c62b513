# The default SETR-MLA system: a smaller ViT (ViT-S/16: 384 wide, 12 layers, 6 heads, MLP 1536)
# trained from scratch together with the MLA neck and head, DRIVE at 224x224.
_base_ = [
    "_base_/models/setr_mla_vit-b16.py",
    "_base_/datasets/fundus_drive.py",
    "../../_base_/schedules/mmseg_adamw_cosine_20k.py",
    "../../_base_/mmseg_runtime.py",
]
crop_size = (224, 224)
embed_dims = 384
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, embed_dims=embed_dims, num_heads=6, frozen=False, pretrained_timm=None),
    neck=dict(in_channels=[embed_dims] * 4),
)
