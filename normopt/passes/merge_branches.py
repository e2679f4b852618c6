"""`merge-branches`: parallel branches of one input, summed, become one Conv (structural
re-parameterization: RepVGG, ACNet, Diverse Branch Block), and a Conv whose kernel is computed
from constants in the graph (DEA-Net's DEConv) reads it as one constant.

Before: x -> branch_1 ... branch_n, summed by Adds (any tree) or a Sum. A branch is x itself or
        a chain of stages from x: Conv (constant weight and bias), a per-channel affine
        (BatchNormalization, a constant Mul/Add chain), AveragePool, and Pad with a constant
        (Pad, or DBB's pad(y - v) + v: per-channel v)
After:  x -> Conv(W, b): every branch as one convolution of x, their kernels zero-padded,
        centred, to the largest window and summed, their biases summed
Conditions:
  1. at least two branches, one with a Conv; each branch's values read only by the next stage
     (its output only by the sum);
  2. a chain composes only where one of two Convs in sequence is 1x1 (stride 1, unpadded when it
     is the lower one), and a padding between them (a Conv's zero pads, an AveragePool's, an
     explicit Pad) pads with what the lower stages give a zero input (the lower stages' bias:
     DBB pads with BN(0) for this; equal to float32 rounding); AveragePool counts its padding
     (count_include_pad=1) and floors (ceil_mode=0);
  3. the branches with a Conv share strides, dilations and groups; each kernel centres in the
     merged window K (per axis the largest, (K - k) even), and every branch's pads plus dilation *
     (K - k) / 2 per side give the same window pads (1x3 + 3x1 merge into a 3x3); otherwise the
     refusal names the mismatch;
  4. a branch of per-channel stages only (identity, affine, average pool of x) needs the Convs'
     stride, as many output as input channels and that window; it takes the Convs' groups.
Formula: convolution is linear in the kernel, so sum_i (W_i * x + b_i) = (sum_i pad(W_i)) * x +
sum_i b_i with each kernel centred in the merged window; a 1x1 Conv M after or before a Conv W
is the Conv M W (rewriter.numerics.compose_kernels); a per-channel stage a*x + c scales the
kernel's output channels and shifts the bias (all in float64).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter import numerics
from normopt.rewriter.branches import (
    Branch,
    as_branch,
    deep_constant,
    only_reader,
    walk,
)
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_value, dead_nodes, is_op, rank, sole_reader
from normopt.rewriter.norms import NormMatch, find_norms


@dataclass
class Merge:
    root: ir.Node  # the Add (or Sum) whose output the merged Conv gives
    x: ir.Value
    branches: list[Branch]
    chain: list[ir.Node]  # the inner Adds
    kernel: list[int]
    pads: list[int]
    strides: list[int]
    dilations: list[int]
    group: int

    def describe(self) -> str:
        return f"{len(self.branches)} branches summed at {self.root.name} into one Conv"


@dataclass
class Materialize:
    conv: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None

    def describe(self) -> str:
        return f"the kernel of {self.conv.name}, computed in the graph, as a constant"


# ------------------------------------------------------------------------------- plan


def _leaves(node: ir.Node, chain: list[ir.Node]) -> list[ir.Value]:
    """The operands of an Add/Sum tree rooted at `node` (inner sums read only by their parent),
    leaving out a constant scalar zero (TorchScript's MobileOne starts its sum at 0.0)."""
    out = []
    for value in node.inputs:
        inner = value.producer()
        if is_op(inner, "Add", "Sum") and sole_reader(value) is node and inner.graph is node.graph:
            chain.append(inner)
            out += _leaves(inner, chain)
        elif not _zero_scalar(value, node):
            out.append(value)
    return out


def _zero_scalar(value: ir.Value, node: ir.Node) -> bool:
    """A constant single 0 of no higher rank than the sum `node` makes (adding it changes
    nothing: one element broadcasts without adding axes)."""
    array = constant_value(value)
    if array is None or array.size != 1 or np.any(array):
        return False
    return array.ndim == 0 or array.ndim <= (rank(node.outputs[0]) or 0)


def _plan_one(
    root: ir.Node, affines: dict[ir.Value, NormMatch], dead: set[ir.Node]
) -> Merge | str | None:
    """The merge at `root`, why the candidate there is refused, or None (no candidate)."""
    chain: list[ir.Node] = []
    leaves = _leaves(root, chain)
    walks = {leaf: walk(leaf, affines, dead, root.graph) for leaf in leaves}
    starts = {source for source, _ in walks.values()}
    for leaf in leaves:  # an operand that another one starts from is the identity branch
        if leaf in starts:
            walks[leaf] = (leaf, [])
    sources = {source for source, _ in walks.values()}
    convs = [
        s
        for _, stages in walks.values()
        for s in stages
        if not isinstance(s, str) and s.op == "conv"
    ]
    if (
        len(sources) != 1
        or len(leaves) < 2
        or not any(
            isinstance(s, str) or s.op == "conv" for _, stages in walks.values() for s in stages
        )
    ):
        return None  # not parallel branches of one input (a residual Add, ...)
    x = sources.pop()
    problem = _operand_problem(root, leaves)
    if problem:
        return problem
    for leaf in leaves:
        if leaf is not x and only_reader(leaf, dead) is None:
            return f"the branch '{leaf.name}' is read elsewhere too"
    problem = next((s for _, stages in walks.values() for s in stages if isinstance(s, str)), None)
    if problem or not convs:
        return problem
    bottom = convs[
        0
    ]  # a walk's lowest Conv: only per-channel stages before it, it reads x's channels
    channels, rank = bottom.weight.shape[1] * bottom.group, bottom.weight.ndim - 2
    branches = []
    for leaf in leaves:
        branch = as_branch(leaf, walks[leaf][1], channels, rank)
        if isinstance(branch, str):
            return branch
        branches.append(branch)
    return _window(root, x, branches, chain)


def _window(root, x, branches: list[Branch], chain) -> Merge | str:
    """The merged Conv's window and attributes, or the mismatch between the branches."""
    convs = [b for b in branches if not b.per_channel]
    for attr in ("strides", "dilations", "group"):  # a pooling branch's window is undilated too
        values = {
            str(getattr(b, attr))
            for b in (branches if attr == "dilations" else convs)
            if getattr(b, attr) is not None
        }
        if len(values) > 1:
            return f"the Convs differ in {attr} ({', '.join(sorted(values))})"
    first = convs[0]
    rank = len(first.strides)
    dilations = next((b.dilations for b in convs if b.dilations is not None), [1] * rank)
    out_channels, group = first.weight.shape[0], first.group
    kernel = [max(b.kernel[i] for b in branches) for i in range(rank)]
    pads = None
    for b in convs + [b for b in branches if b.per_channel]:
        if b.per_channel:
            name = f"the identity branch '{b.name}'"
            if b.strides != first.strides:
                return f"{name} needs stride {_stride(b.strides)}, the Convs have {first.strides}"
            if b.weight.shape[0] != out_channels:
                return f"{name} keeps {b.weight.shape[0]} channels, the Convs give {out_channels}"
            if b.dilations is None and b.kernel == [1] * rank:
                # its tap sits at index (k-1)//2 of the merged kernel: x itself only where
                # the pads put that tap at offset 0 (an even kernel with dilation has no such tap)
                begin = [dilations[i] * ((kernel[i] - 1) // 2) for i in range(rank)]
                same = begin + [dilations[i] * (kernel[i] - 1) - begin[i] for i in range(rank)]
                if pads != same:
                    return f"{name} needs 'same' pads {same}, the Convs have {pads}"
                continue
        margin = [k - s for k, s in zip(kernel, b.kernel)]
        if any(m % 2 for m in margin):
            return f"{b.name}'s kernel {b.kernel} does not centre in {kernel}"
        window = [p + dilations[i % rank] * margin[i % rank] // 2 for i, p in enumerate(b.pads)]
        if pads is not None and window != pads:
            return (
                f"{b.name}'s pads {b.pads} put its {kernel} window at pads {window}, "
                f"{first.name.removeprefix('Conv ')}'s at {pads}: the branches read different "
                "windows"
            )
        pads = window
    for i, b in enumerate(branches):
        if b.per_channel:
            grouped = numerics.regroup(numerics.ungroup(b.weight, b.group), group)
            branches[i] = replace(b, weight=grouped, group=group)
    return Merge(root, x, branches, chain, kernel, pads, first.strides, dilations, group)


def _operand_problem(root: ir.Node, leaves: list[ir.Value]) -> str | None:
    """Operands one Conv cannot stand for: one summed twice, or one broadcast (a shape other
    than the sum's: 1 channel beside 4, a [C, 1, 1] map beside [C, H, W])."""
    seen: set[ir.Value] = set()
    for leaf in leaves:
        if leaf in seen:
            return f"'{leaf.name}' is summed more than once"
        seen.add(leaf)
    shapes = [leaf.shape for leaf in leaves if leaf.shape is not None]
    if not shapes:
        return None
    rank = max(len(shape) for shape in shapes)
    for axis in range(rank):
        dims = [shape[axis] if len(shape) == rank else None for shape in shapes]
        sizes = {d for d in dims if isinstance(d, int)}
        # a broadcast operand: fewer axes, two sizes, or a 1 beside a size not known to be 1
        if None in dims or len(sizes) > 1 or (sizes == {1} and len(set(map(str, dims))) > 1):
            shown = ", ".join(str(list(s)) for s in shapes)
            return f"the sum broadcasts an operand along axis {axis} ({shown})"
    return None


def _stride(strides: list[int]) -> str:
    return str(strides[0]) if len(set(strides)) == 1 else str(strides)


def _apply_one(edit: Editor, merge: Merge, dtype) -> Change:
    w, b = numerics.merged_kernel(
        [(br.weight, br.bias) for br in merge.branches],
        merge.kernel,
        merge.branches[0].weight.shape[0],
    )
    name = (
        next(n.name for br in merge.branches for n in br.nodes if n.op_type == "Conv") or "merged"
    )
    attrs = {
        "kernel_shape": merge.kernel,
        "pads": merge.pads,
        "strides": merge.strides,
        "dilations": merge.dilations,
        "group": merge.group,
    }
    conv = edit.node(
        "Conv",
        [
            merge.x,
            edit.initializer(f"{name}.merged_weight", w.astype(dtype)),
            edit.initializer(f"{name}.merged_bias", b.astype(dtype)),
        ],
        attrs,
        name=f"{name}.merged",
        like=merge.root.outputs[0],
    )
    removed = [merge.root, *merge.chain, *(n for br in merge.branches for n in br.nodes)]
    change = Change(
        "merged",
        "parallel branches into one Conv",
        tuple(n.name for n in removed),
        (merge.root.outputs[0].name,),
    )
    edit.graph.insert_before(merge.root, conv)
    edit.take_over(merge.root.outputs[0], conv.outputs[0])
    order = {n: i for i, n in enumerate(edit.graph)}
    for node in sorted(removed, key=order.__getitem__, reverse=True):  # readers first
        if not any(out.uses() for out in node.outputs):
            edit.graph.remove(node, safe=True)  # else a dead reader still holds it: cleanup's
    return change


def _computed_kernel(conv: ir.Node) -> Materialize | None:
    """A Conv whose weight is computed from constants in the graph (not one constant)."""
    weight = conv.inputs[1] if len(conv.inputs) > 1 else None
    if weight is None or constant_value(weight) is not None:
        return None
    array = deep_constant(weight)
    if array is None:
        return None
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    bias_array = None if bias is None or constant_value(bias) is not None else deep_constant(bias)
    return Materialize(conv, array, bias_array)


MergeAction = Merge | Materialize


class MergeBranches(Pass[MergeAction]):
    name = "merge-branches"
    summary = (
        "merge parallel branches of one input (RepVGG, ACNet, DBB: Conv, identity, BN, pool, 1x1 "
        "-> kxk) "
        "into one Conv; a kernel computed in the graph (DEConv) becomes a constant"
    )

    def plan(self, model: ir.Model) -> Plan[MergeAction]:
        plan, claimed, dead = Plan(), set(), set(dead_nodes(model.graph))
        affines = {
            m.output: m
            for m in find_norms(model.graph)
            if m.kind in ("batchnorm", "affine")
            and not m.detail.get("transposed")
            and "repbn_alpha" not in m.detail
        }
        for node in reversed(list(model.graph)):  # outer sums first: they cover the inner ones
            if not is_op(node, "Add", "Sum") or node in claimed:
                continue
            merge = _plan_one(node, affines, dead)
            if merge is None:
                continue
            plan.decide(f"sum at {node.name}", merge)
            if isinstance(merge, Merge):
                claimed.update([node, *merge.chain, *(n for b in merge.branches for n in b.nodes)])
        for node in model.graph:
            if is_op(node, "Conv") and node not in claimed:
                computed = _computed_kernel(node)
                if computed is not None:
                    plan.actions.append(computed)
        if not plan.actions and not plan.refusals:
            plan.idle = (
                "no sum of parallel Conv branches of one input, no kernel computed in the graph"
            )
        return plan

    def apply(self, model: ir.Model, plan: Plan[MergeAction]) -> list[Change]:
        edit = Editor(model.graph)
        changes = []
        for action in plan.actions:
            if isinstance(action, Merge):
                dtype = deep_constant(
                    next(n for b in action.branches for n in b.nodes if n.op_type == "Conv").inputs[
                        1
                    ]
                ).dtype
                changes.append(_apply_one(edit, action, dtype))
            else:
                conv = action.conv
                inputs = [(1, action.weight, "weight")] + (
                    [(2, action.bias, "bias")] if action.bias is not None else []
                )
                for index, array, what in inputs:
                    conv.replace_input_with(index, edit.initializer(f"{conv.name}.{what}", array))
                changes.append(
                    Change(
                        "folded",
                        "computed Conv kernel(s) into constants",
                        (conv.name,),
                        (conv.inputs[1].name,),
                    )
                )
        return changes
