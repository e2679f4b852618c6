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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normopt.files import StagedModel
from normopt.passes.base import PassResult, Refusal
from normopt.profiling import Figure, by_op_type, node_breakdown
from normopt.request import CRMS_PASS as PASS
from normopt.variants import Variants

MATMUL_OPS = ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulInteger", "QLinearMatMul")


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


@dataclass
class CRMSDecision:
    """What is published: `variant` (the CRMS rewrite, or the RMS one with its own results
    and histogram), and what was measured."""

    staged: StagedModel
    choice: CRMSChoice
    results: list[PassResult]
    histogram: dict[str, int] | None  # None: the CRMS rewrite's, unchanged
    names: list[str]


def choose(
    variants: Variants, staged: StagedModel, names: Sequence[str], results: Sequence[PassResult]
) -> CRMSDecision:
    """`staged` (CRMS applied) against the same pipeline without it: the one to publish (the
    other is discarded), what was measured, and the pass results of what is published (where
    RMS is kept: its run's, the CRMS pass refused with the figures)."""
    width = applied(results).stats.get("width")
    variants.step("--crms auto: building the rewrite without CRMS")
    rms_names = [n for n in names if n != PASS]
    rms = variants.build(rms_names)
    try:
        variants.step("--crms auto: timing RMS and CRMS side by side")
        rows = {"RMS": rms.staged.path, "CRMS": staged.path}
        figures = variants.time(rows, against={"CRMS": "RMS"})
        kept = "CRMS" if figures["CRMS"].verdict == "faster" else "RMS"
        breakdown = {}
        if kept == "RMS":
            if variants.backend.startswith("ort"):
                variants.step("--crms auto: profiling where the time goes")
                threads = variants.request.timing.threads
                breakdown = {k: _split(p, variants.feeds, threads) for k, p in rows.items()}
            variants.verify(rms.staged)  # verified as the rewrite was, now it will be written
    except BaseException:
        variants.discard(rms.staged)
        raise
    why = _why(kept, figures["CRMS"], width, breakdown)
    choice = CRMSChoice(
        variants.backend, kept, figures["RMS"], figures["CRMS"], width, why, breakdown
    )
    if kept == "CRMS":
        variants.discard(rms.staged)
        return CRMSDecision(staged, choice, list(results), None, list(names))
    variants.discard(staged)
    refusal = Refusal("residual stream", f"--crms auto: {choice.why}", settled=True)
    at = next(i for i, r in enumerate(results) if r.name == PASS)
    merged = [*rms.results[:at], PassResult(PASS, False, [], [refusal]), *rms.results[at:]]
    return CRMSDecision(rms.staged, choice, merged, rms.histogram, rms_names)
