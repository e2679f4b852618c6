"""The passes by name, the default pipeline, and the function that runs a pipeline.

A pipeline is: annotate shapes (so the passes see ranks and normalized sizes), the passes in
order, then `cleanup` whatever was asked; the annotations no pass used are taken back before
the model is written (rewriter.shapes).
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
    """Run `names` then the final passes (each once); results in run order."""
    results = []
    with annotated(model):
        for name in [*names, *(n for n in FINAL_PASSES if n not in names)]:
            if on_pass:
                on_pass(name)
            results.append(PASSES[name](options).run(model))
    return results

