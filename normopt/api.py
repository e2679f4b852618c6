"""The Python API, model in and model out (re-exported by `normopt/__init__.py`).

Each function takes a model as a path, an `onnx.ModelProto` or an `onnx_ir.Model`. `rewrite`
returns the rewritten model as the same kind (a path: the `output` path) with its report; the
input object is never changed. An in-memory model goes through a temporary folder (the CLI's
file path: checked, verified, atomic), and the rewritten one comes back in memory: for models
of several GB pass paths, which stay memory-mapped. Errors are `normopt.errors.NormoptError`
subclasses with the CLI's exit code (`BadInput` 2, `VerificationFailed` 1, `NotApplied` 3).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from normopt.rewrite import RewriteReport
    from normopt.verify import VerifyReport

ModelLike = TypeVar("ModelLike")  # str | os.PathLike | onnx.ModelProto | onnx_ir.Model
IN_MEMORY = "<in memory>"  # what reports name an in-memory model by


def _kind(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return "path"
    import onnx
    import onnx_ir as ir

    if isinstance(model, onnx.ModelProto):
        return "proto"
    if isinstance(model, ir.Model):
        return "ir"
    from normopt.errors import BadInput

    raise BadInput(
        f"a model is a path, an onnx.ModelProto or an onnx_ir.Model, not {type(model).__name__}"
    )


@contextlib.contextmanager
def _as_file(model: Any, folder: Path, name: str) -> Iterator[Path]:
    """A path holding `model`: the path itself, or the in-memory model written into `folder`
    (its tensors in a data file beside it, so nothing is limited to 2 GB; the object itself
    is not changed)."""
    kind = _kind(model)
    if kind == "path":
        yield Path(model)
        return
    import onnx_ir as ir

    from normopt.errors import BadInput
    from normopt.rewriter import io

    path = folder / name
    try:
        io.save(ir.from_proto(model) if kind == "proto" else model, path, external_data=True)
    except (OSError, ValueError) as exc:  # an ExternalTensor whose file is not found, ...
        raise BadInput(
            f"cannot write the in-memory model ({exc}); load its external data first, or pass its "
            "path"
        ) from None
    yield path


def _read_back(path: Path, kind: str) -> Any:
    """The model at `path` in memory as `kind` (the temporary folder goes away after)."""
    import onnx
    import onnx_ir as ir

    proto = onnx.load(path)  # with its external data, into memory
    return proto if kind == "proto" else ir.from_proto(proto)


def _verify_options(inputs, dims, shapes, rtol, atol, seed, trials):
    from normopt.verify import VerifyOptions

    return VerifyOptions(
        inputs=inputs,
        dims=dict(dims or {}),
        shapes={k: tuple(v) for k, v in (shapes or {}).items()},
        rtol=rtol,
        atol=atol,
        seed=seed,
        trials=trials,
    )


def rewrite(
    model: ModelLike,
    output: str | os.PathLike | None = None,
    *,
    passes: Sequence[str] | None = None,
    target: str = "onnx",
    allow_hidden_state_change: bool = False,
    tune_params: str = "constants",
    trt_version: str | None = None,
    verify: bool = True,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    trials: int = 2,
    speed_guard: bool = False,
    crms: str | None = None,
    threads: int = 2,
    require_change: bool = False,
    report: str | os.PathLike | None = None,
) -> tuple[ModelLike, RewriteReport]:
    """Rewrite `model` with `passes` (None: the default pipeline) for `target` (onnx | ort |
    tensorrt), verified in onnxruntime unless `verify=False` (inputs: arrays by name, an .npz
    path, or generated from `dims`/`shapes`/`seed`, `trials` draws), with `speed_guard` never
    slower than the original on the target's backend; `crms` off | on | auto (None: auto where
    `passes` names preln-to-crmsnorm: kept only where it times faster than Pre-RMSNorm). A path
    needs `output` (written only on
    success, never over `model`); an in-memory model comes back as the same kind. Returns
    (rewritten model, RewriteReport); `report.to_json()` is the CLI's --json document, also
    written to `report` when given."""
    from normopt.errors import BadInput
    from normopt.guard import SpeedGuard
    from normopt.passes.base import Options
    from normopt.rewrite import RewriteReport
    from normopt.rewrite import rewrite as run

    if target not in ("onnx", "ort", "tensorrt"):
        raise BadInput(f"target must be onnx, ort or tensorrt, not '{target}'")
    kind = _kind(model)
    if kind == "path" and output is None:
        raise BadInput("rewriting a model file needs an output path: rewrite(path, output)")
    if kind != "path" and output is not None:
        raise BadInput(
            "an in-memory model is returned, not written: leave out `output` (or pass a path)"
        )
    checks = _verify_options(inputs, dims, shapes, rtol, atol, seed, trials)
    if tune_params not in ("constants", "inputs", "inputs:all"):
        raise BadInput(f"tune_params must be constants, inputs or inputs:all, not '{tune_params}'")
    if trt_version is not None:
        from normopt.plugins.spec import parse_version

        try:
            parse_version(trt_version)
        except ValueError as exc:
            raise BadInput(f"trt_version: {exc}") from None
    options = Options(
        target=target,
        allow_hidden_state_change=allow_hidden_state_change,
        tune_params=tune_params,
        trt_version=trt_version,
    )
    timing = SpeedGuard(threads=threads, inputs=checks)
    with (
        tempfile.TemporaryDirectory(prefix="normopt-") as tmp,
        _as_file(model, Path(tmp), "input.onnx") as src,
    ):
        dst = Path(output) if output is not None else Path(tmp) / "output.onnx"
        result = (
            RewriteReport(str(src), str(dst))
            if kind == "path"
            else RewriteReport(IN_MEMORY, IN_MEMORY)
        )
        run(
            src,
            dst,
            passes=passes,
            options=options,
            verification=checks if verify else None,
            speed_guard=timing if speed_guard else None,
            crms=crms,
            timing=timing,
            require_change=require_change,
            report_path=report,
            report=result,
        )
        return (dst if kind == "path" else _read_back(dst, kind)), result


def verify(
    model_a: ModelLike,
    model_b: ModelLike,
    *,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    trials: int = 2,
) -> VerifyReport:
    """Run A and B in onnxruntime on the same inputs and compare every output (`report.ok`;
    `report.to_json()` is the CLI's --json document). Tolerances as in `normopt verify`."""
    from normopt.verify import verify as run

    options = _verify_options(inputs, dims, shapes, rtol, atol, seed, trials)
    with (
        tempfile.TemporaryDirectory(prefix="normopt-") as tmp,
        _as_file(model_a, Path(tmp), "a.onnx") as a,
        _as_file(model_b, Path(tmp), "b.onnx") as b,
    ):
        return run(a, b, options)


def inspect(model: ModelLike, target: str = "onnx") -> dict:
    """Describe `model` (its norms, architecture, and which passes would apply and why not):
    the CLI's `inspect --json` document. Analysis only: nothing is written or kept changed."""
    import onnx_ir as ir

    from normopt.inspect import describe, inspect_model

    kind = _kind(model)
    if kind == "path":
        return inspect_model(model, target)
    if kind == "proto":  # a new IR over the proto's tensors: edits never reach the caller's proto
        return describe(ir.from_proto(model), IN_MEMORY, target)
    return describe(model, IN_MEMORY, target, scratch=False)
