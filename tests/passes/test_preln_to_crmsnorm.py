"""preln-to-crmsnorm: a zero-mean Pre-RMSNorm stream carried in d-1 coordinates, on the corpus's
dynamo Pre-LN export (equal to the reference, every width d-1 asserted) and a refusal per
precondition that fails."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from normopt.errors import NotApplied
from normopt.rewrite import rewrite
from normopt.verify import VerifyOptions
from tests.helpers import assert_matches_reference

PASSES = ["preln-to-rmsnorm", "preln-to-crmsnorm"]


def _widths(path) -> dict[str, list[int]]:
    return {i.name: list(i.dims) for i in onnx.load(path).graph.initializer}


def test_the_stream_becomes_d_minus_1_wide_and_equal(corpus, tmp_path):
    """The hand-written Pre-LN transformer (d = 64), dynamo: embedding and positional tables,
    every branch's output projection and bias cut to 63; every norm a CRMSNorm; the readers'
    weights 63 rows; outputs equal to the reference."""
    paths = corpus("preln-dyn18")
    out = tmp_path / "out.onnx"
    report = rewrite(paths.model, out, passes=PASSES, verification=VerifyOptions(inputs=paths.load_inputs()))
    crms = next(p for p in report.passes if p.name == "preln-to-crmsnorm")
    assert crms.lines == ["cut 10 writer constant(s) to d-1 hidden entries", "converted 5 RMSNorm(s) to CRMSNorm (width d-1)"]
    widths = _widths(out)
    assert widths["tokens.weight"] == [128, 63] and widths["positions"] == [1, 64, 63]
    assert all(widths[f"blocks.{i}.{b}.bias"] == [63] for i in (0, 1) for b in ("attn.proj", "mlp.2"))
    matmul_weights = [widths[n.input[1]] for n in onnx.load(out).graph.node if n.op_type == "MatMul" and n.input[1] in widths]
    assert sorted(matmul_weights) == sorted([[63, 192], [64, 63], [63, 128], [128, 63]] * 2 + [[63, 128]])
    assert_matches_reference(out, paths)


def test_gpt2_dynamo_export_is_carried_in_d_minus_1(corpus, tmp_path):
    """GPT-2 (dynamo): its Conv1D writers are Gemm -> Reshape(B, T, d) with the target built by a
    Concat (the constant d cut to d-1), its readers Reshape(-1, d) -> Gemm, the final norm's beta an
    Add (folded into the tied LM head, which gets its own weight); equal to the reference."""
    paths = corpus("gpt2-dyn18")
    out = tmp_path / "out.onnx"
    report = rewrite(paths.model, out, passes=PASSES, verification=VerifyOptions(inputs=paths.load_inputs()))
    crms = next(p for p in report.passes if p.name == "preln-to-crmsnorm")
    assert crms.lines[1] == "converted 5 RMSNorm(s) to CRMSNorm (width d-1)"
    graph = onnx.load(out).graph
    widths = {i.name: list(i.dims) for i in graph.initializer}
    gathers = [widths[n.input[0]] for n in graph.node if n.op_type == "Gather" and n.input[0] in widths
               and len(widths[n.input[0]]) == 2]
    assert gathers and all(w[-1] == 63 for w in gathers)  # token and position tables
    assert_matches_reference(out, paths)


@pytest.mark.parametrize("name", ["preln-ts14", "preln-ts17", "bloom-ts17", "whisper-dyn18"])
def test_more_exports_carried_in_d_minus_1(corpus, tmp_path, name):
    """TorchScript reads the norm output's shape (`b, n, d = x.shape`): those Shape nodes get d
    back (+1 on their last entry); BLOOM's embedding LayerNorm leaves an explicit recentring,
    sliced; Whisper's decoder stream (dynamo). Equal to the reference."""
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite(paths.model, out, passes=PASSES, verification=VerifyOptions(inputs=paths.load_inputs()))
    crms = next(p for p in report.passes if p.name == "preln-to-crmsnorm")
    assert crms.modified and any(line.startswith("converted") for line in crms.lines)
    if name.startswith("preln-ts"):
        assert sum(n.op_type == "Add" and n.name.endswith(".crms_d") for n in onnx.load(out).graph.node) >= 2
    assert_matches_reference(out, paths)


def _refusal(model_path, tmp_path, passes=PASSES) -> str:
    with pytest.raises(NotApplied) as info:
        rewrite(model_path, tmp_path / "out.onnx", passes=passes, verification=None)
    return str(info.value)


@pytest.mark.parametrize(("name", "reason"), [
    # OPT reshapes the stream between blocks: a Reshape reading a stream value is not cut yet
    ("opt-ts17", "Reshape /model/decoder/layers.0/Reshape reads the stream value"),
    ("llama-dyn18", "the table of node_embedding does not sum to 0 along the hidden axis: the stream is not zero-mean"),
    ("bert-ts17", "not Pre-RMSNorm"),
    # GPT-2's Conv1D reshapes the norm output to (-1, x.size(-1)): a target computed from its shape
    ("gpt2-ts17", "target shape is computed: its hidden size is not a constant to cut"),
    ("vit-ts17", "writes into the stream: not a cut CRMS can make"),  # the cls token's Concat
    ("clip-ts17", "Gather /model/Gather reads the stream value"),  # the pooled token
])
def test_preconditions_that_fail_are_named(corpus, tmp_path, name, reason):
    assert reason in _refusal(corpus(name).model, tmp_path)


def test_a_stream_value_that_is_a_graph_output_is_refused(corpus, tmp_path):
    """RMSNorm-converted first, then a residual Add's output made a graph output (hidden states):
    cutting it would change that output."""
    from normopt.rewriter import io
    from normopt.rewriter.norms import find_norms
    from normopt.rewriter.stream import analyze

    converted = tmp_path / "rms.onnx"
    rewrite(corpus("preln-dyn18").model, converted, passes=["preln-to-rmsnorm"], verification=None)
    ir_model = io.load(converted)
    stream = analyze(ir_model.graph, find_norms(ir_model.graph)).residual_adds[0].node.outputs[0].name
    model = onnx.load(converted)
    model.graph.output.append(helper.make_tensor_value_info(stream, onnx.TensorProto.FLOAT, ["batch", "tokens", 64]))
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    assert f"the stream value '{stream}' is a graph output" in _refusal(src, tmp_path, ["preln-to-crmsnorm"])


def test_a_matmul_that_reads_a_norm_and_writes_the_stream_gets_both_edits(tmp_path):
    """Found by the fuzzer (a one-MatMul branch): its weight loses the last row (it reads the
    norm: W[i] - W[d-1]) and the last column (it writes the stream): 8x8 -> 7x7."""
    import numpy as np

    from tests.helpers import const, make_model, tensor

    rng = np.random.default_rng(0)
    d = 8
    inits = [const("table", rng.standard_normal((12, d)).astype(np.float32)),
             const("pos", rng.standard_normal((3, d)).astype(np.float32)),
             const("g", (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)), const("b", np.zeros(d, np.float32)),
             const("w", rng.standard_normal((d, d)).astype(np.float32)), const("head", rng.standard_normal((d, 5)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("Add", ["e", "pos"], ["x0"]),
             helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["br"]), helper.make_node("Add", ["x0", "br"], ["x1"]),
             helper.make_node("LayerNormalization", ["x1", "g", "b"], ["z"], axis=-1),
             helper.make_node("MatMul", ["z", "head"], ["y"])]
    model = make_model(nodes, [tensor("ids", onnx.TensorProto.INT64, (3,))], [tensor("y", shape=(3, 5))], inits)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = rewrite(src, out, passes=PASSES, verification=VerifyOptions(inputs={"ids": np.array([1, 5, 11])}))
    assert report.verification.ok
    graph = onnx.load(out).graph
    widths = {i.name: list(i.dims) for i in graph.initializer}
    branch = next(n for n in graph.node if n.op_type == "MatMul" and n.output[0] == "br")
    assert widths[branch.input[1]] == [7, 7] and widths[next(n for n in graph.node if n.output[0] == "y").input[1]] == [7, 5]


def test_an_explicit_recentring_is_sliced(tmp_path, monkeypatch):
    """The stream starts at a graph input, so preln-to-rmsnorm recentres it explicitly
    (x - mean(x)): zero-mean by construction, CRMS slices its first d-1 entries after it."""
    import numpy as np

    from normopt.rewriter import stream_plan
    from tests.helpers import const, make_model, tensor

    monkeypatch.setattr(stream_plan, "RECENTRING_COST", 0)
    rng = np.random.default_rng(1)
    d = 6
    inits = [const("g", (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)),
             const("b", (0.1 * rng.standard_normal(d)).astype(np.float32)),  # one beta, both norms: no residual
             const("w1", rng.standard_normal((d, d)).astype(np.float32)), const("w2", rng.standard_normal((d, d)).astype(np.float32)),
             const("head", rng.standard_normal((d, 3)).astype(np.float32))]
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w1"], ["t"]), helper.make_node("Relu", ["t"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["br"]), helper.make_node("Add", ["x", "br"], ["x1"]),
             helper.make_node("LayerNormalization", ["x1", "g", "b"], ["z"], axis=-1),
             helper.make_node("MatMul", ["z", "head"], ["y"])]
    model = make_model(nodes, [tensor("x", shape=(2, 4, d))], [tensor("y", shape=(2, 4, 3))], inits)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    report = rewrite(src, out, passes=PASSES,
                     verification=VerifyOptions(inputs={"x": rng.standard_normal((2, 4, d)).astype(np.float32)}))
    crms = next(p for p in report.passes if p.name == "preln-to-crmsnorm")
    assert "cut 1 recentred value(s) sliced to d-1 hidden entries" in crms.lines and report.verification.ok
    ops = [n.op_type for n in onnx.load(out).graph.node]
    assert ops.count("Slice") == 1 and "LayerNormalization" not in ops


def test_a_24_layer_stream_keeps_its_accuracy(tmp_path):
    """24 Pre-LN blocks (d = 32): the CRMS rewrite's error against the original, in float32, is
    of the order of the RMS rewrite's (the dropped coordinate is never rebuilt, only implied)."""
    import numpy as np

    from normopt.verify import run_ort
    from tests.helpers import const, make_model, tensor

    rng = np.random.default_rng(3)
    d, layers = 32, 24
    inits = [const("table", rng.standard_normal((50, d)).astype(np.float32)),
             const("head", (rng.standard_normal((d, 7)) / d ** 0.5).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x0"])]
    for i in range(layers):
        inits += [const(f"g{i}", (1 + 0.2 * rng.standard_normal(d)).astype(np.float32)),
                  const(f"b{i}", (0.1 * rng.standard_normal(d)).astype(np.float32)),
                  const(f"w{i}", (rng.standard_normal((d, 2 * d)) / d ** 0.5).astype(np.float32)),
                  const(f"v{i}", (rng.standard_normal((2 * d, d)) / (2 * d) ** 0.5).astype(np.float32))]
        nodes += [helper.make_node("LayerNormalization", [f"x{i}", f"g{i}", f"b{i}"], [f"h{i}"], axis=-1),
                  helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"t{i}"]), helper.make_node("Relu", [f"t{i}"], [f"r{i}"]),
                  helper.make_node("MatMul", [f"r{i}", f"v{i}"], [f"o{i}"]),
                  helper.make_node("Add", [f"x{i}", f"o{i}"], [f"x{i + 1}"])]
    inits.append(const("gf", np.ones(d, np.float32)))
    nodes += [helper.make_node("LayerNormalization", [f"x{layers}", "gf"], ["z"], axis=-1),
              helper.make_node("MatMul", ["z", "head"], ["y"])]
    model = make_model(nodes, [tensor("ids", onnx.TensorProto.INT64, (4, 9))], [tensor("y", shape=(4, 9, 7))], inits)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    feeds = {"ids": rng.integers(0, 50, (4, 9)).astype(np.int64)}
    rewrite(src, tmp_path / "rms.onnx", passes=["preln-to-rmsnorm"], verification=VerifyOptions(inputs=feeds))
    rewrite(src, tmp_path / "crms.onnx", passes=PASSES, verification=VerifyOptions(inputs=feeds))
    want = run_ort(src, feeds)["y"].astype(np.float64)
    rms = np.abs(run_ort(tmp_path / "rms.onnx", feeds)["y"] - want).max()
    crms = np.abs(run_ort(tmp_path / "crms.onnx", feeds)["y"] - want).max()
    assert crms <= max(4 * rms, 1e-5 * np.abs(want).max()), (crms, rms)


def test_a_norm_read_by_a_non_linear_op_is_refused(tmp_path):
    """Only a linear reader can take the dropped entry (W[i] - W[d-1]); a Relu reading the final
    norm is named."""
    import numpy as np

    from tests.helpers import const, make_model, tensor

    rng = np.random.default_rng(0)
    d = 8
    inits = [const("table", rng.standard_normal((12, d)).astype(np.float32)), const("g", np.ones(d, np.float32)),
             const("b", np.zeros(d, np.float32)), const("w", rng.standard_normal((d, d)).astype(np.float32))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["x0"]),
             helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1),
             helper.make_node("MatMul", ["h", "w"], ["br"]), helper.make_node("Add", ["x0", "br"], ["x1"]),
             helper.make_node("LayerNormalization", ["x1", "g", "b"], ["z"], axis=-1),
             helper.make_node("Relu", ["z"], ["y"], name="act")]
    model = make_model(nodes, [tensor("ids", onnx.TensorProto.INT64, (3,))], [tensor("y", shape=(3, d))], inits)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    assert "Relu act reads the RMSNorm at" in _refusal(src, tmp_path)
