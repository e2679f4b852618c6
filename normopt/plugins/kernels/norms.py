"""Triton kernels for the norms normopt's TensorRT plugins compute, and torch launchers.

One program normalizes one row. Statistics accumulate in float32 whatever the storage dtype
(fp32 / fp16 / bf16). A row up to BLOCK wide (ONE_PASS) is read once and kept in registers, so
each kernel moves the fewest bytes; a wider one is read in BLOCK-wide chunks, twice, so any
hidden size works (767, 4095, 16384, ...). Rows may be strided: each tensor has its own row
pitch (elements). (BLOCK, num_warps) per hidden size: `candidates` (the default first).

Signatures follow TensorRT's ahead-of-time Python plugins, which launch a kernel compiled to
PTX with pointers and int32 scalars only: inputs first, then int32 scalars, then outputs;
epsilon, the block size and feature switches (HAS_WEIGHT, ONE_PASS) are compile-time
constants (constexpr).
  rms_norm:      y = x / sqrt(mean(x^2) + eps) * w
  crms_norm:     x holds the first d-1 entries of a zero-mean vector of size d (the d-th is
                 -sum(x)); y = x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * w, width d-1
  add_rms_norm:  s = x + r (written out), y = rms_norm(s) * w
  layer_norm:    y = (x - mean) / sqrt(var + eps) * w + b   (for comparison)
"""

from __future__ import annotations

import functools

import triton
import triton.language as tl


@triton.jit
def _load(ptr, cols, n_cols):
    return tl.load(ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)


@triton.jit
def _sum_squares(x_ptr, n_cols, BLOCK: tl.constexpr):
    """(sum of x^2, sum of x) over one row, in float32, read in BLOCK-wide chunks."""
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = _load(x_ptr, start + tl.arange(0, BLOCK), n_cols)
        acc_sq += x * x
        acc += x
    return tl.sum(acc_sq, axis=0), tl.sum(acc, axis=0)


@triton.jit
def _scale_row(x_ptr, w_ptr, y_ptr, n_cols, inv, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """y = x * inv (* w), chunk by chunk (the row is read a second time)."""
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        y = _load(x_ptr, cols, n_cols) * inv
        if HAS_WEIGHT:
            y = y * _load(w_ptr, cols, n_cols)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _store_scaled(x, w_ptr, y_ptr, cols, n_cols, inv, HAS_WEIGHT: tl.constexpr):
    """y = x * inv (* w) for a row held in registers."""
    y = x * inv
    if HAS_WEIGHT:
        y = y * _load(w_ptr, cols, n_cols)
    tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def rms_norm_kernel(
    x_ptr,
    w_ptr,
    n_cols,
    x_pitch,
    y_pitch,
    y_ptr,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    if ONE_PASS:  # n_cols <= BLOCK: the row is read once and stays in registers
        cols = tl.arange(0, BLOCK)
        x = _load(x_row, cols, n_cols)
        _store_scaled(
            x,
            w_ptr,
            y_row,
            cols,
            n_cols,
            1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + EPS),
            HAS_WEIGHT,
        )
    else:
        sq, _ = _sum_squares(x_row, n_cols, BLOCK)
        _scale_row(x_row, w_ptr, y_row, n_cols, 1.0 / tl.sqrt(sq / n_cols + EPS), BLOCK, HAS_WEIGHT)


@triton.jit
def crms_norm_kernel(
    x_ptr,
    w_ptr,
    n_cols,
    x_pitch,
    y_pitch,
    y_ptr,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    # the implicit d-th entry is -sum(x): mean of squares over d = (sum(x^2) + sum(x)^2) / (n_cols
    # + 1)
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        x = _load(x_row, cols, n_cols)
        s = tl.sum(x, axis=0)
        inv = 1.0 / tl.sqrt((tl.sum(x * x, axis=0) + s * s) / (n_cols + 1) + EPS)
        _store_scaled(x, w_ptr, y_row, cols, n_cols, inv, HAS_WEIGHT)
    else:
        sq, s = _sum_squares(x_row, n_cols, BLOCK)
        _scale_row(
            x_row,
            w_ptr,
            y_row,
            n_cols,
            1.0 / tl.sqrt((sq + s * s) / (n_cols + 1) + EPS),
            BLOCK,
            HAS_WEIGHT,
        )


@triton.jit
def add_rms_norm_kernel(
    x_ptr,
    r_ptr,
    w_ptr,
    n_cols,
    x_pitch,
    r_pitch,
    s_pitch,
    y_pitch,
    s_ptr,
    y_ptr,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_pitch, r_ptr + row * r_pitch
    s_row, y_row = s_ptr + row * s_pitch, y_ptr + row * y_pitch
    # the sum is rounded to its stored dtype, then normalized, as an unfused Add then RMSNorm would
    if ONE_PASS:  # read x and r once; the sum stays in registers
        cols = tl.arange(0, BLOCK)
        s = (_load(x_row, cols, n_cols) + _load(r_row, cols, n_cols)).to(s_ptr.dtype.element_ty)
        tl.store(s_row + cols, s, mask=cols < n_cols)
        s = s.to(tl.float32)
        _store_scaled(
            s,
            w_ptr,
            y_row,
            cols,
            n_cols,
            1.0 / tl.sqrt(tl.sum(s * s, axis=0) / n_cols + EPS),
            HAS_WEIGHT,
        )
    else:  # write the sum chunk by chunk, accumulating its squares, then scale it from memory
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            s = (_load(x_row, cols, n_cols) + _load(r_row, cols, n_cols)).to(s_ptr.dtype.element_ty)
            tl.store(s_row + cols, s, mask=cols < n_cols)
            s = s.to(tl.float32)
            acc += s * s
        _scale_row(
            s_row,
            w_ptr,
            y_row,
            n_cols,
            1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + EPS),
            BLOCK,
            HAS_WEIGHT,
        )


@triton.jit
def layer_norm_kernel(
    x_ptr,
    w_ptr,
    b_ptr,
    n_cols,
    x_pitch,
    y_pitch,
    y_ptr,
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_PASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    # two-pass variance (sum of (x - mean)^2): no cancellation for large means
    if ONE_PASS:
        cols = tl.arange(0, BLOCK)
        x = _load(x_row, cols, n_cols)
        mean = tl.sum(x, axis=0) / n_cols
        d = tl.where(cols < n_cols, x - mean, 0.0)
        inv = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / n_cols + EPS)
        y = d * inv * _load(w_ptr, cols, n_cols) + _load(b_ptr, cols, n_cols)
        tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)
    else:
        _, s = _sum_squares(x_row, n_cols, BLOCK)
        mean = s / n_cols
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            d = tl.where(cols < n_cols, _load(x_row, cols, n_cols) - mean, 0.0)
            acc += d * d
        inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + EPS)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            y = (_load(x_row, cols, n_cols) - mean) * inv * _load(w_ptr, cols, n_cols) + _load(
                b_ptr, cols, n_cols
            )
            tl.store(y_row + cols, y.to(y_ptr.dtype.element_ty), mask=cols < n_cols)


MAX_BLOCK = 8192  # widest chunk held in registers (16 warps x 32 lanes x 16 fp32 each)


def _warps(block: int) -> int:
    return (
        1
        if block <= 256
        else 2
        if block <= 512
        else 4
        if block <= 2048
        else 8
        if block <= 4096
        else 16
    )


@functools.cache
def candidates(n_cols: int) -> tuple[tuple[int, int], ...]:
    """The (BLOCK, num_warps) launch configurations worth timing for a hidden size, the default
    first: the row in one register-resident chunk when it fits MAX_BLOCK (warps from the block
    width, then half and twice that), then narrower chunks that read the row twice. These are
    the tactics a TensorRT plugin offers its autotuner; benchmarks/norm_kernels.py --tune times
    them on a GPU."""
    block = min(triton.next_power_of_2(max(n_cols, 16)), MAX_BLOCK)
    warps = _warps(block)
    out = [(block, warps)]
    out += [(block, w) for w in (warps // 2, warps * 2) if 1 <= w <= 32 and block // (32 * w) >= 1]
    out += [(b, _warps(b)) for b in (block // 2, block // 4) if b >= 256]
    return tuple(dict.fromkeys(out))


def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a hidden size: the first of `candidates`."""
    return candidates(n_cols)[0]


# ------------------------------------------------------------------------- torch launchers


def _rows(t):
    """A [rows, cols] view with unit column stride (any leading shape, any row pitch)."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    if t.dim() == 1:
        return t.view(1, -1)
    if t.dim() > 2:
        try:
            return t.view(-1, t.shape[-1])
        except RuntimeError:
            return t.reshape(-1, t.shape[-1])
    return t


def _vector(v, n_cols: int, name: str):
    """A per-channel vector (weight, bias) as the kernels read it: n_cols values, unit stride."""
    if v is None:
        return None
    if tuple(v.shape) != (n_cols,):
        raise ValueError(f"{name} has shape {tuple(v.shape)}; the rows are {n_cols} wide")
    return v if v.stride(0) == 1 else v.contiguous()


def launch_args(n_cols: int, config=None) -> dict:
    """Compile-time launch arguments for a row width: BLOCK, ONE_PASS and num_warps (the torch
    launchers and the AOT compile both use these)."""
    block, warps = config or launch_config(n_cols)
    return {"BLOCK": block, "ONE_PASS": n_cols <= block, "num_warps": warps}


def _row_norm(kernel, x, weight, eps: float, config):
    import torch

    rows = _rows(x)
    weight = _vector(weight, rows.shape[1], "weight")
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    kernel[(rows.shape[0],)](
        rows,
        weight if weight is not None else rows,
        rows.shape[1],
        rows.stride(0),
        y.stride(0),
        y,
        EPS=eps,
        HAS_WEIGHT=weight is not None,
        **launch_args(rows.shape[1], config),
    )
    return y.view(x.shape)


def rms_norm(x, weight=None, eps: float = 1e-6, config=None):
    """RMSNorm over the last axis; y has x's dtype and shape (rows may be strided). `config`:
    a (BLOCK, num_warps) pair from `candidates`, else the default."""
    return _row_norm(rms_norm_kernel, x, weight, eps, config)


def crms_norm(x, weight=None, eps: float = 1e-6, config=None):
    """CRMSNorm of rows of width d-1 (the last axis); y has x's dtype and shape."""
    return _row_norm(crms_norm_kernel, x, weight, eps, config)


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6, config=None):
    """(x + residual, rms_norm(x + residual) * weight), both in x's dtype."""
    import torch

    if residual.shape != x.shape:
        raise ValueError(f"residual has shape {tuple(residual.shape)}; x has {tuple(x.shape)}")
    rows, res = _rows(x), _rows(residual)
    weight = _vector(weight, rows.shape[1], "weight")
    s = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    y = torch.empty_like(s)
    add_rms_norm_kernel[(rows.shape[0],)](
        rows,
        res,
        weight if weight is not None else rows,
        rows.shape[1],
        rows.stride(0),
        res.stride(0),
        s.stride(0),
        y.stride(0),
        s,
        y,
        EPS=eps,
        HAS_WEIGHT=weight is not None,
        **launch_args(rows.shape[1], config),
    )
    return s.view(x.shape), y.view(x.shape)


def layer_norm(x, weight, bias, eps: float = 1e-5, config=None):
    """LayerNorm over the last axis (for comparison)."""
    import torch

    rows = _rows(x)
    weight, bias = _vector(weight, rows.shape[1], "weight"), _vector(bias, rows.shape[1], "bias")
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    layer_norm_kernel[(rows.shape[0],)](
        rows,
        weight,
        bias,
        rows.shape[1],
        rows.stride(0),
        y.stride(0),
        y,
        EPS=eps,
        **launch_args(rows.shape[1], config),
    )
    return y.view(x.shape)
