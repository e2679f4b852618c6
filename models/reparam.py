"""Re-parameterizable blocks in their training form, written as their papers' code writes them.

ACNet (Ding et al. 2019): a 3x3, a 1x3 and a 3x1 Conv, each with its BatchNorm, summed.
Diverse Branch Block (Ding et al. 2021, DingXiaoH/DiverseBranchBlock): a kxk Conv+BN, a 1x1
Conv+BN, 1x1 Conv -> BN-and-pad -> kxk average pool -> BN, and 1x1 Conv (identity-initialised:
its kernel is W + I, computed in forward) -> BN-and-pad -> kxk Conv (no padding) -> BN, summed.
BN-and-pad pads the BatchNorm's output with BN(0) per channel, so that the sequential branch
equals one kxk Conv of the zero-padded input.
DEA-Net's DEConv (Chen et al. 2024): five 3x3 difference convolutions (central, angular,
horizontal, vertical, vanilla) whose kernels are computed from their weights in forward and
summed into the one kernel of one `F.conv2d`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.common import Built


class ACBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.square = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.hor = nn.Sequential(
            nn.Conv2d(c, c, (1, 3), padding=(0, 1), bias=False), nn.BatchNorm2d(c)
        )
        self.ver = nn.Sequential(
            nn.Conv2d(c, c, (3, 1), padding=(1, 0), bias=False), nn.BatchNorm2d(c)
        )

    def forward(self, x):
        return torch.relu(self.square(x) + self.hor(x) + self.ver(x))


class BNAndPad(nn.Module):
    """DBB's BNAndPadLayer: BatchNorm, then pad with BN(0) (what the BN gives a zero input).
    DBB's code writes the border by slice assignment, which exports as shape-dependent ScatterND
    chains; `slice_assign=False` writes the same values as pad(y - v) + v."""

    def __init__(self, pad: int, c: int, slice_assign: bool = False) -> None:
        super().__init__()
        self.bn, self.pad, self.slice_assign = nn.BatchNorm2d(c), pad, slice_assign

    def forward(self, x):
        out = self.bn(x)
        if self.pad == 0:
            return out
        bn, p = self.bn, self.pad
        values = (bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(
            1, -1, 1, 1
        )
        if not self.slice_assign:
            return F.pad(out - values, [p] * 4) + values
        out = F.pad(out, [p] * 4)
        out[:, :, 0:p, :] = values
        out[:, :, -p:, :] = values
        out[:, :, :, 0:p] = values
        out[:, :, :, -p:] = values
        return out


class IdentityBasedConv1x1(nn.Conv2d):
    def __init__(self, c: int) -> None:
        super().__init__(c, c, 1, bias=False)
        self.register_buffer("eye", torch.eye(c).view(c, c, 1, 1))

    def forward(self, x):
        return F.conv2d(x, self.weight + self.eye)


class DiverseBranchBlock(nn.Module):
    def __init__(self, c: int, k: int = 3, slice_assign: bool = False) -> None:
        super().__init__()
        p = k // 2
        self.origin = nn.Sequential(nn.Conv2d(c, c, k, padding=p, bias=False), nn.BatchNorm2d(c))
        self.one = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.avg = nn.Sequential(
            nn.Conv2d(c, c, 1, bias=False),
            BNAndPad(p, c, slice_assign),
            nn.AvgPool2d(k, 1, 0),
            nn.BatchNorm2d(c),
        )
        self.one_kxk = nn.Sequential(
            IdentityBasedConv1x1(c),
            BNAndPad(p, c, slice_assign),
            nn.Conv2d(c, c, k, bias=False),
            nn.BatchNorm2d(c),
        )

    def forward(self, x):
        return torch.relu(self.origin(x) + self.one(x) + self.avg(x) + self.one_kxk(x))


class DifferenceConv(nn.Module):
    """One DEA-Net difference convolution: `kind` picks how its 3x3 kernel is computed."""

    def __init__(self, c: int, kind: str, theta: float = 1.0) -> None:
        super().__init__()
        k = (1, 3) if kind in ("hd", "vd") else (3, 3)
        self.conv = nn.Conv2d(c, c, k, bias=True)
        self.kind, self.theta = kind, theta

    def kernel(self):
        w = self.conv.weight
        o, i = w.shape[:2]
        if self.kind == "cd":  # central: the centre minus the sum of the window
            flat = w.reshape(o, i, 9)
            centre = flat[:, :, 4:5] - flat.sum(2, keepdim=True)
            return torch.cat([flat[:, :, :4], centre, flat[:, :, 5:]], 2).reshape(o, i, 3, 3)
        if self.kind == "ad":  # angular: each tap minus its clockwise neighbour
            flat = w.reshape(o, i, 9)
            return (flat - self.theta * flat[:, :, [3, 0, 1, 6, 4, 2, 7, 8, 5]]).reshape(o, i, 3, 3)
        line = w.reshape(o, i, 3)
        zeros = torch.zeros_like(line)
        if self.kind == "hd":  # horizontal: left column minus right column
            return torch.stack([line, zeros, -line], 3)
        return torch.stack([line, zeros, -line], 2)  # vd: top row minus bottom row


class DEConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.parts = nn.ModuleList(DifferenceConv(c, kind) for kind in ("cd", "hd", "vd", "ad"))
        self.vanilla = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        w = sum(p.kernel() for p in self.parts) + self.vanilla.weight
        b = sum(p.conv.bias for p in self.parts) + self.vanilla.bias
        return torch.relu(F.conv2d(x, w, b, stride=1, padding=1))


class RepBlocks(nn.Module):
    """A stem Conv, then an ACNet block, a Diverse Branch Block and a DEConv, and a linear head."""

    def __init__(self, c: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(ACBlock(c), DiverseBranchBlock(c), DEConv(c))
        self.head = nn.Linear(c, classes)

    def forward(self, x):
        return self.head(self.blocks(torch.relu(self.stem(x))).mean((2, 3)))


def repblocks(large: bool = False) -> Built:
    """The three blocks in their training form, exported with BatchNorm kept and nothing folded
    (so the DEConv kernel and DBB's identity kernel stay computed in the graph). Small: 8
    channels, 64x64; large: 64 channels at 224x224 (112x112 after the stem), batch 1."""
    from models.cnn import _image

    return _image(RepBlocks(64 if large else 8), size=224 if large else 64, batch=1 if large else 2)
