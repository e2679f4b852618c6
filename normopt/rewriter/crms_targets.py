"""The shapes that follow a Pre-CRMSNorm cut (normopt.rewriter.crms): Reshape targets whose
hidden entry becomes d-1, Expand shapes that get 1 there, and Shape readers of cut values that
must keep seeing d."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.rewriter.crms_plan import CRMSPlan, Cut
from normopt.rewriter.graph import (
    Refuse,
    folded_value,
    int_list,
    is_op,
    rank,
    readers,
    static_shape,
)


def entry(
    node: ir.Node, entry: int, out_hidden: int, in_hidden: int, d: int, what: str
) -> int | None:
    """What a Reshape target's entry at the hidden axis becomes once cut (None: it follows the
    cut by itself: -1 infers d-1, 0 copies the input's d-1), or Refuse."""
    if entry == -1 or (
        entry == 0 and out_hidden == in_hidden and not node.attributes.get_int("allowzero", 0)
    ):
        return None
    if entry != d:
        raise Refuse(f"{what} gives the hidden axis {entry} entries, not its size {d}")
    return entry - 1


def reshape(node: ir.Node, out_hidden: int, in_hidden: int, plan: CRMSPlan) -> None:
    """A Reshape carrying the hidden axis (in_hidden -> out_hidden): its target's entry there
    must follow the cut: a constant d becomes d-1 (the target, or the constant piece of the
    Concat that builds it), -1 and 0 follow by themselves, and so does an entry read from the
    input's own shape at its hidden axis (TorchScript's `x.view(-1, x.size(-1))`)."""
    plan.reshapes.add(node)
    target = folded_value(node.inputs[1])
    if target is not None:
        if target.ndim != 1 or target.size <= out_hidden:
            raise Refuse(f"Reshape {node.name}'s target does not reach the hidden axis")
        what = f"Reshape {node.name}'s target"
        new = entry(node, int(target[out_hidden]), out_hidden, in_hidden, plan.d, what)
        if new is not None:
            plan.cuts.append(Cut(node, 1, _with(target, out_hidden, new)))
        return
    _concat_target(node, out_hidden, in_hidden, plan)


def _with(array: np.ndarray, k: int, new: int) -> np.ndarray:
    """`array` (1-D) with entry k replaced by `new`."""
    return np.concatenate([array[:k], [new], array[k + 1 :]]).astype(array.dtype)


def _concat_target(node: ir.Node, out_hidden: int, in_hidden: int, plan: CRMSPlan) -> None:
    """A Reshape target built by a Concat: the piece holding the hidden entry is cut (a
    constant), or is read from the input's own shape (`_own_dim`)."""
    concat, offset = node.inputs[1].producer(), 0
    if not is_op(concat, "Concat"):
        raise Refuse(
            f"Reshape {node.name}'s target shape is computed: its hidden size is not a constant to "
            "cut"
        )
    for index, piece in enumerate(concat.inputs):  # noqa: B007 (both read after the loop)
        size = static_shape(piece)
        if size is None or len(size) != 1:
            raise Refuse(f"Reshape {node.name}'s target is built from pieces of unknown length")
        if offset + size[0] > out_hidden:
            break
        offset += size[0]
    k = out_hidden - offset
    array = folded_value(piece)
    if array is not None:
        what = f"Reshape {node.name}'s target"
        new = entry(node, int(array[k]), out_hidden, in_hidden, plan.d, what)
        if new is not None:
            plan.cuts.append(Cut(concat, index, _with(array, k, new)))
            plan.shapes.append(node.inputs[1])
        return
    shape = _own_dim(piece, k, node.inputs[0], in_hidden, concat, plan)
    if shape is None:
        raise Refuse(
            f"Reshape {node.name}'s target shape is computed: its hidden size is not a constant to "
            "cut"
        )
    plan.own_shapes.add(shape)


def _own_dim(
    piece: ir.Value, k: int, x: ir.Value, hidden: int, concat: ir.Node, plan: CRMSPlan
) -> ir.Node | None:
    """The Shape node when entry k of `piece` is x's size along its hidden axis, read by a
    chain used only to build this target (Shape(x) sliced or gathered, a one-entry piece
    squeezed and unsqueezed on the way: TorchScript's `x.size(-1)`); that size is cut with x,
    as it must be."""
    node, chain = piece.producer(), []
    while is_op(node, "Unsqueeze", "Squeeze"):
        chain.append(node)
        node = node.inputs[0].producer()
    if is_op(node, "Gather") and node.attributes.get_int("axis", 0) == 0:
        index = folded_value(node.inputs[1])
        at = None if index is None or index.size != 1 else int(index.reshape(-1)[0])
    elif is_op(node, "Slice"):
        starts, steps = folded_value(node.inputs[1]), int_list(node, "", 4)
        at = (
            None
            if starts is None or starts.size != 1 or steps not in (None, [1])
            else int(starts[0]) + k
        )
    else:
        return None
    chain.append(node)
    shape = node.inputs[0].producer()
    if (
        at is None
        or not is_op(shape, "Shape")
        or shape.attributes.get_int("start", 0) != 0
        or "end" in shape.attributes
    ):
        return None
    for link, reader in zip([shape, *reversed(chain)], [*reversed(chain), concat]):
        if readers(link.outputs[0]) != [reader] or link.outputs[0].is_graph_output():
            return None
    y, r = shape.inputs[0], rank(shape.inputs[0])
    if r is None or (y is x and at % r != hidden):
        return None
    if (
        y is not x
    ):  # another value's size (GPT-2 keeps the embeddings' x.size(-1)): it must be cut there too
        plan.follows.append((y, at % r, shape))
    return shape


def expand(node: ir.Node, out_hidden: int, plan: CRMSPlan) -> None:
    """Expand(x, s): s's entry at the hidden axis is 1 or d (x has d there); once x has d-1 it
    must be 1: a constant entry d is cut to 1, a computed one is set to 1 in the graph."""
    size = static_shape(node.inputs[1])
    out_rank = rank(node.outputs[0])
    if size is None or out_rank is None:
        raise Refuse(f"Expand {node.name}'s shape has an unknown length")
    k = out_hidden - (out_rank - size[0])
    if k < 0:
        return
    target = folded_value(node.inputs[1])
    if target is None:
        plan.expands.append((node, k))
    elif int(target[k]) != 1:
        plan.cuts.append(
            Cut(node, 1, np.concatenate([target[:k], [1], target[k + 1 :]]).astype(target.dtype))
        )


def shape_readers(value: ir.Value, hidden: int | None, plan: CRMSPlan) -> None:
    """Shape nodes reading `value`, which is cut: their entry at the hidden axis gets d back
    (TorchScript's `b, n, d = x.shape` must keep computing with d), unless the shape only
    builds the target of value's own Reshape (CRMSPlan.own_shapes). Size would need numel:
    refused."""
    for node in readers(value):
        if is_op(node, "Size"):
            raise Refuse(f"Size {node.name} reads '{value.name}', which is cut")
        if is_op(node, "Shape"):
            if value.shape is None:
                raise Refuse(f"Shape {node.name} reads '{value.name}', whose rank is unknown")
            plan.shape_reads.append((node, len(value.shape) - 1 if hidden is None else hidden))
