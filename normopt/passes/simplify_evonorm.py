"""`simplify-evonorm`: a B0/B1/B2 EvoNorm's per-channel values broadcast, not spread.

Before: Max(Expand(sqrt(running_var + eps), Shape(x)), right), or Max(C, right) with C that
        constant already spread by the exporter to x's full (static) shape [N, C, H, W];
        right = x * v + Expand(instance_std(x), Shape(x)) (B0; B1: (x + 1) * Expand(...),
        B2: Expand(...) - x).
After:  Max(c, right) with c the [1, C, 1, 1] constant, right = x * v + instance_std(x): the
        ops broadcast (a full-shape constant of every B0 layer, batch size baked in, leaves the
        model; an Expand and its Shape leave each branch).
Conditions (rewriter.norms_evo.broadcasts): the match is an EvoNorm B variant; an Expand is
the match's own and spreads to x's shape (Shape(x), or a constant equal to x's static shape);
a spread constant is equal along the batch and spatial axes. Exact: the op's other operand is x
combined elementwise with per-channel constants, so the result has the same shape and entries.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan, Refusal
from normopt.rewriter.edit import Editor
from normopt.rewriter.evonorm_broadcast import Broadcast, broadcasts
from normopt.rewriter.norms import find_norms


class SimplifyEvoNorm(Pass[Broadcast]):
    name = "simplify-evonorm"
    summary = (
        "let a B0/B1/B2 EvoNorm's running-variance branch and instance statistic broadcast "
        "(a per-channel constant instead of one spread to x's shape; Expands dropped)"
    )

    def plan(self, model: ir.Model) -> Plan[Broadcast]:
        plan = Plan()
        for match in find_norms(model.graph):
            if match.kind != "evonorm" or not match.detail["variant"].startswith("B"):
                continue
            found = broadcasts(match)
            plan.actions += found
            if not found:
                plan.refusals.append(
                    Refusal(
                        f"evonorm {match.detail['variant']} at {match.where()}",
                        "no operand spread to its input's shape (an Expand whose shape is "
                        "Shape(x), a constant or an inferred shape equal to x's, or a constant "
                        "of x's shape equal along batch and space)",
                        settled=True,
                    )
                )
        if not plan.actions and not plan.refusals:
            plan.idle = "no EvoNorm B0/B1/B2"
        return plan

    def apply(self, model: ir.Model, plan: Plan[Broadcast]) -> list[Change]:
        edit = Editor(model.graph)
        changes = []
        for b in plan.actions:
            old = b.node.inputs[b.index]
            if isinstance(b.source, np.ndarray):
                constant = edit.initializer(f"{old.name}.channels", b.source)
                b.node.replace_input_with(b.index, constant)
            else:
                b.node.replace_input_with(b.index, b.source)
                if not old.uses() and not old.is_graph_output():  # the dropped Expand: gone
                    edit.graph.remove(old.producer(), safe=True)  # now, so the passes after
                    # this one in the round still see the EvoNorm (it reads the statistic)
            changes.append(Change("simplified", b.what, (b.node.name,), (old.name,)))
        return changes
