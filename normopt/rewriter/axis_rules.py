"""How an axis passes through each op: one table (`RULES`), one row per op.

Every walk along the hidden (or channel) axis reads it: preln-to-rmsnorm's stream merges
(`stream`), the folds that carry a per-channel affine to a linear reader (`carrier`), the CRMS
cut carried on to a norm's readers (`cut`), and the writer walk backwards from a stream value to
the constants that write it (`back`, normopt.rewriter.writers). Adding an op to the stream is
one row here, plus its tests.

A row's `forward(node, axis, r, name)` says where input 0's `axis` (non-negative, of rank `r`)
goes: `(output axis, output rank)` when every output vector along it is a whole input vector
along it (or zeros, for Pad), else why not, in words naming the axis as `name`. `back(node,
out_axis)` is the input axis the output's `out_axis` comes from, or why it cannot be told.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import folded_value, int_list, is_op, rank, static_shape

Through = tuple[int, int]  # (output axis, output rank)


@dataclass(frozen=True)
class Rule:
    forward: Callable[[ir.Node, int, int, str], Through | str]
    back: Callable[[ir.Node, int], int | str] | None = None
    elementwise: bool = False  # every axis passes unchanged, whatever the rank
    stream: bool = False  # preln-to-rmsnorm carries a recentring through it
    carrier: bool = False  # a per-channel affine folds through it into a linear reader
    cut: bool = False  # a CRMS-cut norm output passes through it to the readers


def named_axes(node: ir.Node, r: int) -> list[int] | None:
    """The axes a Reduce*/Squeeze names, non-negative and sorted (None: not constant, or none
    given, which means every axis)."""
    axes = int_list(node, "axes", 1)
    return sorted({a % r for a in axes}) if axes else None


def sliced_axes(node: ir.Node) -> list[int] | None:
    """The axes a Slice slices (its `axes` input, by default the first len(starts))."""
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return int_list(node, "", 3)
    starts = folded_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if starts is None else list(range(starts.size))


# ------------------------------------------------------------------------------ forward


def _same(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x (in another dtype): every element stays where it is
    return axis, r


def _reshape(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = reshape(x) keeps the axis whole when it becomes the output's last and every dim
    # after it is 1: its vectors are contiguous already
    a, b = node.inputs[0].shape, node.outputs[0].shape
    size = a[axis] if a is not None else None
    if (
        a is None
        or b is None
        or not len(b)
        or not isinstance(size, int)
        or b[-1] != size
        or any(d != 1 for d in list(a)[axis + 1 :])
    ):
        return f"{node.op_type} {node.name} does not keep {name} whole and last"
    return len(b) - 1, len(b)


def _transpose(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x permuted: input axis perm[k] becomes output axis k
    perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(r)))
    return list(perm).index(axis), r


def _gather(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x[..., idx, ...] along another axis: each selected vector is a whole input vector
    along, ri = node.attributes.get_int("axis", 0) % r, rank(node.inputs[1])
    if along == axis:
        return f"Gather {node.name} gathers along {name}"
    if ri is None:
        return f"the rank of Gather {node.name}'s indices is unknown"
    return (axis if axis < along else axis - 1 + ri), r - 1 + ri


def _slice(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x[a:b] along other axes: the selected vectors stay whole
    axes = sliced_axes(node)
    if axes is None or any(a % r == axis for a in axes):
        return f"Slice {node.name} slices {name} (or its axes are not constant)"
    return axis, r


def _squeeze(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x without size-1 axes: the others keep their order
    axes = named_axes(node, r)
    if axes is None or axis in axes:
        return f"Squeeze {node.name} removes {name} (or its axes are not constant)"
    return axis - sum(a < axis for a in axes), r - len(axes)


def _unsqueeze(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x with size-1 axes inserted: the input axes keep their order around them
    added = int_list(node, "axes", 1)
    if not added:
        return f"Unsqueeze {node.name}'s axes are not constant"
    out_r = r + len(added)
    inserted = {a % out_r for a in added}
    kept = [k for k in range(out_r) if k not in inserted]
    return kept[axis], out_r


def _reduce(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # mean or sum over other axes: sum_i (a * x_i + c) = a * sum_i x_i + n * c, per channel
    axes = named_axes(node, r)
    if axes is None:
        return f"{node.op_type} {node.name} reduces every axis, {name} too"
    if axis in axes:
        return f"{node.op_type} {node.name} reduces {name}"
    if node.attributes.get_int("keepdims", 1):
        return axis, r
    return axis - sum(a < axis for a in axes), r - len(axes)


def _global_pool(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # mean over the spatial axes (2..), kept as size 1
    return (axis, r) if axis < 2 else f"{node.op_type} {node.name} pools {name}"


def _expand(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # broadcast aligns trailing axes; the axis must not be broadcast itself
    out_r = rank(node.outputs[0])
    if out_r is None:
        return f"the rank of Expand {node.name}'s output is unknown"
    out_axis = axis + out_r - r
    a, b = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if a is None or b is None or a[axis] != b[out_axis]:
        return f"Expand {node.name} may broadcast along {name}"
    return out_axis, out_r


def _tile(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # y = x repeated along other axes
    a, b = static_shape(node.inputs[0]), static_shape(node.outputs[0])
    if a is None or b is None or a[axis] != b[axis]:
        return f"Tile {node.name} may repeat along {name}"
    return axis, r


def _split(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # pieces along another axis: each holds whole vectors
    if node.attributes.get_int("axis", 0) % r == axis:
        return f"Split {node.name} splits {name}"
    return axis, r


def _pad(node: ir.Node, axis: int, r: int, name: str) -> Through | str:
    # zeros added along other axes: new vectors of zeros, the others whole
    pads = folded_value(node.inputs[1]) if len(node.inputs) > 1 else None
    has_fill = len(node.inputs) > 2 and node.inputs[2] is not None
    fill = folded_value(node.inputs[2]) if has_fill else np.zeros(())
    plain = node.attributes.get_string("mode", "constant") == "constant" and len(node.inputs) <= 3
    if (
        not plain
        or pads is None
        or pads.size != 2 * r
        or pads[axis] != 0
        or pads[axis + r] != 0
        or fill is None
        or np.any(fill != 0)
    ):
        return f"Pad {node.name} pads {name} or pads with non-zeros"
    return axis, r


# ------------------------------------------------------------------------------ back


def _back_same(node: ir.Node, out_axis: int) -> int | str:
    # elementwise, or a Slice along other axes: the same axis
    out_rank, in_rank = rank(node.outputs[0]), rank(node.inputs[0])
    if out_rank is None or in_rank is None or out_rank != in_rank:
        return f"rank unknown around {node.op_type} {node.name}"
    if is_op(node, "Slice"):
        axes = sliced_axes(node)
        if axes is None or any(a % in_rank == out_axis for a in axes):
            return f"Slice {node.name} slices the hidden axis (or its axes are not constant)"
    return out_axis


def _back_expand(node: ir.Node, out_axis: int) -> int | str:
    # broadcasting aligns trailing axes
    out_rank, in_rank = rank(node.outputs[0]), rank(node.inputs[0])
    if out_rank is None or in_rank is None or out_axis - (out_rank - in_rank) < 0:
        return f"Expand {node.name} adds the hidden axis (or ranks are unknown)"
    return out_axis - (out_rank - in_rank)


def _back_transpose(node: ir.Node, out_axis: int) -> int | str:
    # output axis k is input axis perm[k]
    out_rank = rank(node.outputs[0])
    perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(out_rank or 0)))
    return perm[out_axis]


def _back_reshape(node: ir.Node, out_axis: int) -> int | str:
    # a prefix up to the axis left untouched, or the axis last and of the same static size
    a, b = node.inputs[0].shape, node.outputs[0].shape
    if a is not None and b is not None:
        if out_axis < len(a) and list(a[: out_axis + 1]) == list(b[: out_axis + 1]):
            return out_axis
        if out_axis == len(b) - 1 and a[-1] == b[-1] and isinstance(b[-1], int):
            return len(a) - 1
    return f"cannot tell where the hidden axis goes through {node.op_type} {node.name}"


# ------------------------------------------------------------------------------ the table

RULES: dict[str, Rule] = {
    "Identity": Rule(_same, _back_same, elementwise=True, stream=True, carrier=True),
    "Cast": Rule(_same, _back_same, elementwise=True, stream=True),
    "Reshape": Rule(_reshape, _back_reshape, stream=True, carrier=True, cut=True),
    "Flatten": Rule(_reshape, _back_reshape, stream=True, carrier=True),
    "Transpose": Rule(_transpose, _back_transpose, stream=True),
    "Gather": Rule(_gather, stream=True, carrier=True, cut=True),
    "Slice": Rule(_slice, _back_same, stream=True, carrier=True, cut=True),
    "Squeeze": Rule(_squeeze, stream=True, carrier=True),
    "Unsqueeze": Rule(_unsqueeze, stream=True, carrier=True),
    "ReduceMean": Rule(_reduce, stream=True, carrier=True),
    "ReduceSum": Rule(_reduce, carrier=True),
    "GlobalAveragePool": Rule(_global_pool, carrier=True),
    "Expand": Rule(_expand, _back_expand, stream=True),
    "Tile": Rule(_tile, stream=True),
    "Split": Rule(_split, stream=True),
    "Pad": Rule(_pad, stream=True),
}


def rule(node: ir.Node | None) -> Rule | None:
    """The row for `node` (ONNX domain only), or None."""
    return RULES.get(node.op_type) if node is not None and is_op(node, node.op_type) else None


def through(node: ir.Node, axis: int, name: str = "the hidden axis") -> Through | str:
    """Where input 0's `axis` (non-negative) goes through `node` (see the module docstring)."""
    found, r = rule(node), rank(node.inputs[0])
    if found is None:
        return f"{node.op_type} {node.name} is not a known carrier of {name}"
    if r is None:
        return f"{node.op_type} {node.name} reads a value of unknown rank"
    return found.forward(node, axis, r, name)


def keeps_last(node: ir.Node) -> bool:
    """Does `node` keep each vector along input 0's last axis whole and last in its output?"""
    found = rule(node)
    if found is not None and found.elementwise:
        return True
    r = rank(node.inputs[0]) if node.inputs else None
    if found is None or r is None or r < 1:
        return False
    out = through(node, r - 1)
    return not isinstance(out, str) and out[0] == out[1] - 1


def back(node: ir.Node, out_axis: int) -> int | str:
    """The input axis the output's `out_axis` (non-negative) comes from, or why it cannot be
    told (ops without a `back` rule carry no writer walk)."""
    found = rule(node)
    if found is None or found.back is None:
        return f"unexpected {node.op_type}"
    return found.back(node, out_axis)
