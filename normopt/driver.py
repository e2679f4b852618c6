"""The rewrite driver: load, run a pipeline, check, stage, verify, choose, publish.

Order matters for safety and memory:
  1. validate paths: OUT's folder exists and is writable; no output (OUT, its data file, the
     report) resolves to an input file (IN, its external data files, the inputs file);
  2. load (memory-mapped), run the passes;
  3. a pass named explicitly that changed nothing stops here (`NotApplied`, nothing written);
  4. run `onnx.checker` on the rewritten graph, stage the output in a temp folder beside OUT,
     drop the model;
  5. verify original vs staged in onnxruntime, one session at a time; with --crms auto or a
     speed guard, build the variants from IN and time them (normopt.variants);
  6. only then rename into place. Any failure (or SIGINT/SIGTERM) discards the staged files
     (normopt.files.Transaction); temp files a killed run left beside OUT are removed by the
     next run.
The report is assembled in one place (`_Run.report`) from what the steps returned; on failure
the exception carries it (`exc.report`: how far the run got). When asked for, it is written
(atomically) on success and on failure, unless its own path is what was wrong.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from normopt import crms_choice, memory
from normopt.crms_choice import CRMSChoice
from normopt.errors import BadInput, InternalError, NormoptError, NotApplied, VerificationFailed
from normopt.files import (
    Transaction,
    check_writable_folder,
    remove_stale_temps,
    same_file,
    write_json_atomic,
)
from normopt.guard import GuardReport, guard_speed
from normopt.inputs import cache_note, fallback_trials, input_trials
from normopt.passes.base import PassResult
from normopt.passes.pipeline import run_pipeline
from normopt.request import ROTATE_PASS, RewriteRequest
from normopt.rewriter import io
from normopt.rewriter.graph import op_histogram
from normopt.schema import document, inputs_json, now
from normopt.sessions import ModelRunError
from normopt.timings import recording
from normopt.timings import step as timed
from normopt.variants import COLLECT_BYTES, Variants
from normopt.verification import VerifyReport, verify
from normopt.verify_runs import Reference, run_reference


@dataclass
class RewriteReport:
    input: str
    output: str
    passes: list[PassResult] = field(default_factory=list)
    verification: VerifyReport | None = None
    nodes_before: dict[str, int] = field(default_factory=dict)
    nodes_after: dict[str, int] = field(default_factory=dict)
    bytes_before: int | None = None  # IN's files (model and external data)
    bytes_after: int | None = None  # OUT's, once written
    tensorrt: str | None = None  # --target tensorrt: the TensorRT version written for
    data_file: str | None = None  # OUT's external data file, by name (None: embedded)
    replaced_data_file: bool = False  # that file existed, and no OUT before read it
    seconds: dict[str, float] = field(default_factory=dict)
    written: bool = False
    error: str | None = None
    exit_code: int = 0
    guard: GuardReport | None = None
    crms: CRMSChoice | None = None  # what --crms auto measured and kept
    # what verification and the speed guard ran on (normopt.schema.inputs_json)
    inputs: dict | None = None
    # the first input set they ran on (what --profile times); not in the document
    feeds: dict | None = field(default=None, repr=False)

    # the document's stamp, one per report: every copy of the document carries it
    created: str = field(default_factory=now, repr=False)

    @property
    def changed(self) -> bool:
        """Whether any pass changed the model (else OUT holds IN's graph)."""
        return any(p.modified for p in self.passes)

    def to_json(self) -> dict:
        """`normopt rewrite`'s document (normopt.schema): every change as a record, uncut."""
        body = {
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "changed": self.changed,
            "passes": [p.to_json() for p in self.passes],
            "changes": [c.to_json(p.name) for p in self.passes for c in p.changes],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "tensorrt": self.tensorrt,
            "data_file": self.data_file,
            "replaced_data_file": self.replaced_data_file,
            "verification": self.verification.body() if self.verification else None,
            "speed_guard": self.guard.to_json() if self.guard else None,
            "crms_choice": self.crms.to_json() if self.crms else None,
        }
        return document(
            "rewrite",
            body,
            exit_code=self.exit_code,
            error=self.error,
            seconds=self.seconds,
            inputs=self.inputs,
            created=self.created,
        )


def rewrite(
    request: RewriteRequest,
    on_step: Callable[[str], None] | None = None,
    names: tuple[str, str] | None = None,
) -> RewriteReport:
    """Carry out `request`; returns its report. A failure raises a NormoptError (its exit code)
    whose `report` says how far the run got. `names`: how the report names IN and OUT (the API
    names in-memory models '<in memory>')."""
    run = _Run(request, on_step or (lambda _m: None), names)
    report_ok = False
    with Transaction() as transaction:
        try:
            run.protect_inputs(transaction)
            if request.report_path is not None:
                check_writable_folder(request.report_path, "report")
                run.guard_outputs(transaction)
                report_ok = True
            with recording(run.seconds), timed("total"):
                run.execute(transaction)
        except NormoptError as exc:
            exc.report = run.report(exc)
            if report_ok and transaction.guard.clash(request.report_path) is None:
                write_json_atomic(request.report_path, exc.report.to_json())
            raise
    report = run.report()
    if request.report_path is not None:
        write_json_atomic(request.report_path, report.to_json())
    return report


class _Run:
    """One rewrite's steps; each keeps what it found for `report()`."""

    def __init__(self, request: RewriteRequest, step, names: tuple[str, str] | None) -> None:
        self.request, self.step = request, step
        self.names = names or (str(request.src), str(request.dst))
        self.seconds: dict[str, float] = {}
        self.passes: list[PassResult] = []
        self.histograms: tuple[dict[str, int], dict[str, int]] = ({}, {})
        self.verification: VerifyReport | None = None
        self.plan: memory.VerifyPlan | None = None
        self.reference: Reference | None = None  # IN's outputs, run once before the passes
        self.trials: list[dict] | None = None
        self.fallback: list[dict] | None = None
        self.inputs: dict | None = None
        self.crms: CRMSChoice | None = None
        self.guard: GuardReport | None = None
        self.written = False
        self.sizes: list[int | None] = [None, None]  # IN's and OUT's files, bytes
        self.data_file: str | None = None
        self.replaced_data = False

    def report(self, error: NormoptError | None = None) -> RewriteReport:
        return RewriteReport(
            self.names[0],
            self.names[1],
            passes=self.passes,
            verification=self.verification,
            nodes_before=self.histograms[0],
            nodes_after=self.histograms[1],
            bytes_before=self.sizes[0],
            bytes_after=self.sizes[1],
            tensorrt=self.tensorrt_version(),
            data_file=self.data_file,
            replaced_data_file=self.replaced_data,
            seconds=self.seconds,
            written=self.written,
            error=str(error) if error else None,
            exit_code=error.exit_code if error else 0,
            guard=self.guard,
            crms=self.crms,
            inputs=self.inputs,
            feeds=self.trials[0] if self.trials else None,
        )

    def tensorrt_version(self) -> str | None:
        """MAJOR.MINOR of the TensorRT a --target tensorrt rewrite is written for."""
        options = self.request.options
        if options.target != "tensorrt":
            return None
        from normopt.plugins.spec import target_version

        return ".".join(map(str, target_version(options.trt_version)))

    def protect_inputs(self, transaction: Transaction) -> None:
        transaction.protect(self.request.src, "input model")
        inputs = self.request.checks.inputs
        if isinstance(inputs, (str, os.PathLike)):
            transaction.protect(inputs, "inputs file")

    def guard_outputs(self, transaction: Transaction) -> None:
        """No output may write an input; OUT may replace IN's model file (by a rename, never
        writing into it) only with --in-place."""
        src, dst, report = self.request.src, self.request.dst, self.request.report_path
        if same_file(src, dst):
            if not self.request.in_place:
                raise BadInput(f"output '{dst}' is the input; pass --in-place to overwrite it")
        else:
            transaction.guard.check(dst, "output")
        if report is None:
            return
        transaction.guard.check(report, "report")
        for target, what in (
            (dst, "output"),
            (dst.parent / f"{dst.name}.data", "output's data file"),
        ):
            if os.path.realpath(report) == os.path.realpath(target):
                raise BadInput(f"report '{report}' is the {what}; choose another path")

    def execute(self, transaction: Transaction) -> None:
        request, step = self.request, self.step
        src, dst = request.src, request.dst
        io.check_readable_file(src)
        if dst.is_dir():
            raise BadInput(f"output '{dst}' is a directory; give a file path")
        check_writable_folder(dst)
        self.guard_outputs(transaction)
        names, crms = request.pipeline()
        remove_stale_temps(dst.parent)
        step(f"loading {src.name}")
        with timed("load"):
            model = io.load(src)
        transaction.protect_model(src, model)
        self.sizes[0] = _file_bytes([src, *io.external_data_files(model)])
        self.guard_outputs(transaction)
        self.choose_inputs(model)
        self.run_original(model)
        variants = Variants(request, transaction, io.uses_external_data(model), self.verify, step)
        before = op_histogram(model)
        with timed("passes"):
            self.passes = run_pipeline(
                model, names, request.options, lambda n: step(f"pass {n}"), request.settings()
            )
        self.histograms = (before, op_histogram(model))
        self.check_applied(names)
        big = io.initializer_bytes(model) >= COLLECT_BYTES
        staged = variants.stage(model)
        del model
        if big:  # the IR holds reference cycles: its weights go before onnxruntime loads
            gc.collect()
        self.verify(staged.path)
        variants.feeds = self.trials[0] if self.trials else None
        if crms == "auto" and crms_choice.applied(self.passes):
            with timed("crms choice"):
                decision = crms_choice.choose(variants, staged, names, self.passes)
            staged, self.crms, self.passes = decision.staged, decision.choice, decision.results
            if decision.histogram is not None:
                self.histograms, names = (before, decision.histogram), decision.names
        if request.speed_guard:
            with timed("speed guard"):
                staged, self.guard = guard_speed(variants, staged, names, self.passes)
        if staged.data_name:  # a data file OUT did not use: another model's, maybe
            self.replaced_data = (dst.parent / staged.data_name).exists() and not dst.exists()
        transaction.commit(staged)
        self.written = True
        data = [dst.parent / staged.data_name] if staged.data_name else []
        self.sizes[1], self.data_file = _file_bytes([dst, *data]), staged.data_name

    def run_original(self, model) -> None:
        """Before any work: how verification will run (whole or by segments, from IN's weights;
        where neither fits, BadInput with the figures), then IN on its inputs, once for every
        comparison (one onnxruntime cannot load or run is exit 2 before the passes)."""
        checks = self.request.verification
        if checks is None:
            return
        self.plan = memory.plan(memory.ir_weights(model), checks.method, checks.max_memory)
        with timed("verify: original"):
            self.reference = run_reference(
                self.request.src, self.trials, self.fallback, self.plan, checks.backend, self.step
            )

    def choose_inputs(self, model) -> None:
        """The input sets verification and timing run on, from the model as loaded (no second
        load of IN for its inputs)."""
        request = self.request
        if request.verification is not None or request.timed:
            self.trials = input_trials(model, request.checks)
            self.fallback = fallback_trials(model, request.checks)
            checks = request.checks
            note = cache_note(model, checks)
            self.inputs = inputs_json(self.trials, checks.inputs, checks.seed, note)

    def check_applied(self, names: list[str]) -> None:
        """--require-change: some pass changed the model; --passes: each named pass did (and
        --rotate: rotate-stream did)."""
        if self.request.require_change and not any(p.modified for p in self.passes):
            reasons = "; ".join(
                f"{r.name}: {r.refusals[0].candidate}: {r.refusals[0].reason}"
                for r in self.passes
                if r.refusals
            )
            raise NotApplied(
                f"no pass changed the model (--require-change); nothing written: {reasons}"
            )
        asked = set(names) if self.request.passes is not None else set()
        if self.request.rotate is not None:  # --rotate asks for rotate-stream by name
            asked.add(ROTATE_PASS)
        idle = [r for r in self.passes if r.name in asked and not r.modified]
        if idle:
            reasons = "; ".join(
                f"{r.name}: " + "; ".join(f"{x.candidate}: {x.reason}" for x in r.refusals[:3])
                for r in idle
            )
            raise NotApplied(f"requested pass(es) applied nowhere: {reasons}")

    def verify(self, staged: Path) -> None:
        """Original against `staged`, as the request asks (nothing when it does not)."""
        checks, dst = self.request.verification, self.request.dst
        if checks is None:
            return
        changed = {
            o: f"changed on request by {r.name}" for r in self.passes for o in r.changed_outputs
        }
        with timed("verify"):
            try:
                report = verify(
                    self.request.src,
                    staged,
                    checks,
                    on_step=self.step,
                    changed_on_request=changed,
                    plan=self.plan,
                    reference=self.reference,
                )
            except ModelRunError as exc:
                if exc.path == staged:  # the original runs, the rewrite does not: our failure
                    reason = str(exc).replace(str(staged), str(dst))
                    raise InternalError(
                        "the rewritten model does not run (a bug in normopt; nothing written): "
                        f"{reason}"
                    ) from None
                raise
        report.model_b = str(dst)
        self.verification = report
        if report.note:  # it ran on the fallback inputs: the speed guard times those too
            self.trials, self.inputs = self.fallback, report.inputs
        if not report.ok:
            worst = report.failures()[0]
            raise VerificationFailed(
                f"rewritten model differs from the original (nothing written): "
                f"output '{worst.name}': {worst.problem}"
            )


def _file_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths if p.exists())
