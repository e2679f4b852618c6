"""ResNet-18, MobileNetV2 and a ConvNeXt in plain torch (torchvision cannot run on CPU torch), and
timm's channels-first ConvNeXt.

Same topology as torchvision's, narrower (base width 16 / width multiplier 0.5) so they export
in seconds. ResNet and MobileNet are exported with BatchNorm kept (`keep_bn`): exporters fold
Conv+BN by default. The ConvNeXt writes its LayerNorm by hand over the last axis of an NHWC
tensor, as ConvNeXt code does, so every exporter leaves it decomposed.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Built

IMAGE = 64


def _conv_bn(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(cin, cout, 3, stride), nn.ReLU(), *_conv_bn(cout, cout, 3)
        )
        self.down = (
            nn.Sequential(*_conv_bn(cin, cout, 1, stride))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.down(x))


class ResNet18(nn.Module):
    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        layers = [*_conv_bn(3, width, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
        cin = width
        for i, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            layers += [BasicBlock(cin, cout, 1 if i == 0 else 2), BasicBlock(cout, cout, 1)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers = [*_conv_bn(cin, hidden, 1), nn.ReLU6()] if expand != 1 else []
        layers += [
            *_conv_bn(hidden, hidden, 3, stride, groups=hidden),
            nn.ReLU6(),
            *_conv_bn(hidden, cout, 1),
        ]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, stride) as in the paper, channels scaled by `width`
    SETTINGS = [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]

    def __init__(self, width: float = 0.5, classes: int = 10) -> None:
        super().__init__()
        cin = int(32 * width)
        layers = [*_conv_bn(3, cin, 3, 2), nn.ReLU6()]
        for t, c, n, s in self.SETTINGS:
            cout = max(8, int(c * width))
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers += [*_conv_bn(cin, 1280 // 4, 1), nn.ReLU6()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(1280 // 4, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ChannelsLastLayerNorm(nn.Module):
    """LayerNorm over the last axis, written out: mean, centred square, sqrt(var + eps)."""

    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = (
            nn.Parameter(torch.ones(d)),
            nn.Parameter(torch.zeros(d)),
            eps,
        )

    def forward(self, x):
        u = x.mean(-1, keepdim=True)
        s = (x - u).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - u) / torch.sqrt(s + self.eps)) + self.bias


class ConvNeXtBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = ChannelsLastLayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
        return x + self.mlp(y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, d: int = 64, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, d, 4, 4)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(d) for _ in range(blocks)])
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _image(module: nn.Module, keep_bn: bool = True, size: int = IMAGE, batch: int = 2) -> Built:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=g)
    return Built(
        module.eval(),
        {"image": x},
        ["logits"],
        {"image": {0: "batch"}, "logits": {0: "batch"}},
        keep_bn=keep_bn,
    )


def resnet18(large: bool = False) -> Built:
    """Large: torchvision's width (64) at 224x224, 1000 classes."""
    return _image(ResNet18(64, 1000), size=224, batch=1) if large else _image(ResNet18())


def mobilenetv2() -> Built:
    return _image(MobileNetV2())


def convnext(large: bool = False) -> Built:
    return _image(ConvNeXt(d=128, blocks=4) if large else ConvNeXt(), keep_bn=False)


def convnext2d(large: bool = False) -> Built:
    """timm's ConvNeXt as its class builds it (convnext_tiny and up): the stem's and the
    downsampling layers' norms are timm's LayerNorm2d (NCHW permuted to NHWC, LayerNorm over
    the channels, permuted back), the blocks' norms are channels-last LayerNorms before Linear
    MLPs. Large: convnext_atto's depths and widths (2, 2, 6, 2 blocks of 40-320 channels) at
    128x128; small: four stages of one block, 8-32 channels."""
    from timm.models.convnext import ConvNeXt as TimmConvNeXt

    import models._torchvision_shim  # noqa: F401  (timm imports torchvision)

    config = (
        dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320))
        if large
        else dict(depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    )
    module = TimmConvNeXt(**config, ls_init_value=0.5, num_classes=10)
    return _image(module, keep_bn=False, size=128 if large else IMAGE, batch=1 if large else 2)


def _repvgg_module(large: bool):
    import dataclasses

    from timm.models.byobnet import ByobNet, model_cfgs

    import models._torchvision_shim  # noqa: F401  (timm imports torchvision)

    cfg = model_cfgs["repvgg_a0"]
    if not large:
        cfg = dataclasses.replace(
            cfg,
            stem_chs=8,
            blocks=tuple(
                dataclasses.replace(b, c=max(b.c // 16, 8), d=min(b.d, 2)) for b in cfg.blocks
            ),
        )
    return ByobNet(cfg, num_classes=1000 if large else 10)


def repvgg(large: bool = False) -> Built:
    """timm's RepVGG in its training form: per block a 3x3 Conv+BN, a 1x1 Conv+BN and, where the
    shapes allow, an identity BatchNorm, summed. Large: RepVGG-A0 (48-1280 channels) at
    224x224, 1000 classes; small: its stages at 1/16 width, at most 2 blocks each, 64x64."""
    return _image(_repvgg_module(large), size=224 if large else IMAGE, batch=1 if large else 2)


def mobileone() -> Built:
    """timm's MobileOne-S0 in its training form (per block: k over-parameterized Conv+BN branches,
    a 1x1 scale branch and an identity BN where the shapes allow, summed; depthwise and pointwise
    blocks in turn), 10 classes at 64x64. TorchScript exports its sum starting at 0.0."""
    import timm

    import models._torchvision_shim  # noqa: F401  (timm imports torchvision)

    return _image(timm.create_model("mobileone_s0", pretrained=False, num_classes=10))


def levit() -> Built:
    """timm's LeViT-128S at 64x64, 10 classes: attention blocks whose every Linear is followed by
    a BatchNorm1d over the flattened tokens (Linear -> Flatten/Reshape -> BatchNorm -> Reshape),
    HardSwish activations, a BatchNorm'd head after mean pooling."""
    import timm

    import models._torchvision_shim  # noqa: F401  (timm imports torchvision)

    return _image(timm.create_model("levit_128s", pretrained=False, num_classes=10, img_size=64))


def repvgg_deploy(large: bool = False) -> Built:
    """The same RepVGG after timm's own reparameterize_model(): one 3x3 Conv per block (the
    model's own deploy form, the peer merge-branches is measured against)."""
    from timm.utils.model import reparameterize_model

    return _image(
        reparameterize_model(_repvgg_module(large).eval()),
        keep_bn=False,
        size=224 if large else IMAGE,
        batch=1 if large else 2,
    )
