"""The passes by name, the default pipeline, and the function that runs a pipeline.

A pipeline is: annotate shapes (so the passes see ranks and normalized sizes; afresh in every
round), the passes in order and `cleanup` whatever was asked (a pass after one that changed the
model always runs);
then again every pass that refused a candidate while a later pass changed the model (one
pass's edits can free a candidate of an earlier one: a fold that gives a tied head its own
weight frees the embedding table for centring), until none changes anything; the annotations
no pass used are taken back before the model is written (rewriter.shapes). So a second run
changes nothing.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping, Sequence

import onnx_ir as ir

from normopt.errors import BadInput
from normopt.passes.base import Options, Pass, PassResult
from normopt.passes.canonicalize_norms import CanonicalizeNorms
from normopt.passes.cleanup import Cleanup
from normopt.passes.convbn_tune import ConvBNTune
from normopt.passes.fold_affine_norms import FoldAffineNorms
from normopt.passes.fold_norm_affine import FoldNormAffine
from normopt.passes.inline_norm_functions import InlineNormFunctions
from normopt.passes.merge_branches import MergeBranches
from normopt.passes.preln_to_crmsnorm import PreLNToCRMSNorm
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from normopt.passes.rotate_stream import RotateStream
from normopt.passes.simplify_evonorm import SimplifyEvoNorm
from normopt.passes.tensorrt_norms import TensorRTNorms
from normopt.rewriter.shapes import annotated
from normopt.timings import step

PASSES: dict[str, type[Pass]] = {
    p.name: p
    for p in (
        InlineNormFunctions,
        PreLNToRMSNorm,
        CanonicalizeNorms,
        SimplifyEvoNorm,
        FoldAffineNorms,
        MergeBranches,
        TensorRTNorms,
        FoldNormAffine,
        PreLNToCRMSNorm,
        RotateStream,
        ConvBNTune,
        Cleanup,
    )
}
# The default pipeline, in order.
DEFAULT_PIPELINE: tuple[str, ...] = (
    "inline-norm-functions",
    "preln-to-rmsnorm",
    "canonicalize-norms",
    "simplify-evonorm",
    "fold-affine-norms",
    "merge-branches",
    "tensorrt-norms",
)
# Run after every pipeline, whatever was asked.
FINAL_PASSES: tuple[str, ...] = ("cleanup",)
MAX_ROUNDS = 8


def parse(text: str) -> tuple[str, object | None]:
    """`name` or `name{field=value field=value}` -> (name, the pass's Settings or None);
    BadInput for an unknown pass, field or value."""
    name, _, rest = text.partition("{")
    name = name.strip()
    if name not in PASSES:
        return name, None  # resolve() names it among the unknown passes
    if not rest:
        return name, None
    if not rest.endswith("}"):
        raise BadInput(f"pass '{text}': settings go in braces, name{{field=value}}")
    cls = PASSES[name].Settings
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    values = {}
    for item in rest[:-1].split():
        key, sep, value = item.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in fields:
            known = ", ".join(fields) or "none"
            raise BadInput(f"pass '{name}' has no setting '{key}' (it has: {known})")
        kind = {int: "int", float: "float", str: "str"}.get(fields[key], fields[key])
        kind = str(kind).removesuffix(" | None")
        if kind not in ("int", "float", "str"):
            raise BadInput(f"pass '{name}': {key} cannot be set in a pipeline string")
        try:
            values[key] = {"int": int, "float": float, "str": str}[kind](value)
        except ValueError:
            raise BadInput(f"pass '{name}': {key} takes a {kind}, not '{value}'") from None
    return name, cls(**values)


def bare(names: Sequence[str]) -> list[str]:
    """The pass names without their settings."""
    return [parse(n)[0] for n in names]


def ordered() -> list[str]:
    """Every pass name in the order a user reads them: the default pipeline as it runs, the
    passes run only on request, then those that always run last."""
    rest = sorted(set(PASSES) - set(DEFAULT_PIPELINE) - set(FINAL_PASSES))
    return [*DEFAULT_PIPELINE, *rest, *FINAL_PASSES]


def resolve(names: Sequence[str] | None) -> list[str]:
    """Validate pass names (None means the default pipeline; an empty list is an error); a
    name keeps its settings (`name{field=value}`)."""
    if names is None:
        return list(DEFAULT_PIPELINE)
    if not names:
        raise BadInput(f"--passes names no pass; known passes: {', '.join(ordered())}")
    unknown = [n for n in bare(names) if n not in PASSES]
    if unknown:
        guesses = [g for n in unknown for g in difflib.get_close_matches(n, PASSES, n=1)]
        hint = f" (did you mean {', '.join(repr(g) for g in guesses)}?)" if guesses else ""
        raise BadInput(
            f"unknown pass {', '.join(repr(n) for n in unknown)}{hint}; "
            f"known passes: {', '.join(ordered())}"
        )
    return list(dict.fromkeys(bare(names)))


def settings_of(names: Sequence[str] | None) -> dict[str, object]:
    """The settings the names carry, by pass name."""
    return {n: s for n, s in (parse(n) for n in names or ()) if s is not None}


def run_pipeline(
    model: ir.Model,
    names: Sequence[str],
    options: Options | None = None,
    on_pass: Callable[[str], None] | None = None,
    settings: Mapping[str, object] | None = None,
) -> list[PassResult]:
    """Run `names` then the final passes; then again those that refused a candidate while a pass
    after them changed the model, until none does. One result per pass, in run order. A name
    may carry its pass's settings (`name{field=value}`); `settings` gives them as objects by
    pass name (they win)."""
    settings = {**settings_of(names), **(settings or {})}
    names = bare(names)
    results: dict[str, PassResult] = {}
    finals = [n for n in FINAL_PASSES if n not in names]
    order = [*names, *finals]
    pending = set(order)
    for _ in range(MAX_ROUNDS):
        # annotated afresh each round: the values an earlier round created get their shapes
        # too, so a round plans as a new run on that round's input would (idempotence)
        with annotated(model):
            ran: list[tuple[str, bool]] = []
            for name in order:
                # a pass runs when pending, or when a pass before it changed the model this round
                if name not in pending and not any(m for _, m in ran):
                    continue
                if on_pass:
                    on_pass(name)
                with step(f"pass {name}"):
                    result = PASSES[name](options, settings.get(name)).run(model)
                results[name] = results[name].then(result) if name in results else result
                ran.append((name, result.modified))
        # again: the passes that refused a candidate a later pass's edits may have freed
        # (cleanup each round: a dead reader still shares a weight)
        pending = {
            n
            for i, (n, _) in enumerate(ran)
            if n in names
            and any(m for _, m in ran[i + 1 :])
            and any(r.may_change for r in results[n].refusals)
        }
        if not pending:
            break
        pending.update(finals)
    return list(results.values())
