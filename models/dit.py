"""A small DiT (Peebles & Xie 2023, facebookresearch/DiT's model code): patchified latents, a
timestep and class-label embedding c, blocks whose LayerNorms have no affine and are modulated
by c (adaLN-Zero: `x * (1 + scale) + shift`, each branch output gated per channel), and the
adaLN final layer. The gates are per sample and per channel, so the residual stream is not
zero-mean: a Pre-LN conversion must refuse it, or be exact."""

from __future__ import annotations

import math

import torch
from torch import nn

from models.common import Built
from models.transformer import Attention

D, HEADS, DEPTH, LATENT, CHANNELS, PATCH, CLASSES = 64, 4, 2, 8, 4, 2, 10


def _modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x, c):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(_modulate(self.norm1(x), shift1, scale1))
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, d: int = D, depth: int = DEPTH) -> None:
        super().__init__()
        tokens = (LATENT // PATCH) ** 2
        self.patch = nn.Conv2d(CHANNELS, d, PATCH, stride=PATCH)
        self.pos = nn.Parameter(torch.randn(1, tokens, d) * 0.1)
        self.t_mlp = nn.Sequential(nn.Linear(32, d), nn.SiLU(), nn.Linear(d, d))
        self.labels = nn.Embedding(CLASSES, d)
        self.blocks = nn.ModuleList(DiTBlock(d, HEADS) for _ in range(depth))
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.out = nn.Linear(d, PATCH * PATCH * CHANNELS)

    def forward(self, latents, t, y):
        x = self.patch(latents).flatten(2).transpose(1, 2) + self.pos
        freqs = torch.exp(-math.log(10000.0) * torch.arange(16, dtype=torch.float32) / 16)
        args = t[:, None] * freqs[None]
        c = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1)) + self.labels(y)
        for block in self.blocks:
            x = block(x, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        return self.out(_modulate(self.norm(x), shift, scale))


def dit() -> Built:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, CHANNELS, LATENT, LATENT, generator=g)
    t = torch.tensor([10.0, 500.0])
    y = torch.tensor([1, 7])
    # adaLN-Zero initializes the modulation to 0 (gates closed): random weights open them
    return Built(
        DiT().eval(),
        {"latents": latents, "t": t, "y": y},
        ["noise"],
        {"latents": {0: "batch"}, "t": {0: "batch"}, "y": {0: "batch"}, "noise": {0: "batch"}},
    )
