"""preln-to-rmsnorm on graphs onnxruntime's transformers optimizer fused: SkipLayerNormalization
(y = LN(input + skip + bias), the sum as its optional output 3) is a residual Add and a
LayerNorm at once. Hand-built Pre-LN graphs in that form: each precondition refuses by name;
what converts is equal in onnxruntime."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normopt.passes.base import Options
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from tests.helpers import annotate, const, make_model, ort_run, tensor

D, VOCAB = 8, 16
FEEDS = {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)}


def _skip(inputs, outputs, simplified=False):
    op = "SkipSimplifiedLayerNormalization" if simplified else "SkipLayerNormalization"
    if simplified:  # no beta
        inputs = inputs[:3] + inputs[4:]
    return helper.make_node(op, inputs, outputs, domain="com.microsoft", epsilon=1e-5)


def _fused(
    dtype=np.float32,
    mean_read=False,
    simplified=False,
    sum_reader=None,
    final_sum=False,
    branch_reader=False,
):
    """ids -> Gather(table) + pos = x0 -> LN -> MatMul = m0; Skip0(m0, x0, +c0) -> (n1, sum x1);
    MatMul = m1; Skip1(m1, x1, +c1) -> final -> MatMul(head) = y.
    mean_read: Skip0's Mean output is a graph output; simplified: Skip0 is already a
    SkipSimplifiedLayerNormalization; sum_reader: an op reading x1 into the output "extra";
    final_sum: Skip1's sum is the graph output "x2"; branch_reader: Relu(m0) is an output too."""
    rng = np.random.default_rng(0)
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))

    def arr(*shape, scale=1.0, offset=0.0):
        return (offset + scale * rng.standard_normal(shape)).astype(dtype)

    inits = [
        const("table", arr(VOCAB, D)),
        const("pos", arr(1, 4, D)),
        const("head", arr(D, VOCAB)),
    ]
    for i in range(3):
        inits += [const(f"g{i}", arr(D, scale=0.2, offset=1)), const(f"b{i}", arr(D, scale=0.1))]
    for i in range(2):
        inits += [const(f"w{i}", arr(D, D)), const(f"c{i}", arr(D, scale=0.3, offset=0.5))]
    stats = ["x1_mean"] if mean_read else [""]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tok"]),
        helper.make_node("Add", ["tok", "pos"], ["x0"]),
        helper.make_node("LayerNormalization", ["x0", "g0", "b0"], ["n0"], epsilon=1e-5),
        helper.make_node("MatMul", ["n0", "w0"], ["m0"]),
        _skip(["m0", "x0", "g1", "b1", "c0"], ["n1", *stats, "", "x1"], simplified),
        helper.make_node("MatMul", ["n1", "w1"], ["m1"]),
        _skip(["m1", "x1", "g2", "b2", "c1"], ["final", "", "", "x2"] if final_sum else ["final"]),
        helper.make_node("MatMul", ["final", "head"], ["y"]),
    ]
    outputs = [tensor("y", t, (2, 4, VOCAB))]
    if mean_read:
        outputs.append(tensor("x1_mean", TensorProto.FLOAT, (2, 4, 1)))
    if sum_reader:
        nodes.append(helper.make_node(sum_reader, ["x1"], ["extra"]))
        outputs.append(tensor("extra", t, (2, 4, D)))
    if final_sum:
        outputs.append(tensor("x2", t, (2, 4, D)))
    if branch_reader:
        nodes.append(helper.make_node("Relu", ["m0"], ["branch"]))
        outputs.append(tensor("branch", t, (2, 4, D)))
    ids = [tensor("ids", TensorProto.INT64, (2, 4))]
    return make_model(nodes, ids, outputs, inits, domains=[("com.microsoft", 1)])


def _run(model, **options):
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = PreLNToRMSNorm(Options(**options)).run(ir_model)
    rewritten = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(rewritten)
    return result, rewritten


def _assert_same(model, rewritten, names=None, tol=1e-5):
    before, after = ort_run(model, FEEDS), ort_run(rewritten, FEEDS)
    for name in names or before:
        ref = before[name].astype(np.float64)
        np.testing.assert_allclose(after[name], ref, rtol=tol, atol=tol * np.abs(ref).max())


def _ops(model):
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_fused_pre_ln_converts_with_the_residual_biases_centred(dtype):
    model = _fused(dtype)
    result, rewritten = _run(model)
    assert result.stats["converted"] == 3, result.refusals
    ops = _ops(rewritten)
    assert ops["SkipSimplifiedLayerNormalization"] == 2 and not ops["SkipLayerNormalization"]
    betas = [n for n in rewritten.graph.node if n.op_type == "Add" and n.input[1] in ("b1", "b2")]
    assert len(betas) == 2  # no linear reader with a bias of its own takes them: Adds after
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in rewritten.graph.initializer}
    skips = [n for n in rewritten.graph.node if n.op_type == "SkipSimplifiedLayerNormalization"]
    for node in skips:  # the residual bias (input 3) is centred with the stream
        bias = inits[node.input[3]].astype(np.float64)
        assert abs(bias.mean()) < 1e-3 * np.abs(bias).max()
    assert list(skips[0].output)[3] == "x1"  # the sum keeps its name and its reader
    # no statistics outputs (onnxruntime would compute them), no sum where nothing reads it
    assert list(skips[0].output)[1:3] == ["", ""] and len(skips[1].output) == 1
    _assert_same(model, rewritten, tol=1e-5 if dtype == np.float32 else 1e-2)


def test_skip_norm_statistics_outputs_read():
    result, rewritten = _run(_fused(mean_read=True))
    reasons = [r.reason for r in result.refusals]
    assert any("Mean/InvStdDev outputs are read" in r for r in reasons), reasons
    assert not _ops(rewritten)["SkipSimplifiedLayerNormalization"]


def test_stream_read_by_a_skip_rmsnorm_keeps_its_numbers():
    """A SkipSimplifiedLayerNormalization normalizes input + skip without centring: the first
    norm's input, which it reads, must keep its numbers."""
    model = _fused(simplified=True)
    result, rewritten = _run(model)
    assert any("not shift-invariant" in r.reason for r in result.refusals), result.refusals
    # the last norm alone would need the sum x1 recentred explicitly: no gain
    assert not result.modified and result.stats["converted"] == 0
    _assert_same(model, rewritten)


@pytest.mark.parametrize("op", ["Relu", "Sigmoid"])
def test_sum_read_by_a_non_shift_invariant_op(op):
    model = _fused(sum_reader=op)
    result, rewritten = _run(model)
    assert any(f"{op} " in r.reason and "'x1'" in r.reason for r in result.refusals)
    _assert_same(model, rewritten)


def test_sum_as_graph_output_needs_allow_hidden_state_change():
    model = _fused(final_sum=True)
    result, _ = _run(model)  # the whole stream flows into x2: every norm stays, saying so
    assert not result.modified and len(result.refusals) == 3
    assert all("'x2' is a graph output" in r.reason for r in result.refusals)
    result, rewritten = _run(model, allow_hidden_state_change=True)
    assert result.stats["converted"] == 3 and "x2" in result.changed_outputs
    _assert_same(model, rewritten, names=["y"])
    x2 = ort_run(rewritten, FEEDS)["x2"]
    np.testing.assert_allclose(x2.mean(-1), 0, atol=1e-5)  # the stream itself is zero-mean now


def test_a_branch_read_elsewhere_keeps_its_numbers():
    """m0 (Skip0's input) is read by a Relu too: m0 keeps its numbers, and with it the stream
    before it (the first two norms say so); the last norm alone would need the sum x1
    recentred explicitly, which costs more than converting one norm saves."""
    model = _fused(branch_reader=True)
    result, rewritten = _run(model)
    reasons = [r.reason for r in result.refusals]
    assert not result.modified and len(reasons) == 3, reasons
    assert sum(r.startswith("Relu") and "reads 'm0'" in r for r in reasons) == 2
    assert sum(r.startswith("1 LayerNorm(s) would need 1 explicit") for r in reasons) == 1
    _assert_same(model, rewritten)


@pytest.mark.parametrize("post_ln_first", [False, True])
def test_crms_refuses_a_stream_of_fused_skip_norms(post_ln_first):
    """A stream of Skip norms (SkipSimplified after preln-to-rmsnorm) is classified as one
    (each Skip is a residual Add) and preln-to-crmsnorm refuses it by name: a Skip norm
    normalizes input + skip, not a value CRMS could cut (tests/test_fuzz.py has the case where
    it did)."""
    from normopt.passes.pipeline import run_pipeline

    model = _fused()
    if post_ln_first:  # the first block's output normalized after its residual Add
        graph = model.graph
        ln = next(n for n in graph.node if n.op_type == "LayerNormalization")
        post = helper.make_node("LayerNormalization", ["x0", "g0", "b0"], ["x0n"], epsilon=1e-5)
        graph.node.insert(list(graph.node).index(ln), post)
        ln.input[0] = "x0n"
        next(n for n in graph.node if n.op_type == "SkipLayerNormalization").input[1] = "x0n"
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    results = run_pipeline(ir_model, ["preln-to-rmsnorm", "preln-to-crmsnorm"], Options())
    crms = results[1]
    assert not crms.modified
    assert any("fused" in r.reason for r in crms.refusals), crms.refusals
    _assert_same(model, ir.serde.serialize_model(ir_model))


def test_fused_post_ln_bert_stays_with_the_reason(corpus):
    """BERT fused by onnxruntime (EmbedLayerNormalization, Attention, SkipLayerNormalization):
    Post-LN, the stream is each norm's output, which the next block's Attention or MLP reads."""
    from normopt.rewriter import io
    from normopt.rewriter.norms import find_norms
    from normopt.rewriter.stream import analyze

    model = io.load(corpus("bertfused-ts17").model)
    assert analyze(model.graph, find_norms(model.graph)).architecture == "post-ln"
    annotate(model)
    result = PreLNToRMSNorm().run(model)
    assert not result.modified and len(result.refusals) == 4
    for refusal in result.refusals:
        assert refusal.reason.startswith(("Attention ", "MatMul ")), refusal
        assert "would see the recentred values" in refusal.reason
