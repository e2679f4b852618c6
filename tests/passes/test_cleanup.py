import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normopt import files
from normopt.passes.cleanup import Cleanup
from normopt.rewriter import io
from normopt.sessions import run_ort
from tests.helpers import const, make_model, mlp, save, tensor


def _ir(proto):
    return ir.serde.deserialize_model(proto)


def _run_and_check(proto, tmp_path, feeds):
    """Run cleanup, save, check, compare with the original in ORT; return the result."""
    src = save(proto, tmp_path / "src.onnx")
    model = io.load(src)
    result = Cleanup().run(model)
    dst = tmp_path / "dst.onnx"
    files.save(model, dst, external_data=False)
    onnx.checker.check_model(str(dst), full_check=True)
    expected, got = run_ort(src, feeds), run_ort(dst, feeds)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_array_equal(expected[name], got[name])
    return result, io.load(dst)


def test_removes_dead_chain_and_its_initializer(tmp_path):
    proto = mlp()
    proto.graph.node.extend(
        [
            helper.make_node("Mul", ["x", "unused_w"], ["dead1"], name="dead_mul"),
            helper.make_node("Relu", ["dead1"], ["dead2"], name="dead_relu"),
        ]
    )
    proto.graph.initializer.append(const("unused_w", np.ones(8, np.float32)))
    result, out = _run_and_check(proto, tmp_path, {"x": np.ones((2, 8), np.float32)})
    assert result.modified
    assert result.lines[:2] == ["removed 2 dead node(s)", "removed 1 unused initializer(s)"]
    assert [(c.nodes, c.values) for c in result.changes if c.kind == "removed"] == [
        (("dead_mul",), ()),
        (("dead_relu",), ()),
        ((), ("unused_w",)),
    ]
    assert [n.op_type for n in out.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    assert "unused_w" not in out.graph.initializers


def test_sorts_unsorted_graph(tmp_path):
    proto = mlp()
    nodes = list(proto.graph.node)
    del proto.graph.node[:]
    proto.graph.node.extend(reversed(nodes))
    model = _ir(proto)
    plan = Cleanup().plan(model)
    assert plan.actions == ["sort nodes topologically"]
    result = Cleanup().run(model)
    assert result.lines == ["sorted 1 graph(s) topologically"]
    assert [n.name for n in model.graph] == ["mm1", "add1", "relu", "mm2"]


def test_clean_model_is_not_modified_and_says_why():
    result = Cleanup().run(_ir(mlp()))
    assert not result.modified and result.lines == []
    assert result.refusals[0].reason == "no dead nodes, unused initializers or unsorted nodes"


def test_idempotent(tmp_path):
    proto = mlp()
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    model = _ir(proto)
    assert Cleanup().run(model).modified
    assert not Cleanup().run(model).modified


def test_value_used_only_inside_if_branch_is_kept(tmp_path):
    """A node whose output is read only by an If branch (outer-scope capture) is live."""
    then_graph = helper.make_graph(
        [helper.make_node("Neg", ["captured"], ["t_out"])], "then", [], [tensor("t_out")]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e_out"])], "else", [], [tensor("e_out")]
    )
    nodes = [
        helper.make_node("Relu", ["x"], ["captured"], name="feeds_branch"),
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum"),
        helper.make_node("Greater", ["s", "zero"], ["cond"], name="cond"),
        helper.make_node(
            "If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if"
        ),
        helper.make_node("Sigmoid", ["x"], ["dead"], name="dead"),
    ]
    proto = make_model(nodes, [tensor("x")], [tensor("y")], [const("zero", np.float32(0))])
    feeds = {"x": np.arange(16, dtype=np.float32).reshape(2, 8) - 3}
    result, out = _run_and_check(proto, tmp_path, feeds)
    assert [n.name for n in out.graph] == ["feeds_branch", "sum", "cond", "if"]
    assert any("dead" in c for c in result.lines)


def test_model_local_function_is_kept_and_cleaned(tmp_path):
    body = [helper.make_node("Relu", ["a"], ["b"]), helper.make_node("Neg", ["a"], ["unused"])]
    function = helper.make_function(
        "custom", "MyRelu", ["a"], ["b"], body, [helper.make_opsetid("", 17)]
    )
    nodes = [helper.make_node("MyRelu", ["x"], ["y"], domain="custom", name="call")]
    graph = helper.make_graph(nodes, "g", [tensor("x")], [tensor("y")])
    proto = helper.make_model(
        graph,
        functions=[function],
        ir_version=10,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)],
    )
    result, out = _run_and_check(
        proto, tmp_path, {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)}
    )
    assert "removed 1 dead node(s) in model-local functions" in result.lines
    assert [n.op_type for n in out.graph] == ["MyRelu"] and len(out.functions) == 1


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_fp16_and_fp32_models(tmp_path, dtype):
    proto = mlp(dtype=dtype)
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    result, out = _run_and_check(proto, tmp_path, {"x": np.ones((2, 8), dtype)})
    assert result.modified and out.graph.initializers["w1"].dtype == ir.DataType(
        helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    )


def test_graph_outputs_and_inputs_are_kept():
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["z"])]
    proto = make_model(nodes, [tensor("x"), tensor("unused_input")], [tensor("y"), tensor("z")])
    model = _ir(proto)
    assert not Cleanup().run(model).modified
    assert [v.name for v in model.graph.inputs] == ["x", "unused_input"]
    assert len(model.graph) == 2


def test_bool_graph_without_dead_nodes_is_untouched():
    nodes = [helper.make_node("Not", ["b"], ["y"])]
    proto = make_model(nodes, [tensor("b", TensorProto.BOOL)], [tensor("y", TensorProto.BOOL)])
    assert not Cleanup().run(_ir(proto)).modified
