"""normopt's TensorRT norm plugins, one spec each: what the emitter writes into the ONNX graph,
what the TensorRT registration declares, and what the CPU reference computes all read these.

Each plugin is an ONNX node in domain `normopt` with a unique op type (never a built-in name:
TensorRT's parser would import a built-in op instead), and the attributes TensorRT's parser
reads: `plugin_namespace` and `plugin_version` pick the registered plugin, `aot` = 1 its
ahead-of-time (PTX) implementation; `epsilon` is the one plugin field, a FLOAT. TensorRT's
QDP calls aot_impl with every field in registration order, so every node carries them all.

  NormoptRMSNorm(x, weight) -> y             y = x / sqrt(mean(x^2) + eps) * weight
  NormoptCRMSNorm(x, weight) -> y            x: the first d-1 entries of a zero-mean vector;
                                             y = x / sqrt((sum(x^2) + sum(x)^2) / d + eps) * weight
  NormoptAddRMSNorm(x, residual, weight) -> (sum, y)
                                             sum = x + residual (rounded to x's dtype),
                                             y = RMSNorm(sum) * weight
Statistics accumulate in float32 (the kernels) whatever the storage dtype: fp16 models do not
overflow in the squares. Normalized over the last axis; its size must be static.
"""

from __future__ import annotations

from dataclasses import dataclass

DOMAIN = "normopt"  # the ONNX domain of the plugin nodes, and the plugins' TensorRT namespace
VERSION = "1"  # TensorRT's Python plugins are always version "1"


@dataclass(frozen=True)
class PluginSpec:
    op_type: str  # the ONNX op type and the TensorRT plugin name
    kernel: str  # the Triton kernel in normopt.plugins.kernels.norms
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    fields: tuple[tuple[str, type], ...] = (
        ("epsilon", float),
    )  # the plugin's attributes, in order

    def attributes(self, epsilon: float, aot: bool = True) -> dict:
        """Every attribute a node of this plugin carries (fields first, in registration order)."""
        return {
            "epsilon": float(epsilon),
            "plugin_namespace": DOMAIN,
            "plugin_version": VERSION,
            "aot": int(aot),
        }


RMS_NORM = PluginSpec("NormoptRMSNorm", "rms_norm_kernel", ("x", "weight"), ("y",))
CRMS_NORM = PluginSpec("NormoptCRMSNorm", "crms_norm_kernel", ("x", "weight"), ("y",))
ADD_RMS_NORM = PluginSpec(
    "NormoptAddRMSNorm", "add_rms_norm_kernel", ("x", "residual", "weight"), ("sum", "y")
)
PLUGINS = {spec.op_type: spec for spec in (RMS_NORM, CRMS_NORM, ADD_RMS_NORM)}

# TensorRT versions: ahead-of-time Python plugins since 10.9; the ONNX parser imports
# RMSNormalization natively since 10.15. The newest checked (docs/tensorrt_plugins.md): 11.4.
OLDEST, NEWEST, NATIVE_RMSNORM = (10, 9), (11, 4), (10, 15)


def parse_version(text: str) -> tuple[int, int]:
    """'10.9' or '10.9.0.34' -> (10, 9); ValueError with the reason otherwise."""
    parts = text.strip().split(".")
    try:
        version = (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0)
    except ValueError:
        raise ValueError(f"'{text}' is no TensorRT version (MAJOR.MINOR, e.g. 10.9)") from None
    if version < OLDEST:
        raise ValueError(
            f"TensorRT {text} has no ahead-of-time Python plugins; normopt's need >= 10.9"
        )
    return version


def installed_version() -> tuple[int, int] | None:
    """The installed TensorRT's version, read from its package metadata (nothing imported)."""
    import importlib.metadata

    for dist in (
        "tensorrt",
        "tensorrt-cu12",
        "tensorrt-cu13",
        "tensorrt-cu12-bindings",
        "tensorrt-cu13-bindings",
    ):
        try:
            return parse_version(importlib.metadata.version(dist))
        except (importlib.metadata.PackageNotFoundError, ValueError):
            continue
    return None


def target_version(text: str | None) -> tuple[int, int]:
    """The TensorRT version to emit for: `text` (--trt-version), else the installed one, else
    the newest normopt knows."""
    return parse_version(text) if text else (installed_version() or NEWEST)
