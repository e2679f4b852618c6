import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normopt.rewriter.graph import consumers, constant_value, private_initializer, unique_name
from tests.helpers import const, make_model, tensor


def _model(nodes, inits=(), inputs=None, outputs=("y",)):
    proto = make_model(nodes, inputs or [tensor("x")], [tensor(o) for o in outputs], inits)
    return ir.serde.deserialize_model(proto)


def _value(model, name):
    for node in model.graph:
        for out in node.outputs:
            if out.name == name:
                return out
    return model.graph.initializers.get(name) or next(v for v in model.graph.inputs if v.name == name)


def test_constant_value_sources():
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("t", TensorProto.FLOAT, [2], [1.5, 2.5])),
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
    proto = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor("x"), tensor("w", shape=(8,))],
                       [tensor("y")], [const("w", np.ones(8, np.float32))])
    model = ir.serde.deserialize_model(proto)
    assert constant_value(model.graph.initializers["w"]) is None


def _shared_weight_model():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["a"], name="first"),
             helper.make_node("MatMul", ["a", "w"], ["y"], name="second")]
    return _model(nodes, [const("w", np.eye(8, dtype=np.float32))], inputs=[tensor("x", shape=(2, 8))])


def test_private_initializer_copies_shared_weight_on_write():
    model = _shared_weight_model()
    first, second = list(model.graph)
    private = private_initializer(first, 1)
    assert private is not model.graph.initializers["w"]
    assert first.inputs[1] is private and second.inputs[1] is model.graph.initializers["w"]
    private.const_value = ir.tensor(np.zeros((8, 8), np.float32), name=private.name)
    assert np.array_equal(constant_value(second.inputs[1]), np.eye(8))
    assert private.name in model.graph.initializers


def test_private_initializer_of_sole_user_is_itself():
    model = _shared_weight_model()
    first, second = list(model.graph)
    copy = private_initializer(first, 1)
    assert private_initializer(second, 1) is model.graph.initializers["w"]
    assert private_initializer(first, 1) is copy


def test_private_initializer_same_weight_twice_in_one_node():
    model = _model([helper.make_node("Add", ["w", "w"], ["y"], name="double")], [const("w", np.ones(8, np.float32))])
    node = next(iter(model.graph))
    private = private_initializer(node, 0)
    assert node.inputs[0] is private and node.inputs[1] is model.graph.initializers["w"]


def test_private_initializer_rejects_non_initializer():
    model = _shared_weight_model()
    with pytest.raises(ValueError, match="not an initializer"):
        private_initializer(next(iter(model.graph)), 0)


def test_unique_name_and_consumers():
    model = _shared_weight_model()
    assert unique_name(model.graph, "w") == "w_1"
    assert unique_name(model.graph, "fresh") == "fresh"
    assert [n.name for n in consumers(model.graph.initializers["w"])] == ["first", "second"]
