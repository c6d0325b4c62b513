# SETR-MLA, frozen ViT-B/16 foundation-model encoder (timm layout), trainable MLA neck + head, DRIVE.
# 224x224 input, AdamW 1e-4 + cosine, 20k iterations; best checkpoint by validation Dice.
# The encoder weights are model.backbone.pretrained_timm (a missing file stops the run with a
# message naming that field); check everything first: python tools/check_config.py <this file>.
_base_ = [
    "_base_/models/setr_mla_vit-b16.py",
    "_base_/datasets/fundus_drive.py",
    "../../_base_/schedules/mmseg_adamw_cosine_20k.py",
    "../../_base_/mmseg_runtime.py",
]
crop_size = (224, 224)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(img_size=crop_size, frozen=True, pretrained_timm="VFM_Fundus_weights.pth"),
)
