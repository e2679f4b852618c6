"""Triton kernels for the norms normopt's TensorRT plugins compute, and torch launchers.

One program normalizes one row. Statistics accumulate in float32 whatever the storage dtype
(fp32 / fp16 / bf16); the row is read in BLOCK-wide chunks, so any hidden size works (767,
4095, ...). Rows may be strided: each tensor has its own row pitch (elements).

Signatures follow TensorRT's ahead-of-time Python plugins, which launch a kernel compiled to
PTX with pointers and int32 scalars only: inputs first, then int32 scalars, then outputs;
epsilon, the block size and feature switches are compile-time constants (constexpr).
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
def _sum_squares(x_ptr, n_cols, BLOCK: tl.constexpr):
    """(sum of x^2, sum of x) over one row, in float32."""
    acc_sq = tl.zeros([BLOCK], dtype=tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        acc_sq += x * x
        acc += x
    return tl.sum(acc_sq, axis=0), tl.sum(acc, axis=0)


@triton.jit
def _scale_row(x_ptr, w_ptr, y_ptr, n_cols, inv, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        y = tl.load(x_ptr + cols, mask=mask, other=0.0).to(tl.float32) * inv
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rms_norm_kernel(x_ptr, w_ptr, n_cols, x_pitch, y_pitch, y_ptr,
                    EPS: tl.constexpr, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    sq, _ = _sum_squares(x_row, n_cols, BLOCK)
    _scale_row(x_row, w_ptr, y_row, n_cols, 1.0 / tl.sqrt(sq / n_cols + EPS), BLOCK, HAS_WEIGHT)


@triton.jit
def crms_norm_kernel(x_ptr, w_ptr, n_cols, x_pitch, y_pitch, y_ptr,
                     EPS: tl.constexpr, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    sq, s = _sum_squares(x_row, n_cols, BLOCK)
    inv = 1.0 / tl.sqrt((sq + s * s) / (n_cols + 1) + EPS)  # the implicit d-th entry is -sum(x)
    _scale_row(x_row, w_ptr, y_row, n_cols, inv, BLOCK, HAS_WEIGHT)


@triton.jit
def add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, n_cols, x_pitch, r_pitch, s_pitch, y_pitch, s_ptr, y_ptr,
                        EPS: tl.constexpr, BLOCK: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, r_row = x_ptr + row * x_pitch, r_ptr + row * r_pitch
    s_row, y_row = s_ptr + row * s_pitch, y_ptr + row * y_pitch
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):  # write the sum (stored dtype), accumulate its squares
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32) + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = s.to(s_ptr.dtype.element_ty)
        tl.store(s_row + cols, s, mask=mask)
        s32 = s.to(tl.float32)  # normalize the sum as stored, as an unfused Add then RMSNorm would
        acc += s32 * s32
    inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + EPS)
    _scale_row(s_row, w_ptr, y_row, n_cols, inv, BLOCK, HAS_WEIGHT)


@triton.jit
def layer_norm_kernel(x_ptr, w_ptr, b_ptr, n_cols, x_pitch, y_pitch, y_ptr,
                      EPS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row, y_row = x_ptr + row * x_pitch, y_ptr + row * y_pitch
    _, s = _sum_squares(x_row, n_cols, BLOCK)
    mean = s / n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):  # two-pass variance: no cancellation for large means
        cols = start + tl.arange(0, BLOCK)
        d = tl.where(cols < n_cols, tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32) - mean, 0.0)
        acc += d * d
    inv = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / n_cols + EPS)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_row + cols, ((x - mean) * inv * w + b).to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a hidden size: one chunk up to 8192 columns (the row stays in
    registers), then 8192-wide chunks; more warps for wider blocks."""
    block = min(triton.next_power_of_2(max(n_cols, 16)), 8192)
    warps = 1 if block <= 256 else 2 if block <= 512 else 4 if block <= 2048 else 8 if block <= 4096 else 16
    return block, warps


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


def _row_norm(kernel, x, weight, eps: float):
    import torch

    rows = _rows(x)
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block, warps = launch_config(rows.shape[1])
    kernel[(rows.shape[0],)](rows, weight if weight is not None else rows, rows.shape[1], rows.stride(0),
                             y.stride(0), y, EPS=eps, BLOCK=block, HAS_WEIGHT=weight is not None, num_warps=warps)
    return y.view(x.shape)


def rms_norm(x, weight=None, eps: float = 1e-6):
    """RMSNorm over the last axis; y has x's dtype and shape (rows may be strided)."""
    return _row_norm(rms_norm_kernel, x, weight, eps)


def crms_norm(x, weight=None, eps: float = 1e-6):
    """CRMSNorm of rows of width d-1 (the last axis); y has x's dtype and shape."""
    return _row_norm(crms_norm_kernel, x, weight, eps)


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6):
    """(x + residual, rms_norm(x + residual) * weight), both in x's dtype."""
    import torch

    rows, res = _rows(x), _rows(residual)
    s = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    y = torch.empty_like(s)
    block, warps = launch_config(rows.shape[1])
    add_rms_norm_kernel[(rows.shape[0],)](rows, res, weight if weight is not None else rows, rows.shape[1],
                                          rows.stride(0), res.stride(0), s.stride(0), y.stride(0), s, y,
                                          EPS=eps, BLOCK=block, HAS_WEIGHT=weight is not None, num_warps=warps)
    return s.view(x.shape), y.view(x.shape)


def layer_norm(x, weight, bias, eps: float = 1e-5):
    """LayerNorm over the last axis (for comparison)."""
    import torch

    rows = _rows(x)
    y = torch.empty(rows.shape, dtype=x.dtype, device=x.device)
    block, warps = launch_config(rows.shape[1])
    layer_norm_kernel[(rows.shape[0],)](rows, weight, bias, rows.shape[1], rows.stride(0), y.stride(0), y,
                                        EPS=eps, BLOCK=block, num_warps=warps)
    return y.view(x.shape)
