"""Folding a per-channel affine `y = a*x + c` into the weights of a linear op, and finding
the linear op that produces a norm's input (`plan_preceding`).

Shared by every pass that removes an affine by moving it into a Conv / ConvTranspose / Gemm /
MatMul: BatchNorm and affine-chain folds, and a converted LayerNorm's beta. The caller plans
the fold (which op, which side, that the channel axis maps onto the weight); `fold_weights`
writes the new weight and bias, with the formulas of `rewriter.numerics` (float64, cast
back to each tensor's dtype). The weights are read when the fold is applied, so folds into
one op made one after another compose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.rewriter import axis_rules, numerics
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import (
    LINEAR_OPS,
    constant_shape,
    folded_value,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norms import NormMatch


@dataclass
class Fold:
    """`a*x + c` per channel folded into `linear`: on its output when the affine follows it
    (side "preceding": the linear op precedes the norm), on its input when it precedes it."""

    a: np.ndarray
    c: np.ndarray
    side: str  # preceding | following
    linear: ir.Node
    bias_add: ir.Node | None = None  # a constant bias Add right after a MatMul


def bias_add_data(node: ir.Node | None) -> ir.Value | None:
    """For `Add(data, constant)` (either order) the data input, else None."""
    if not is_op(node, "Add") or len(node.inputs) != 2:
        return None
    constant = [constant_shape(v) is not None for v in node.inputs]
    if constant.count(True) != 1:
        return None
    return node.inputs[constant.index(False)]


def bias_add_after(linear: ir.Node) -> ir.Node | None:
    """The constant bias Add that alone reads a MatMul's output (Gemm and Conv have theirs
    inside), or None."""
    if not is_op(linear, "MatMul"):
        return None
    out = linear.outputs[0]
    add = sole_reader(out)
    return add if add is not None and bias_add_data(add) is out else None


def _weight_channels(linear: ir.Node, shape: tuple[int, ...], input_side: bool) -> int:
    """How many channels the weight axis a fold scales has (`shape`: the weight's)."""
    op, groups = linear.op_type, linear.attributes.get_int("group", 1)
    if op == "Conv":
        return shape[1] * groups if input_side else shape[0]
    if op == "ConvTranspose":
        return shape[1] * groups
    trans_b = op == "Gemm" and linear.attributes.get_int("transB", 0)
    k_axis, n_axis = (1, 0) if trans_b else (-2, -1)
    return shape[k_axis] if input_side else shape[n_axis]


def fold_problem(linear: ir.Node, value: ir.Value, channels: int, input_side: bool) -> str | None:
    """Why `linear` cannot take a per-channel affine of `channels` channels on its input
    (`input_side`, the affine comes first and `value` is what it reads) or its output
    (`value` is its output), or None when it can. The channel axis itself is the caller's
    to check."""
    op, where = linear.op_type, f"{linear.op_type} {linear.name}"
    if not is_op(linear, "Conv", "Gemm", "MatMul", *(() if input_side else ("ConvTranspose",))):
        return f"{where} is not a linear op the affine folds into"
    if input_side and (linear.inputs[0] is not value or value in linear.inputs[1:]):
        return f"it is not only the data input of {where}"
    shape = constant_shape(linear.inputs[1]) if len(linear.inputs) > 1 else None
    if shape is None:
        return f"{where} has no constant weight"
    if op == "MatMul" and (len(shape) < 2 or (input_side and len(shape) != 2)):
        return f"{where} has a {len(shape)}-D weight"
    if op == "MatMul" and constant_shape(linear.inputs[0]) is not None:
        return f"{where}'s first input is constant too"
    if (
        len(linear.inputs) > 2
        and linear.inputs[2] is not None
        and constant_shape(linear.inputs[2]) is None
    ):
        return f"{where} has a non-constant bias"
    if op == "Gemm" and input_side and linear.attributes.get_int("transA", 0):
        return "Gemm with transA=1 reads its input transposed"
    if _weight_channels(linear, shape, input_side) != channels:
        return (
            f"the affine has {channels} channels, {where}'s weight "
            f"{_weight_channels(linear, shape, input_side)}"
        )
    return None


def bias_slot(fold: Fold) -> tuple[ir.Node | None, int | None]:
    """Where the linear op's bias lives or would go: (node, input index); (None, None) for a
    MatMul without a bias Add."""
    if fold.bias_add is not None:
        return fold.bias_add, 1 if folded_value(fold.bias_add.inputs[1]) is not None else 0
    if fold.linear.op_type in ("Conv", "ConvTranspose", "Gemm"):
        return fold.linear, 2
    return None, None


def bias_of(fold: Fold) -> ir.Value | None:
    """The linear op's bias value, or None."""
    node, index = bias_slot(fold)
    return node.inputs[index] if node is not None and index < len(node.inputs) else None


def fold_weights(edit: Editor, fold: Fold) -> None:
    """Give the linear op the weight and bias that absorb the affine."""
    node, a, c, op = fold.linear, fold.a, fold.c, fold.linear.op_type
    w = folded_value(node.inputs[1])
    bias_node, bias_index = bias_slot(fold)
    bias_value = bias_of(fold)
    b = folded_value(bias_value)  # any broadcastable shape; None when absent
    attrs = node.attributes
    groups, trans_b = attrs.get_int("group", 1), bool(attrs.get_int("transB", 0))
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    if op in ("Conv", "ConvTranspose") and b is None:
        b = np.zeros(w.shape[0] if op == "Conv" else w.shape[1] * groups, w.dtype)
    if fold.side == "preceding":
        if op == "Conv":
            w2, b2 = numerics.into_conv_output(w, b, a, c)
        elif op == "ConvTranspose":
            w2, b2 = numerics.into_conv_transpose_output(w, b, a, c, groups)
        elif op == "Gemm":
            w2, b2 = numerics.into_gemm_output(w, b, a, c, beta, trans_b)
        else:
            w2, b2 = numerics.into_matmul_output(w, 0.0 if b is None else b, a, c)
    else:
        if op == "Conv":
            w2, b2 = numerics.into_conv_input(w, b, a, c, groups)
        elif op == "Gemm":
            w2, b2 = numerics.into_gemm_input(w, b, a, c, alpha, beta, trans_b)
        else:
            w2, b2 = numerics.into_matmul_input(w, 0.0 if b is None else b, a, c)
    if op == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is now inside the bias
    if not (np.all(a == 1) and fold.side == "following"):  # a pure shift leaves the weight as it is
        edit.set_constant_input(node, 1, w2.astype(w.dtype), f"{node.name}.weight")
    b2 = np.asarray(b2).astype(w.dtype if b is None else b.dtype)
    if bias_node is not None:
        edit.set_constant_input(bias_node, bias_index, b2, f"{node.name}.bias")
    elif np.any(b2 != 0):
        edit.add_after(node, "Add", b2, f"{node.name}.folded_bias")


def norm_affine(match: NormMatch) -> tuple[np.ndarray, np.ndarray]:
    """(a, c) of a BatchNorm or affine-chain match: y = a*x + c per channel."""
    if match.kind == "batchnorm":
        bn = next(n for n in match.nodes if n.op_type == "BatchNormalization")
        gamma, beta, mean, var = (folded_value(v) for v in bn.inputs[1:5])
        return numerics.batchnorm_affine(
            gamma, beta, mean, var, match.epsilon, match.detail.get("repbn_alpha", 0.0)
        )
    steps, channels = [], 1
    for node in match.nodes:
        k = next(folded_value(v) for v in node.inputs if folded_value(v) is not None)
        steps.append((node.op_type, k))
        channels = max(channels, k.size)
    return numerics.chain_affine(steps, channels)


def norm_rank(match: NormMatch, linear: ir.Node | None) -> int | None:
    """The rank of the normalized tensor (from the values, else from a Conv weight)."""
    for value in (match.input, match.output):
        if rank(value) is not None:
            return rank(value)
    if linear is not None and linear.op_type in ("Conv", "ConvTranspose"):
        w = folded_value(linear.inputs[1])
        return None if w is None else w.ndim
    return None


def channel_axis(match: NormMatch, r: int | None) -> int | None:
    """The channel axis of the norm's input, non-negative."""
    if match.kind == "batchnorm" and not match.detail.get("transposed"):
        return 1
    return None if r is None else r + match.axis


def single_reader(value: ir.Value) -> ir.Node | str:
    """The one node reading `value`'s numbers, or why there is not one (shape/dtype-only
    readers do not count: the fold keeps both, so they can read the other side)."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    reader = sole_reader(value, numbers_only=True)
    return (
        reader
        if reader is not None
        else f"'{value.name}' has {len(readers(value, numbers_only=True))} readers"
    )


def expects_channel(
    linear: ir.Node, axis: int | None, r: int | None, input_side: bool
) -> str | None:
    """Why the channel axis does not map onto the weight axis, or None when it does."""
    if axis is None:
        return "the rank of the normalized tensor is unknown"
    if linear.op_type in ("Conv", "ConvTranspose"):
        return None if axis == 1 else f"channel axis {axis} is not the conv's channel axis 1"
    if r is None or axis != r - 1:
        return f"channel axis {axis} is not the last axis a {linear.op_type} contracts or produces"
    if linear.op_type == "Gemm" and input_side and linear.attributes.get_int("transA", 0):
        return "Gemm with transA=1 reads its input transposed"
    return None


def plan_preceding(match: NormMatch, a, c) -> Fold | str:
    """The fold of `a*x + c` into the linear op (and its bias Add) that produces the norm's
    input, or why there is none."""
    traced = _reshaped_from(match)
    if isinstance(traced, str):
        return traced
    value, r, axis = traced
    producer = value.producer()
    bias_add = None
    linear_out = bias_add_data(producer)
    if linear_out is not None and is_op(linear_out.producer(), "MatMul"):
        bias_add, producer = producer, linear_out.producer()
        reader = single_reader(linear_out)
        if not isinstance(reader, ir.Node):
            return reader
    if not is_op(producer, *LINEAR_OPS):
        return (
            f"not produced by {'/'.join(sorted(LINEAR_OPS))} (by "
            f"{producer.op_type if producer else 'a graph input'})"
        )
    reader = single_reader(value)
    if not isinstance(reader, ir.Node):
        return reader
    if r is None:
        r = norm_rank(match, producer)
        axis = channel_axis(match, r)
    problem = expects_channel(producer, axis, r, input_side=False) or fold_problem(
        producer, value, a.size, input_side=False
    )
    if problem:
        return problem
    return Fold(a, c, "preceding", producer, bias_add)


def _reshaped_from(match: NormMatch) -> tuple[ir.Value, int | None, int | None] | str:
    """The value a linear op must produce for a preceding fold, with its rank and channel
    axis: the norm's input, or, back through Reshape/Flatten ops each read only by the next
    (LeViT's Linear -> Flatten -> BatchNorm1d), the value they reshape, where a reshape keeps
    each channel vector whole and last (axis_rules' `back`: a per-channel affine commutes
    with it)."""
    value = match.input
    r = norm_rank(match, value.producer())
    axis = channel_axis(match, r)
    node = value.producer()
    while is_op(node, "Reshape", "Flatten") and axis is not None:
        reader = single_reader(value)
        if not isinstance(reader, ir.Node):
            return reader
        back = axis_rules.back(node, axis)
        if isinstance(back, str):
            return back
        value, axis = node.inputs[0], back
        r, node = rank(value), value.producer()
    return value, r, axis


TOKEN_OPS = ("Gather", "Slice", "Squeeze", "Unsqueeze")


def is_carrier(node: ir.Node | None) -> bool:
    """Does an affine along the channel axis fold through `node` (a `carrier` row of
    normopt.rewriter.axis_rules)?"""
    rule = axis_rules.rule(node)
    return rule is not None and rule.carrier


def carried(
    node: ir.Node, value: ir.Value, r: int | None, axis: int | None
) -> tuple[int, int, float] | str:
    """What a per-channel affine of `value` (rank r, channel axis `axis`) becomes through
    `node`: (rank, channel axis, factor on the shift c) after it, or why it does not pass.
    Where the channel axis goes is the table's (normopt.rewriter.axis_rules); token selection
    (Gather/Slice/Squeeze/Unsqueeze) with the channel axis last; mean or sum pooling over other
    axes (ReduceMean, GlobalAveragePool: mean(a*x + c) = a*mean(x) + c; ReduceSum over n
    positions: n*c); a Reshape/Flatten that keeps the channel axis whole and last."""
    op = node.op_type
    if r is None or axis is None:
        return f"read through {op} {node.name} with the rank unknown"
    if not is_carrier(node):
        return f"read by {op} {node.name}, not by Conv/MatMul/Gemm"
    if op in TOKEN_OPS and axis != r - 1:
        return f"read through {op} {node.name} with the channel axis not last"
    after = axis_rules.through(node, axis, "the channel axis")
    if isinstance(after, str):
        return after
    factor = 1.0
    if op == "ReduceSum":
        summed = axis_rules.named_axes(node, r) or []
        sizes = [value.shape[a] if value.shape is not None else None for a in summed]
        if not all(isinstance(n, int) for n in sizes):
            return (
                f"ReduceSum {node.name} sums dims of unknown size (the shift would scale by "
                "their count)"
            )
        factor = float(np.prod(sizes))
    return after[1], after[0], factor
