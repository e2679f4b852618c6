import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_value, readers, sole_reader
from tests.helpers import const, make_model, tensor


def _model(nodes, inits=(), inputs=None, outputs=("y",)):
    proto = make_model(nodes, inputs or [tensor("x")], [tensor(o) for o in outputs], inits)
    return ir.serde.deserialize_model(proto)


def _value(model, name):
    for node in model.graph:
        for out in node.outputs:
            if out.name == name:
                return out
    return model.graph.initializers.get(name) or next(
        v for v in model.graph.inputs if v.name == name
    )


def test_constant_value_sources():
    nodes = [
        helper.make_node(
            "Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.FLOAT, [2], [1.5, 2.5])
        ),
        helper.make_node("Cast", ["c"], ["c16"], to=TensorProto.FLOAT16),
        helper.make_node("Identity", ["w"], ["wi"]),
        helper.make_node("Cast", ["c16"], ["c32"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["x", "c32"], ["s"]),
        helper.make_node("Add", ["s", "wi"], ["y"]),
    ]
    model = _model(nodes, [const("w", np.full(8, 3.0, np.float32))])
    assert constant_value(_value(model, "c")).tolist() == [1.5, 2.5]
    c16 = constant_value(_value(model, "c16"))
    assert c16.dtype == np.float16 and c16.tolist() == [1.5, 2.5]
    assert constant_value(_value(model, "wi")).tolist() == [3.0] * 8
    assert constant_value(_value(model, "c32")).dtype == np.float32
    assert constant_value(_value(model, "x")) is None
    assert constant_value(_value(model, "s")) is None


def test_initializer_listed_as_input_is_not_constant():
    """IR < 4 style: a graph input with a default is overridable, so not a constant."""
    proto = make_model(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        [tensor("x"), tensor("w", shape=(8,))],
        [tensor("y")],
        [const("w", np.ones(8, np.float32))],
    )
    model = ir.serde.deserialize_model(proto)
    assert constant_value(model.graph.initializers["w"]) is None


def _shared_weight_model():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
        helper.make_node("MatMul", ["a", "w"], ["y"], name="second"),
    ]
    return _model(
        nodes, [const("w", np.eye(8, dtype=np.float32))], inputs=[tensor("x", shape=(2, 8))]
    )


def test_private_initializer_copies_shared_weight_on_write():
    model = _shared_weight_model()
    first, second = list(model.graph)
    private = Editor(model.graph).private_initializer(first, 1)
    assert private is not model.graph.initializers["w"]
    assert first.inputs[1] is private and second.inputs[1] is model.graph.initializers["w"]
    private.const_value = ir.tensor(np.zeros((8, 8), np.float32), name=private.name)
    assert np.array_equal(constant_value(second.inputs[1]), np.eye(8))
    assert private.name in model.graph.initializers


def test_private_initializer_of_sole_user_is_itself():
    model = _shared_weight_model()
    first, second = list(model.graph)
    edit = Editor(model.graph)
    copy = edit.private_initializer(first, 1)
    assert edit.private_initializer(second, 1) is model.graph.initializers["w"]
    assert edit.private_initializer(first, 1) is copy


def test_private_initializer_same_weight_twice_in_one_node():
    model = _model(
        [helper.make_node("Add", ["w", "w"], ["y"], name="double")],
        [const("w", np.ones(8, np.float32))],
    )
    node = next(iter(model.graph))
    private = Editor(model.graph).private_initializer(node, 0)
    assert node.inputs[0] is private and node.inputs[1] is model.graph.initializers["w"]


def test_private_initializer_rejects_non_initializer():
    model = _shared_weight_model()
    with pytest.raises(ValueError, match="not an initializer"):
        Editor(model.graph).private_initializer(next(iter(model.graph)), 0)


def test_fresh_names_and_readers():
    model = _shared_weight_model()
    edit = Editor(model.graph)
    assert (
        edit.value_name("w") == "w_1" and edit.value_name("w") == "w_2"
    )  # each name handed out once
    assert edit.value_name("fresh") == "fresh" and edit.node_name("first") == "first_1"
    node = edit.node("Relu", [model.graph.inputs[0]], name="val_0")
    assert node.name == "val_0" and node.outputs[0].name == "val_0"  # never left to onnx-ir's val_N
    assert [n.name for n in readers(model.graph.initializers["w"])] == ["first", "second"]
    assert sole_reader(model.graph.initializers["w"]) is None
    first = next(iter(model.graph))
    assert sole_reader(first.outputs[0]) is list(model.graph)[1]


def test_readers_of_numbers_leave_out_shape_readers():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Reshape", ["r", "s"], ["y"]),
    ]
    model = _model(nodes)
    x = model.graph.inputs[0]
    assert [n.op_type for n in readers(x)] == ["Shape", "Relu"]
    assert sole_reader(x, numbers_only=True).op_type == "Relu" and sole_reader(x) is None


def _folded(nodes, name, inits=()):
    from normopt.rewriter.graph import folded_value

    model = ir.serde.deserialize_model(
        make_model(nodes, [tensor("x", shape=(1, 2))], [tensor("y", shape=(1, 2))], inits, opset=21)
    )
    return folded_value(ir.convenience.create_value_mapping(model.graph)[name])


def test_shape_with_end_zero_folds_to_an_empty_shape():
    """Found from outside: Shape(end=0) was read as "to the end" (a kernel computed with it
    raised in merge-branches, exit 4). ONNX slices the shape: end 0 is empty."""
    w = const("w", np.ones((3, 4), np.float32))
    nodes = [
        helper.make_node("Shape", ["w"], ["s0"], end=0),
        helper.make_node("Shape", ["w"], ["s1"], start=-1),
        helper.make_node("Add", ["x", "x"], ["y"]),
    ]
    assert _folded(nodes, "s0", [w]).tolist() == []
    assert _folded(nodes, "s1", [w]).tolist() == [4]


@pytest.mark.parametrize("to", [TensorProto.FLOAT8E4M3FN, TensorProto.FLOAT8E5M2])
def test_casts_numpy_does_not_compute_as_onnx_are_not_folded(to):
    """Found from outside: a fake-quant kernel computed through Cast to FLOAT8 was folded with
    ml_dtypes, which gives NaN/Inf where ONNX's Cast saturates: the rewrite was wrong before the
    gate. Those casts are not folded (the kernel is not a constant to normopt); float16 is."""
    w = const("w", np.array([[1000.0, -0.3]], np.float32))
    nodes = [
        helper.make_node("Cast", ["w"], ["q"], to=to),
        helper.make_node("Cast", ["q"], ["dq"], to=TensorProto.FLOAT),
        helper.make_node("Cast", ["w"], ["h"], to=TensorProto.FLOAT16),
        helper.make_node("Add", ["x", "dq"], ["y"]),
    ]
    assert _folded(nodes, "dq", [w]) is None
    assert _folded(nodes, "h", [w]).dtype == np.float16


def test_a_fold_reads_no_weight_an_input_makes_useless():
    """Found at LLM scale: Gather(table, input_ids) computed the (centred, lazily computed)
    table each time a pass asked whether the Gather is constant. The structure says it is not
    before any value is read; a Gather of constants still folds."""
    from normopt.rewriter.graph import folded_value

    table = ir.Value(name="table")
    read = []

    def computed():
        read.append(1)
        return ir.Tensor(np.arange(6, dtype=np.float32).reshape(3, 2))

    table.const_value = ir.LazyTensor(computed, dtype=ir.DataType.FLOAT, shape=ir.Shape([3, 2]))
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([2]))
    gather = ir.node("Gather", [table, ids], {"axis": 0})
    graph = ir.Graph([ids], gather.outputs, nodes=[gather], initializers=[table])
    assert folded_value(gather.outputs[0]) is None and not read
    index = ir.Value(name="index", const_value=ir.Tensor(np.array([2, 0], np.int64)))
    graph.register_initializer(index)
    gather.replace_input_with(1, index)
    assert folded_value(gather.outputs[0]).tolist() == [[4.0, 5.0], [0.0, 1.0]] and read
