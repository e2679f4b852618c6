"""CPU references of the plugins in `spec`: numpy functions (float64 accumulation), what the
Triton kernels are tested against (`rms_norm` / `crms_norm` / `add_rms_norm`). The same
computation as ONNX ops, for onnxruntime, is normopt.lowering."""

from __future__ import annotations

import numpy as np


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis, float64, in x's dtype."""
    x64 = x.astype(np.float64)
    return (
        x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * weight.astype(np.float64)
    ).astype(x.dtype)


def crms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (width d-1) / sqrt((sum(x^2) + sum(x)^2) / d + eps) * weight, float64, in x's dtype."""
    x64 = x.astype(np.float64)
    d = x.shape[-1] + 1
    ms = ((x64 * x64).sum(-1, keepdims=True) + x64.sum(-1, keepdims=True) ** 2) / d
    return (x64 / np.sqrt(ms + eps) * weight.astype(np.float64)).astype(x.dtype)


def add_rms_norm(
    x: np.ndarray, residual: np.ndarray, weight: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """(x + residual rounded to x's dtype, rms_norm of that sum)."""
    s = (x.astype(np.float64) + residual.astype(np.float64)).astype(x.dtype)
    return s, rms_norm(s, weight, eps)
