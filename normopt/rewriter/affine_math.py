"""Weight math for folding a per-channel affine `y = a*x + c` into a linear op. Pure numpy.

Every function computes in float64 and returns float64; callers cast back to the tensor's
own dtype. `a` and `c` are 1-D, one entry per channel. Notation (shared/docs/rewrites.md 3):
s = gamma / sqrt(var + eps), t = beta - mean * s.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def batchnorm_affine(gamma, beta, mean, var, eps: float, alpha: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as y = a*x + c:  a = gamma / sqrt(var + eps) + alpha,
    c = beta - mean * gamma / sqrt(var + eps).  `alpha` is SLAB RepBN's `BN(x) + alpha*x`."""
    s = _f64(gamma) / np.sqrt(_f64(var) + eps)
    return s + alpha, _f64(beta) - _f64(mean) * s


def chain_affine(steps: Sequence[tuple[str, np.ndarray]], channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Compose x (op) k steps into y = a*x + c, from a = 1, c = 0:
    Mul k: a*k, c*k;  Div k: a/k, c/k;  Add k: c+k;  Sub k: c-k  (k per channel or scalar)."""
    a, c = np.ones(channels), np.zeros(channels)
    for op, k in steps:
        k = np.broadcast_to(_f64(k).reshape(-1), (channels,))
        if op == "Mul":
            a, c = a * k, c * k
        elif op == "Div":
            a, c = a / k, c / k
        elif op == "Add":
            c = c + k
        elif op == "Sub":
            c = c - k
        else:
            raise ValueError(f"not an affine step: {op}")
    return a, c


def into_conv_output(weight, bias, a, c) -> tuple[np.ndarray, np.ndarray]:
    """Conv (weight [C_out, C_in/G, k...]) then y = a*x + c on output channels:
    W'[o] = a_o * W[o],  b' = a * b + c  (any groups, pads, strides, dilations)."""
    w = _f64(weight)
    shape = (-1,) + (1,) * (w.ndim - 1)
    return w * _f64(a).reshape(shape), _f64(a) * _f64(bias) + _f64(c)


def into_conv_transpose_output(weight, bias, a, c, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """ConvTranspose (weight [C_in, C_out/G, k...]) then y = a*x + c: output channel
    o = g*(C_out/G) + j lives in W[g*(C_in/G):(g+1)*(C_in/G), j]:  W'[.., j] = a_o W[.., j],
    b' = a * b + c."""
    w = _f64(weight).copy()
    cin, cout_g = w.shape[0], w.shape[1]
    a = _f64(a)
    for g in range(groups):
        rows = slice(g * cin // groups, (g + 1) * cin // groups)
        w[rows] *= a[g * cout_g:(g + 1) * cout_g].reshape((1, cout_g) + (1,) * (w.ndim - 2))
    return w, a * _f64(bias) + _f64(c)


def into_matmul_output(weight, bias, a, c) -> tuple[np.ndarray, np.ndarray]:
    """x @ W + b (W [..., K, N]) then y = a*x + c on the last axis:  W' = W * a (columns),
    b' = a * b + c."""
    return _f64(weight) * _f64(a), _f64(a) * _f64(bias) + _f64(c)


def into_matmul_input(weight, bias, a, c) -> tuple[np.ndarray, np.ndarray]:
    """y = a*x + c on the last axis, then y @ W + b (W [K, N]):  W' = diag(a) W,
    b' = b + c @ W."""
    w = _f64(weight)
    return _f64(a)[:, None] * w, _f64(bias) + _f64(c) @ w


def into_conv_input(weight, bias, a, c, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """y = a*x + c on input channels, then Conv (weight [C_out, C_in/G, k...], zero pads
    only): W'[o, j, ...] = W[o, j, ...] * a_(g*C_in/G + j) with g the group of o;
    b'_o = b_o + sum_(j, k) W[o, j, k] * c_(g*C_in/G + j).  With zero padding and c != 0 the
    border outputs would see the shift only partly: callers must not fold then."""
    w = _f64(weight)
    cout, cin_g = w.shape[0], w.shape[1]
    per_group = cout // groups
    group_of = np.arange(cout) // per_group
    channel = group_of[:, None] * cin_g + np.arange(cin_g)[None, :]  # [C_out, C_in/G]
    expand = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    w_new = w * _f64(a)[channel][expand]
    b_new = _f64(bias) + (w.reshape(cout, cin_g, -1).sum(axis=2) * _f64(c)[channel]).sum(axis=1)
    return w_new, b_new
