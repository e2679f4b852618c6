"""Weight math for making a residual-stream writer zero-mean along the hidden axis. Pure numpy.

A linear writer y = x W + b writes a zero-mean vector for every x iff every column-sum of the
centring is zero: W' = W - mean over the output axis, b' = b - mean(b) (shared/docs/rewrites.md 1).
Computed in float64; callers cast back to the tensor's dtype.
"""

from __future__ import annotations

import numpy as np


def center(array, axis: int) -> np.ndarray:
    """array - array.mean(axis): every slice along `axis` sums to zero.
    Embedding table [V, D]: axis=-1 (each row). MatMul weight W[in, out]: axis=-1 (each row of
    W, i.e. over outputs). Gemm transB weight W[out, in]: axis=0. Conv weight [C_out, ...]:
    axis=0 (over output channels). A bias [D]: axis=-1."""
    a = np.asarray(array, dtype=np.float64)
    return a - a.mean(axis=axis, keepdims=True)
