"""The Python API, model in and model out (re-exported by `normopt/__init__.py`); the CLI is
a thin layer over it.

Each function takes a model as a path, an `onnx.ModelProto` or an `onnx_ir.Model`. `rewrite`
returns the rewritten model as the same kind (a path: the `output` path) with its report; the
input object is never changed. An in-memory model goes through a temporary folder (the CLI's
file path: checked, verified, atomic), and the rewritten one comes back in memory: for models
of several GB pass paths, which stay memory-mapped. Errors are `normopt.errors.NormoptError`
subclasses with the CLI's exit code (`BadInput` 2, `VerificationFailed` 1, `NotApplied` 3); a
failed rewrite's error carries its report (`exc.report`). `report=PATH` writes the function's
JSON document (normopt.schema) there, atomically and never over an input.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import numpy as np

    from normopt.driver import RewriteReport
    from normopt.profiler import ProfileReport
    from normopt.recalibration import RecalibrateReport
    from normopt.verification import VerifyReport

ModelLike = TypeVar("ModelLike")  # str | os.PathLike | onnx.ModelProto | onnx_ir.Model
IN_MEMORY = "<in memory>"  # what reports name an in-memory model by
Step = Callable[[str], None]


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

    from normopt import files
    from normopt.errors import BadInput

    path = folder / name
    try:
        files.save(ir.from_proto(model) if kind == "proto" else model, path, external_data=True)
    except (OSError, ValueError) as exc:  # an ExternalTensor whose file is not found, ...
        raise BadInput(
            f"cannot write the in-memory model ({exc}); load its external data first, or pass "
            "its path"
        ) from None
    yield path


def _read_back(path: Path, kind: str) -> Any:
    """The model at `path` in memory as `kind` (the temporary folder goes away after)."""
    import onnx
    import onnx_ir as ir

    proto = onnx.load(path)  # with its external data, into memory
    return proto if kind == "proto" else ir.from_proto(proto)


def _verify_options(
    inputs, dims, shapes, rtol, atol, seed, trials, method, max_memory, backend="ort-cpu"
):
    from normopt.memory import parse_size
    from normopt.verification import VerifyOptions

    if isinstance(max_memory, str):
        max_memory = parse_size(max_memory)
    return VerifyOptions(
        method=method,
        max_memory=max_memory,
        backend=backend,
        inputs=inputs,
        dims=dict(dims or {}),
        shapes={k: tuple(v) for k, v in (shapes or {}).items()},
        rtol=rtol,
        atol=atol,
        seed=seed,
        trials=trials,
    )


@contextlib.contextmanager
def _documented(
    models: Sequence[Path],
    report: str | os.PathLike | None,
    outputs: Mapping[str, str | os.PathLike | None] | None = None,
    inputs: object = None,
) -> Iterator[Callable[[dict], None]]:
    """The outputs of a command that writes documents, plots or engines: `report` and
    `outputs` (what -> path) checked before any work (a writable folder, never an input: the
    models, their data files, `inputs` where it is a file); yields the document's writer."""
    from normopt.files import Transaction
    from normopt.rewriter import io

    with Transaction() as transaction:
        wanted = {w: p for w, p in {"--report": report, **(outputs or {})}.items() if p}
        for model in models:
            io.check_readable_file(model)
            if wanted:
                transaction.protect_model(model)
        if isinstance(inputs, (str, os.PathLike)):
            transaction.protect(inputs, "inputs file")
        for what, path in wanted.items():
            transaction.output(path, what)
        yield lambda doc: report is not None and transaction.write_json(report, doc, "--report")


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
    verify_method: str = "auto",
    max_memory: int | str | None = None,
    inputs: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    trials: int = 2,
    speed_guard: bool = False,
    crms: str | None = None,
    rotate: str | None = None,
    rotate_seed: int = 0,
    threads: int = 2,
    backend: str | None = None,
    require_change: bool = False,
    in_place: bool = False,
    report: str | os.PathLike | None = None,
    on_step: Step | None = None,
) -> tuple[ModelLike, RewriteReport]:
    """Rewrite `model` with `passes` (None: the default pipeline) for `target` (onnx | ort |
    tensorrt), verified in onnxruntime unless `verify=False` (on `inputs`: arrays by name, an
    .npz path, or generated from `dims`/`shapes`/`seed`, `trials` draws; `verify_method` auto |
    full | local: whole models, or a segment at a time where they do not fit in `max_memory`),
    with `speed_guard` never slower than the original on `backend` (None: the target's; also
    what `crms` auto times: off | on | auto, None: auto where `passes` names it); `rotate`
    hadamard | random: rotate-stream, seeded by `rotate_seed`. A path needs `output` (written on
    success, never over `model` unless `in_place`); an in-memory model comes back as such. Returns
    (model, RewriteReport: to_json() is the --json, also `report`); `on_step(text)` hears steps."""
    from normopt.request import Timing

    return _rewrite(
        model,
        output,
        on_step,
        passes=tuple(passes) if passes is not None else None,
        options=_options(passes, target, allow_hidden_state_change, tune_params, trt_version),
        checks=_verify_options(
            inputs, dims, shapes, rtol, atol, seed, trials, verify_method, max_memory
        ),
        verify=verify,
        timing=Timing(backend=backend, threads=threads),
        speed_guard=speed_guard,
        crms=crms,
        rotate=rotate,
        rotate_seed=rotate_seed,
        require_change=require_change,
        in_place=in_place,
        report_path=Path(report) if report is not None else None,
    )


def _options(passes, target, allow_hidden_state_change, tune_params, trt_version):
    """The passes' Options; BadInput for arguments that do not go together."""
    from normopt.errors import BadInput
    from normopt.passes.base import Options

    if trt_version is not None and target != "tensorrt":
        raise BadInput("trt_version (--trt-version) goes with target='tensorrt'")
    if isinstance(passes, str):  # a string is a sequence too: of one-letter "pass names"
        raise BadInput(f"passes is a list of pass names, not the string {passes!r}")
    return Options(
        target, allow_hidden_state_change, tune_params=tune_params, trt_version=trt_version
    )


def _rewrite(model: Any, output, on_step: Step | None, **fields) -> tuple[Any, RewriteReport]:
    """The driver on a RewriteRequest of `fields` (normopt.request); an in-memory model goes
    through a temporary folder and comes back as the same kind."""
    from normopt.driver import rewrite as run
    from normopt.errors import BadInput
    from normopt.request import RewriteRequest

    kind = _kind(model)
    if kind == "path" and output is None:
        raise BadInput("rewriting a model file needs an output path: rewrite(path, output)")
    if kind != "path" and output is not None:
        raise BadInput(
            "an in-memory model is returned, not written: leave out `output` (or pass a path)"
        )
    from normopt.files import scratch_folder

    with (
        scratch_folder() if kind != "path" else contextlib.nullcontext(None) as tmp,
        _as_file(model, tmp, "input.onnx") as src,
    ):
        dst = Path(output) if output is not None else tmp / "output.onnx"
        request = RewriteRequest(src, dst, **fields)
        names = None if kind == "path" else (IN_MEMORY, IN_MEMORY)
        result = run(request, on_step, names)
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
    method: str = "auto",
    max_memory: int | str | None = None,
    backend: str = "ort-cpu",
    report: str | os.PathLike | None = None,
    on_step: Step | None = None,
) -> VerifyReport:
    """Run A and B in onnxruntime on the same inputs and compare every output (`report.ok`;
    `report.to_json()` is the CLI's --json document). Tolerances as in `normopt verify`;
    `method` auto | full | local and `max_memory` as in `rewrite`; `backend` ort-cpu | openvino
    (both models on OpenVINO's CPU plugin)."""
    from normopt.verification import verify as run

    options = _verify_options(
        inputs, dims, shapes, rtol, atol, seed, trials, method, max_memory, backend
    )
    from normopt.files import scratch_folder

    with (
        scratch_folder() as tmp,
        _as_file(model_a, tmp, "a.onnx") as a,
        _as_file(model_b, tmp, "b.onnx") as b,
        _documented([a, b], report, inputs=inputs) as write,
    ):
        result = run(a, b, options, on_step=on_step)
        write(result.to_json())
        return result


def inspect(
    model: ModelLike, target: str = "onnx", *, report: str | os.PathLike | None = None
) -> dict:
    """Describe `model` (its norms, architecture, and which passes would apply and why not):
    the CLI's `inspect --json` document. Nothing is written (but `report`) or kept changed."""
    import onnx_ir as ir

    from normopt.inspection import describe, inspect_model
    from normopt.passes.base import Options

    Options(target=target)  # refuses an unknown target
    kind = _kind(model)
    if kind == "path":
        with _documented([Path(model)], report) as write:
            info = inspect_model(model, target)
            write(info)
            return info
    with _documented([], report) as write:
        if kind == "proto":  # a new IR over the proto's tensors: never edits the caller's proto
            info = describe(ir.from_proto(model), IN_MEMORY, target)
        else:
            info = describe(model, IN_MEMORY, target, scratch=False)
        write(info)
        return info


def list_passes(*, report: str | os.PathLike | None = None) -> dict:
    """The passes (name -> one line), the default pipeline and what always runs last."""
    from normopt.passes.pipeline import DEFAULT_PIPELINE, FINAL_PASSES, PASSES, ordered
    from normopt.schema import document

    doc = document(
        "passes",
        {
            "passes": {n: PASSES[n].summary for n in ordered()},  # the pipeline's order
            "default_pipeline": list(DEFAULT_PIPELINE),
            "always_after": list(FINAL_PASSES),
        },
    )
    with _documented([], report) as write:
        write(doc)
    return doc


def recalibrate(
    model: str | os.PathLike,
    output: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 32,
    batches: int | None = None,
    stats: str = "torch",
    report: str | os.PathLike | None = None,
    on_step: Step | None = None,
) -> RecalibrateReport:
    """Write `model` with every BatchNorm's running statistics re-estimated on `data` (an .npz
    of arrays by input name with a leading sample axis, or a folder of them) to `output`."""
    from normopt.recalibration import recalibrate as run

    data_file = Path(data) if Path(data).is_file() else None
    with _documented([Path(model)], report, inputs=data_file) as write:
        result = run(
            model,
            output,
            data,
            batch_size=batch_size,
            batches=batches,
            stats=stats,
            on_step=on_step,
        )
        write(result.to_json())
        return result


def profile(
    models: Sequence[str | os.PathLike],
    *,
    backend: str = "ort-cpu",
    threads: int = 2,
    inputs: str | os.PathLike | None = None,
    dims: Mapping[str, int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    warmup: int = 3,
    runs: int = 30,
    seed: int = 0,
    feeds: Mapping[str, np.ndarray] | None = None,
    report: str | os.PathLike | None = None,
    plot: str | os.PathLike | None = None,
    on_round: Callable[[int], None] | None = None,
) -> ProfileReport:
    """Time `models` side by side (interleaved runs, paired ratios to the first, time per op
    type) on `feeds`, else on inputs from `inputs` or generated for the first model; TensorRT
    engine files with `backend="tensorrt"`. `plot`: a .png or .html of the figures."""
    from normopt.profiler import check_plot_path, profile_models
    from normopt.profiler import plot as make_plot

    paths = [Path(m) for m in models]
    if plot is not None:
        check_plot_path(plot)
    with _documented(paths, report, {"--plot": plot}, inputs) as write:
        result = profile_models(
            paths,
            backend=backend,
            threads=threads,
            options=_verify_options(inputs, dims, shapes, None, None, seed, 1, "auto", None),
            warmup=warmup,
            runs=runs,
            feeds=feeds,
            on_round=on_round,
        )
        write(result.to_json())
        if plot is not None:
            make_plot(result, plot)
        return result


def build(
    model: str | os.PathLike,
    engine: str | os.PathLike,
    *,
    shapes: Mapping[str, tuple] | None = None,
    dims: Mapping[str, int] | None = None,
    timing_cache: str | os.PathLike | None = None,
    workspace_mb: int = 4096,
    plugins: str = "aot",
    precision: str | None = None,
    trt_version: str | None = None,
) -> dict:
    """Build a TensorRT engine from `model` (strongly typed, normopt's plugins registered;
    `shapes`: name -> (min, opt, max) of a dynamic input; `precision` fp16 | bf16 lowers the
    graph first). Needs TensorRT: BadInput without it. Returns `normopt build`'s document."""
    from normopt.engine.build import build as run
    from normopt.engine.build import check_settings
    from normopt.engine.trt import load_tensorrt
    from normopt.schema import document

    check_settings(workspace_mb, plugins, precision)
    load_tensorrt("normopt build")
    src, dst = Path(model), Path(engine)
    cache = Path(timing_cache) if timing_cache is not None else None
    with _documented([src], None, {"OUT": dst, "--timing-cache": cache}):
        body = run(
            src,
            dst,
            shapes=dict(shapes or {}),
            dims=dict(dims or {}),
            workspace_mb=workspace_mb,
            timing_cache=cache,
            plugins=plugins,
            precision=precision,
            trt_version=trt_version,
        )
    return document("build", body)
