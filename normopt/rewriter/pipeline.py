"""The pipelines, in one place, and the function that runs one on a model."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx_ir as ir

from normopt.errors import BadInput
from normopt.rewriter.graph import annotate_shapes
from normopt.rewriter.pass_base import Options, PassResult, registered

# The default pipeline, in order. Later rewrites add themselves here.
DEFAULT_PIPELINE: tuple[str, ...] = ("preln-to-rmsnorm", "canonicalize-norms", "fold-affine-norms")
# Run after every pipeline, whatever was asked.
FINAL_PASSES: tuple[str, ...] = ("cleanup",)


def resolve(names: Sequence[str] | None) -> list[str]:
    """Validate pass names (None means the default pipeline)."""
    if names is None:
        return list(DEFAULT_PIPELINE)
    known = registered()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInput(
            f"unknown pass {', '.join(repr(n) for n in unknown)}; "
            f"known passes: {', '.join(sorted(known))}"
        )
    return list(dict.fromkeys(names))


def run_pipeline(
    model: ir.Model,
    names: Sequence[str],
    options: Options | None = None,
    on_pass: Callable[[str], None] | None = None,
) -> list[PassResult]:
    """Run `names` then the final passes (each once); results in run order."""
    known = registered()
    annotate_shapes(model)
    results = []
    for name in [*names, *(n for n in FINAL_PASSES if n not in names)]:
        if on_pass:
            on_pass(name)
        results.append(known[name](options).run(model))
    return results
