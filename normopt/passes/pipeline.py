"""The passes by name, the default pipeline, and the function that runs a pipeline.

A pipeline is: annotate shapes (so the passes see ranks and normalized sizes), the passes in
order and `cleanup` whatever was asked, repeated until none of the passes asked for changes the
model (one pass's edits can make a candidate of an earlier one: a fold that gives a tied head its
own weight frees the embedding table for centring); the annotations no pass used are taken back
before the model is written (rewriter.shapes). So a second run changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from normopt.errors import BadInput
from normopt.passes.base import Options, Pass, PassResult
from normopt.passes.canonicalize_norms import CanonicalizeNorms
from normopt.passes.cleanup import Cleanup
from normopt.passes.fold_affine_norms import FoldAffineNorms
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from normopt.rewriter.shapes import annotated

PASSES: dict[str, type[Pass]] = {
    p.name: p for p in (PreLNToRMSNorm, CanonicalizeNorms, FoldAffineNorms, Cleanup)
}
# The default pipeline, in order.
DEFAULT_PIPELINE: tuple[str, ...] = ("preln-to-rmsnorm", "canonicalize-norms", "fold-affine-norms")
# Run after every pipeline, whatever was asked.
FINAL_PASSES: tuple[str, ...] = ("cleanup",)
MAX_ROUNDS = 8


def resolve(names: Sequence[str] | None) -> list[str]:
    """Validate pass names (None means the default pipeline; an empty list is an error)."""
    if names is None:
        return list(DEFAULT_PIPELINE)
    if not names:
        raise BadInput(f"--passes names no pass; known passes: {', '.join(sorted(PASSES))}")
    unknown = [n for n in names if n not in PASSES]
    if unknown:
        raise BadInput(
            f"unknown pass {', '.join(repr(n) for n in unknown)}; "
            f"known passes: {', '.join(sorted(PASSES))}"
        )
    return list(dict.fromkeys(names))


def run_pipeline(
    model: ir.Model,
    names: Sequence[str],
    options: Options | None = None,
    on_pass: Callable[[str], None] | None = None,
) -> list[PassResult]:
    """Run `names` then the final passes, again until none of `names` changes the model; one
    result per pass, in run order."""
    results: dict[str, PassResult] = {}
    order = [*names, *(n for n in FINAL_PASSES if n not in names)]
    with annotated(model):
        for _ in range(MAX_ROUNDS):
            changed = False
            for name in order:  # cleanup each round: a dead reader would still share a weight
                if on_pass:
                    on_pass(name)
                result = PASSES[name](options).run(model)
                results[name] = results[name].then(result) if name in results else result
                changed |= result.modified and name in names
            if not changed:
                break
    return list(results.values())

