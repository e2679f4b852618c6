"""`rewrite`: load, run a pipeline, write atomically, check, verify, publish.

Order matters for safety and memory:
  1. validate paths: OUT's folder exists and is writable; no output (OUT, its data file, the
     report) resolves to an input file (IN, its external data files, the inputs file);
  2. load (memory-mapped), run the passes;
  3. a pass named explicitly that changed nothing stops here (`NotApplied`, nothing written);
  4. run `onnx.checker` on the rewritten graph, stage the output in a temp folder beside OUT,
     drop the model;
  5. verify original vs staged in onnxruntime, one session at a time; with a speed guard,
     time them and drop the changes that make it slower (normopt.guard);
  6. only then rename into place. Any failure (or SIGINT/SIGTERM) discards the staged files;
     temp files a killed run left beside OUT are removed by the next run.
The report, when asked for, is written (atomically) on success and on failure, unless its
own path is what was wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir

from normopt import crms_choice
from normopt.crms_choice import CRMSChoice
from normopt.errors import BadInput, InternalError, NormoptError, NotApplied, VerificationFailed
from normopt.guard import GuardReport, SpeedGuard, guard_speed
from normopt.passes.base import Options, PassResult
from normopt.passes.pipeline import resolve, run_pipeline
from normopt.rewriter import io
from normopt.rewriter.graph import op_histogram
from normopt.schema import document, inputs_json
from normopt.timings import recording
from normopt.timings import step as timed
from normopt.verify import (
    ModelRunError,
    VerifyOptions,
    VerifyReport,
    fallback_trials,
    input_trials,
    verify,
)


@dataclass
class RewriteReport:
    input: str
    output: str
    passes: list[PassResult] = field(default_factory=list)
    verification: VerifyReport | None = None
    nodes_before: dict[str, int] = field(default_factory=dict)
    nodes_after: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    written: bool = False
    error: str | None = None
    exit_code: int = 0
    guard: GuardReport | None = None
    crms: CRMSChoice | None = None  # what --crms auto measured and kept
    trials: list[dict] | None = (
        None  # the input sets verification runs on (their hashes in `inputs`)
    )
    fallback: list[dict] | None = None  # generated inputs with unset dims at 1, if the others fail
    inputs: dict | None = (
        None  # what verification and the speed guard ran on (normopt.schema.inputs_json)
    )

    @property
    def feeds(self) -> dict | None:
        """The first input set (what the speed guard and --profile time)."""
        return self.trials[0] if self.trials else None

    @property
    def changed(self) -> bool:
        """Whether any pass changed the model (else OUT holds IN's graph)."""
        return any(p.modified for p in self.passes)

    def to_json(self) -> dict:
        """`normopt rewrite`'s document (normopt.schema): every change as a record, uncut."""
        return document(
            "rewrite",
            {
                "input": self.input,
                "output": self.output,
                "written": self.written,
                "changed": self.changed,
                "passes": [p.to_json() for p in self.passes],
                "changes": [c.to_json(p.name) for p in self.passes for c in p.changes],
                "nodes_before": self.nodes_before,
                "nodes_after": self.nodes_after,
                "verification": self.verification.body() if self.verification else None,
                "speed_guard": self.guard.to_json() if self.guard else None,
                "crms_choice": self.crms.to_json() if self.crms else None,
            },
            exit_code=self.exit_code,
            error=self.error,
            seconds=self.seconds,
            inputs=self.inputs,
        )


def _same_file(a: Path, b: Path) -> bool:
    return os.path.realpath(a) == os.path.realpath(b) or (
        a.exists() and b.exists() and os.path.samefile(a, b)
    )


def _guard_outputs(
    guard: io.Guard, src: Path, dst: Path, report_path: Path | None, in_place: bool
) -> None:
    """No output may write an input; OUT may replace IN's model file (by a rename, never
    writing into it) only with --in-place."""
    if _same_file(src, dst):
        if not in_place:
            raise BadInput(f"output '{dst}' is the input; pass --in-place to overwrite it")
    else:
        guard.check(dst, "output")
    if report_path is not None:
        guard.check(report_path, "report")
        for target, what in (
            (dst, "output"),
            (dst.parent / f"{dst.name}.data", "output's data file"),
        ):
            if os.path.realpath(report_path) == os.path.realpath(target):
                raise BadInput(f"report '{report_path}' is the {what}; choose another path")


def rewrite(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    passes: Sequence[str] | None = None,
    options: Options | None = None,
    verification: VerifyOptions | None = VerifyOptions(),  # noqa: B008 (frozen)
    speed_guard: SpeedGuard | None = None,
    crms: str | None = None,
    timing: SpeedGuard | None = None,
    require_change: bool = False,
    in_place: bool = False,
    report_path: str | os.PathLike | None = None,
    on_step: Callable[[str], None] | None = None,
    report: RewriteReport | None = None,
) -> RewriteReport:
    """Rewrite `src` into `dst`, verified unless `verification` is None, and with `speed_guard`
    never slower than `src` on the target's backend (normopt.guard); `crms` off | on | auto
    (None: auto where the pipeline holds preln-to-crmsnorm; normopt.crms_choice), auto timed
    with `timing` (default: `speed_guard`'s settings, else SpeedGuard()); `require_change`: a run
    where no pass changes the model is NotApplied (nothing written). Fills and returns
    `report` (also on failure: the exception carries the exit code, the report says how far
    it got) and writes it to `report_path` when given."""
    src, dst = Path(src), Path(dst)
    report = report if report is not None else RewriteReport(str(src), str(dst))
    report_path = Path(report_path) if report_path is not None else None
    guard = io.Guard()
    guard.protect(src, "input model")
    if verification is not None and isinstance(verification.inputs, (str, os.PathLike)):
        guard.protect(verification.inputs, "inputs file")
    report_ok = False
    try:
        if report_path is not None:
            io.check_writable_folder(report_path, "report")
            _guard_outputs(guard, src, dst, report_path, in_place)
            report_ok = True
        with recording(report.seconds), timed("total"):
            _rewrite(
                src,
                dst,
                passes,
                options,
                verification,
                speed_guard,
                crms,
                timing or speed_guard or SpeedGuard(),
                require_change,
                in_place,
                report_path,
                guard,
                on_step or (lambda _m: None),
                report,
            )
    except NormoptError as exc:
        report.error, report.exit_code = str(exc), exc.exit_code
        if report_path is not None and guard.clash(report_path):
            report_ok = False
        raise
    finally:
        if report_ok:
            io.write_json_atomic(report_path, report.to_json())
    return report


def _rewrite(
    src: Path,
    dst: Path,
    passes,
    options,
    verification,
    speed_guard,
    crms,
    timing,
    require_change,
    in_place,
    report_path,
    guard,
    step,
    report,
) -> None:
    io.check_readable_file(src)
    if dst.is_dir():
        raise BadInput(f"output '{dst}' is a directory; give a file path")
    io.check_writable_folder(dst)
    _guard_outputs(guard, src, dst, report_path, in_place)
    names, crms = crms_choice.pipeline(
        resolve(passes), crms, requested=passes is not None, target=(options or Options()).target
    )
    io.remove_stale_temps(dst.parent)

    step(f"loading {src.name}")
    with timed("load"):
        model = io.load(src)
    for data_file in io.external_data_files(model):
        guard.protect(data_file, "input data file")
    _guard_outputs(guard, src, dst, report_path, in_place)
    timed_by = speed_guard or (timing if crms == "auto" else None)
    feeds_from = verification or (timed_by.inputs or VerifyOptions() if timed_by else None)
    if feeds_from is not None:  # from the model as loaded: no second load of IN for its inputs
        report.trials = input_trials(model, feeds_from)
        report.fallback = fallback_trials(model, feeds_from)
        report.inputs = inputs_json(report.trials, feeds_from.inputs, feeds_from.seed)
    external = io.uses_external_data(model)
    report.nodes_before = op_histogram(model)
    with timed("passes"):
        report.passes = run_pipeline(model, names, options, on_pass=lambda n: step(f"pass {n}"))
    report.nodes_after = op_histogram(model)
    if require_change and not report.changed:
        raise NotApplied(
            "no pass changed the model (--require-change); nothing written: "
            + "; ".join(
                f"{r.name}: {r.refusals[0].candidate}: {r.refusals[0].reason}"
                for r in report.passes
                if r.refusals
            )
        )
    if passes is not None:
        idle = [r for r in report.passes if r.name in names and not r.modified]
        if idle:
            reasons = "; ".join(
                f"{r.name}: " + "; ".join(f"{x.candidate}: {x.reason}" for x in r.refusals[:3])
                for r in idle
            )
            raise NotApplied(f"requested pass(es) applied nowhere: {reasons}")

    def stage(model: ir.Model) -> io.StagedModel:
        with timed("output checker"):
            problem = io.check_structure(model)
        if problem is not None:
            raise InternalError(
                "the rewritten model fails onnx.checker (a bug in normopt; nothing written): "
                f"{problem}"
            )
        step(f"saving {dst.name}")
        return io.stage(
            model,
            dst,
            external_data=external,
            guard=guard,
            replaces_input=in_place and _same_file(src, dst),
            progress=lambda i, n: step(f"saving {dst.name}: tensor {i}/{n}"),
        )

    def check(path: Path) -> None:
        if verification is not None:
            with timed("verify"):
                _verify(src, path, dst, verification, step, report)

    staged = stage(model)
    del model
    try:
        check(staged.path)
        if crms == "auto" and crms_choice.applied(report.passes):
            with timed("crms choice"):
                staged, report.crms, report.passes, histogram = crms_choice.choose(
                    src,
                    staged,
                    names,
                    options or Options(),
                    report.passes,
                    report.feeds,
                    timing,
                    stage,
                    check,
                    step,
                )
            if report.crms.kept == "RMS":
                names, report.nodes_after = [n for n in names if n != crms_choice.PASS], histogram
        if speed_guard is not None:
            with timed("speed guard"):
                staged, report.guard = guard_speed(
                    src,
                    staged,
                    names,
                    options or Options(),
                    report.passes,
                    report.feeds,
                    speed_guard,
                    stage,
                    check,
                    step,
                )
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    report.written = True


def _verify(
    src: Path, staged: Path, dst: Path, verification: VerifyOptions, step, report: RewriteReport
) -> None:
    changed = {
        o: f"changed on request by {r.name}" for r in report.passes for o in r.changed_outputs
    }
    try:
        report.verification = verify(
            src,
            staged,
            verification,
            trials=report.trials,
            fallback=report.fallback,
            on_step=step,
            changed_on_request=changed,
        )
    except ModelRunError as exc:
        if exc.path == staged:  # the original runs, the rewrite does not: our failure
            reason = str(exc).replace(str(staged), str(dst))
            raise InternalError(
                f"the rewritten model does not run (a bug in normopt; nothing written): {reason}"
            ) from None
        raise
    report.verification.model_b = str(dst)
    if report.verification.note:  # it ran on the fallback inputs: the speed guard times those too
        report.trials, report.inputs = report.fallback, report.verification.inputs
    if not report.verification.ok:
        worst = report.verification.failures()[0]
        raise VerificationFailed(
            f"rewritten model differs from the original (nothing written): "
            f"output '{worst.name}': {worst.problem}"
        )
