"""inline-norm-functions: model-local functions that hold a norm are inlined first, so the
passes after it see their norms.

Before: a graph calling a function (`torch.onnx.export(export_modules_as_functions=...)` puts
each module of the chosen types in one), whose body holds a LayerNorm, RMSNorm or BatchNorm (an
op, or the ReduceMean of a decomposed one).
After: the body in place of each call, its values renamed apart; a function no call is left
for is removed. Functions without a norm stay as they are.
Conditions:
  1. the function is the model's own (a local function, not an op of a domain), with no
     recursion (onnx-ir's inliner);
  2. its body holds a norm op or a ReduceMean.
Formula: none (inlining computes the same values: the body's nodes read what the call read).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter.norms import NORM_OPS


def _holds_norm(function: ir.Function) -> bool:
    # a fused norm, or the ReduceMean every decomposed LayerNorm / RMSNorm starts from
    return any(n.op_type in NORM_OPS or n.op_type == "ReduceMean" for n in function.all_nodes())


class InlineNormFunctions(Pass[ir.OperatorIdentifier]):
    name = "inline-norm-functions"
    summary = "inline the model-local functions that hold a norm (exported modules)"

    def plan(self, model: ir.Model) -> Plan[ir.OperatorIdentifier]:
        if not model.functions:
            return Plan(idle="no model-local function")
        called = {(n.domain, n.op_type, n.overload) for n in model.graph.all_nodes()}
        plan: Plan[ir.OperatorIdentifier] = Plan()
        for key, function in model.functions.items():
            if key not in called:
                continue
            what = f"function {function.domain}::{function.name}"
            plan.decide(what, key if _holds_norm(function) else "holds no norm: left as it is")
        if not plan.actions and not plan.refusals:
            plan.idle = "no call of a model-local function"
        return plan

    def apply(self, model: ir.Model, plan: Plan[ir.OperatorIdentifier]) -> list[Change]:
        chosen = set(plan.actions)
        calls = [
            n.name or n.op_type
            for n in model.graph.all_nodes()
            if (n.domain, n.op_type, n.overload) in chosen
        ]
        InlinePass(criteria=lambda f: f.identifier() in chosen)(model)
        return [
            Change("inlined", "call(s) of model-local functions holding a norm", (c,))
            for c in calls
        ]
