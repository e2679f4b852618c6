"""`merge-branches`: parallel convolution branches of one input, summed, become one Conv
(structural re-parameterization: RepVGG, ACNet, Diverse Branch Block's parallel branches).

Before: x -> Conv_1(W_1, b_1) ... Conv_n(W_n, b_n), and x itself or a per-channel affine of x
        (BN(x): RepVGG's identity branch), summed by Adds (any tree) or a Sum
After:  x -> Conv(W, b) with W = sum of the branch kernels zero-padded, centred, to the largest
        kernel (an identity branch: a 1 at the centre of each channel's own input; an affine
        a*x + c: a there, c into the bias), b = sum of the biases; the window's pads
Conditions:
  1. every branch is a Conv of x (constant weight and bias, explicit pads), x itself, or a
     per-channel affine of x (BatchNormalization, a constant Mul/Add chain) over the channel
     axis; at least two branches, one a Conv; each branch's output read only by the sum;
  2. the Convs share strides, dilations and groups; each kernel fits centred in the merged
     window K (per axis the largest, (K - k) even), and every Conv's pads plus dilation *
     (K - k) / 2 per side give the same window pads (every branch reads the same input window:
     1x3 + 3x1 merge into a 3x3); otherwise the refusal names the mismatch;
  3. an identity or affine branch needs stride 1, as many output as input channels and
     "same" padding (dilation * (K - 1) / 2 per side).
Sequential branches (DBB's 1x1 -> kxk, AvgPool) are not merged. BN after each Conv folds first
(fold-affine-norms runs before this pass in the default pipeline).
Formula: sum_i (W_i * x + b_i) = (sum_i pad(W_i)) * x + sum_i b_i: convolution is linear in the
kernel, and a centred zero-padded kernel with its padding reduced by the margin computes the
same window (rewriter.numerics.merged_kernel / identity_kernel, float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter import numerics
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import folded_value, is_op, readers, sole_reader
from normopt.rewriter.linear_fold import norm_affine
from normopt.rewriter.norms import NormMatch, find_norms


@dataclass
class Merge:
    root: ir.Node  # the Add (or Sum) whose output the merged Conv gives
    x: ir.Value
    convs: list[ir.Node]
    affines: list[tuple[np.ndarray | None, np.ndarray | None, list[ir.Node]]]  # identity: (None, None, [])
    chain: list[ir.Node]  # the inner Adds
    kernel: list[int]  # the merged window, and the pads every branch's own pads put it at
    pads: list[int]

    def describe(self) -> str:
        return f"{len(self.convs) + len(self.affines)} branches summed at {self.root.name} into one Conv"


def _leaves(node: ir.Node, chain: list[ir.Node]) -> list[ir.Value]:
    """The operands of an Add/Sum tree rooted at `node` (inner sums read only by their parent)."""
    out = []
    for value in node.inputs:
        inner = value.producer()
        if is_op(inner, "Add", "Sum") and sole_reader(value) is node and inner.graph is node.graph:
            chain.append(inner)
            out += _leaves(inner, chain)
        else:
            out.append(value)
    return out


def _source(value: ir.Value, affines: dict[ir.Value, NormMatch]) -> ir.Value:
    """The input a branch reads: a Conv's data input, an affine's input, else the value itself."""
    producer = value.producer()
    if is_op(producer, "Conv"):
        return producer.inputs[0]
    if value in affines:
        return affines[value].input
    return value


def _conv_problem(convs: list[ir.Node]) -> str | None:
    for conv in convs:
        if folded_value(conv.inputs[1]) is None or (len(conv.inputs) > 2 and conv.inputs[2] is not None
                                                    and folded_value(conv.inputs[2]) is None):
            return f"Conv {conv.name} has no constant weight or bias"
        if conv.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
            return f"Conv {conv.name} pads by auto_pad, not explicitly"
    for attr in ("strides", "dilations", "group"):
        values = {str(_attr(c, attr)) for c in convs}
        if len(values) > 1:
            return f"the Convs differ in {attr} ({', '.join(sorted(values))})"
    return None


def _attr(conv: ir.Node, name: str):
    rank = folded_value(conv.inputs[1]).ndim - 2
    if name == "group":
        return conv.attributes.get_int("group", 1)
    if name == "pads":
        return list(conv.attributes.get_ints("pads", [0] * 2 * rank))
    return list(conv.attributes.get_ints(name, [1] * rank))


def _plan_one(root: ir.Node, affines: dict[ir.Value, NormMatch]) -> Merge | str | None:
    """The merge at `root`, why the candidate there is refused, or None (no candidate)."""
    chain: list[ir.Node] = []
    leaves = _leaves(root, chain)
    sources = {_source(v, affines) for v in leaves}
    convs = [v.producer() for v in leaves if is_op(v.producer(), "Conv")]
    if len(sources) != 1 or not convs or len(leaves) < 2:
        return None  # not parallel branches of one input (a residual Add, ...)
    x = sources.pop()
    for value in leaves:
        if value is not x and (value.is_graph_output() or len(readers(value)) > 1):
            return f"the branch '{value.name}' is read elsewhere too"
    problem = _conv_problem(convs)
    if problem:
        return problem
    weights = [folded_value(c.inputs[1]) for c in convs]
    kernel = [max(w.shape[2 + i] for w in weights) for i in range(weights[0].ndim - 2)]
    dilations, rank = _attr(convs[0], "dilations"), len(kernel)
    pads = None  # the window's pads: each Conv's own pads plus its margin (1x3 + 3x1 make a 3x3)
    for conv, w in zip(convs, weights):
        margin = [k - s for k, s in zip(kernel, w.shape[2:])]
        if any(m % 2 for m in margin):
            return f"Conv {conv.name}'s kernel {list(w.shape[2:])} does not centre in {kernel}"
        window = [p + dilations[i % rank] * margin[i % rank] // 2 for i, p in enumerate(_attr(conv, "pads"))]
        if pads is not None and window != pads:
            return (f"Conv {conv.name}'s pads {_attr(conv, 'pads')} put its {kernel} window at pads {window}, "
                    f"{convs[0].name}'s at {pads}: the branches read different windows")
        pads = window
    out_channels = weights[0].shape[0]
    branches = []
    for value in leaves:
        if is_op(value.producer(), "Conv"):
            continue
        if any(s != 1 for s in _attr(convs[0], "strides")):
            return f"the identity branch '{value.name}' needs stride 1, the Convs have {_attr(convs[0], 'strides')}"
        if out_channels != weights[0].shape[1] * _attr(convs[0], "group"):
            return f"the identity branch '{value.name}' keeps {weights[0].shape[1] * _attr(convs[0], 'group')} channels, the Convs give {out_channels}"
        same = [dilations[i % rank] * (kernel[i % rank] - 1) // 2 for i in range(2 * rank)]
        if pads != same:
            return f"the identity branch '{value.name}' needs 'same' pads {same}, the Convs have {pads}"
        if value is x:
            branches.append((None, None, []))
        else:
            match = affines[value]
            a, c = norm_affine(match)
            if match.axis not in (1, 1 - rank - 2) or a.size != out_channels:
                return f"the affine branch '{value.name}' is not per channel over axis 1"
            branches.append((a, c, match.nodes))
    return Merge(root, x, convs, branches, chain, kernel, pads)


def _apply_one(edit: Editor, merge: Merge) -> Change:
    convs, kernel = merge.convs, merge.kernel
    weights = [folded_value(c.inputs[1]) for c in convs]
    out_channels, group = weights[0].shape[0], _attr(convs[0], "group")
    parts = [(w, folded_value(c.inputs[2]) if len(c.inputs) > 2 and c.inputs[2] is not None else np.zeros(out_channels))
             for c, w in zip(convs, weights)]
    parts += [(numerics.identity_kernel(out_channels, group, kernel, a), np.zeros(out_channels) if c is None else c)
              for a, c, _ in merge.affines]
    w, b = numerics.merged_kernel(parts, kernel, out_channels)
    dtype = weights[0].dtype
    name = convs[0].name or "merged"
    attrs = {"kernel_shape": kernel, "pads": merge.pads, "strides": _attr(convs[0], "strides"),
             "dilations": _attr(convs[0], "dilations"), "group": group}
    conv = edit.node("Conv", [merge.x, edit.initializer(f"{name}.merged_weight", w.astype(dtype)),
                              edit.initializer(f"{name}.merged_bias", b.astype(dtype))], attrs,
                     name=f"{name}.merged", like=merge.root.outputs[0])
    change = Change("merged", "parallel branches into one Conv",
                    (merge.root.name, *(n.name for n in merge.chain), *(c.name for c in convs),
                     *(n.name for _, _, nodes in merge.affines for n in nodes)), (merge.root.outputs[0].name,))
    edit.graph.insert_before(merge.root, conv)
    edit.take_over(merge.root.outputs[0], conv.outputs[0])
    edit.graph.remove([merge.root, *merge.chain, *convs, *(n for _, _, nodes in merge.affines for n in nodes)],
                      safe=True)
    return change


class MergeBranches(Pass):
    name = "merge-branches"
    summary = "merge parallel Conv branches of one input (RepVGG, ACNet) and identity/BN branches into one Conv"

    def plan(self, model: ir.Model) -> Plan:
        plan, claimed = Plan(), set()
        affines = {m.output: m for m in find_norms(model.graph)
                   if m.kind in ("batchnorm", "affine") and not m.detail.get("transposed")
                   and "repbn_alpha" not in m.detail}
        for node in reversed(list(model.graph)):  # outer sums first: they cover the inner ones
            if not is_op(node, "Add", "Sum") or node in claimed:
                continue
            merge = _plan_one(node, affines)
            if merge is None:
                continue
            plan.decide(f"sum at {node.name}", merge)
            if isinstance(merge, Merge):
                claimed.update([node, *merge.chain])
        if not plan.actions and not plan.refusals:
            plan.idle = "no sum of parallel Conv branches of one input"
        return plan

    def apply(self, model: ir.Model, plan: Plan) -> list[Change]:
        edit = Editor(model.graph)
        return [_apply_one(edit, merge) for merge in plan.actions]
