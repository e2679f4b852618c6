"""`fold-affine-norms`: fold inference-time per-channel affines into an adjacent linear op.

Before: Conv|ConvTranspose|Gemm|MatMul[+Add b] -> y = a*x + c          (preceding)
        y = a*x + c -> [Gather|Slice|Squeeze on token axes, mean/sum pooling over tokens or
        space, a Reshape/Flatten to [..., C]] -> MatMul|Gemm|Conv   (following)
        where y = a*x + c is BatchNormalization (also between Transposes, and SLAB's RepBN
        BN(x) + alpha*x) or a chain of per-channel constant Mul/Add/Sub/Div (Unified Norm,
        PowerNorm's affine).
After:  the linear op alone, with folded weights (a new bias Add only where none existed and
        the folded bias is non-zero).
Conditions:
  1. a and c are constants (BN statistics, alpha, chain constants: folded through the small
     constant subgraphs exporters leave, e.g. dynamo's Expand-built zero conv bias);
  2. the value between the norm and the linear op has exactly one reader and is no graph
     output (preceding: the linear op's output; following: the norm's output);
  3. the channel axis maps onto the weight axis being scaled: output channels of a Conv (axis
     1) or of a MatMul/Gemm (last axis) before; the input channels after; and the norm has
     exactly as many channels as that weight axis;
  4. into a following Conv only with all pads zero or c == 0 (zero padding would add the
     shift to border outputs only partly);
  5. a linear op takes one norm per round; weights shared with other nodes are copied, never
     edited in place;
  6. between a norm and a following op only carriers of whole channel vectors, each read only
     there: token-axis Gather/Slice/Squeeze/Unsqueeze, ReduceMean/GlobalAveragePool over other
     axes (the mean of an affine is the affine of the mean), ReduceSum over static dims (its
     shift scales by their count), a Reshape/Flatten to [..., C] where the dims after the
     channel axis are all 1.
The pass repeats until no fold applies (one fold can make another possible: in Conv -> BN ->
BN the second BN reaches the Conv once the first is folded), so a second run changes nothing.
Formulas: rewriter/numerics.py (float64, cast back to each tensor's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan, Refusal
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import int_list, is_op
from normopt.rewriter.linear_fold import (Fold, bias_add_after, channel_axis, expects_channel, fold_problem, fold_weights,
                                          norm_affine, norm_rank, plan_preceding, single_reader, token_axis_op)
from normopt.rewriter.norms import NormMatch, find_norms


@dataclass
class NormFold:
    match: NormMatch
    fold: Fold

    def describe(self) -> str:
        f = self.fold
        return f"{self.match.kind} at {self.match.where()} into {f.side} {f.linear.op_type} {f.linear.name}"


def _carried(node: ir.Node, value: ir.Value, r: int | None, axis: int | None) -> tuple[int, int, float] | str:
    """What a per-channel affine of `value` (rank r, channel axis `axis`) becomes through
    `node`: (rank, channel axis, factor on the shift c) after it, or why it does not pass.
    Token-axis Gather/Slice/Squeeze/Unsqueeze (channel axis last); mean or sum pooling over other
    axes (ReduceMean, GlobalAveragePool: mean(a*x + c) = a*mean(x) + c; ReduceSum over n
    positions: n*c); a Reshape/Flatten of a value whose dims after the channel axis are all 1 to
    [..., C] (its channels are contiguous already)."""
    op, out = node.op_type, node.outputs[0]
    if r is None or axis is None:
        return f"read through {op} {node.name} with the rank unknown"
    if op in ("Gather", "Slice", "Squeeze", "Unsqueeze"):
        if axis != r - 1:
            return f"read through {op} {node.name} with the channel axis not last"
        after = token_axis_op(node, r)
        return after if isinstance(after, str) else (after, after - 1, 1.0)
    if op == "GlobalAveragePool":
        return (r, axis, 1.0) if axis == 1 else f"GlobalAveragePool {node.name} pools the channel axis"
    if op in ("ReduceMean", "ReduceSum"):
        axes = int_list(node, "axes", 1)
        if axes is None:
            return f"{op} {node.name} reduces every axis, the channel axis too"
        axes = sorted({a % r for a in axes})
        if axis in axes:
            return f"{op} {node.name} reduces the channel axis"
        factor = 1.0
        if op == "ReduceSum":
            sizes = [value.shape[a] if value.shape is not None else None for a in axes]
            if not all(isinstance(n, int) for n in sizes):
                return f"ReduceSum {node.name} sums dims of unknown size (the shift would scale by their count)"
            factor = float(np.prod(sizes))
        if node.attributes.get_int("keepdims", 1):
            return r, axis, factor
        return r - len(axes), axis - sum(a < axis for a in axes), factor
    if op in ("Reshape", "Flatten"):
        shape, out_shape = value.shape, out.shape
        channels = shape[axis] if shape is not None else None
        if (shape is None or out_shape is None or not isinstance(channels, int) or out_shape[-1] != channels
                or any(d != 1 for d in list(shape)[axis + 1:])):
            return f"{op} {node.name} does not keep the channel axis whole and last"
        return len(out_shape), len(out_shape) - 1, 1.0
    return f"read by {op} {node.name}, not by Conv/MatMul/Gemm"


CARRIERS = ("Gather", "Slice", "Squeeze", "Unsqueeze", "GlobalAveragePool", "ReduceMean", "ReduceSum", "Reshape", "Flatten")


def _plan_following(match: NormMatch, a, c) -> Fold | str:
    reader = single_reader(match.output)
    if not isinstance(reader, ir.Node):
        return reader
    r = norm_rank(match, None)
    axis = channel_axis(match, r)
    value, factor = match.output, 1.0
    while is_op(reader, *CARRIERS) and reader.inputs[0] is value:
        step = _carried(reader, value, r, axis)
        if isinstance(step, str):
            return step
        r, axis, factor, value = step[0], step[1], factor * step[2], reader.outputs[0]
        reader = single_reader(value)
        if not isinstance(reader, ir.Node):
            return reader
    c = c * factor
    if not is_op(reader, "Conv", "MatMul", "Gemm"):
        return f"read by {reader.op_type} {reader.name}, not by Conv/MatMul/Gemm"
    problem = expects_channel(reader, axis, r, input_side=True) or fold_problem(reader, value, a.size, input_side=True)
    if problem:
        return problem
    if reader.op_type == "Conv" and np.any(c != 0):
        pads = reader.attributes.get_ints("pads", ())
        auto = reader.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
            return (f"Conv {reader.name} zero-pads its input: the shift c would reach border "
                    "outputs only partly (exact only with zero pads or c == 0)")
    return Fold(a, c, "following", reader, bias_add_after(reader))


def _apply_one(edit: Editor, action: NormFold) -> Change:
    m, fold = action.match, action.fold
    change = Change("folded", f"{m.kind} into {fold.side} {fold.linear.op_type}",
                    (*(n.name for n in m.nodes), fold.linear.name), (m.output.name,))
    fold_weights(edit, fold)
    if fold.side == "preceding":  # what the norm reads now (a new bias Add, if any) takes over
        edit.take_over(m.output, m.current_input())
    else:  # the linear op (or the Gather before it) and any shape-only reader read x directly
        m.output.replace_all_uses_with(m.current_input())
    edit.graph.remove(m.nodes, safe=True)
    return change


class FoldAffineNorms(Pass):
    name = "fold-affine-norms"
    summary = "fold BatchNorm / RepBN / per-channel affine norms into the adjacent Conv, Gemm or MatMul"
    repeats = True  # Conv -> BN -> BN: the second BN reaches the Conv once the first is folded

    def plan(self, model: ir.Model) -> Plan:
        plan, used = Plan(), set()
        matches = find_norms(model.graph)
        matched = {n for m in matches for n in m.nodes}
        for node in model.graph:
            if node.op_type == "BatchNormalization" and node not in matched:
                plan.refusals.append(Refusal(f"batchnorm {node.name}", "its parameters are not constant "
                                             "(graph inputs or computed) or it runs in training mode"))
        for match in matches:
            if match.kind not in ("batchnorm", "affine"):
                continue
            where = f"{match.kind} at {match.where()}"
            affine = norm_affine(match)
            before = plan_preceding(match, *affine)
            fold = before if isinstance(before, Fold) else _plan_following(match, *affine)
            if isinstance(fold, Fold) and fold.linear in used:
                fold = f"{fold.linear.op_type} {fold.linear.name} already takes another norm"
            if isinstance(fold, Fold):
                used.add(fold.linear)
                plan.actions.append(NormFold(match, fold))
            else:
                plan.refusals.append(Refusal(where, f"cannot fold before ({before}) or after ({fold})"))
        if not plan.actions and not plan.refusals:
            plan.idle = "no BatchNorm or per-channel affine norm"
        return plan

    def apply(self, model: ir.Model, plan: Plan) -> list[Change]:
        edit = Editor(model.graph)
        return [_apply_one(edit, action) for action in plan.actions]
