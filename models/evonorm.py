"""EvoNorm CNNs (timm's EvoNorm2d* layers, Liu et al. 2020): a small net with every variant,
timm's RegNetZ-B16-EvoS and ResNetV2-50d-EvoS (small configs; their real sizes on request),
and a ResNetV2 with EvoNorm-B0 (the variant with a running variance)."""

from __future__ import annotations

import torch
from torch import nn

import models._torchvision_shim  # noqa: F401  (timm, imported below, imports torchvision)
from models.cnn import _image


def _randomize_evonorms(module: nn.Module, seed: int) -> None:
    """EvoNorm's v (the swish/B0 slope) and B's running variance (left at 1 by timm's init, which
    would hide a wrong max branch); randomize_norms_and_biases does gamma and beta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if type(sub).__name__.startswith("EvoNorm"):
                if getattr(sub, "v", None) is not None:
                    sub.v.copy_(1 + 0.3 * torch.randn(sub.v.shape, generator=g))
                if hasattr(sub, "running_var"):
                    sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=g))


class EvoNorms(nn.Module):
    """A stem Conv, then per EvoNorm variant (with and without its activation) the norm and a
    Conv: 1x1 (its trailing affine folds), or 3x3 zero-padded (it cannot: the shift)."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        from timm.layers import evo_norm as E

        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, padding=1)]
        variants = [
            (E.EvoNorm2dB0, {}),
            (E.EvoNorm2dB1, {}),
            (E.EvoNorm2dB2, {}),
            (E.EvoNorm2dS0, {"groups": 4}),
            (E.EvoNorm2dS0a, {"group_size": 8}),
            (E.EvoNorm2dS1, {"groups": 2}),
            (E.EvoNorm2dS2, {"groups": 4}),
            (E.EvoNorm2dS0a, {"groups": 4, "apply_act": False}),
            (E.EvoNorm2dS0, {"groups": 4, "apply_act": False}),
            (E.EvoNorm2dB0, {"apply_act": False}),
        ]
        for i, (cls, kwargs) in enumerate(variants):
            k = 3 if i % 3 == 2 else 1
            layers += [cls(width, **kwargs), nn.Conv2d(width, width, k, padding=k // 2)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _evo_image(module: nn.Module, large: bool = False):
    _randomize_evonorms(module, seed=2)
    return _image(module, keep_bn=False, batch=1 if large else 2)


def evonorms() -> object:
    return _evo_image(EvoNorms())


def regnetz_evos(large: bool = False) -> object:
    """timm's regnetz_b16_evos (EvoNorm-S0a, group size 16, SE, SiLU); small: its stages at 1/3
    width (group size 8) with 1-2 blocks each. 64x64 either way."""
    import dataclasses
    import functools

    from timm.layers.evo_norm import EvoNorm2dS0a
    from timm.models.byobnet import ByobNet, model_cfgs

    cfg = model_cfgs["regnetz_b16_evos"]
    if not large:
        cfg = dataclasses.replace(
            cfg,
            stem_chs=16,
            num_features=128,
            norm_layer=functools.partial(EvoNorm2dS0a, group_size=8),
            blocks=tuple(
                dataclasses.replace(b, c=b.c // 3, d=min(b.d, 2), gs=8) for b in cfg.blocks
            ),
        )
    return _evo_image(ByobNet(cfg, num_classes=1000 if large else 10), large)


def resnetv2_evo(large: bool = False, b0: bool = False) -> object:
    """timm's resnetv2_50d_evos (pre-activation, EvoNorm-S0 with 32 groups, deep stem, avg
    down); small: one bottleneck per stage, 1/8 width, 8 groups; `b0`: EvoNorm-B0 instead, large
    with two blocks per stage (ResNetV2-26d: 50 random B0 layers are chaotic, float32 and
    float64 torch differ by 15% of the output)."""
    import functools

    from timm.layers import create_conv2d
    from timm.layers.evo_norm import EvoNorm2dB0, EvoNorm2dS0
    from timm.models.resnetv2 import ResNetV2

    norm = EvoNorm2dB0 if b0 else EvoNorm2dS0
    config = dict(conv_layer=create_conv2d, stem_type="deep", avg_down=True)
    if large:
        config.update(layers=[2] * 4 if b0 else [3, 4, 6, 3], norm_layer=norm, num_classes=1000)
    else:
        config.update(
            layers=[1, 1, 1, 1],
            channels=(32, 64, 128, 256),
            stem_chs=16,
            norm_layer=norm if b0 else functools.partial(norm, groups=8),
            num_classes=10,
        )
    return _evo_image(ResNetV2(**config), large)


def resnetv2_evob(large: bool = False) -> object:
    return resnetv2_evo(large, b0=True)
