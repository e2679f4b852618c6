"""Hand-written transformers: Pre-LN, Peri-LN, Mix-LN and scaled-embedding / mean-pooled text
models, RepBN (SLAB-style, vision), Unified-Norm (vision).

Same block everywhere, x = x + attn(norm1(x)); x = x + mlp(norm2(x)); only the norm differs:
- "ln":      nn.LayerNorm over the hidden axis;
- "repbn":   SLAB's RepBN on token features, BN1d(x^T)^T + alpha*x (BatchNorm normalizes axis 1,
             so it sits between two Transposes);
- "unified": Unified-Norm-style inference norm, w*x/sqrt(running_var+eps)+b per channel.
"""

from __future__ import annotations

import torch
from torch import nn

from models.common import Built

D, HEADS, LAYERS, VOCAB, SEQ, PATCH, IMAGE = 64, 4, 2, 128, 16, 8, 32


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5, dim=-1)
        return self.proj((att @ v).transpose(1, 2).reshape(b, n, d))


class RepBN(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(d)
        self.alpha = nn.Parameter(torch.tensor([0.5]))

    def forward(self, x):
        return (self.bn(x.transpose(1, 2)) + self.alpha * x.transpose(1, 2)).transpose(1, 2)


class UnifiedNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))
        self.bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("running_var", torch.ones(d))

    def forward(self, x):
        return x / torch.sqrt(self.running_var + self.eps) * self.weight + self.bias


NORMS = {"ln": nn.LayerNorm, "repbn": RepBN, "unified": UnifiedNorm}


class Block(nn.Module):
    """layout "pre": x + f(norm(x)); "peri": x + norm_out(f(norm(x))) (Peri-LN normalizes the
    branch outputs too); "post": norm(x + f(x))."""

    def __init__(self, d: int, heads: int, norm: str, layout: str = "pre") -> None:
        super().__init__()
        self.layout = layout
        self.norm1, self.norm2 = NORMS[norm](d), NORMS[norm](d)
        self.attn = Attention(d, heads)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        if layout == "peri":
            self.out1, self.out2 = NORMS[norm](d), NORMS[norm](d)

    def forward(self, x):
        if self.layout == "post":
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        if self.layout == "peri":
            x = x + self.out1(self.attn(self.norm1(x)))
            return x + self.out2(self.mlp(self.norm2(x)))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TextTransformer(nn.Module):
    """`layouts`: one per block (see Block); `embed_scale`: tokens x sqrt(d) (fairseq, T5-style);
    `pool`: mean over tokens, then the final norm and a classification head."""

    def __init__(
        self,
        norm: str,
        layouts: tuple[str, ...] = ("pre",) * LAYERS,
        embed_scale: bool = False,
        pool: bool = False,
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, D)
        self.positions = nn.Parameter(torch.randn(1, 64, D) * 0.02)
        self.blocks = nn.Sequential(*[Block(D, HEADS, norm, layout) for layout in layouts])
        self.norm = NORMS[norm](D)
        self.head = nn.Linear(D, VOCAB)
        self.scale, self.pool = (D**0.5 if embed_scale else 1.0), pool

    def forward(self, input_ids):
        x = self.tokens(input_ids) * self.scale + self.positions[:, : input_ids.shape[1]]
        x = self.blocks(x)
        return self.head(self.norm(x.mean(dim=1) if self.pool else x))


class VisionTransformer(nn.Module):
    def __init__(
        self,
        norm: str,
        classes: int = 10,
        d: int = D,
        heads: int = HEADS,
        layers: int = LAYERS,
        patch: int = PATCH,
        image: int = IMAGE,
        pool: str = "cls",
    ) -> None:
        super().__init__()
        self.pool = pool  # cls: the cls token's features; mean: the mean over every token
        self.patch = nn.Conv2d(3, d, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        self.positions = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[Block(d, heads, norm) for _ in range(layers)])
        self.norm = NORMS[norm](d)
        self.head = nn.Linear(d, classes)

    def forward(self, image):
        x = self.patch(image).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.positions
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1) if self.pool == "mean" else x[:, 0])


def _randomize_custom_norms(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, RepBN):
                sub.alpha.copy_(torch.rand(1, generator=g) + 0.25)
            elif isinstance(sub, UnifiedNorm):
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=g))


def _text(module: TextTransformer) -> Built:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=g)
    axes = {0: "batch", 1: "sequence"}
    return Built(
        module.eval(),
        {"input_ids": ids},
        ["logits"],
        {"input_ids": axes, "logits": {0: "batch"} if module.pool else axes},
    )


def preln() -> Built:
    return _text(TextTransformer("ln"))


def periln() -> Built:
    """Peri-LN: LayerNorms before each branch and on each branch output."""
    return _text(TextTransformer("ln", ("peri",) * LAYERS))


def mixln() -> Built:
    """Mix-LN: a Post-LN first block, then Pre-LN blocks."""
    return _text(TextTransformer("ln", ("post", "pre", "pre")))


def scaledpool() -> Built:
    """Pre-LN with embeddings scaled by sqrt(d) and a mean-pooled classification head."""
    return _text(TextTransformer("ln", embed_scale=True, pool=True))


def _vision(norm: str, large: bool = False, pool: str = "cls") -> Built:
    """Small (64 wide, 2 layers, 32x32) or ViT-S/16 size (384 wide, 12 layers, 6 heads, 224x224)."""
    g = torch.Generator().manual_seed(0)
    size = 224 if large else IMAGE
    image = torch.randn(1 if large else 2, 3, size, size, generator=g)
    module = (
        VisionTransformer(norm, 1000, 384, 6, 12, 16, 224, pool=pool)
        if large
        else VisionTransformer(norm, pool=pool)
    ).eval()
    _randomize_custom_norms(module, seed=1)
    return Built(
        module,
        {"image": image},
        ["logits"],
        {"image": {0: "batch"}, "logits": {0: "batch"}},
        keep_bn=True,
    )


def repbn(large: bool = False) -> Built:
    return _vision("repbn", large)


def repbnpool(large: bool = False) -> Built:
    """The RepBN ViT with a mean-pooled head: its final BatchNorm reaches the head through a
    mean over tokens."""
    return _vision("repbn", large, pool="mean")


def unifiednorm(large: bool = False) -> Built:
    return _vision("unified", large)
