"""`rewrite`: load, run a pipeline, write atomically, check, verify, publish.

Order matters for safety and memory:
  1. validate paths, load (memory-mapped), run the passes;
  2. a pass named explicitly that changed nothing stops here (`NotApplied`, nothing written);
  3. stage the output in a temp folder beside OUT, run `onnx.checker` on it, drop the model;
  4. verify original vs staged in onnxruntime, one session at a time;
  5. only then rename into place. Any failure discards the staged files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from normopt.errors import BadInput, NotApplied, VerificationFailed
from normopt.rewriter import io
from normopt.rewriter.pass_base import Options, PassResult
from normopt.rewriter.pipeline import resolve, run_pipeline
from normopt.rewriter.verify import DEFAULT_SEED, ModelRunError, VerifyReport, input_feeds, verify


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
    feeds: dict | None = None  # the inputs verification ran on (not in the JSON report)

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "written": self.written,
            "exit_code": self.exit_code,
            "error": self.error,
            "passes": [p.to_json() for p in self.passes],
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "verification": self.verification.to_json() if self.verification else None,
            "seconds": self.seconds,
        }


def op_histogram(model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _check_paths(src: Path, dst: Path, in_place: bool) -> None:
    io.check_readable_file(src)
    if dst.is_dir():
        raise BadInput(f"output '{dst}' is a directory; give a file path")
    if not dst.parent.is_dir():
        raise BadInput(f"output folder '{dst.parent}' does not exist")
    if dst.exists() and os.path.samefile(src, dst) and not in_place:
        raise BadInput(f"output '{dst}' is the input; pass --in-place to overwrite it")


def rewrite(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    passes: Sequence[str] | None = None,
    options: Options | None = None,
    check: bool = True,
    in_place: bool = False,
    verify_kwargs: dict | None = None,
    on_step: Callable[[str], None] | None = None,
    report: RewriteReport | None = None,
) -> RewriteReport:
    """Rewrite `src` into `dst`. Fills and returns `report` (also on failure: the exception
    carries the exit code, the report says how far it got)."""
    src, dst = Path(src), Path(dst)
    report = report if report is not None else RewriteReport(str(src), str(dst))
    step = on_step or (lambda _msg: None)
    _check_paths(src, dst, in_place)
    names = resolve(passes)

    t0 = time.perf_counter()
    step(f"loading {src.name}")
    model = io.load(src)
    kwargs = dict(verify_kwargs or {})
    if check:  # from the model as loaded, before any pass: no second load of IN to read its inputs
        report.feeds = input_feeds(model, kwargs.pop("inputs", None), kwargs.pop("dims", None),
                                   kwargs.pop("seed", DEFAULT_SEED))
    external = io.uses_external_data(model)
    report.nodes_before = op_histogram(model)
    t1 = time.perf_counter()
    report.passes = run_pipeline(model, names, options, on_pass=lambda n: step(f"pass {n}"))
    report.nodes_after = op_histogram(model)
    t2 = time.perf_counter()
    report.seconds.update(load=t1 - t0, passes=t2 - t1)
    if passes is not None:
        idle = [r for r in report.passes if r.name in names and not r.modified]
        if idle:
            reasons = "; ".join(
                f"{r.name}: " + "; ".join(f"{x.candidate}: {x.reason}" for x in r.refusals[:3])
                for r in idle
            )
            raise NotApplied(f"requested pass(es) applied nowhere: {reasons}")

    step(f"saving {dst.name}")
    staged = io.stage(model, dst, external_data=external,
                      progress=lambda i, n: step(f"saving {dst.name}: tensor {i}/{n}"))
    del model
    try:
        try:
            onnx.checker.check_model(str(staged.path))
        except onnx.checker.ValidationError as exc:
            raise VerificationFailed(
                f"rewritten model fails onnx.checker (a normopt bug; nothing written): "
                f"{str(exc).strip().splitlines()[0]}"
            ) from None
        t3 = time.perf_counter()
        report.seconds["save"] = t3 - t2
        if check:
            try:
                changed = {o: f"changed on request by {r.name}" for r in report.passes for o in r.changed_outputs}
                report.verification = verify(src, staged.path, inputs=report.feeds, on_step=step,
                                             changed_on_request=changed, **kwargs)
                report.verification.model_b = str(dst)
            except ModelRunError as exc:
                if exc.path == staged.path:  # the original runs, the rewrite does not: our failure
                    raise VerificationFailed(f"rewritten model does not run: {exc}") from None
                raise
            report.seconds["verify"] = time.perf_counter() - t3
            if not report.verification.ok:
                worst = report.verification.failures()[0]
                raise VerificationFailed(
                    f"rewritten model differs from the original (nothing written): "
                    f"output '{worst.name}': {worst.problem}"
                )
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    report.written = True
    return report
