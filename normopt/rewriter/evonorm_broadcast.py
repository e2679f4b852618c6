"""Which of a B0/B1/B2 EvoNorm's operands spread a per-channel value to x's shape and could
broadcast instead (what simplify-evonorm edits); analysis only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import folded_value, is_op
from normopt.rewriter.norm_match import NormMatch
from normopt.rewriter.norms_evo import producer_of, same_tensor, spread_channels


@dataclass
class Broadcast:
    """An operand of a B-variant EvoNorm's elementwise op that holds a per-channel (or
    per-instance) value spread to x's full shape: the op can broadcast it instead. `source` is
    what the op reads then: the Expand's input, or the constant's one [1, C, 1, 1] slice."""

    node: ir.Node
    index: int
    source: ir.Value | np.ndarray
    what: str  # the change, in words


def _spreads_to_x(expand: ir.Node, x: ir.Value) -> bool:
    """`expand` spreads its input to x's shape: its shape is Shape(x), or a constant equal to
    x's static shape, or its result has x's shape by shape inference, dim by dim (sizes, or
    named dims: one name is one size)."""
    node = expand.inputs[1].producer()
    if is_op(node, "Shape") and same_tensor(node.inputs[0], x) and not node.attributes:
        return True
    dims = _known(x.shape)
    array = folded_value(expand.inputs[1])
    if array is not None:
        return dims is not None and [int(d) for d in array.reshape(-1)] == dims
    out = _known(expand.outputs[0].shape)
    return dims is not None and out == dims


def _known(shape: ir.Shape | None) -> list[int | str] | None:
    """Every dim of `shape` as a size or a name; None if any is unknown."""
    if shape is None:
        return None
    dims = [d if isinstance(d, int) else d.value for d in shape]
    return None if any(d is None for d in dims) else dims


def broadcasts(match: NormMatch) -> list[Broadcast]:
    """In a B0/B1/B2 match: the Expands to x's shape read by the Max or by the op combining x
    with its instance statistic (directly, or through a Cast: a float16 model's Max computes in
    float32), and the running-variance branch folded by the exporter into a constant of x's
    full shape. Dropping either is exact: the op's other operand is x
    combined elementwise with per-channel constants, so it has x's full shape already, and the
    op's result keeps its shape and every entry."""
    found, x, inside = [], match.input, set(match.nodes)
    if not match.detail.get("variant", "").startswith("B"):
        return found

    def full(value: ir.Value, depth: int = 2) -> bool:
        """x, or x combined inside the match with anything (Max's right: one level more)."""
        node = value.producer()
        if is_op(node, "Cast") and node in inside:  # a float16 model's Max runs in float32
            return full(node.inputs[0], depth)
        return same_tensor(value, x) or (
            depth > 0
            and node in inside
            and is_op(node, "Add", "Mul", "Sub")
            and any(full(v, depth - 1) for v in node.inputs)
        )

    for op in match.nodes:
        if not is_op(op, "Max", "Add", "Mul", "Sub") or len(op.inputs) != 2:
            continue
        for i, value in enumerate(op.inputs):
            if not full(op.inputs[1 - i]):
                continue  # the other operand must have x's shape (not the eps Add's)
            node, index, cast = op, i, producer_of(value, "Cast")
            if cast is not None and cast in inside:  # spread, then cast: the Cast's input
                node, index, value = cast, 0, cast.inputs[0]
            expand = producer_of(value, "Expand")
            array = folded_value(value) if op.op_type == "Max" else None
            if expand is not None and expand in inside and _spreads_to_x(expand, x):
                what = "EvoNorm Expand(s) to x's shape (the op broadcasts instead)"
                found.append(Broadcast(node, index, expand.inputs[0], what))
            elif (
                array is not None
                and array.ndim == 4
                and list(array.shape) == _known(x.shape)
                and array.size > array.shape[1]
                and (channels := spread_channels(array, match.axis + 4)) is not None
            ):
                what = "EvoNorm constant(s) of x's shape cut to their channels"
                found.append(Broadcast(node, index, channels, what))
    return found
