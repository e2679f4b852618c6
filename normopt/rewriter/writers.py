"""The walk from a stream value back to the constants that write it along its hidden axis.

preln-to-rmsnorm centres those constants (the stream becomes zero-mean) and preln-to-crmsnorm
cuts them to d-1 entries (the stream drops its implied last coordinate): the same walk with
different leaf actions, given by a `Visitor`. What writes the value:
  Add / Sub / Concat (where the visitor combines them): each input, constants as leaves, the
     others walked on with the hidden axis aligned from the end (broadcasting);
  a linear op with constant weights (`weight_inputs`): its weight and bias are leaves;
  an op of normopt.rewriter.axis_rules with a `back` rule (Cast, Reshape, Transpose, Expand, ...):
     the input axis the hidden axis comes from, walked on (or a constant leaf);
  a Mul by a constant scalar, where the visitor's map commutes with it: its other input;
  anything else, or an op the visitor handles itself first (`special`), refuses.
"""

from __future__ import annotations

from typing import Protocol

import onnx_ir as ir

from normopt.rewriter import axis_rules
from normopt.rewriter.graph import Refuse, constant_shape, folded_value, is_op, rank

MAX_DEPTH = 64


class Visitor(Protocol):
    combines: tuple[str, ...]  # which of Add / Sub / Concat are walked through
    where: str  # how refusals name a written value: "" or " (written into the stream)"
    # a Mul by one constant scalar is walked through (the leaves' map commutes with it: a cut,
    # a rotation; a centring folds it as a LayerScale instead)
    through_scalars: bool

    def special(self, node: ir.Node, value: ir.Value, hidden: int, depth: int) -> bool:
        """Handle `node` itself (LayerScale, a recentring, a scalar Mul); True when done."""

    def constant(self, node: ir.Node, index: int, axis: int, what: str) -> None:
        """A constant input of `node` written along its `axis` (negative)."""

    def recurse(self, node: ir.Node, value: ir.Value, hidden: int | None, depth: int) -> None:
        """Walk on to `value`, an input of `node` carrying the hidden axis at `hidden`."""

    def moved(self, node: ir.Node, out_hidden: int, in_hidden: int) -> None:
        """A shape op carries the hidden axis from `in_hidden` to `out_hidden`."""


def weight_inputs(node: ir.Node, hidden: int, r: int) -> list[tuple[int, int]] | None:
    """The constant inputs through which a linear op writes its output's `hidden` axis (of
    rank r), each with the axis (negative) that becomes it; None: not such a writer.
      MatMul  y = x @ W, W constant of rank >= 2: W's last axis;
      Gemm    y = x @ B (+ C): B's output axis (its first with transB) and C's last;
      Conv    output channels (hidden axis 1), one group: W's first axis and B;
      Gather  an embedding table (axis 0, rank >= 2) read by ids: the table's last axis."""
    op, last = node.op_type, hidden == r - 1
    weight = constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    bias = [(2, -1)] if len(node.inputs) > 2 and node.inputs[2] is not None else []
    if op == "MatMul" and weight is not None and len(weight) >= 2 and last:
        return [(1, -1)]
    if op == "Gemm" and weight is not None and last:
        return [(1, -2 if node.attributes.get_int("transB", 0) else -1), *bias]
    if op == "Conv" and weight is not None and hidden == 1:
        if node.attributes.get_int("group", 1) != 1:
            raise Refuse(
                f"grouped Conv {node.name} writes into the stream: its output channels read "
                "different groups of inputs (centring or cutting one changes the others)"
            )
        return [(1, -len(weight)), *bias]
    table = constant_shape(node.inputs[0]) if node.inputs else None
    if op == "Gather" and node.attributes.get_int("axis", 0) == 0 and last:
        if table is not None and len(table) >= 2:
            return [(0, -1)]
    return None


def walk(value: ir.Value, hidden: int | None, visitor: Visitor, depth: int = 0) -> None:
    """Visit what writes `value` along its (non-negative) `hidden` axis, the last when None,
    or Refuse."""
    node, r = value.producer(), rank(value)
    if node is None:
        raise Refuse(f"'{value.name}'{visitor.where} is a graph input")
    if r is None:
        raise Refuse(f"the rank of '{value.name}'{visitor.where} is unknown")
    if depth > MAX_DEPTH:
        raise Refuse(f"'{value.name}' is written by a chain too deep to follow")
    hidden = r - 1 if hidden is None else hidden
    op = node.op_type
    if not is_op(node, op):
        raise Refuse(f"{node.domain}::{op} {node.name} writes '{value.name}'")
    if visitor.special(node, value, hidden, depth):
        return
    scaled = _scaled(node) if visitor.through_scalars else None
    if scaled is not None:
        rs = rank(scaled)
        visitor.recurse(node, scaled, None if rs is None else hidden - r + rs, depth)
        return
    if op in visitor.combines:
        _combined(node, value, hidden, r, visitor, depth)
        return
    weights = weight_inputs(node, hidden, r)
    if weights is not None:
        for index, axis in weights:
            kind = "the weight" if index == 1 else "the bias" if index == 2 else "the table"
            visitor.constant(node, index, axis, f"{kind} of {node.name}")
        return
    if axis_rules.rule(node) is not None and axis_rules.rule(node).back is not None:
        _moved(node, hidden, visitor, depth)
        return
    raise Refuse(
        f"{op} {node.name} writes '{value.name}'{visitor.where} and is not a linear op with "
        "constant weights"
    )


def _scaled(node: ir.Node) -> ir.Value | None:
    """z of Mul(z, s) (either order) with s a constant scalar, else None."""
    if not is_op(node, "Mul") or len(node.inputs) != 2:
        return None
    scalars = [constant_shape(v) is not None and folded_value(v).size == 1 for v in node.inputs]
    return node.inputs[scalars.index(False)] if scalars.count(True) == 1 else None


def _combined(
    node: ir.Node, value: ir.Value, hidden: int, r: int, visitor: Visitor, depth: int
) -> None:
    """Add / Sub / Concat: constants are leaves, the other inputs walked on."""
    if node.op_type == "Concat" and node.attributes.get_int("axis", 0) % r == hidden:
        raise Refuse(f"Concat {node.name} joins pieces along the hidden axis")
    done = set()
    for i, v in enumerate(node.inputs):
        if constant_shape(v) is not None:
            visitor.constant(
                node, i, hidden - r, f"the constant '{v.name}' of {node.op_type} {node.name}"
            )
        elif v not in done:
            done.add(v)
            rv = rank(v)
            if rv is None or rv < r - hidden:
                raise Refuse(
                    f"'{v.name}' is added along the whole hidden axis of '{value.name}' (or "
                    "its rank is unknown)"
                )
            visitor.recurse(node, v, rv - (r - hidden), depth)


def _moved(node: ir.Node, hidden: int, visitor: Visitor, depth: int) -> None:
    """A shape op: the input axis the hidden axis comes from, then its writer."""
    axis = axis_rules.back(node, hidden)
    if isinstance(axis, str):
        raise Refuse(axis)
    visitor.moved(node, hidden, axis)
    source = node.inputs[0]
    if constant_shape(source) is not None:
        what = f"the constant '{source.name}' of {node.name}"
        visitor.constant(node, 0, axis - rank(source), what)
    else:
        visitor.recurse(node, source, axis, depth)
