"""SETR encoder for mmseg: mmseg's ``VisionTransformer`` that can be frozen and load timm weights.

mmseg has the rest of SETR-MLA (``MLANeck``, ``SETRMLAHead``, ``DRIVEDataset``). A frozen encoder
keeps eval mode and runs without autograd, so it costs no gradients, optimizer state or saved
activations; its outputs can be cached per input view (:mod:`rat_plugins.models.feature_cache`),
which pays off only for views that recur (validation, or training without random augmentation).
"""

import os

import torch
from mmengine.logging import print_log
from mmseg.models.backbones import VisionTransformer
from mmseg.registry import MODELS

from ..models.feature_cache import CachedFrozenForward
from ..models.vit_convert import convert_timm_vit_to_mmseg, load_timm_vit_checkpoint

__all__ = ["FrozenVisionTransformer"]


@MODELS.register_module()
class FrozenVisionTransformer(VisionTransformer):
    """mmseg ``VisionTransformer`` with an optional frozen mode and timm-layout weight loading.

    Args:
        frozen: freeze every parameter, keep eval mode, run the forward without autograd.
        pretrained_timm: path of a timm / DeiT ViT checkpoint loaded strictly in ``init_weights``
            (config field ``model.backbone.pretrained_timm``); ``None`` for mmseg's own
            initialisation (random, or ``init_cfg``). At another input size than the checkpoint's
            the position table is resampled as timm does (``interpolate_mode``, antialiased).
        feature_cache_dir: cache the frozen encoder's outputs per input view there (None: off).
        **kwargs: mmseg ``VisionTransformer`` arguments. For timm weights use
            ``patch_bias=True``, ``final_norm=True``, ``qkv_bias=True`` and
            ``norm_cfg=dict(type='LN', eps=1e-6)``.
    """

    # settings that change the outputs without changing a weight (part of the cache key)
    _OUTPUT_SETTINGS = (
        "img_size",
        "patch_size",
        "interpolate_mode",
        "out_indices",
        "out_origin",
        "with_cls_token",
        "output_cls_token",
        "pre_norm",
        "final_norm",
    )

    def __init__(self, *args, frozen: bool = True, pretrained_timm=None, feature_cache_dir=None, **kwargs):
        if pretrained_timm is not None and (kwargs.get("init_cfg") or kwargs.get("pretrained")):
            raise ValueError("FrozenVisionTransformer: set either pretrained_timm or init_cfg / pretrained, not both")
        super().__init__(*args, **kwargs)
        self.frozen = bool(frozen)
        self.pretrained_timm = pretrained_timm
        if feature_cache_dir and not self.frozen:
            raise ValueError(
                "FrozenVisionTransformer: feature_cache_dir needs frozen=True (a training "
                "encoder's outputs change every step); set feature_cache_dir=None"
            )
        if self.frozen:
            for p in self.parameters():
                p.requires_grad_(False)
            self.train(False)
        # a plain attribute, not a submodule: the state dict keeps the encoder's keys once
        self._cached_forward = (
            CachedFrozenForward(self, feature_cache_dir, self._OUTPUT_SETTINGS, compute=self._encode)
            if feature_cache_dir
            else None
        )

    def init_weights(self):
        if self.pretrained_timm is None:
            super().init_weights()
            return
        path = os.fspath(self.pretrained_timm)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"pretrained encoder weights not found: {path!r} (config field model.backbone.pretrained_timm, "
                f"resolved from {os.getcwd()!r}). Put the timm/DeiT-layout ViT checkpoint there, or set "
                "model.backbone.pretrained_timm=None to train from a random encoder."
            )
        state = load_timm_vit_checkpoint(path)
        grid = (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)
        converted, report = convert_timm_vit_to_mmseg(
            state,
            num_layers=len(self.layers),
            embed_dims=self.cls_token.shape[-1],
            grid_hw=grid,
            mlp_hidden=self.layers[0].ffn.layers[0][0].out_features,
            patch_size=self.patch_size,
            interpolate_mode=self.interpolate_mode,
        )
        own = self.state_dict()
        missing = [k for k in own if k not in converted]
        unexpected = [k for k in converted if k not in own]
        if missing or unexpected:
            raise ValueError(
                f"{path!r} does not match the encoder: missing {missing or 'none'}; "
                f"not in the model {unexpected or 'none'} (timm weights need patch_bias=True, "
                "final_norm=True, qkv_bias=True).\n" + str(report)
            )
        self.load_state_dict(converted, strict=True)
        for line in report.lines():
            print_log(f"FrozenVisionTransformer: {path}: {line}", logger="current")
        self._is_init = True

    def train(self, mode: bool = True):
        super().train(mode and not self.frozen)
        return self

    def forward(self, inputs):
        if self._cached_forward is not None:
            return self._cached_forward(inputs)
        return self._encode(inputs)

    def _encode(self, inputs):
        if self.frozen:
            with torch.no_grad():
                return super().forward(inputs)
        return super().forward(inputs)
