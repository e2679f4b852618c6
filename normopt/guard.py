"""`rewrite --guard speed`: never write a rewrite that measures slower than the original.

The rewritten model is timed against the original on the target's backend (`profiling.compare`:
an A/A control row, repetitions with fresh sessions, paired ratios with a bootstrap 95%
interval, on the inputs verification uses). Where it is slower beyond noise, the changes are
taken apart into units, each a pass that changed the model, or for a pass that reports groups
of sites (`PassResult.units`: canonicalize-norms, by fused op and layout) each group; every
variant without one unit is rebuilt from IN and timed beside the current one, and the fastest
is kept, until what is kept is not slower (or nothing is left: the output is IN's graph). Each
step's figures are reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Options, PassResult
from normopt.passes.pipeline import FINAL_PASSES, run_pipeline
from normopt.profiling import Figure, compare
from normopt.rewriter import io
from normopt.verify import VerifyOptions


@dataclass(frozen=True)
class SpeedGuard:
    """Timing settings; `backend` None: ORT CPU for --target onnx/ort, TensorRT for tensorrt."""

    backend: str | None = None
    threads: int = 2
    rounds: int = 20
    reps: int = 2
    inputs: VerifyOptions | None = (
        None  # where the inputs come from when the rewrite is not verified
    )


@dataclass(frozen=True)
class Unit:
    """What the guard may drop: a whole pass (`sites` None) or a group of its sites."""

    pass_name: str
    label: str | None = None
    sites: tuple[str, ...] | None = None

    def __str__(self) -> str:
        return self.pass_name if self.label is None else f"{self.pass_name} ({self.label})"


@dataclass
class GuardReport:
    backend: str
    steps: list[dict[str, Figure]] = field(default_factory=list)  # each comparison's rows by label
    dropped: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    final: Figure | None = None  # what is written, against the original

    @property
    def verdict(self) -> str:
        figure = (
            f"{self.final.text()} x original ({self.final.verdict})" if self.final else "not timed"
        )
        if not self.dropped:
            return f"kept every change: {figure}"
        return f"dropped {', '.join(self.dropped)} (measured slower); what is written: {figure}"

    def to_json(self) -> dict:
        return {
            "backend": self.backend,
            "verdict": self.verdict,
            "dropped": self.dropped,
            "kept": self.kept,
            "final": self.final.to_json() if self.final else None,
            "steps": [{k: f.to_json() for k, f in step.items()} for step in self.steps],
        }


def units(results: Sequence[PassResult]) -> list[Unit]:
    """The changes a run made, as units the guard may drop."""
    out = []
    for r in results:
        if not r.modified or r.name in FINAL_PASSES:
            continue
        if len(r.units) > 1:
            out += [Unit(r.name, label, tuple(sites)) for label, sites in r.units.items()]
        else:
            out.append(Unit(r.name))
    return out


def _variant(
    src: Path,
    names: Sequence[str],
    every: Sequence[Unit],
    kept: Sequence[Unit],
    options: Options,
    stage: Callable[[ir.Model], io.StagedModel],
) -> io.StagedModel:
    """IN rewritten with only the `kept` units, staged (nothing kept: IN's graph as it is)."""
    model = io.load(src)
    if kept:
        skip = {s for u in every if u not in kept for s in u.sites or ()}
        dropped_passes = {u.pass_name for u in every if u.sites is None and u not in kept}
        run_pipeline(
            model,
            [n for n in names if n not in dropped_passes],
            dataclasses.replace(options, skip_sites=options.skip_sites | frozenset(skip)),
        )
    return stage(model)


def guard_speed(
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
) -> tuple[io.StagedModel, GuardReport]:
    """Time `staged` against IN; drop units while it is slower beyond noise. Returns the staged
    model to publish (`staged` itself, or a variant: then `staged` is discarded) and the report.
    `stage(model)` stages a variant as the rewrite was staged; `check(path)` verifies it as the
    rewrite was verified."""
    backend = settings.backend or ("tensorrt" if options.target == "tensorrt" else "ort-cpu")
    report = GuardReport(backend)

    def timed(rows: dict[str, Path]) -> dict[str, Figure]:
        figures = compare(
            rows,
            "original",
            feeds,
            backend=backend,
            threads=settings.threads,
            rounds=settings.rounds,
            reps=settings.reps,
        )
        report.steps.append(figures)
        return figures

    every = units(results)
    kept = list(every)
    step("speed guard: timing the rewrite against the original")
    report.final = timed({"original": src, "rewritten": staged.path})["rewritten"]
    current = staged
    try:
        while report.final.verdict == "slower" and kept:
            step(f"speed guard: slower; timing {len(kept)} variant(s) without one change each")
            variants: dict[Unit, io.StagedModel] = {}
            try:
                for unit in kept:
                    variants[unit] = _variant(
                        src, names, every, [u for u in kept if u != unit], options, stage
                    )
                figures = timed(
                    {
                        "original": src,
                        "current": current.path,
                        **{f"without {u}": v.path for u, v in variants.items()},
                    }
                )
                best = min(variants, key=lambda u: figures[f"without {u}"].ratio)
                check(variants[best].path)
            except BaseException:
                for v in variants.values():
                    v.discard()
                raise
            for unit, v in variants.items():
                if unit != best:
                    v.discard()
            if current is not staged:
                current.discard()
            current = variants[best]
            kept.remove(best)
            report.dropped.append(str(best))
            report.final = figures[f"without {best}"]
    except BaseException:
        if current is not staged:
            current.discard()
        raise
    report.kept = [str(u) for u in kept]
    if current is not staged:
        staged.discard()
    return current, report
