"""normopt command line: inspect, rewrite, verify, passes.

Results go to stdout: tables, or with --json one JSON document (normopt.schema; also on an
error, then with `error` and `exit_code`); --report FILE writes the same document to a file.
Progress, warnings and errors go to stderr. Exit codes are in normopt.errors. User errors print
one line and never a traceback (--debug shows it). Without a terminal, output is full width
(nothing cut to 80 columns) and progress is a periodic line.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from normopt import __version__
from normopt.errors import BadInput, NormoptError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Exact norm rewrites for ONNX graphs.",
)


def _console(stderr: bool = False) -> Console:
    """Rich on a terminal; without one (CI logs, pipes) the same text at full width: nothing is
    cut to 80 columns ("hidden_s…"), whatever COLUMNS says."""
    console = Console(stderr=stderr, soft_wrap=True)
    return console if console.is_terminal else Console(stderr=stderr, soft_wrap=True, width=100_000)


out = _console()
err = _console(stderr=True)
HEARTBEAT_S = 10.0
_state = {"debug": False, "emitted": False}
INTERNAL_ERROR = 4


class Terminated(BaseException):
    """SIGTERM, raised where Python runs next, so every cleanup runs as for Ctrl-C."""


def _on_sigterm(_signum, _frame) -> None:
    raise Terminated()


def _command(fn: Callable) -> Callable:
    """Register a command whose NormoptErrors become one line on stderr and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _state["emitted"] = False
        try:
            return fn(*args, **kwargs)
        except NormoptError as exc:
            if _state["debug"]:
                raise
            err.print(f"normopt: error: {exc}", markup=False, highlight=False)
            if kwargs.get("json_out") and not _state["emitted"]:  # stdout still holds one document
                from normopt.schema import document

                _emit(
                    document(fn.__name__, {}, exit_code=exc.exit_code, error=str(exc)),
                    True,
                    None,
                    None,
                )
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("normopt: interrupted")
            raise typer.Exit(130) from None
        except Terminated:
            err.print("normopt: terminated")
            raise typer.Exit(143) from None
        except (typer.Exit, typer.Abort):
            raise
        except Exception as exc:
            if _state["debug"]:
                raise
            err.print(
                f"normopt: internal error: {type(exc).__name__}: {exc} "
                "(a bug in normopt; rerun with --debug for the traceback)",
                markup=False,
                highlight=False,
            )
            raise typer.Exit(INTERNAL_ERROR) from None

    return app.command()(wrapper)


@contextlib.contextmanager
def _progress(first: str) -> Iterator[Callable[[str], None]]:
    """A spinner on stderr naming the current step; without a terminal, a line on stderr every
    HEARTBEAT_S seconds naming the step still running (a quick run, or a quick error, prints
    none: an error stays one line)."""
    if err.is_terminal:
        with err.status(first) as status:
            yield lambda msg: status.update(msg)
        return
    current, done, start = [first], threading.Event(), time.monotonic()

    def heartbeat() -> None:
        while not done.wait(HEARTBEAT_S):
            err.print(
                f"normopt: {current[0]} ({time.monotonic() - start:.0f} s)",
                markup=False,
                highlight=False,
            )

    thread = threading.Thread(target=heartbeat, daemon=True)
    thread.start()
    try:
        yield lambda msg: current.__setitem__(0, msg)
    finally:
        done.set()
        thread.join()


def _emit(doc: dict, json_out: bool, report: Path | None, guard) -> None:
    """The command's document: to stdout with --json, to FILE with --report (atomically,
    never over an input: `guard`)."""
    if report is not None:
        from normopt.rewriter import io

        guard.check(report, "--report")
        io.write_json_atomic(report, doc)
    if json_out:
        _state["emitted"] = True
        typer.echo(json.dumps(doc, indent=2))


def _output_guard(models: list[Path], outputs: dict[str, Path | None], inputs: Path | None = None):
    """Refuse, before any work, an output (--report, --plot) that is a model, one of its data
    files or the --inputs file, or whose folder is not writable."""
    from normopt.rewriter import io

    guard = io.Guard()
    wanted = {what: path for what, path in outputs.items() if path is not None}
    for model in models:
        io.check_readable_file(model)
        for path in io.model_files(model) if wanted else [model]:
            guard.protect(path, "input model" if path == model else "input data file")
    if inputs is not None:
        guard.protect(inputs, "inputs file")
    for what, path in wanted.items():
        io.check_writable_folder(path, what)
        guard.check(path, what)
    return guard


def _parse_dims(items: list[str] | None) -> dict[str, int]:
    dims = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value.strip().isdigit():
            raise BadInput(f"--dim takes NAME=VALUE with a whole number, got '{item}'")
        dims[name.strip()] = int(value)
    return dims


def _feeds(model: Path, options) -> dict:
    """Inputs for `model`: the .npz given, else generated from its input specs."""
    from normopt.rewriter import io
    from normopt.verify import input_trials

    return input_trials(io.load(model), options)[0]


def _parse_shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        sizes = value.strip().lower().split("x")
        if not sep or not name or not all(s.strip().isdigit() for s in sizes):
            raise BadInput(
                f"--shape takes NAME=AxBxC with whole numbers (e.g. input_ids=1x128), got '{item}'"
            )
        shapes[name.strip()] = tuple(int(s) for s in sizes)
    return shapes


def _verify_options(inputs, dim, rtol, atol, seed, trials=2, shape=None):
    from normopt.verify import VerifyOptions

    return VerifyOptions(
        inputs=inputs,
        dims=_parse_dims(dim),
        shapes=_parse_shapes(shape),
        rtol=rtol,
        atol=atol,
        seed=seed,
        trials=trials,
    )


def _check_target(target: str) -> None:
    if target not in ("onnx", "ort", "tensorrt"):
        raise BadInput(f"--target must be onnx, ort or tensorrt, not '{target}'")


def _check_trt_version(version: str | None, target: str) -> None:
    if version is None:
        return
    if target != "tensorrt":
        raise BadInput("--trt-version goes with --target tensorrt")
    from normopt.plugins.spec import parse_version

    try:
        parse_version(version)
    except ValueError as exc:
        raise BadInput(f"--trt-version: {exc}") from None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _verify_table(report) -> Table:
    table = Table(title=f"{report.model_a}  vs  {report.model_b}")
    for col in (
        "output",
        "dtype",
        "shape",
        "max abs",
        "max rel",
        "cosine",
        "tol (rtol, atol)",
        "own noise",
        "ok",
    ):
        table.add_column(col)
    for o in report.outputs:
        tol = "exact" if o.rtol is None else f"{o.rtol:g}, {o.atol:g}"
        status = (
            f"[yellow]changed[/] ({escape(o.skipped)})"
            if o.skipped
            else "[green]ok[/] (within the original's own noise)"
            if o.within_noise
            else "[green]ok[/]"
            if o.ok
            else f"[red]FAIL[/] {escape(o.problem or '')}"
        )
        table.add_row(
            escape(o.name),
            o.dtype,
            str(o.shape),
            _fmt(o.max_abs),
            _fmt(o.max_rel),
            _fmt(o.cosine),
            tol,
            _fmt(o.noise),
            status,
        )
    return table


@app.callback(invoke_without_command=True)
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    _state["debug"] = debug
    if version:
        out.print(f"normopt {__version__}")
        raise typer.Exit(0)


DimOpt = Annotated[
    list[str] | None,
    typer.Option("--dim", help="Symbolic dim size, NAME=VALUE (repeatable)."),
]
ShapeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--shape", help="An input's whole shape, NAME=AxB (repeatable; e.g. input_ids=1x128)."
    ),
]
InputsOpt = Annotated[Path | None, typer.Option("--inputs", help="Inputs by name in an .npz file.")]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", help="Relative tolerance (x output scale).")
]
AtolOpt = Annotated[float | None, typer.Option("--atol", help="Absolute tolerance.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for random inputs.")]
TrialsOpt = Annotated[
    int, typer.Option("--trials", help="Random input draws to verify on (ignored with --inputs).")
]
JsonOpt = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document (normopt.schema) to stdout instead of tables."
    ),
]
ReportOpt = Annotated[
    Path | None,
    typer.Option("--report", help="Also write the JSON document to this file (atomically)."),
]


@_command
def passes(json_out: JsonOpt = False, report: ReportOpt = None) -> None:
    """List the passes, one line each."""
    from normopt.passes.pipeline import DEFAULT_PIPELINE, FINAL_PASSES, PASSES
    from normopt.schema import document

    known = PASSES
    guard = _output_guard([], {"--report": report})
    _emit(
        document(
            "passes",
            {
                "passes": {n: cls.summary for n, cls in sorted(known.items())},
                "default_pipeline": list(DEFAULT_PIPELINE),
                "always_after": list(FINAL_PASSES),
            },
        ),
        json_out,
        report,
        guard,
    )
    if json_out:
        return
    table = Table(title="normopt passes")
    table.add_column("pass")
    table.add_column("in default pipeline")
    table.add_column("what it does")
    for name, cls in sorted(known.items()):
        where = (
            "yes" if name in DEFAULT_PIPELINE else "always last" if name in FINAL_PASSES else "no"
        )
        table.add_row(name, where, cls.summary)
    out.print(table)


@_command
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model.")],
    json_out: JsonOpt = False,
    report: ReportOpt = None,
    target: Annotated[
        str, typer.Option("--target", help="onnx | ort | tensorrt: for the passes' verdicts.")
    ] = "onnx",
) -> None:
    """Describe a model: its norms, its architecture, and which passes apply and why not."""
    from normopt.inspect import inspect_model
    from normopt.rewriter.graph import dims_text

    _check_target(target)
    guard = _output_guard([model], {"--report": report})
    with _progress(f"loading {model.name}"):
        info = inspect_model(model, target)
    _emit(info, json_out, report, guard)
    if json_out:
        return
    summary = Table(title=escape(str(model)), show_header=False)
    for key, value in info["model"].items():
        if key in ("inputs", "outputs"):
            value = ", ".join(
                f"{v['name']} {v['dtype'] or '?'} {dims_text(v['shape'])}" for v in value
            )
        summary.add_row(key, escape(str(value)))
    out.print(summary)
    ops = Table(title="operators")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in info["operators"].items():
        ops.add_row(op, str(count))
    out.print(ops)
    norms = Table(title=f"norms ({len(info['norms'])})")
    for col in ("kind", "form", "axis", "epsilon", "dtype", "compute", "scale", "bias", "where"):
        norms.add_column(col)
    for n in info["norms"]:
        eps = "-" if n["epsilon"] is None else f"{n['epsilon']:.3g}"
        norms.add_row(
            n["kind"],
            n["form"],
            str(n["axis"]),
            eps,
            str(n["dtype"]),
            str(n["compute_dtype"]),
            "yes" if n["scale"] else "no",
            "yes" if n["bias"] else "no",
            n["nodes"][0],
        )
    out.print(norms)
    out.print(
        f"architecture: [bold]{info['architecture']}[/] ({'; '.join(info['architecture_reasons'])})"
    )
    table = Table(title="passes")
    for col in ("pass", "applies", "reason"):
        table.add_column(col)
    for name, p in info["passes"].items():
        table.add_row(name, "[green]yes[/]" if p["applies"] else "no", escape(p["reason"]))
    out.print(table)
    crms = info["crms"]
    after = f" after {crms['after']}" if crms["after"] else ""
    out.print(
        f"Pre-CRMSNorm (rewrite --crms on|auto){after}: {'applies' if crms['applies'] else 'no'}: "
        f"{crms['reason']}",
        markup=False,
        highlight=False,
    )


@_command
def rewrite(
    src: Annotated[Path, typer.Argument(metavar="IN", help="Input ONNX model (never modified).")],
    dst: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output path (written only on success).")
    ],
    passes: Annotated[
        str | None,
        typer.Option("--passes", help="Comma-separated pass names (default pipeline if omitted)."),
    ] = None,
    target: Annotated[
        str, typer.Option("--target", help="onnx | ort | tensorrt: which fused ops to emit.")
    ] = "onnx",
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the JSON document here (also on failure)."),
    ] = None,
    json_out: Annotated[
        bool,
        typer.Option(
            "--json",
            help="Print the JSON document (normopt.schema) to stdout instead of tables (also on "
            "failure).",
        ),
    ] = False,
    no_verify: Annotated[
        bool, typer.Option("--no-verify", help="Skip the onnxruntime equivalence check.")
    ] = False,
    explain: Annotated[
        bool, typer.Option("--explain", help="Print every refusal with its reason.")
    ] = False,
    in_place: Annotated[
        bool, typer.Option("--in-place", help="Allow OUT to be IN (replaced atomically).")
    ] = False,
    allow_hidden_state_change: Annotated[
        bool,
        typer.Option(
            "--allow-hidden-state-change",
            help="Let preln-to-rmsnorm rewrite models that output residual-stream values (those "
            "outputs change).",
        ),
    ] = False,
    profile_after: Annotated[
        bool,
        typer.Option("--profile", help="After writing OUT, time IN vs OUT side by side (ORT CPU)."),
    ] = False,
    guard: Annotated[
        str | None,
        typer.Option(
            "--guard",
            help="speed: time OUT against IN on the target's backend and drop the changes that "
            "make it slower.",
        ),
    ] = None,
    crms: Annotated[
        str | None,
        typer.Option(
            "--crms",
            help="off | on | auto: Pre-CRMSNorm (preln-to-crmsnorm, a d-1 stream); auto (the "
            "default where --passes names it; on / auto add it to the default pipeline) keeps "
            "it only where it times faster than Pre-RMSNorm.",
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            "--threads",
            help="onnxruntime intra-op threads for --guard speed, --crms auto and --profile.",
        ),
    ] = 2,
    timings: Annotated[
        bool,
        typer.Option(
            "--timings",
            help="Print where the time went (load, checker, shape annotation, each pass, save, "
            "verification, guard).",
        ),
    ] = False,
    require_change: Annotated[
        bool,
        typer.Option(
            "--require-change", help="Exit 3 (nothing written) when no pass changes the model."
        ),
    ] = False,
    tune_params: Annotated[
        str,
        typer.Option(
            "--tune-params",
            help="convbn-tune: constants | inputs (BN parameters become graph inputs with their "
            "values as defaults) | inputs:all (weights and biases too).",
        ),
    ] = "constants",
    trt_version: Annotated[
        str | None,
        typer.Option(
            "--trt-version",
            help="--target tensorrt: the TensorRT version to emit for (MAJOR.MINOR, >= 10.9; "
            "default: the installed one, else 11.4).",
        ),
    ] = None,
    dim: DimOpt = None,
    inputs: InputsOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 2,
    shape: ShapeOpt = None,
) -> None:
    """Rewrite IN into OUT. Exit 0 written; 1 verification failed; 2 bad input; 3 a requested pass
    applied nowhere (or, with --require-change, none changed the model)."""
    from normopt.guard import SpeedGuard
    from normopt.passes.base import Options
    from normopt.rewrite import RewriteReport
    from normopt.rewrite import rewrite as run_rewrite

    _check_target(target)
    if guard not in (None, "speed"):
        raise BadInput(f"--guard takes 'speed', not '{guard}'")
    if threads < 1:
        raise BadInput("--threads must be at least 1")
    if tune_params not in ("constants", "inputs", "inputs:all"):
        raise BadInput(f"--tune-params takes constants, inputs or inputs:all, not '{tune_params}'")
    _check_trt_version(trt_version, target)
    names = [n.strip() for n in passes.split(",") if n.strip()] if passes is not None else None
    checks = _verify_options(inputs, dim, rtol, atol, seed, trials, shape)
    timing = SpeedGuard(threads=threads, inputs=checks)
    result = RewriteReport(str(src), str(dst))
    try:
        with _progress(f"loading {src.name}") as step:
            run_rewrite(
                src,
                dst,
                passes=names,
                verification=None if no_verify else checks,
                options=Options(
                    target=target,
                    allow_hidden_state_change=allow_hidden_state_change,
                    tune_params=tune_params,
                    trt_version=trt_version,
                ),
                speed_guard=timing if guard else None,
                crms=crms,
                timing=timing,
                require_change=require_change,
                in_place=in_place,
                report_path=report,
                on_step=step,
                report=result,
            )
    finally:
        if json_out:
            _emit(result.to_json(), True, None, None)
        _print_rewrite_result(result, explain, timings, threads, stdout=not json_out)
    if result.changed:
        err.print(f"wrote {dst}", highlight=False)
    else:
        err.print(
            f"unchanged: no pass changed the model; wrote {dst} with IN's graph (--require-change "
            "makes "
            "this exit 3)",
            highlight=False,
            markup=False,
        )
    if profile_after:  # on the inputs verification used (generated only with --no-verify)
        feeds = result.feeds if result.feeds is not None else _feeds(src, checks)
        _run_profile([src, dst], feeds, "ort-cpu", threads, 3, 30, seed=seed, inputs_from=inputs)


def _print_rewrite_result(result, explain: bool, timings: bool, threads: int, stdout: bool) -> None:
    """The tables (on stdout unless --json took it); a failing check and notes on stderr."""
    if stdout:
        if result.passes:
            _print_rewrite(result, explain)
        if result.verification is not None:
            out.print(_verify_table(result.verification))
        if result.crms is not None:
            out.print(
                f"--crms auto ({result.crms.backend}, {threads} threads): RMS "
                f"{result.crms.rms.text()} x original; "
                f"{result.crms.why}",
                markup=False,
                highlight=False,
            )
        if result.guard is not None:
            out.print(
                f"speed guard ({result.guard.backend}, {threads} threads): {result.guard.verdict}",
                markup=False,
                highlight=False,
            )
        if timings:
            _print_timings(result.seconds)
    if result.verification is not None:
        if not result.verification.ok:  # a failing check belongs in the error log too
            err.print(_verify_table(result.verification))
        _warn_note(result.verification)


def _print_timings(seconds: dict[str, float]) -> None:
    table = Table(title="timings (seconds; an indented step is part of the next one that is not)")
    table.add_column("step")
    table.add_column("s", justify="right")
    table.add_column("share", justify="right")
    total = seconds.get("total") or 1.0
    for step, s in seconds.items():
        inner = step.startswith(("load: ", "pass ", "shape annotation"))
        table.add_row(("  " if inner else "") + step, f"{s:.3f}", f"{100 * s / total:.0f}%")
    out.print(table)


def _print_rewrite(result, explain: bool) -> None:
    table = Table(title=f"rewrite {result.input} -> {result.output}")
    for col in ("pass", "applied", "what changed / why not"):
        table.add_column(col)
    for p in result.passes:
        if p.modified:
            table.add_row(p.name, "[green]yes[/]", escape("\n".join(p.lines)))
        else:
            first = p.refusals[0] if p.refusals else None
            table.add_row(
                p.name,
                "no",
                escape(f"{first.candidate}: {first.reason}") if first else "nothing to do",
            )
    out.print(table)
    before, after = sum(result.nodes_before.values()), sum(result.nodes_after.values())
    out.print(f"nodes: {before} -> {after}")
    if explain:
        refusals = Table(title="refusals")
        for col in ("pass", "candidate", "reason"):
            refusals.add_column(col)
        for p in result.passes:
            for r in p.refusals:
                refusals.add_row(p.name, escape(r.candidate), escape(r.reason))
        out.print(refusals if refusals.row_count else "no refusals")
        changes = Table(title="changes")
        for col in ("pass", "kind", "what", "nodes", "values", "why"):
            changes.add_column(col)
        for p in result.passes:
            for c in p.changes:
                changes.add_row(
                    p.name,
                    c.kind,
                    escape(c.what),
                    escape(", ".join(c.nodes)),
                    escape(", ".join(c.values)),
                    escape(c.why),
                )
        out.print(changes if changes.row_count else "no changes")


@_command
def verify(
    model_a: Annotated[Path, typer.Argument(metavar="A", help="Reference model.")],
    model_b: Annotated[Path, typer.Argument(metavar="B", help="Model to check against A.")],
    dim: DimOpt = None,
    inputs: InputsOpt = None,
    rtol: RtolOpt = None,
    atol: AtolOpt = None,
    seed: SeedOpt = 0,
    trials: TrialsOpt = 2,
    shape: ShapeOpt = None,
    json_out: JsonOpt = False,
    report_path: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the JSON document to this file (atomically)."),
    ] = None,
) -> None:
    """Run A and B in onnxruntime (CPU, no graph optimizations) on the same inputs and compare
    outputs. Exit 0 all within tolerance; 1 not; 2 bad input."""
    from normopt.verify import verify as run_verify

    guard = _output_guard([model_a, model_b], {"--report": report_path}, inputs)
    with _progress(f"loading {model_a.name}") as step:
        report = run_verify(
            model_a,
            model_b,
            _verify_options(inputs, dim, rtol, atol, seed, trials, shape),
            on_step=step,
        )
    _emit(report.to_json(), json_out, report_path, guard)
    if not json_out:
        out.print(_verify_table(report))
    if not report.ok:
        err.print(_verify_table(report))
    _warn_note(report)
    if not report.ok:
        raise typer.Exit(1)


@_command
def recalibrate(
    src: Annotated[
        Path,
        typer.Argument(
            metavar="IN",
            help="Model with BatchNorms (plain, or after convbn-tune); never modified.",
        ),
    ],
    dst: Annotated[
        Path, typer.Argument(metavar="OUT", help="Output path (written only on success).")
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Calibration inputs: an .npz of arrays by input name with a leading sample axis, "
            "or a folder of such files.",
        ),
    ],
    batch_size: Annotated[int, typer.Option("--batch-size", help="Samples per batch.")] = 32,
    batches: Annotated[
        int | None,
        typer.Option("--batches", help="Use at most this many batches (default: all the data)."),
    ] = None,
    stats: Annotated[
        str,
        typer.Option(
            "--stats",
            help="torch: average of the batches' mean and unbiased variance (PyTorch train mode, "
            "momentum=None); pooled: over every sample at once.",
        ),
    ] = "torch",
    json_out: JsonOpt = False,
    report_path: Annotated[
        Path | None,
        typer.Option("--report", help="Also write the JSON document to this file (atomically)."),
    ] = None,
) -> None:
    """Re-estimate every BatchNorm's running mean and variance from calibration data (AdaBN),
    streaming over batches. Exit 0 written; 2 bad input (model or data)."""
    from normopt.recalibrate import recalibrate as run_recalibrate

    guard = _output_guard([src], {"--report": report_path}, data if data.is_file() else None)
    with _progress(f"loading {src.name}") as step:
        result = run_recalibrate(
            src, dst, data, batch_size=batch_size, batches=batches, stats=stats, on_step=step
        )
    _emit(result.to_json(), json_out, report_path, guard)
    if not json_out:
        layers = Table(
            title=f"recalibrated {len(result.layers)} BatchNorm(s) on {result.samples} samples "
            f"({result.batches} batches, --stats {result.stats})"
        )
        for col in ("BatchNorm", "channels", "max mean shift (old stds)", "var ratio new/old"):
            layers.add_column(col)
        for layer in result.layers:
            layers.add_row(
                escape(layer["name"]),
                str(layer["channels"]),
                f"{layer['mean_shift_max']:.3g}",
                f"{layer['var_ratio_min']:.3g} .. {layer['var_ratio_max']:.3g}",
            )
        out.print(layers)
        drift = Table(title="outputs on the first calibration batch, recalibrated vs original")
        for col in ("output", "max abs change", "relative to its scale"):
            drift.add_column(col)
        for d in result.drift:
            drift.add_row(escape(d["output"]), _fmt(d["max_abs"]), _fmt(d["max_rel"]))
        out.print(drift)
    err.print(f"wrote {dst}", highlight=False)


def _warn_note(report) -> None:
    if report.note:
        err.print(f"normopt: warning: {report.note}", markup=False, highlight=False)


def _profile_tables(report) -> None:
    first = report.models[0]
    table = Table(
        title=f"latency, {report.environment['backend']}, {report.environment['threads']} threads, "
        f"{report.summary[first]['runs']} interleaved runs each"
    )
    for col in ("model", "median ms", "p90", "p99", "mean", "std", "samples/s", "x first (paired)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    for n in report.models:
        s = report.summary[n]
        table.add_row(
            escape(n),
            f"{s['median_ms']:.3f}",
            f"{s['p90_ms']:.3f}",
            f"{s['p99_ms']:.3f}",
            f"{s['mean_ms']:.3f}",
            f"{s['std_ms']:.3f}",
            f"{s['throughput_per_s']:.1f}",
            f"{s['ratio']:.3f}",
        )
    out.print(table)
    ops = Table(title="time per op type (ms per run, share of the model's op time)")
    ops.add_column("op")
    for i, _ in enumerate(report.models):
        ops.add_column(f"model {i + 1}", justify="right")
    totals = {n: sum(report.ops[n].values()) or 1.0 for n in report.models}
    names = sorted(
        {op for n in report.models for op in report.ops[n]},
        key=lambda op: -max(report.ops[n].get(op, 0.0) for n in report.models),
    )
    for op in names[:15]:
        ops.add_row(
            op,
            *(
                f"{report.ops[n].get(op, 0.0):.3f} "
                f"({100 * report.ops[n].get(op, 0.0) / totals[n]:.1f}%)"
                for n in report.models
            ),
        )
    norm_ms = report.norms_ms
    ops.add_row(
        "[bold]all norms[/] (fused ops, and decomposed norms' nodes)",
        *(f"{norm_ms[n]:.3f} ({100 * norm_ms[n] / totals[n]:.1f}%)" for n in report.models),
    )
    out.print(ops)


def _run_profile(
    paths,
    feeds,
    backend,
    threads,
    warmup,
    runs,
    *,
    seed=0,
    inputs_from=None,
    json_out=False,
    report_path=None,
    plot_path=None,
    guard=None,
):
    from rich.progress import Progress

    from normopt.profiling import plot as make_plot
    from normopt.profiling import profile as run_profile

    with Progress(console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("profiling", total=runs)
        report = run_profile(
            paths,
            feeds,
            backend=backend,
            threads=threads,
            warmup=warmup,
            runs=runs,
            seed=seed,
            inputs_from=inputs_from,
            on_round=lambda r: bar.update(task, completed=r),
        )
    if not json_out:
        _profile_tables(report)
    _emit(report.to_json(), json_out, report_path, guard)
    if report_path is not None:
        err.print(f"wrote {report_path}", highlight=False)
    if plot_path is not None:
        err.print(f"wrote {make_plot(report, plot_path)}", highlight=False)
    return report


@_command
def profile(
    models: Annotated[
        list[Path],
        typer.Argument(
            metavar="MODEL...", help="Models to time side by side (ratios are to the first)."
        ),
    ],
    backend: Annotated[
        str, typer.Option("--backend", help="ort-cpu | ort-cuda | tensorrt.")
    ] = "ort-cpu",
    threads: Annotated[int, typer.Option("--threads", help="onnxruntime intra-op threads.")] = 2,
    dim: DimOpt = None,
    shape: ShapeOpt = None,
    inputs: InputsOpt = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per model first.")] = 3,
    runs: Annotated[int, typer.Option("--runs", help="Timed runs per model (interleaved).")] = 30,
    seed: SeedOpt = 0,
    json_out: JsonOpt = False,
    report_path: Annotated[
        Path | None,
        typer.Option(
            "--report",
            help="Also write the JSON document (every figure, the environment) to this file.",
        ),
    ] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a plot (.png or .html).")
    ] = None,
) -> None:
    """Time models side by side: interleaved runs, median/p90/p99, paired ratios, time per op
    type."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise BadInput("--runs and --threads must be at least 1, --warmup at least 0")
    guard = _output_guard(models, {"--report": report_path, "--plot": plot_path}, inputs)
    from normopt.profiling import ENGINE_SUFFIXES

    engines = [m.suffix in ENGINE_SUFFIXES for m in models]
    if any(engines):  # TensorRT engine files: random inputs of their profiles' opt shapes
        if backend != "tensorrt" or not all(engines):
            raise BadInput(
                "engine files (.engine, .plan, .trt) are timed with --backend tensorrt, and only "
                "with other engine files"
            )
        from normopt.engine.trt import load_tensorrt
        from normopt.rewriter.io import check_readable_file

        load_tensorrt("profile --backend tensorrt")
        for m in models:
            check_readable_file(m)
        feeds = {}
    else:
        feeds = _feeds(models[0], _verify_options(inputs, dim, None, None, seed, shape=shape))
    _run_profile(
        models,
        feeds,
        backend,
        threads,
        warmup,
        runs,
        seed=seed,
        inputs_from=inputs,
        json_out=json_out,
        report_path=report_path,
        plot_path=plot_path,
        guard=guard,
    )


@_command
def build(
    src: Annotated[
        Path, typer.Argument(metavar="IN", help="ONNX model (a --target tensorrt rewrite, or any).")
    ],
    dst: Annotated[Path, typer.Argument(metavar="OUT", help="Engine file (written atomically).")],
    shape: Annotated[
        list[str] | None,
        typer.Option(
            "--shape",
            help="NAME:MIN/OPT/MAX optimization profile of a dynamic input, each AxBxC "
            "(repeatable).",
        ),
    ] = None,
    dim: DimOpt = None,
    timing_cache: Annotated[
        Path | None,
        typer.Option("--timing-cache", help="TensorRT timing cache to read and update."),
    ] = None,
    workspace: Annotated[int, typer.Option("--workspace", help="Builder workspace, MiB.")] = 4096,
    plugins: Annotated[
        str, typer.Option("--plugins", help="aot (PTX in the engine, runs without Python) | jit.")
    ] = "aot",
    fp16: Annotated[
        bool,
        typer.Option(
            "--fp16",
            help="Build in float16: the graph is converted first (inputs and outputs stay float32; "
            "LayerNorms reduce in float32).",
        ),
    ] = False,
    bf16: Annotated[bool, typer.Option("--bf16", help="Build in bfloat16 (as --fp16).")] = False,
    trt_version: Annotated[
        str | None,
        typer.Option(
            "--trt-version",
            help="With --fp16/--bf16: the TensorRT the fp32 norms are emitted for (default: the "
            "installed one).",
        ),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Build a TensorRT engine (strongly typed, normopt's norm plugins registered). Needs TensorRT:
    exit 2 without it."""
    from normopt.engine.build import build_engine, profile_shapes
    from normopt.engine.trt import load_tensorrt
    from normopt.rewriter.io import check_readable_file
    from normopt.schema import document

    if plugins not in ("aot", "jit"):
        raise BadInput(f"--plugins takes aot or jit, not '{plugins}'")
    if workspace < 1:
        raise BadInput("--workspace must be at least 1 MiB")
    if fp16 and bf16:
        raise BadInput("--fp16 and --bf16 exclude each other")
    load_tensorrt("normopt build")
    check_readable_file(src)
    _output_guard([src], {"OUT": dst, "--timing-cache": timing_cache})
    profiles = profile_shapes(_input_dims(src), _parse_profiles(shape), _parse_dims(dim))
    with tempfile.TemporaryDirectory(prefix="normopt-build-") as tmp:
        graph, lowered = src, None
        if fp16 or bf16:  # a strongly typed engine computes in the graph's types
            from normopt.engine.precision import convert

            graph = Path(tmp) / "lowered.onnx"
            lowered = convert(src, graph, "fp16" if fp16 else "bf16", trt_version)
        summary = build_engine(
            graph,
            dst,
            shapes=profiles,
            workspace_mb=workspace,
            timing_cache=timing_cache,
            plugins=plugins,
        )
    _emit(
        document("build", {"input": str(src), "output": str(dst), "precision": lowered, **summary}),
        json_out,
        None,
        None,
    )
    if not json_out:
        out.print(
            ", ".join(f"{n} {kind}" for kind, n in sorted(summary["layers"].items())),
            highlight=False,
        )
    err.print(f"wrote {dst}", highlight=False)


def _input_dims(model: Path) -> dict[str, list]:
    """The graph inputs' dims (numbers, dim names) without loading the weights."""
    import onnx

    proto = onnx.load(str(model), load_external_data=False)
    names = {i.name for i in proto.graph.initializer}
    return {
        i.name: [
            d.dim_value if d.HasField("dim_value") else d.dim_param or None
            for d in i.type.tensor_type.shape.dim
        ]
        for i in proto.graph.input
        if i.name not in names
    }


def _parse_profiles(items: list[str] | None) -> dict[str, tuple]:
    """NAME:MIN/OPT/MAX with each shape AxBxC -> name -> (min, opt, max)."""
    out = {}
    for item in items or []:
        name, _, spec = item.rpartition(":")
        parts = spec.split("/")
        try:
            shapes = tuple(tuple(int(d) for d in p.split("x")) for p in parts)
        except ValueError:
            shapes = ()
        if not name or len(shapes) != 3 or len({len(s) for s in shapes}) != 1:
            raise BadInput(
                f"--shape takes NAME:MIN/OPT/MAX with shapes like 1x128/8x128/16x128, not '{item}'"
            )
        out[name] = shapes
    return out


def main() -> None:
    signal.signal(signal.SIGTERM, _on_sigterm)
    app(prog_name="normopt")


if __name__ == "__main__":
    sys.exit(main())
