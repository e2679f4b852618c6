"""All of normopt's weight math. Pure numpy, no graph types; each docstring is the formula.

Every function computes in float64 and returns float64 (callers cast back to the tensor's own
dtype), except `center`, which computes a 16/32-bit result in float32 with float64 means.
Folding: a per-channel affine `y = a*x + c` (`a`, `c` 1-D, one entry per channel) into the
linear op before or after it, with s = gamma / sqrt(var + eps), t = beta - mean * s
for a BatchNorm (docs/rewrites.md, section 3). Centring: a residual-stream writer made
zero-mean along the hidden axis (section 1).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def _f64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def batchnorm_affine(
    gamma, beta, mean, var, eps: float, alpha: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNorm as y = a*x + c:  a = gamma / sqrt(var + eps) + alpha,
    c = beta - mean * gamma / sqrt(var + eps).  `alpha` is SLAB RepBN's `BN(x) + alpha*x`."""
    s = _f64(gamma) / np.sqrt(_f64(var) + eps)
    return s + alpha, _f64(beta) - _f64(mean) * s


def chain_affine(
    steps: Sequence[tuple[str, np.ndarray]], channels: int
) -> tuple[np.ndarray, np.ndarray]:
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
        w[rows] *= a[g * cout_g : (g + 1) * cout_g].reshape((1, cout_g) + (1,) * (w.ndim - 2))
    return w, a * _f64(bias) + _f64(c)


def into_matmul_output(weight, bias, a, c) -> tuple[np.ndarray, np.ndarray]:
    """x @ W + b (W [..., K, N]) then y = a*x + c on the last axis:  W' = W * a (columns),
    b' = a * b + c."""
    return _f64(weight) * _f64(a), _f64(a) * _f64(bias) + _f64(c)


def into_matmul_input(weight, bias, a, c) -> tuple[np.ndarray, np.ndarray]:
    """y = a*x + c on the last axis, then y @ W + b (W [K, N]):  W' = diag(a) W,
    b' = b + c @ W.  With a == 1 (a LayerNorm's beta alone) W' is W itself, not a copy."""
    if np.all(_f64(a) == 1):
        return np.asarray(weight), _f64(bias) + _dot64(c, weight)
    w = _f64(weight)
    return _f64(a)[:, None] * w, _f64(bias) + _f64(c) @ w


def _dot64(c, w, block_bytes: int = 1 << 22) -> np.ndarray:
    """c @ w (w [K, N]) in float64, a block of rows at a time: no float64 copy of w."""
    w = np.asarray(w)
    c, out = _f64(c), np.zeros(w.shape[1:], np.float64)
    per = max(1, block_bytes // max(1, 8 * w[0].size))
    for start in range(0, w.shape[0], per):
        out += c[start : start + per] @ _f64(w[start : start + per])
    return out


def into_conv_input(weight, bias, a, c, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """y = a*x + c on input channels, then Conv (weight [C_out, C_in/G, k...], zero pads
    only): W'[o, j, ...] = W[o, j, ...] * a_(g*C_in/G + j) with g the group of o;
    b'_o = b_o + sum_(j, k) W[o, j, k] * c_(g*C_in/G + j).  With zero padding and c != 0 the
    border outputs would see the shift only partly: callers must not fold then."""
    w = _f64(weight)
    cout, cin_g = w.shape[0], w.shape[1]
    channel = _input_channels(cout, cin_g, groups)
    expand = (slice(None), slice(None)) + (None,) * (w.ndim - 2)
    w_new = w * _f64(a)[channel][expand]
    b_new = _f64(bias) + (w.reshape(cout, cin_g, -1).sum(axis=2) * _f64(c)[channel]).sum(axis=1)
    return w_new, b_new


def into_gemm_output(
    weight, bias, a, c, beta: float, trans_b: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Gemm `alpha A B + beta C` then y = a*x + c on its output columns:
    a*(alpha A B + beta C) + c = alpha A (B diag(a)) + (a beta C + c); the new bias is used
    with beta = 1. B is [K, N], or [N, K] with transB."""
    w = _f64(weight).T if trans_b else _f64(weight)
    w2, b2 = into_matmul_output(w, 0.0 if bias is None else beta * _f64(bias), a, c)
    return (w2.T if trans_b else w2), b2


def into_gemm_input(
    weight, bias, a, c, alpha: float, beta: float, trans_b: bool
) -> tuple[np.ndarray, np.ndarray]:
    """y = a*x + c on the last axis, then Gemm `alpha y B + beta C` (no transA):
    alpha (a x + c) B + beta C = alpha x (diag(a) B) + (alpha c B + beta C); the new bias is
    used with beta = 1."""
    w = _f64(weight).T if trans_b else _f64(weight)
    w2, shift = into_matmul_input(w, 0.0, a, c)
    return (w2.T if trans_b else w2), alpha * shift + (0.0 if bias is None else beta * _f64(bias))


def center(
    array, axis: int, dtype=None, block_bytes: int = 1 << 22, diffuse: bool = False
) -> np.ndarray:
    """array - array.mean(axis): every slice along `axis` sums to zero. A linear writer
    y = x W + b writes a zero-mean vector for every x iff W' = W - mean over the output axis,
    b' = b - mean(b). Embedding table [V, D]: axis=-1 (each row). MatMul weight W[in, out]:
    axis=-1 (over outputs). Gemm transB weight W[out, in]: axis=0. Conv weight [C_out, ...]:
    axis=0 (over output channels). A bias [D]: axis=-1.
    Computed a block of slices at a time (about `block_bytes` of float64; blocks in parallel
    threads for a large array: no whole-tensor copy) and returned in `dtype` (float64 if None).
    For a float32/16-bit `dtype` the mean is accumulated in float64 and m = fl32(mean) is
    subtracted in float32: each entry is fl(x - m), within one float32 ulp of max(|m|, |x - m|)
    of the float64 result (for float16, within 2^-13 of its own ulp besides its rounding).
    `diffuse`: in float64, rounded to `dtype` by `diffused` (the slices' sums stay 0 within an
    ulp)."""
    a = np.asarray(array)
    out = np.empty(a.shape, np.float64 if dtype is None else dtype)
    blocks = _blocks(a, axis, block_bytes)
    _each(lambda b: out.__setitem__(b, _centred(a[b], axis, out.dtype, diffuse)), blocks)
    return out


def centred_rows(
    array, axis: int, dtype, block_bytes: int = 1 << 22
) -> Iterator[np.ndarray] | None:
    """`center(array, axis, dtype)` as consecutive blocks of leading rows (their bytes in
    order are the result's: a writer streams it to a file without the whole result in memory),
    computed a few blocks ahead in threads; None where the mean runs over the leading axis
    (blocks of columns are not contiguous)."""
    a = np.asarray(array)
    if a.ndim >= 2 and axis % a.ndim == 0:
        return None
    return _ahead(lambda b: _centred(a[b], axis, np.dtype(dtype)), _blocks(a, axis, block_bytes))


def _ahead(compute, blocks: list) -> Iterator[np.ndarray]:
    """compute(block) for every block, in order, a few blocks ahead in threads."""
    window = 2 * (os.cpu_count() or 1)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(blocks), window):
            yield from pool.map(compute, blocks[start : start + window])


def _centred(part: np.ndarray, axis: int, dtype: np.dtype, diffuse: bool = False) -> np.ndarray:
    """One block of `center`, in `dtype`."""
    if diffuse or dtype.itemsize > 4 or part.dtype.itemsize > 4:
        part = _f64(part)
        centred = part - part.mean(axis=axis, keepdims=True)
        return diffused(centred, axis, dtype) if diffuse else centred.astype(dtype)
    mean = part.mean(axis=axis, keepdims=True, dtype=np.float64)
    return np.subtract(part, mean.astype(np.float32), dtype=np.float32).astype(dtype, copy=False)


def _blocks(a: np.ndarray, axis: int, block_bytes: int) -> list[tuple]:
    """Index tuples of about `block_bytes` of float64 each, along an axis the mean over `axis`
    does not run over (the whole array for a vector)."""
    if a.ndim < 2:
        return [(slice(None),)]
    other = 1 if axis % a.ndim == 0 else 0
    per = max(1, block_bytes // max(1, 8 * a.size // max(1, a.shape[other])))
    blocks = []
    for start in range(0, a.shape[other], per):
        block = [slice(None)] * a.ndim
        block[other] = slice(start, start + per)
        blocks.append(tuple(block))
    return blocks


def _each(work, blocks: list) -> None:
    """work(block) for every block; in threads where there are several (numpy releases the
    GIL in its loops: the blocks of a large tensor are computed on every core)."""
    if len(blocks) < 4:
        for block in blocks:
            work(block)
        return
    with ThreadPoolExecutor(min(len(blocks), os.cpu_count() or 1)) as pool:
        list(pool.map(work, blocks))


def diffused(array: np.ndarray, axis: int, dtype) -> np.ndarray:
    """`array` (float64) rounded to `dtype` entry by entry along `axis`, each entry taking the
    rounding error of the ones before it (error diffusion): q_i = round(a_i + e_{i-1}),
    e_i = a_i + e_{i-1} - q_i. Each entry moves by at most half its own ulp and half its
    predecessor's, and every prefix sum stays within half an ulp of its last entry: rounding
    entries alone moves a slice's sum by up to half an ulp per
    entry when they sit just off representable values the same way (a float16 row centred by
    a shift below half its ulp keeps its old sum: the shift is rounded away)."""
    a = np.moveaxis(_f64(array), axis, -1)
    out = np.empty(a.shape, dtype)
    carry = np.zeros(a.shape[:-1])
    for i in range(a.shape[-1]):
        wanted = a[..., i] + carry
        out[..., i] = wanted
        carry = wanted - out[..., i].astype(np.float64)
    return np.moveaxis(out, -1, axis)


def scale_along(array, g, axis: int) -> np.ndarray:
    """array * g along `axis` (g one entry per index of that axis, or a scalar): a LayerScale
    `y = (x W + b) * g` folded into its writer, W' = W diag(g), b' = b * g."""
    a = _f64(array)
    g = _f64(g).reshape(-1)
    return a * g.reshape([g.size if i == axis % a.ndim else 1 for i in range(a.ndim)])


def merged_kernel(
    branches: Sequence[tuple[np.ndarray, np.ndarray]], kernel: Sequence[int], out_channels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Parallel convolutions of one input, summed, as one: every branch's weight [C_out, C_in/G,
    k_1, k_2, ..] zero-padded, centred, to `kernel` (each k_i's margin (K_i - k_i) / 2 per side,
    which is exactly where its own padding put it), then the weights and the biases summed:
    W = sum_i pad(W_i), b = sum_i b_i. `branches`: (weight, bias) pairs in any float dtype."""
    total = np.zeros((out_channels, branches[0][0].shape[1], *kernel))
    bias = np.zeros(out_channels)
    for weight, b in branches:
        w = _f64(weight)
        margins = [((k - s) // 2, (k - s) // 2) for k, s in zip(kernel, w.shape[2:])]
        total += np.pad(w, [(0, 0), (0, 0), *margins])
        bias += _f64(b)
    return total, bias


def ungroup(weight, groups: int) -> np.ndarray:
    """A grouped convolution weight [C_out, C_in/G, k..] as the dense [C_out, C_in, k..] one:
    output channel o reads only its group's inputs, zeros elsewhere."""
    w = _f64(weight)
    out, per_group = w.shape[:2]
    dense = np.zeros((out, per_group * groups, *w.shape[2:]))
    outs = out // groups
    for g in range(groups):
        dense[g * outs : (g + 1) * outs, g * per_group : (g + 1) * per_group] = w[
            g * outs : (g + 1) * outs
        ]
    return dense


def regroup(dense, groups: int) -> np.ndarray | None:
    """The inverse of `ungroup`: the [C_out, C_in/G, k..] weight of a dense kernel that is block
    diagonal over `groups`, or None where some output channel reads outside its group."""
    out, cin = dense.shape[:2]
    if out % groups or cin % groups:
        return None
    outs, per_group = out // groups, cin // groups
    inside = ungroup(np.ones((out, per_group, *dense.shape[2:])), groups).astype(bool)
    if np.any(dense[~inside] != 0):
        return None
    return np.concatenate(
        [
            dense[g * outs : (g + 1) * outs, g * per_group : (g + 1) * per_group]
            for g in range(groups)
        ]
    )


def compose_kernels(
    upper, upper_bias, upper_groups: int, lower, lower_bias, lower_groups: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Two convolutions in sequence, one of them 1x1 (stride 1, nothing padded between them
    that the composite would not pad the same way), as one: upper(lower(x)) = W * x + b,
    W[o, i, k] = sum_m upper[o, m, k] lower[m, i] (lower 1x1) or sum_m upper[o, m] lower[m, i, k]
    (upper 1x1), b = upper_bias + sum_(m, k) upper[o, m, k] lower_bias[m]; in grouped terms, with
    the groups of the result (a depthwise stage keeps the other's groups). Returns (W, b, G)."""
    up, low = _f64(upper), _f64(lower)
    mid = low.shape[0]
    depthwise = lambda w, g: g == w.shape[0] and w.shape[1] == 1  # noqa: E731
    if depthwise(low, lower_groups) and all(
        k == 1 for k in low.shape[2:]
    ):  # a per-channel affine before a Conv
        return (
            *into_conv_input(up, upper_bias, low.reshape(-1), lower_bias, upper_groups),
            upper_groups,
        )
    bias = _f64(upper_bias) + (
        up.reshape(up.shape[0], up.shape[1], -1).sum(axis=2)
        * _f64(lower_bias)[_input_channels(up.shape[0], up.shape[1], upper_groups)]
    ).sum(axis=1)
    if depthwise(up, upper_groups) and all(k == 1 for k in low.shape[2:]):
        return up * low.reshape(mid, low.shape[1], *[1] * (up.ndim - 2)), bias, lower_groups
    if depthwise(up, upper_groups) and all(k == 1 for k in up.shape[2:]):
        return low * up.reshape(mid, *[1] * (low.ndim - 1)), bias, lower_groups
    dense_up, dense_low = ungroup(up, upper_groups), ungroup(low, lower_groups)
    if all(k == 1 for k in low.shape[2:]):
        weight = np.einsum("om...,mi->oi...", dense_up, dense_low.reshape(dense_low.shape[:2]))
    else:
        weight = np.einsum("om,mi...->oi...", dense_up.reshape(dense_up.shape[:2]), dense_low)
    groups = math.gcd(upper_groups, lower_groups)
    return regroup(weight, groups), bias, groups


def _input_channels(out: int, per_group: int, groups: int) -> np.ndarray:
    """[C_out, C_in/G]: the input channel each tap of a grouped weight reads."""
    return (np.arange(out) // (out // groups))[:, None] * per_group + np.arange(per_group)[None, :]


def per_channel_kernel(scale, kernel: Sequence[int]) -> np.ndarray:
    """A per-channel map as a depthwise kernel [C, 1, k..]: every tap `scale[c] / prod(k)` (an
    identity or a per-channel affine's a with k = 1; an average pool's window with a ones scale)."""
    s = _f64(scale).reshape(-1)
    return np.broadcast_to(
        s.reshape(-1, 1, *[1] * len(kernel)) / np.prod(kernel), (s.size, 1, *kernel)
    ).copy()


class Rotation:
    """An orthogonal d x d matrix Q (Q Q^T = I) for rotating a residual stream: x -> x Q.
    `hadamard` (QuaRot's): Q = diag(s) kron(A, H_n), s seeded random signs, H_n the normalized
    Sylvester-Hadamard matrix of a power of two n, A of order p = d / n: 1, or a normalized
    Paley Hadamard matrix (p = q + 1, q a prime = 3 mod 4: 768 = 12 x 64), else a seeded random
    orthogonal matrix of d's odd part. `random`: a seeded random orthogonal d x d (the Q of a
    Gaussian's QR, signs fixed). Either spreads one channel over all d. Applied in float64:
    O(d (log n + p)) per vector for `hadamard` (a fast Walsh-Hadamard transform), O(d^2) for
    `random`."""

    def __init__(self, d: int, kind: str = "hadamard", seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.d, self.kind, self.seed = d, kind, seed
        self.signs = np.ones(d) if kind == "random" else rng.choice([-1.0, 1.0], d)
        self.p, self.a = (d, None) if kind == "random" else _paley_factor(d)
        self.n, self.factor = d // self.p, f"Paley Hadamard of order {self.p}"
        if self.a is None:
            self.factor, self.a = (
                f"random orthogonal of order {self.p}",
                _random_orthogonal(self.p, rng),
            )

    def describe(self) -> str:
        if self.n == 1 and self.p > 1:  # no Hadamard factor
            return f"random orthogonal {self.d} x {self.d} (seed {self.seed})"
        factor = f" x {self.factor}" if self.p > 1 else ""
        return f"randomized Hadamard {self.n}{factor} (d = {self.d}, seed {self.seed})"

    def rows(self, x: np.ndarray) -> np.ndarray:
        """x Q for the rows of x ([r, d], float64)."""
        y = (x * self.signs).reshape(len(x), self.p, self.n)
        h = 1
        while h < self.n:  # Sylvester order: pairs h apart become (a + b, a - b)
            y = y.reshape(len(x), self.p, self.n // (2 * h), 2, h)
            a, b = y[:, :, :, :1], y[:, :, :, 1:]
            y = np.concatenate([a + b, a - b], 3)
            h *= 2
        y = np.swapaxes(y.reshape(len(x), self.p, self.n), 1, 2) / math.sqrt(self.n)
        y = y.reshape(-1, self.p) @ self.a  # one product for every (row, Hadamard index)
        return np.swapaxes(y.reshape(len(x), self.n, self.p), 1, 2).reshape(len(x), self.d)

    def matrix(self) -> np.ndarray:
        """Q itself (float64)."""
        return self.rows(np.eye(self.d))


def rotate(array, axis: int, q: Rotation, scale=None, dtype=None) -> np.ndarray:
    """`array` with every vector v along `axis` replaced by (v * scale) Q, computed in float64
    a block at a time and rounded once to `dtype` (the array's own if None). A stream writer
    W [in, d] becomes W Q (axis -1); a reader's weight W [d, out] becomes Q^T diag(g) W
    (axis 0: its columns are those vectors); a Conv writer's output channels: axis 0."""
    a = np.moveaxis(np.asarray(array), axis, -1)
    out = np.empty(a.shape, a.dtype if dtype is None else dtype)
    flat, res, g = a.reshape(-1, q.d), out.reshape(-1, q.d), _scale(scale, q.d)
    _each(lambda b: res.__setitem__(b, q.rows(_f64(flat[b]) * g)), _row_blocks(len(flat), q.d))
    return np.moveaxis(out, -1, axis)


def rotated_rows(array, q: Rotation, scale=None, dtype=None) -> Iterator[np.ndarray]:
    """`rotate(array, -1, q, scale, dtype)` as consecutive blocks of leading rows (their bytes in
    order are the result's: a writer streams it to a file without the whole in memory),
    computed a few blocks ahead in threads."""
    flat, g = np.asarray(array).reshape(-1, q.d), _scale(scale, q.d)
    out = flat.dtype if dtype is None else dtype
    yield from _ahead(lambda b: q.rows(_f64(flat[b]) * g).astype(out), _row_blocks(len(flat), q.d))


def _scale(scale, d: int) -> np.ndarray:
    return np.ones(d) if scale is None else _f64(scale).reshape(-1)


def _row_blocks(rows: int, d: int) -> list[tuple[slice]]:
    """Slices of about 4 MB of float64 rows of width d."""
    per = max(1, (1 << 22) // (8 * d))
    return [(slice(s, s + per),) for s in range(0, rows, per)]


def _paley_factor(d: int) -> tuple[int, np.ndarray | None]:
    """(p, A): d = p n with n a power of two and A a normalized Paley Hadamard matrix of order
    p (None where no such p exists: p is d's odd part then)."""
    odd = d
    while odd % 2 == 0:
        odd //= 2
    if odd == 1:
        return 1, np.ones((1, 1))
    p = odd * 4
    while d % p == 0:
        q = p - 1
        if all(q % k for k in range(2, math.isqrt(q) + 1)):
            return p, _paley(q) / math.sqrt(p)
        p *= 2
    return odd, None


def _paley(q: int) -> np.ndarray:
    """Paley's construction I, q prime = 3 mod 4: H = I + S, S = [[0, 1^T], [-1, J]] with J the
    Jacobsthal matrix J[i, j] = chi(j - i) (the Legendre symbol mod q); H H^T = (q + 1) I."""
    squares = {(k * k) % q for k in range(1, q)}
    chi = np.array([0.0] + [1.0 if k in squares else -1.0 for k in range(1, q)])
    jac = chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1.0, -1.0, jac
    return np.eye(q + 1) + s


def _random_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """The Q of a Gaussian matrix's QR, its columns' signs fixed (Haar-distributed)."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))
