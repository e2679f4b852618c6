"""A model run a segment at a time (normopt.segments, `--verify local`) computes what the whole
model computes, bit for bit in float32, on real exports and on graphs built to stress the cuts."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import normopt
from normopt.segments import plan, topological
from normopt.sessions import run_local, run_ort_all
from tests.helpers import IR_VERSION, const, make_model, tensor

rng = np.random.default_rng(3)


def _same(path, feeds, budget):
    whole = run_ort_all(path, [feeds])[0]
    parts, count = run_local(path, [feeds], budget)
    assert list(parts[0]) == list(whole)
    for name, value in whole.items():
        assert parts[0][name].dtype == value.dtype
        np.testing.assert_array_equal(parts[0][name], value, err_msg=name)
    return count


@pytest.mark.parametrize(
    "name",
    ["gpt2-ts17", "gpt2-dyn18", "gpt2kv-dyn18", "gpt2fused-ts17", "llama-dyn18", "resnet18-ts17"],
)
def test_a_corpus_export_run_in_segments_equals_the_whole_run(corpus, name):
    """Every node with weights a segment of its own (budget 1 byte): the most cuts there can
    be; KV-cache inputs and outputs, onnxruntime's fused ops and Conv nets included."""
    paths = corpus(name)
    count = _same(paths.model, paths.load_inputs(), budget=1)
    assert count > 10


def test_external_data_weights_are_read_from_their_file(tmp_path):
    """Weights in a data file are mapped from it, a segment's at a time."""
    nodes = [
        helper.make_node("MatMul", ["x" if i == 0 else f"h{i}", f"w{i}"], [f"h{i + 1}"])
        for i in range(4)
    ]
    weights = [const(f"w{i}", rng.standard_normal((8, 8)).astype(np.float32)) for i in range(4)]
    model = make_model(nodes, [tensor("x")], [tensor("h4")], weights)
    path = tmp_path / "m.onnx"
    onnx.save(model, path, save_as_external_data=True, location="m.data", size_threshold=0)
    assert _same(path, {"x": rng.standard_normal((2, 8)).astype(np.float32)}, 256) == 4


def test_values_crossing_cuts_and_subgraph_reads(tmp_path):
    """A value read three segments later, an If whose branches read a value computed outside
    them, an output that is an initializer, an input passed through, nodes out of order."""
    then = helper.make_graph(
        [helper.make_node("Add", ["a", "w1"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Sub", ["a", "w1"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Mul", ["b", "w2"], ["c"]),  # out of order: reads b, computed below
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("If", ["flag"], ["i"], then_branch=then, else_branch=other),
        helper.make_node("Add", ["i", "c"], ["d"]),
        helper.make_node("Add", ["d", "a"], ["y"]),
    ]
    weights = [const(f"w{i}", rng.standard_normal((4, 4)).astype(np.float32)) for i in range(3)]
    graph = helper.make_graph(  # not checked: onnx.checker refuses nodes out of order
        nodes,
        "g",
        [tensor("x", shape=(4, 4)), tensor("flag", TensorProto.BOOL, ())],
        [tensor("y", shape=(4, 4)), tensor("w0", shape=(4, 4)), tensor("x", shape=(4, 4))],
        weights,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=IR_VERSION
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    assert [n.output[0] for n in topological(model.graph.node)][:3] == ["a", "b", "c"]
    for flag in (True, False):
        feeds = {"x": rng.standard_normal((4, 4)).astype(np.float32), "flag": np.array(flag)}
        assert _same(path, feeds, budget=1) >= 3


def test_a_node_heavier_than_the_budget_is_a_segment_of_its_own():
    weights = [const("big", np.zeros((64, 64), np.float32)), const("s", np.zeros(64, np.float32))]
    nodes = [
        helper.make_node("MatMul", ["x", "big"], ["a"]),
        helper.make_node("Add", ["a", "s"], ["b"]),
        helper.make_node("Relu", ["b"], ["y"]),
    ]
    graph = make_model(
        nodes, [tensor("x", shape=(1, 64))], [tensor("y", shape=(1, 64))], weights
    ).graph
    assert [len(s.nodes) for s in plan(graph, budget=300)] == [1, 2]
    assert [len(s.nodes) for s in plan(graph, budget=1 << 20)] == [3]


def test_rewrite_verified_by_segments_agrees_with_the_full_verification(corpus, tmp_path):
    """On the corpus, --verify local and --verify full give the same verdict and errors of
    the same size; the report names the method and the segments."""
    paths = corpus("gpt2-dyn18")
    feeds = paths.load_inputs()
    reports = {
        method: normopt.rewrite(
            paths.model, tmp_path / f"{method}.onnx", inputs=feeds, verify_method=method
        )[1].verification
        for method in ("full", "local")
    }
    assert all(r.ok for r in reports.values())
    assert reports["local"].to_json()["method"]["segments"]["model_a"] >= 2
    assert reports["full"].to_json()["method"]["method"] == "full"
    for full, local in zip(reports["full"].outputs, reports["local"].outputs):
        assert full.name == local.name and full.max_abs == pytest.approx(local.max_abs, abs=1e-6)


def _shipped(corpus, tmp_path, form):
    """A corpus export in a form users ship: a KV-cache decoder, onnxruntime-fused, float16
    mixed precision, or with its weights in an external data file."""
    from tests.test_precision import _fp16

    name = {"kv": "gpt2kv-dyn18", "fused": "gpt2fused-ts17"}.get(form, "gpt2-dyn18")
    paths = corpus(name)
    if form == "fp16":
        return paths, _fp16(paths.model, tmp_path / "fp16.onnx")
    if form == "external":
        model = tmp_path / "ext.onnx"
        onnx.save(
            onnx.load(str(paths.model)),
            str(model),
            save_as_external_data=True,
            location="ext.onnx.data",  # onnx's threshold: tensors of 1 KiB and up
        )
        return paths, model
    return paths, paths.model


@pytest.mark.slow
@pytest.mark.parametrize("form", ["kv", "fused", "fp16", "external"])
def test_streamed_centring_and_verification_by_segments_on_the_forms_users_ship(
    corpus, tmp_path, monkeypatch, form
):
    """Every centred writer computed as it is saved (StreamedTensor, the threshold at 0 so the
    small exports take the large models' path) and both models run a segment at a time: the
    rewrite is verified, runs in segments, and equals the original on the export's own inputs."""
    from normopt.rewriter import streamed
    from normopt.sessions import run_ort

    made = []
    real = streamed.StreamedTensor.__init__

    def counted(self, *args, **kwargs):
        made.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(streamed, "STREAM_BYTES", 0)
    monkeypatch.setattr(streamed.StreamedTensor, "__init__", counted)
    paths, src = _shipped(corpus, tmp_path, form)
    out, report = normopt.rewrite(src, tmp_path / "o.onnx", verify_method="local")
    assert report.written and report.verification.ok and made
    assert min(report.verification.segments.values()) >= 2
    feeds = paths.load_inputs()
    want, got = run_ort(src, feeds), run_ort(out, feeds)
    tolerance = 2e-2 if form == "fp16" else 1e-5
    for name, value in want.items():
        scale = max(1.0, float(np.abs(value).max()))
        assert np.abs(got[name].astype(np.float64) - value).max() <= tolerance * scale, name
