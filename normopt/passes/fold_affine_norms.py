"""`fold-affine-norms`: fold inference-time per-channel affines into an adjacent linear op.

Before: Conv|ConvTranspose|Gemm|MatMul[+Add b] -> y = a*x + c          (preceding)
        y = a*x + c -> [Gather|Slice|Squeeze on token axes, mean/sum pooling over tokens or
        space, a Reshape/Flatten to [..., C]] -> MatMul|Gemm|Conv   (following)
        where y = a*x + c is BatchNormalization (also between Transposes, and SLAB's RepBN
        BN(x) + alpha*x) or a chain of per-channel constant Mul/Add/Sub/Div (Unified Norm,
        PowerNorm's affine), or the trailing `* gamma + beta` of an EvoNorm (following only:
        it comes after the EvoNorm's nonlinear division).
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
from normopt.rewriter.graph import is_op
from normopt.rewriter.linear_fold import (
    Fold,
    bias_add_after,
    carried,
    channel_axis,
    expects_channel,
    fold_problem,
    fold_weights,
    is_carrier,
    norm_affine,
    norm_rank,
    plan_preceding,
    single_reader,
)
from normopt.rewriter.norms import NormMatch, find_norms
from normopt.rewriter.norms_evo import trailing_affine


@dataclass
class NormFold:
    match: NormMatch
    fold: Fold

    def describe(self) -> str:
        f = self.fold
        return (
            f"{self.match.kind} at {self.match.where()} into {f.side} {f.linear.op_type} "
            f"{f.linear.name}"
        )


def _plan_following(match: NormMatch, a, c) -> Fold | str:
    reader = single_reader(match.output)
    if not isinstance(reader, ir.Node):
        return reader
    r = norm_rank(match, None)
    axis = channel_axis(match, r)
    value, factor = match.output, 1.0
    while is_carrier(reader) and reader.inputs[0] is value:
        step = carried(reader, value, r, axis)
        if isinstance(step, str):
            return step
        r, axis, factor, value = step[0], step[1], factor * step[2], reader.outputs[0]
        reader = single_reader(value)
        if not isinstance(reader, ir.Node):
            return reader
    c = c * factor
    if not is_op(reader, "Conv", "MatMul", "Gemm"):
        return f"read by {reader.op_type} {reader.name}, not by Conv/MatMul/Gemm"
    problem = expects_channel(reader, axis, r, input_side=True) or fold_problem(
        reader, value, a.size, input_side=True
    )
    if problem:
        return problem
    if reader.op_type == "Conv" and np.any(c != 0):
        pads = reader.attributes.get_ints("pads", ())
        auto = reader.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
            return (
                f"Conv {reader.name} zero-pads its input: the shift c would reach border "
                "outputs only partly (exact only with zero pads or c == 0)"
            )
    return Fold(a, c, "following", reader, bias_add_after(reader))


def _apply_one(edit: Editor, action: NormFold) -> Change:
    m, fold = action.match, action.fold
    kind = "evonorm affine" if "of" in m.detail else m.kind
    change = Change(
        "folded",
        f"{kind} into {fold.side} {fold.linear.op_type}",
        (*(n.name for n in m.nodes), fold.linear.name),
        (m.output.name,),
    )
    fold_weights(edit, fold)
    if fold.side == "preceding":  # what the norm reads now (a new bias Add, if any) takes over
        edit.take_over(m.output, m.current_input())
    else:  # the linear op (or the Gather before it) and any shape-only reader read x directly
        m.output.replace_all_uses_with(m.current_input())
    edit.graph.remove(m.nodes, safe=True)
    return change


class FoldAffineNorms(Pass[NormFold]):
    name = "fold-affine-norms"
    summary = (
        "fold BatchNorm / RepBN / per-channel affine norms (and EvoNorms' trailing affines) into "
        "the adjacent Conv, Gemm or MatMul"
    )
    repeats = True  # Conv -> BN -> BN: the second BN reaches the Conv once the first is folded

    def plan(self, model: ir.Model) -> Plan[NormFold]:
        plan, used = Plan(), set()
        matches = find_norms(model.graph)
        matched = {n for m in matches for n in m.nodes}
        for node in model.graph:
            if node.op_type == "BatchNormalization" and node not in matched:
                plan.refusals.append(
                    Refusal(
                        f"batchnorm {node.name}",
                        "its parameters are not constant "
                        "(graph inputs or computed) or it runs in training mode",
                    )
                )
        for match in matches:
            if match.kind == "evonorm":  # its trailing affine, after the division: following
                where = f"evonorm {match.detail['variant']} at {match.where()}"
                match = trailing_affine(match)
                if match is None:
                    continue
                before = "it follows the EvoNorm's division"
                fold = _plan_following(match, *norm_affine(match))
            elif match.kind in ("batchnorm", "affine"):
                where = f"{match.kind} at {match.where()}"
                affine = norm_affine(match)
                before = plan_preceding(match, *affine)
                fold = before if isinstance(before, Fold) else _plan_following(match, *affine)
            else:
                continue
            if isinstance(fold, Fold) and fold.linear in used:
                fold = f"{fold.linear.op_type} {fold.linear.name} already takes another norm"
            if isinstance(fold, Fold):
                used.add(fold.linear)
                plan.actions.append(NormFold(match, fold))
            else:
                plan.refusals.append(
                    Refusal(where, f"cannot fold before ({before}) or after ({fold})")
                )
        if not plan.actions and not plan.refusals:
            plan.idle = "no BatchNorm, per-channel affine norm or EvoNorm affine"
        return plan

    def apply(self, model: ir.Model, plan: Plan[NormFold]) -> list[Change]:
        edit = Editor(model.graph)
        return [_apply_one(edit, action) for action in plan.actions]
