"""The table of per-op axis rules: where an axis goes through each op, or why it does not."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import helper

from normopt.rewriter import axis_rules
from tests.helpers import annotate, const, make_model, tensor


def _node(op: str, shape, out_shape, inits=(), inputs=("x",), opset=18, **attrs) -> ir.Node:
    """One `op` node reading x of `shape`, annotated; its extra inputs constants."""
    node = helper.make_node(op, [*inputs, *(i.name for i in inits)], ["y"], name="n", **attrs)
    model = make_model(
        [node], [tensor("x", shape=shape)], [tensor("y", shape=out_shape)], inits, opset=opset
    )
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    return next(iter(ir_model.graph))


def test_gather_moves_other_axes_and_refuses_its_own():
    idx = const("idx", np.array([0, 2], np.int64))
    node = _node("Gather", (2, 5, 8), (2, 2, 8), [idx], axis=1)
    assert axis_rules.through(node, 2) == (2, 3)
    assert axis_rules.through(node, 1) == "Gather n gathers along the hidden axis"
    assert axis_rules.keeps_last(node)


def test_slice_squeeze_unsqueeze_and_transpose():
    starts, ends, axes = (const(n, np.array([v], np.int64)) for n, v in zip("sea", (0, 2, 1)))
    node = _node("Slice", (2, 5, 8), (2, 2, 8), [starts, ends, axes])
    assert axis_rules.through(node, 2) == (2, 3)
    assert "slices the channel axis" in axis_rules.through(node, 1, "the channel axis")
    squeeze = _node("Squeeze", (2, 1, 8), (2, 8), [const("ax", np.array([1], np.int64))])
    assert axis_rules.through(squeeze, 2) == (1, 2)
    unsqueeze = _node("Unsqueeze", (2, 8), (2, 8, 1), [const("ax", np.array([-1], np.int64))])
    assert axis_rules.through(unsqueeze, 1) == (1, 3) and not axis_rules.keeps_last(unsqueeze)
    transpose = _node("Transpose", (2, 5, 8), (5, 2, 8), perm=[1, 0, 2])
    assert axis_rules.through(transpose, 0) == (1, 3) and axis_rules.keeps_last(transpose)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
def test_reductions_keep_other_axes_and_empty_axes_reduce_every_axis(op):
    node = _node(op, (2, 5, 8), (2, 1, 8), [const("ax", np.array([1], np.int64))])
    assert axis_rules.through(node, 2) == (2, 3)
    assert axis_rules.through(node, 1) == f"{op} n reduces the hidden axis"
    empty = _node(op, (2, 5, 8), (1, 1, 1), [const("ax", np.array([], np.int64))])
    assert axis_rules.through(empty, 2) == f"{op} n reduces every axis, the hidden axis too"


def test_reshape_keeps_the_axis_whole_only_when_it_stays_last():
    to = const("to", np.array([10, 8], np.int64))
    node = _node("Reshape", (2, 5, 8), (10, 8), [to])
    assert axis_rules.through(node, 2) == (1, 2) and axis_rules.back(node, 1) == 2
    joined = _node("Reshape", (2, 5, 8), (2, 40), [const("to", np.array([2, 40], np.int64))])
    assert "does not keep the hidden axis whole" in axis_rules.through(joined, 2)
    assert axis_rules.back(joined, 0) == 0  # the prefix up to it is untouched


def test_expand_pad_and_an_op_without_a_row():
    shape = const("s", np.array([3, 5, 8], np.int64))
    expand = _node("Expand", (1, 5, 8), (3, 5, 8), [shape])
    assert axis_rules.through(expand, 2) == (2, 3) and axis_rules.back(expand, 2) == 2
    assert "broadcast along" in axis_rules.through(expand, 0)
    pads = const("p", np.array([0, 1, 0, 0, 1, 0], np.int64))
    pad = _node("Pad", (2, 5, 8), (2, 7, 8), [pads])
    assert axis_rules.through(pad, 2) == (2, 3)
    assert "pads the hidden axis" in axis_rules.through(pad, 1)
    relu = _node("Relu", (2, 8), (2, 8))
    assert axis_rules.through(relu, 1) == "Relu n is not a known carrier of the hidden axis"
    assert axis_rules.back(relu, 1) == "unexpected Relu" and not axis_rules.keeps_last(relu)
