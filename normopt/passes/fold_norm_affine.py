"""`fold-norm-affine`: fold a LayerNorm's or RMSNorm's gamma and beta into the linear ops that
read it, leaving an affine-free norm (Jiang et al. 2023, Sec. 3.2: what Pre-CRMSNorm needs; alone
it saves the norm's elementwise scale and shift, which a TensorRT norm plugin then need not do).

Before: y = Norm(x) * gamma + beta  (LayerNormalization, RMSNormalization, onnxruntime's
        SimplifiedLayerNormalization; over the last axis) -> every reader z_i = y W_i + b_i
        (MatMul [+ bias Add], Gemm; a parallel block's q, k, v: every reader), also through
        the carriers fold-affine-norms reads through (linear_fold.carried): a Reshape to
        [..., d] (dynamo's view before addmm), Gather/Slice/Squeeze/Unsqueeze on other axes (a
        ViT's x[:, 0]), mean or sum pooling over tokens (a sum scales beta by its count)
After:  y0 = Norm(x) with scale ones and no bias -> z_i = y0 (diag(gamma) W_i) + (b_i + beta W_i)
        (a bias is added only where none existed and beta W_i is non-zero)
Conditions:
  1. the norm is an op (run canonicalize-norms first for decomposed ones) over the last axis,
     its gamma (and beta) constant per channel, and not already affine-free;
  2. its output is no graph output (nor what a carrier makes of it), and every node reading its
     numbers, through carriers, is a MatMul or Gemm reading it as its data input, with a
     constant weight over the same channels (a 2-D MatMul weight; Gemm without transA); the
     refusal names the first reader that is not;
  3. no reader's weight or bias is shared with another node: folding would copy it (a tied LM
     head would double the embedding table).
Formula: (Norm(x) * gamma + beta) W + b = Norm(x) (diag(gamma) W) + (beta W + b), the same
fold as fold-affine-norms' into a following op (rewriter.numerics.into_matmul_input /
into_gemm_input, float64, cast back).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import folded_value, rank, readers
from normopt.rewriter.linear_fold import (
    Fold,
    bias_add_after,
    carried,
    fold_problem,
    fold_weights,
    is_carrier,
)
from normopt.rewriter.norms import NormMatch, find_norms

OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")


@dataclass
class AffineFold:
    match: NormMatch
    gamma: np.ndarray
    beta: np.ndarray
    folds: list[Fold]

    def describe(self) -> str:
        return f"{self.match.kind} at {self.match.where()} into {len(self.folds)} reader(s)"


def _shared(reader: ir.Node, fold: Fold) -> str | None:
    """The first weight or bias of `reader` another node reads too, or None."""
    holders = [(reader, 1), (reader, 2)] + (
        [(fold.bias_add, i) for i in (0, 1)] if fold.bias_add else []
    )
    for node, index in holders:
        value = node.inputs[index] if index < len(node.inputs) else None
        if (
            value is not None
            and folded_value(value) is not None
            and (len(readers(value)) > 1 or value.is_graph_output() or value.is_graph_input())
        ):
            return value.name
    return None


def _linear_readers(
    value: ir.Value, r: int | None, axis: int | None, factor: float = 1.0
) -> list[tuple[ir.Node, ir.Value, float]] | str:
    """Every (linear op, the value it reads, the factor on the shift) that `value`'s numbers
    reach through carriers of whole channel vectors (linear_fold.carried), or why a reader is
    neither."""
    found = []
    for reader in readers(value, numbers_only=True):
        if reader.op_type in ("MatMul", "Gemm"):
            found.append((reader, value, factor))
            continue
        if not is_carrier(reader) or reader.inputs[0] is not value:
            return f"read by {reader.op_type} {reader.name}, not by a MatMul or Gemm"
        step = carried(reader, value, r, axis)
        if isinstance(step, str):
            return step
        out = reader.outputs[0]
        if out.is_graph_output():
            return f"'{out.name}' ({reader.op_type} of its output) is a graph output"
        further = _linear_readers(out, step[0], step[1], factor * step[2])
        if isinstance(further, str):
            return further
        found += further
    return found


def _plan_one(match: NormMatch) -> AffineFold | str:
    norm = match.nodes[0]
    if match.form != "op":
        return "a decomposed norm (canonicalize-norms fuses it first)"
    if norm.op_type not in OPS:
        return f"a {norm.op_type}, whose output includes the residual Add: not folded"
    if match.axis != -1:
        return f"it normalizes {match.normalized_axes} axes, not the last one alone"
    gamma = folded_value(match.scale)
    beta = folded_value(match.bias) if match.bias is not None else None
    if gamma is None or (match.bias is not None and beta is None):
        return "its scale or bias is not constant"
    d = gamma.size
    if gamma.ndim != 1 or (beta is not None and beta.size != d):
        return f"its scale has shape {list(gamma.shape)}, not one value per channel"
    beta = np.zeros(d, gamma.dtype) if beta is None else beta.reshape(d)
    if np.all(gamma == 1) and not np.any(beta):
        return "already affine-free"
    if match.output.is_graph_output():
        return f"its output '{match.output.name}' is a graph output"
    r = rank(match.output)
    linear = _linear_readers(match.output, r, None if r is None else r - 1)
    if isinstance(linear, str):
        return linear
    folds = []
    for reader, value, factor in linear:
        problem = fold_problem(reader, value, d, input_side=True)
        fold = Fold(gamma, beta * factor, "following", reader, bias_add_after(reader))
        shared = None if problem else _shared(reader, fold)
        if problem or shared:
            return (
                problem
                or f"{reader.op_type} {reader.name}'s weight '{shared}' is shared with another "
                "node (folding would copy it)"
            )
        folds.append(fold)
    if not folds:
        return "nothing reads its numbers"
    return AffineFold(match, gamma, beta, folds)


def _apply_one(edit: Editor, action: AffineFold) -> Change:
    norm, m = action.match.nodes[0], action.match
    change = Change(
        "folded",
        f"{m.kind} scale and bias into the linear ops reading it",
        (norm.name, *(f.linear.name for f in action.folds)),
        tuple(v.name for v in (m.scale, m.bias) if v),
    )
    for fold in action.folds:
        fold_weights(edit, fold)
    edit.set_constant_input(norm, 1, np.ones_like(action.gamma), f"{norm.name}.unit_scale")
    if norm.op_type == "LayerNormalization" and len(norm.inputs) > 2:
        norm.resize_inputs(2)  # no bias: the readers took it
    return change


class FoldNormAffine(Pass[AffineFold]):
    name = "fold-norm-affine"
    summary = (
        "fold LayerNorm/RMSNorm gamma and beta into the MatMul/Gemm reading them (affine-free "
        "norms)"
    )

    def plan(self, model: ir.Model) -> Plan[AffineFold]:
        plan = Plan()
        for match in find_norms(model.graph):
            if match.kind not in ("layernorm", "rmsnorm"):
                continue
            plan.decide(f"{match.kind} at {match.where()}", _plan_one(match))
        if not plan.actions and not plan.refusals:
            plan.idle = "no LayerNorm or RMSNorm"
        return plan

    def apply(self, model: ir.Model, plan: Plan[AffineFold]) -> list[Change]:
        edit = Editor(model.graph)
        return [_apply_one(edit, action) for action in plan.actions]
