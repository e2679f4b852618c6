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

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from normopt.files import StagedModel
from normopt.passes.base import PassResult
from normopt.passes.canonicalize_norms import CanonicalizeNorms, CanonicalizeSettings
from normopt.passes.pipeline import FINAL_PASSES
from normopt.profiling import Figure
from normopt.variants import Variants


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
    variants: Variants, names: Sequence[str], every: Sequence[Unit], kept: Sequence[Unit]
) -> StagedModel:
    """IN rewritten with only the `kept` units, staged (nothing kept: IN's graph as it is)."""
    if not kept:
        return variants.build(None).staged
    skip = frozenset(s for u in every if u not in kept for s in u.sites or ())
    dropped_passes = {u.pass_name for u in every if u.sites is None and u not in kept}
    names = [n for n in names if n not in dropped_passes]
    settings = {CanonicalizeNorms.name: CanonicalizeSettings(skip)} if skip else {}
    return variants.build(names, settings).staged


def guard_speed(
    variants: Variants, staged: StagedModel, names: Sequence[str], results: Sequence[PassResult]
) -> tuple[StagedModel, GuardReport]:
    """Time `staged` against IN; drop units while it is slower beyond noise. Returns the staged
    model to publish (`staged` itself, or a variant: then `staged` is discarded) and the report."""
    report = GuardReport(variants.backend)

    def timed(rows: dict[str, Path]) -> dict[str, Figure]:
        figures = variants.time(rows)
        report.steps.append(figures)
        return figures

    every = units(results)
    kept = list(every)
    variants.step("speed guard: timing the rewrite against the original")
    report.final = timed({"rewritten": staged.path})["rewritten"]
    current = staged
    while report.final.verdict == "slower" and kept:
        variants.step(f"speed guard: slower; timing {len(kept)} variant(s) without one change each")
        candidates = {
            u: _variant(variants, names, every, [k for k in kept if k != u]) for u in kept
        }
        figures = timed(
            {"current": current.path, **{f"without {u}": v.path for u, v in candidates.items()}}
        )
        best = min(candidates, key=lambda u: figures[f"without {u}"].ratio)
        variants.verify(candidates[best])
        for unit, variant in candidates.items():
            if unit != best:
                variants.discard(variant)
        if current is not staged:
            variants.discard(current)
        current = candidates[best]
        kept.remove(best)
        report.dropped.append(str(best))
        report.final = figures[f"without {best}"]
    report.kept = [str(u) for u in kept]
    if current is not staged:
        variants.discard(staged)
    return current, report
