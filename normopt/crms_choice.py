"""`rewrite --crms off|on|auto`: Pre-CRMSNorm kept only where it measures faster than Pre-RMSNorm.

`preln-to-crmsnorm` carries the stream in d-1 coordinates: its norms need no recentring, but
every matrix product that reads or writes the stream gets K or N = d-1, which can cost more
than the norms save (a width that is a multiple of 8 or 16 loses its alignment). So:
  off   the pass does not run (even where --passes names it);
  on    it runs where its preconditions hold;
  auto  (the default where the pipeline holds the pass) it runs; where it changed the model,
        the same pipeline without it is built from IN and verified as the rewrite was, both are
        timed side by side on the target's backend (profiling.compare: paired, interleaved
        rounds, an A/A control, fresh sessions per repetition), and the CRMS rewrite is kept
        only when it is faster than the RMS one beyond noise (within noise: RMS, the original
        width, at the same speed). Where CRMS loses, onnxruntime's profiler splits each
        variant's time into matrix products and the rest, and the report says whether the
        d-1 width is why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.guard import SpeedGuard
from normopt.passes.base import Options, PassResult, Refusal
from normopt.passes.pipeline import run_pipeline
from normopt.profiling import Figure, by_op_type, compare, node_breakdown
from normopt.rewriter import io
from normopt.rewriter.graph import op_histogram

PASS = "preln-to-crmsnorm"
MODES = ("off", "on", "auto")
MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "QLinearMatMul")


def pipeline(
    names: Sequence[str], mode: str | None, requested: bool, target: str = "onnx"
) -> tuple[list[str], str]:
    """The pass names to run for `mode` and the mode itself (None: auto where the pass is in
    `names`, else off). on / auto add the pass right after preln-to-rmsnorm (the stream must be
    Pre-RMSNorm first) where `names` is the default pipeline; named passes are the user's.
    auto for --target tensorrt is refused: onnxruntime cannot time plugin nodes, engines are
    compared with `normopt build` and `profile --backend tensorrt`."""
    if mode not in (None, *MODES):
        raise BadInput(f"--crms takes off, on or auto, not '{mode}'")
    names = list(names)
    if mode is None:
        mode = "auto" if PASS in names else "off"
    if mode == "auto" and target == "tensorrt":
        raise BadInput(
            "--crms auto times the rewrites in onnxruntime, which cannot run TensorRT plugin "
            "nodes: "
            "pass --crms on (compare engines with normopt build and profile --backend tensorrt) or "
            "--crms off"
        )
    if mode == "off":
        return [n for n in names if n != PASS], mode
    if PASS not in names:
        if requested:
            raise BadInput(f"--crms {mode}: --passes does not name {PASS}")
        at = names.index("preln-to-rmsnorm") + 1 if "preln-to-rmsnorm" in names else 0
        names.insert(at, PASS)
    return names, mode


@dataclass
class CRMSChoice:
    """What `auto` measured and kept."""

    backend: str
    kept: str  # "CRMS" | "RMS"
    rms: Figure  # the RMS rewrite against the original
    crms: Figure  # the CRMS rewrite against the RMS rewrite
    width: int | None  # the stream's d (CRMS carries d-1)
    why: str
    breakdown: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # variant -> ms in matrix products / the rest

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "kept": self.kept,
            "why": self.why,
            "width": self.width,
            "rms_vs_original": self.rms.to_json(),
            "crms_vs_rms": self.crms.to_json(),
            "breakdown": self.breakdown,
        }


def applied(results: Sequence[PassResult]) -> PassResult | None:
    return next((r for r in results if r.name == PASS and r.modified), None)


def _split(path: Path, feeds: Mapping[str, np.ndarray], threads: int) -> dict[str, float]:
    per_op = by_op_type(node_breakdown(path, feeds, threads=threads))
    matmul = sum(ms for op, ms in per_op.items() if op in MATMUL_OPS)
    return {"matmul_ms": matmul, "other_ms": sum(per_op.values()) - matmul}


def _why(kept: str, crms: Figure, width: int | None, breakdown: dict[str, dict[str, float]]) -> str:
    head = f"CRMS {crms.text()} x RMS ({crms.verdict})"
    if kept == "CRMS":
        return f"{head}: kept CRMS"
    head += ": kept RMS" + (
        " (same speed, original width)" if crms.verdict == "within noise" else ""
    )
    if not breakdown:
        return head
    r, c = breakdown["RMS"], breakdown["CRMS"]
    matmul, rest = c["matmul_ms"] - r["matmul_ms"], c["other_ms"] - r["other_ms"]
    figures = (
        f"matrix products {r['matmul_ms']:.3f} -> {c['matmul_ms']:.3f} ms, the rest (norms "
        "included) "
        f"{r['other_ms']:.3f} -> {c['other_ms']:.3f} ms"
    )
    if matmul > 0.02 * r["matmul_ms"] and matmul >= rest:
        narrow = f"d-1 = {width - 1}" if width else "d-1"
        misaligned = (
            ", misaligned: d is a multiple of 8" if width is not None and width % 8 == 0 else ""
        )
        return f"{head}; {figures}: the d-1 width (K or N = {narrow}{misaligned}) is why"
    if rest > 0:
        return (
            f"{head}; {figures}: the norms are why (CRMSNorm runs as separate ops; onnxruntime "
            "fuses "
            "RMSNorm into one kernel)"
        )
    return f"{head}; {figures}: the norms saved too little to show"


def choose(
    src: Path,
    staged: io.StagedModel,
    names: Sequence[str],
    options: Options,
    results: Sequence[PassResult],
    feeds: Mapping[str, np.ndarray],
    settings: SpeedGuard,
    stage: Callable[[ir.Model], io.StagedModel],
    check: Callable[[Path], None],
    step: Callable[[str], None],
) -> tuple[io.StagedModel, CRMSChoice, list[PassResult], dict[str, int]]:
    """`staged` (CRMS applied) against the same pipeline without it. Returns the one to publish
    (the other is discarded), what was measured, and the pass results and op histogram of what
    is published (where RMS is kept: its run's, the CRMS pass refused with the figures)."""
    backend = settings.backend or "ort-cpu"  # --target tensorrt was refused (pipeline())
    width = applied(results).stats.get("width")
    step("--crms auto: building the rewrite without CRMS")
    model = io.load(src)  # the rewrite is staged: IN's weights are loaded once at a time
    rms_results = run_pipeline(model, [n for n in names if n != PASS], options)
    histogram = op_histogram(model)
    rms = stage(model)
    del model
    try:
        step("--crms auto: timing RMS and CRMS side by side")
        figures = compare(
            {"original": src, "RMS": rms.path, "CRMS": staged.path},
            "original",
            feeds,
            backend=backend,
            threads=settings.threads,
            rounds=settings.rounds,
            reps=settings.reps,
            against={"CRMS": "RMS"},
        )
        kept = "CRMS" if figures["CRMS"].verdict == "faster" else "RMS"
        breakdown = {}
        if kept == "RMS" and backend.startswith("ort"):
            step("--crms auto: profiling where the time goes")
            breakdown = {
                "RMS": _split(rms.path, feeds, settings.threads),
                "CRMS": _split(staged.path, feeds, settings.threads),
            }
        if kept == "RMS":  # verified as the rewrite was, once it is what will be written
            check(rms.path)
    except BaseException:
        rms.discard()
        raise
    choice = CRMSChoice(
        backend,
        kept,
        figures["RMS"],
        figures["CRMS"],
        width,
        _why(kept, figures["CRMS"], width, breakdown),
        breakdown,
    )
    if kept == "CRMS":
        rms.discard()
        return staged, choice, list(results), {}
    staged.discard()
    refused = PassResult(
        PASS, False, [], [Refusal("residual stream", f"--crms auto: {choice.why}", settled=True)]
    )
    at = next(i for i, r in enumerate(results) if r.name == PASS)
    return rms, choice, [*rms_results[:at], refused, *rms_results[at:]], histogram
