"""What every model builder shares: the build result, weight randomization, and export."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass
class Built:
    """A module ready to export: named example inputs, dynamic axes, output names."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)  # by input and output name
    keep_bn: bool = False  # export without folding BatchNorm into the preceding Conv
    # module types TorchScript exports as model-local functions (export_modules_as_functions)
    functions: tuple[type, ...] = ()
    # (model_type, heads, hidden): the export is run through onnxruntime's transformers
    # optimizer (opt_level 0: its fusions only), as many published ONNX transformers are
    ort_fused: tuple[str, int, int] | None = None


def ort_fuse(built: Built, path: Path) -> None:
    """Rewrite the export at `path` in place with onnxruntime's transformers optimizer
    (SkipLayerNormalization, EmbedLayerNormalization, Attention, FastGelu/BiasGelu fusions)."""
    from onnxruntime.transformers import optimizer

    model_type, heads, hidden = built.ort_fused
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        fused = optimizer.optimize_model(
            str(path), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0
        )
    fused.save_model_to_file(str(path))


def randomize_norms_and_biases(module: torch.nn.Module, seed: int) -> None:
    """Make norm affines, BN statistics and linear biases matter.

    Default initializations (gamma 1, beta 0, mean 0, var 1, zero biases) hide bugs: a dropped
    beta or a mis-centered bias changes nothing. Exporters also merge identical zero biases
    into one shared initializer, which would make every bias edit a shared-weight edit.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g, dtype=t.dtype) * std

    with torch.no_grad():
        for sub in module.modules():
            is_norm = "norm" in type(sub).__name__.lower()
            for name, p in sub.named_parameters(recurse=False):
                if is_norm and name == "weight":
                    p.copy_(1 + randn(p, 0.2))
                elif name == "bias":
                    p.copy_(randn(p, 0.1 if is_norm else 0.05))
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm):
                sub.running_mean.copy_(randn(sub.running_mean, 0.2))
                sub.running_var.copy_(0.5 + torch.rand(sub.running_var.shape, generator=g))


def export(built: Built, path: Path, *, exporter: str, opset: int) -> None:
    """Export with the TorchScript exporter ("ts") or the dynamo exporter ("dynamo")."""
    module = built.module.eval()
    names = list(built.inputs)
    args = tuple(built.inputs.values())
    quiet = io.StringIO()
    with (
        torch.no_grad(),
        contextlib.redirect_stdout(quiet),
        contextlib.redirect_stderr(quiet),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter(
            "ignore"
        )  # the TorchScript exporter is used on purpose (opsets 14/17)
        if exporter == "ts":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                output_names=built.outputs,
                dynamic_axes=built.dynamic or None,
                do_constant_folding=not built.keep_bn,
                export_modules_as_functions=set(built.functions) or False,
            )
        elif exporter == "dynamo":
            shapes = tuple(
                {axis: torch.export.Dim.DYNAMIC for axis in built.dynamic.get(n, {})} or None
                for n in names
            )
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=True,
                opset_version=opset,
                input_names=names,
                output_names=built.outputs,
                dynamic_shapes=shapes,
                external_data=False,
                optimize=not built.keep_bn,
                verbose=False,
            )
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    if not path.exists() or os.path.getsize(path) == 0:
        raise RuntimeError(f"export wrote nothing to {path}")
