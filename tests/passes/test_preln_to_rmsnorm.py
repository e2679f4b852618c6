"""preln-to-rmsnorm: real Pre-LN exports convert exactly; every precondition refuses by name."""

import collections
import json
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from models.corpus import CORPUS
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from normopt.rewriter import io
from tests.helpers import annotate
from normopt.rewriter.norms import find_norms
from normopt.passes.base import Options
from normopt.rewrite import rewrite
from normopt.verify import VerifyOptions, compare_output
from tests.helpers import assert_matches_reference, const, make_model, ort_run, tensor

PRE_LN = sorted(n for n, e in CORPUS.items() if e.family in ("gpt2", "opt", "gptneox", "vit", "preln"))
UNTOUCHED = {"bert": "Post-LN", "llama": "already Pre-RMSNorm", "resnet18": "architecture is none",
             "repbn": "architecture is none", "convnext": "architecture is none"}


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", PRE_LN)
def test_every_stream_layernorm_becomes_rmsnorm(corpus, tmp_path, name, target):
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    passes = ["preln-to-rmsnorm"] + (["canonicalize-norms"] if target == "ort" else [])
    report = rewrite(paths.model, out, passes=passes, options=Options(target=target),
                     verification=VerifyOptions(inputs=paths.load_inputs()))
    assert report.passes[0].modified and "converted 5 LayerNorm(s)" in report.passes[0].changes[0]
    model = io.load(out)
    kinds = collections.Counter(m.kind for m in find_norms(model.graph))
    assert kinds == {"rmsnorm": 5}
    ops = collections.Counter(n.op_type for n in model.graph)
    if target == "ort":
        assert ops["SimplifiedLayerNormalization"] == 5
    assert_matches_reference(out, paths)
    again = PreLNToRMSNorm().run(model)
    assert not again.modified and "already Pre-RMSNorm" in again.refusals[0].reason


@pytest.mark.parametrize("family,reason", sorted(UNTOUCHED.items()))
def test_other_architectures_are_left_alone(corpus, family, reason):
    model = io.load(corpus(f"{family}-ts17").model)
    annotate(model)
    result = PreLNToRMSNorm().run(model)
    assert not result.modified and reason in result.refusals[0].reason


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "normopt", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_hidden_state_outputs_refused_unless_allowed(corpus, tmp_path):
    src, out, report = corpus("gpt2hidden-ts17").model, tmp_path / "o.onnx", tmp_path / "r.json"
    proc = _cli("rewrite", src, out, "--passes", "preln-to-rmsnorm", "--explain")
    assert proc.returncode == 3 and not out.exists()
    assert "stream value 'hidden_" in proc.stderr and "--allow-hidden-state-change" in proc.stderr
    proc = _cli("rewrite", src, out, "--passes", "preln-to-rmsnorm", "--allow-hidden-state-change", "--report", report)
    assert proc.returncode == 0, proc.stderr
    checks = {o["name"]: o for o in json.loads(report.read_text())["verification"]["outputs"]}
    assert checks["logits"]["skipped"] is None and checks["logits"]["max_rel"] < 1e-5
    assert checks["hidden_0"]["skipped"] and checks["hidden_1"]["skipped"]  # the stream: changed on request
    assert checks["hidden_2"]["skipped"] is None  # after ln_f: unchanged


def test_fp16_model(tmp_path):
    """A float16 Pre-LN model (hand-built: onnxruntime's CPU kernels for these ops exist in fp16)."""
    model = _blocks(dtype=np.float16)
    feeds = {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)}
    rewritten = _convert(model)
    got, ref = ort_run(rewritten, feeds)["y"], ort_run(model, feeds)["y"]
    check = compare_output("y", ref, got, None, None)  # fp16: 1e-2 x scale
    assert check.ok and check.max_rel > 0, check


# ------------------------------------------------------------------------- hand-built


def _blocks(dtype=np.float32, reader=None, branch_tail=None, shared_table=False, ln_op=True, opset=17,
            stream_output=False, layerscale=False):
    """ids -> Gather(table) + pos -> [x + W2(LN(x))] x2 -> LN -> MatMul(head).
    reader: (make node reading a value, its output dtype, its output shape): an extra op reading
    the stream, whose output becomes a graph output;
    branch_tail: an op applied to the branch before the residual Add."""
    d, vocab = 8, 16
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [const("table", rng.standard_normal((vocab, d)).astype(dtype)), const("pos", rng.standard_normal((1, 4, d)).astype(dtype)),
             const("g", (1 + 0.2 * rng.standard_normal(d)).astype(dtype)), const("b", (0.1 * rng.standard_normal(d)).astype(dtype)),
             const("head", (rng.standard_normal((d, vocab)) if not shared_table else np.zeros((1,))).astype(dtype))]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["tok"]), helper.make_node("Add", ["tok", "pos"], ["x0"])]
    x = "x0"
    for i in range(2):
        inits += [const(f"w{i}", rng.standard_normal((d, d)).astype(dtype)), const(f"c{i}", rng.standard_normal(d).astype(dtype))]
        nodes += [_ln(x, f"n{i}", ln_op), helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Add", [f"m{i}", f"c{i}"], [f"f{i}"])]
        branch = f"f{i}"
        if layerscale:
            inits.append(const(f"ls{i}", (0.1 + rng.random(d)).astype(dtype)))
            nodes.append(helper.make_node("Mul", [branch, f"ls{i}"], [f"scaled{i}"]))
            branch = f"scaled{i}"
        if branch_tail:
            nodes.append(helper.make_node(branch_tail, [branch], [f"t{i}"]))
            branch = f"t{i}"
        nodes.append(helper.make_node("Add", [x, branch], [f"x{i + 1}"]))
        x = f"x{i + 1}"
    nodes.append(_ln(x, "final", ln_op))
    if shared_table:  # tied LM head: logits = final @ table^T
        nodes += [helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["final", "table_t"], ["y"])]
        inits = [i for i in inits if i.name != "head"]
    else:
        nodes.append(helper.make_node("MatMul", ["final", "head"], ["y"]))
    outputs = [tensor("y", t, (2, 4, vocab))]
    if reader:
        make, out_type, out_shape = reader
        made = make("x1")
        nodes.extend(made if isinstance(made, list) else [made])
        outputs.append(tensor("extra", t if out_type is None else out_type, out_shape))
    if stream_output:
        outputs.append(tensor("x1", t, (2, 4, d)))
    return make_model(nodes, [tensor("ids", TensorProto.INT64, (2, 4))], outputs, inits, opset=opset)


def _ln(x, out, op):
    if op:
        return helper.make_node("LayerNormalization", [x, "g", "b"], [out], axis=-1, epsilon=1e-5)
    raise NotImplementedError


rng = np.random.default_rng(0)


def _convert(model, expect=True, **options):
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = PreLNToRMSNorm(Options(**options)).run(ir_model)
    assert result.modified == expect, result.refusals
    rewritten = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(rewritten, full_check=True)
    if expect:
        feeds = {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)}
        before, after = ort_run(model, feeds), ort_run(rewritten, feeds)
        tol = 2e-2 if before["y"].dtype == np.float16 else 1e-5
        np.testing.assert_allclose(after["y"].astype(np.float64), before["y"].astype(np.float64),
                                   rtol=tol, atol=tol * np.abs(before["y"]).max())
        return rewritten
    return result.refusals[0].reason


def test_hand_built_converts_and_centres_table_and_constants():
    rewritten = _convert(_blocks())
    ops = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert ops["LayerNormalization"] == 0 and ops["Sqrt"] == 3  # three decomposed RMSNorms (opset 17)


def test_opset_23_uses_rmsnormalization():
    rewritten = _convert(_blocks(opset=23))
    assert collections.Counter(n.op_type for n in rewritten.graph.node)["RMSNormalization"] == 3


def test_shared_table_gets_one_explicit_recentring_not_a_copy():
    model = _blocks(shared_table=True)
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = PreLNToRMSNorm().run(ir_model)
    assert result.modified and any("inserted x - ReduceMean(x) after 'x0'" in c and "shared" in c for c in result.changes)
    assert len(ir_model.graph.initializers["table"].uses()) == 2  # still one table, still shared
    _convert(model)


@pytest.mark.parametrize("op", ["Relu", "Sigmoid"])
def test_non_shift_invariant_reader_refused_by_name(op):
    reader = (lambda x: helper.make_node(op, [x], ["extra"], name="culprit"), None, (2, 4, 8))
    reason = _convert(_blocks(reader=reader), expect=False)
    assert f"{op} culprit reads stream value 'x1'" in reason


def test_shape_and_token_readers_are_allowed():
    def pool_then_norm(x):  # mean over tokens keeps each vector zero-mean; the LN then converts
        return [helper.make_node("ReduceMean", [x], ["pooled"], axes=[1], keepdims=0),
                helper.make_node("LayerNormalization", ["pooled", "g", "b"], ["extra"], axis=-1, epsilon=1e-5)]

    def pool(x):
        return helper.make_node("ReduceMean", [x], ["extra"], axes=[1], keepdims=0)

    _convert(_blocks(reader=(pool_then_norm, None, (2, 8))))
    # the pooled vector itself is a stream value: as a graph output it would change
    assert "stream value 'extra' is a graph output" in _convert(_blocks(reader=(pool, None, (2, 8))), expect=False)
    _convert(_blocks(reader=(lambda x: helper.make_node("Shape", [x], ["extra"]), TensorProto.INT64, (3,))))

    def cast_like(x):  # reads only the stream's dtype (dynamo exports do this)
        one = helper.make_tensor("one", TensorProto.DOUBLE, [], [1.0])
        return [helper.make_node("Constant", [], ["one_d"], value=one), helper.make_node("CastLike", ["one_d", x], ["extra"])]

    _convert(_blocks(reader=(cast_like, None, ())))


def test_reduce_over_hidden_axis_is_refused():
    def hidden_mean(x):
        return helper.make_node("ReduceMean", [x], ["extra"], axes=[-1], keepdims=1, name="hidden_mean")

    reason = _convert(_blocks(reader=(hidden_mean, None, (2, 4, 1))), expect=False)
    assert "ReduceMean hidden_mean reads stream value" in reason


def test_stream_output_refused_unless_allowed():
    assert "stream value 'x1' is a graph output" in _convert(_blocks(stream_output=True), expect=False)
    ir_model = ir.serde.deserialize_model(_blocks(stream_output=True))
    annotate(ir_model)
    result = PreLNToRMSNorm(Options(allow_hidden_state_change=True)).run(ir_model)
    assert result.modified and result.changed_outputs == ["x1"]


def test_non_linear_branch_writer_refused_by_name():
    reason = _convert(_blocks(branch_tail="Tanh"), expect=False)
    assert "branch written into the stream" in reason and "Tanh" in reason


def test_layernorm_statistics_outputs_read():
    model = _blocks()
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    ln.output.extend(["ln_mean"])
    model.graph.output.append(helper.make_tensor_value_info("ln_mean", TensorProto.FLOAT, None))
    assert "Mean/InvStdDev outputs are read" in _convert(model, expect=False)


def test_beta_folds_into_the_linear_readers_only():
    """Each LN's beta moves into the bias of the MatMul reading it (one Add less per norm)."""
    ir_model = ir.serde.deserialize_model(_blocks())
    annotate(ir_model)
    result = PreLNToRMSNorm().run(ir_model)
    assert "folded 3 LayerNorm beta(s) into the biases of the linear ops reading them" in result.changes
    _convert(_blocks())
    # the final norm's output is also a graph output: its beta must stay an Add
    model = _blocks()
    model.graph.output.append(tensor("final", TensorProto.FLOAT, (2, 4, 8)))
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    assert "folded 2 LayerNorm beta(s) into the biases of the linear ops reading them" in PreLNToRMSNorm().run(ir_model).changes
    _convert(model)


@pytest.mark.parametrize("name", ["preln-ts17", "gpt2-ts17"])
def test_fp16_copy_of_a_real_export(corpus, tmp_path, name):
    """onnxruntime's float16 converter makes the copy; fp16 tolerance (1e-2 x scale) applies."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    paths = corpus(name)
    src = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(paths.model)), keep_io_types=False), str(src))
    feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in paths.load_inputs().items()}
    report = rewrite(src, tmp_path / "out.onnx", verification=VerifyOptions(inputs=feeds))
    assert "converted 5 LayerNorm(s)" in report.passes[0].changes[0]
    [check] = report.verification.outputs
    assert check.dtype == "float16" and check.ok and check.rtol == 1e-2 and check.max_rel < 5e-3


def test_layerscale_is_folded_into_its_writer_first():
    model = _blocks(layerscale=True)
    rewritten = _convert(model)  # equivalent in ORT
    assert not [n for n in rewritten.graph.node if {"ls0", "ls1"} & set(n.input)]  # the Muls are gone
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    assert "folded 2 LayerScale Mul(s) into their writers" in PreLNToRMSNorm().run(ir_model).changes
