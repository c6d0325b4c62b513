# mmseg's SegDataPreProcessor with the ImageNet mean / std (RGB) that the ViT and RAT encoders expect;
# shared by the SETR and RAT model bases. Padding: 0 for images, 255 (ignored) for labels.
model = dict(
    data_preprocessor=dict(
        type="SegDataPreProcessor",
        mean=[123.675, 116.28, 103.53],
        std=[58.395, 57.12, 57.375],
        bgr_to_rgb=True,
        pad_val=0,
        seg_pad_val=255,
    )
)
