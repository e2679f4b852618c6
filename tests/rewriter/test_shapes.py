"""Shape annotation fills in what the passes need and is taken back before anything is written."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from normopt import files
from normopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline
from normopt.rewriter.shapes import annotated
from tests.helpers import const, make_model, ort_run, tensor


def _values(model):
    return {o.name: o for n in model.graph for o in n.outputs}


def test_annotations_are_taken_back_and_refine_only_what_is_missing(tmp_path):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])]
    proto = make_model(
        nodes,
        [tensor("x", shape=("batch", 4))],
        [tensor("y", shape=("batch", "n"))],
        [const("w", np.ones((4, 3), np.float32))],
    )
    model = ir.serde.deserialize_model(proto)
    with annotated(model):
        h, y = _values(model)["h"], _values(model)["y"]
        assert h.dtype == ir.DataType.FLOAT and list(h.shape)[1] == 3
        assert list(y.shape)[1] == 3  # a symbolic dim inference knows as a number
    assert h.type is None and h.shape is None
    assert [str(d) for d in y.shape] == ["batch", "n"]  # the model's own output type again
    files.save(
        model, tmp_path / "out.onnx", external_data=False
    )  # initializers as IN described them
    assert onnx.load(str(tmp_path / "out.onnx")).graph == proto.graph


def test_sequence_values_keep_their_type():
    """Found from outside (a dynamo export with optimize=False): shape inference's element
    dtype merged into a sequence value made it a tensor, and onnxruntime refused the output."""
    nodes = [
        helper.make_node("SplitToSequence", ["x", "halves"], ["parts"], axis=1),
        helper.make_node("SequenceAt", ["parts", "zero"], ["first"]),
        helper.make_node("LayerNormalization", ["first", "g", "b"], ["y"], axis=-1),
    ]
    proto = make_model(
        nodes,
        [tensor("x", shape=(2, 4))],
        [tensor("y", shape=(2, 2))],
        [
            const("halves", np.array([2, 2], np.int64)),
            const("zero", np.array(0, np.int64)),
            const("g", np.ones(2, np.float32)),
            const("b", np.zeros(2, np.float32)),
        ],
    )
    model = ir.serde.deserialize_model(proto)
    with annotated(model):
        assert isinstance(_values(model)["parts"].type, ir.SequenceType)
    run_pipeline(model, list(DEFAULT_PIPELINE))
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    np.testing.assert_array_equal(ort_run(rewritten, feeds)["y"], ort_run(proto, feeds)["y"])


def test_a_graph_output_a_pass_creates_stays_typed():
    """A fold makes the Conv's output the graph output: it must keep a type."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"]),
        helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["y"]),
    ]
    inits = [
        const("w", np.ones((2, 2, 1, 1), np.float32)),
        *(const(n, np.full(2, 0.5, np.float32)) for n in "s bb m v".split()),
    ]
    proto = make_model(
        nodes, [tensor("x", shape=(1, 2, 3, 3))], [tensor("y", shape=(1, 2, 3, 3))], inits
    )
    model = ir.serde.deserialize_model(proto)
    run_pipeline(model, ["fold-affine-norms"])
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    assert rewritten.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT


def test_a_fused_graph_symbolic_inference_cannot_finish_writes_nothing(tmp_path, monkeypatch):
    """Found in review: onnxruntime's SymbolicShapeInference.infer_shapes, where it cannot infer
    every value (here an op of a custom domain), saves the model as sym_shape_infer_temp.onnx in
    the working directory, the user's folder, and raises. normopt takes its steps itself: the
    shapes it found are kept and nothing is written."""
    monkeypatch.chdir(tmp_path)
    h = 4
    nodes = [
        helper.make_node(
            "SkipLayerNormalization", ["x", "s", "g", "b"], ["n"], domain="com.microsoft"
        ),
        helper.make_node("MatMul", ["n", "w"], ["m"]),
        helper.make_node("Mystery", ["m"], ["y"], domain="custom.domain"),
    ]
    inits = [const(k, np.ones(h, np.float32)) for k in "gb"]
    inits.append(const("w", np.ones((h, h), np.float32)))
    graph = helper.make_graph(
        nodes,
        "g",
        [tensor("x", shape=(2, 3, h)), tensor("s", shape=(2, 3, h))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        inits,
    )
    opsets = [helper.make_opsetid(d, v) for d, v in (("", 17), ("com.microsoft", 1))]
    opsets.append(helper.make_opsetid("custom.domain", 1))
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=opsets))
    with annotated(model):
        m = _values(model)["m"]
        assert m.dtype == ir.DataType.FLOAT and list(m.shape) == [2, 3, h]  # found before it
    assert list(tmp_path.iterdir()) == []
