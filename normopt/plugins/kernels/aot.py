"""Compile a norm kernel to PTX ahead of time, as a TensorRT AOT plugin embeds it in an engine.

The kernel's runtime parameters are pointers (names ending in `_ptr`) and int32 scalars, in
declaration order: inputs, scalars, outputs. Triton >= 3.5 appends two hidden .u64 scratch
pointers to the PTX entry (the launcher must pass them; null when unused).

Vectorized (16-byte) loads and stores need Triton to know alignment: with `aligned=True` the
pointers are declared 16-byte aligned and, when the hidden size is a multiple of 16, n_cols and
every row pitch are declared multiples of 16 (Triton's JIT infers the same from the arguments it
is called with). That promise holds for TensorRT's dense tensors (pitch = n_cols, buffers
256-byte aligned); without it every element is its own 2-byte load.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget

from . import norms

TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclass(frozen=True)
class CompiledKernel:
    name: str
    ptx: str
    num_warps: int
    shared_bytes: int
    params: tuple[
        str, ...
    ]  # PTX entry parameter kinds (.u64 pointer / .u32 int), hidden ones included


def compile_ptx(
    kernel: str,
    dtype: str,
    n_cols: int,
    *,
    eps: float = 1e-6,
    has_weight: bool = True,
    config: tuple[int, int] | None = None,
    aligned: bool = True,
    arch: int = 90,
) -> CompiledKernel:
    """PTX of `kernel` (a name in norms, e.g. "rms_norm_kernel") for rows of `n_cols` `dtype`
    values, launch config (BLOCK, num_warps) from norms.candidates (default: the first)."""
    fn = getattr(norms, kernel)
    launch = norms.launch_args(n_cols, config)
    warps = launch.pop("num_warps")
    constexprs = {"EPS": eps, **launch}
    if "HAS_WEIGHT" in fn.arg_names:
        constexprs["HAS_WEIGHT"] = has_weight
    params = [p for p in fn.arg_names if p not in constexprs]
    signature = {p: f"*{TYPES[dtype]}" if p.endswith("_ptr") else "i32" for p in params}
    signature |= {k: "constexpr" for k in constexprs}
    attrs = {}
    if aligned:
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, p in enumerate(params)
            if p.endswith("_ptr") or n_cols % 16 == 0
        }
    source = triton.compiler.ASTSource(
        fn=fn, signature=signature, constexprs=constexprs, attrs=attrs
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps}
    )
    ptx = compiled.asm["ptx"]
    entry = re.search(r"\.entry\s+(\w+)\s*\((.*?)\)", ptx, re.S)
    kinds = tuple(p.split()[1] for p in entry.group(2).split(","))
    return CompiledKernel(entry.group(1), ptx, warps, compiled.metadata.shared, kinds)


def global_accesses(ptx: str) -> dict[str, int]:
    """Counts of global load / store instructions by form (e.g. 'ld.global.v4.b32': 2)."""
    return dict(Counter(re.findall(r"\b([ls][dt]\.global[.\w]*)", ptx)))
