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
from normopt.passes.base import Options
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from normopt.rewriter import io, stream_plan
from normopt.rewriter.graph import folded_value
from normopt.rewriter.norms import find_norms
from normopt.verification import VerifyOptions, compare_output
from tests.helpers import (
    annotate,
    assert_matches_reference,
    const,
    make_model,
    ort_run,
    rewrite_file,
    tensor,
)


def recentred(result) -> dict[str, str]:
    """The stream values a run recentred, with the reason for each."""
    return {v: c.why for c in result.changes if c.kind == "recentred" for v in c.values}


# Families with Pre-LN blocks: (LayerNorms, converted, explicit recentrings) per export
PRE_LN = {
    "gpt2": (5, 5, 0),
    "opt": (5, 5, 0),
    "gptneox": (5, 5, 0),
    "vit": (5, 5, 0),
    "preln": (5, 5, 0),
    "scaledpool": (
        5,
        5,
        0,
    ),  # tokens x sqrt(d) folded into the table; the mean-pooled final norm too
    "clip": (6, 6, 1),
    "bloom": (6, 6, 1),  # a LayerNorm on the embeddings writes the stream: one recentring
    "whisper": (
        12,
        12,
        2,
    ),  # encoder (after its conv + GELU front end) and decoder: one recentring each
    # branch-output norms read linear outputs and convert; the stream's 5 norms would need 4
    # explicit recentrings (after each branch-output norm): more than they save (1.02x slower)
    "periln": (9, 4, 0),
    "mixln": (7, 5, 1),  # the Post-LN block's 2 stay; one recentring at the Post-LN/Pre-LN boundary
    "wav2vec2": (
        8,
        7,
        1,
    ),  # the feature projection's norm stays (no gain); the stream is recentred after
    # the conv positional embedding, which reads the stream's start
    # stage 1 (4) and its patch-merging norm stay: the merge joins recentred token slices on the
    # hidden axis, which would shift each piece by its own mean (see
    # test_patch_merging_is_not_recentred)
    "swin": (11, 6, 0),
    # fused by onnxruntime: the LayerNormalization and 4 SkipLayerNormalization convert (to
    # SkipSimplifiedLayerNormalization, the residual biases centred with the stream)
    "gpt2fused": (5, 5, 0),
    "vitfused": (5, 5, 0),
}
PRE_LN_EXPORTS = sorted(n for n, e in CORPUS.items() if e.family in PRE_LN)


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", PRE_LN_EXPORTS)
def test_every_stream_layernorm_becomes_rmsnorm(corpus, tmp_path, name, target):
    paths = corpus(name)
    total, count, recentrings = PRE_LN[CORPUS[name].family]
    entry = CORPUS[name]
    if (
        entry.family == "gptneox" and target == "onnx" and entry.opset >= 17
    ):  # LayerNormalization ops
        count = 1  # the parallel blocks' pairs stay (test_layernorm_ops_sharing_an_input_stay_...)
    out = tmp_path / "out.onnx"
    passes = ["preln-to-rmsnorm"] + (["canonicalize-norms"] if target == "ort" else [])
    report = rewrite_file(
        paths.model,
        out,
        passes=passes,
        options=Options(target=target),
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    result = report.passes[0]
    assert result.modified and f"converted {count} LayerNorm(s)" in result.lines[0], result.refusals
    assert result.stats == {
        "layernorms": total,
        "converted": count,
        "recentrings": recentrings,
        "centred_constants": result.stats["centred_constants"],
    }
    assert len(result.refusals) == total - count  # each norm that stays says why
    model = io.load(out)
    kinds = collections.Counter(m.kind for m in find_norms(model.graph))
    assert kinds == {"rmsnorm": count, **({"layernorm": total - count} if total > count else {})}
    ops = collections.Counter(n.op_type for n in model.graph)
    fused = ops["SkipSimplifiedLayerNormalization"]
    assert fused == (4 if entry.family.endswith("fused") else 0)
    if target == "ort":
        assert ops["SimplifiedLayerNormalization"] + fused == count
    assert_matches_reference(out, paths)
    annotate(model)
    again = PreLNToRMSNorm().run(model)
    assert not again.modified  # idempotent
    if total == count:
        assert "its norms are RMSNorms already" in again.refusals[0].reason


@pytest.mark.parametrize(
    "family,reason",
    [
        ("llama", "no LayerNorm: its norms are RMSNorms already"),
        ("resnet18", "no LayerNorm"),
        ("repbn", "no LayerNorm"),
        # ConvNeXt's LayerNorm reads a depthwise Conv's output: one recentring per norm, no gain
        (
            "convnext",
            "would need 1 explicit recentring(s), which cost more than converting them saves",
        ),
    ],
)
def test_models_where_nothing_converts_say_why(corpus, family, reason):
    model = io.load(corpus(f"{family}-ts17").model)
    annotate(model)
    result = PreLNToRMSNorm().run(model)
    assert (
        not result.modified and result.refusals and all(reason in r.reason for r in result.refusals)
    )


@pytest.mark.parametrize("name", ["convnext2d-ts17", "convnext2d-dyn18"])
def test_a_layernorm_op_between_layout_transposes_stays_unless_the_target_fuses_its_rmsnorm(
    corpus, tmp_path, name
):
    """timm's LayerNorm2d (stem, downsampling, head): permute, LayerNormalization, permute back.
    Below opset 23 --target onnx would emit the decomposed RMSNorm there, which onnxruntime does
    not fuse (it moves the Transposes through it): measured 1.03x slower on timm's ConvNeXt, so
    it stays. The stem's norm reads the patch Conv (centrable): --target ort converts it."""
    model = io.load(corpus(name).model)
    annotate(model)
    result = PreLNToRMSNorm(Options(target="onnx")).run(model)
    reasons = [r.reason for r in result.refusals]
    assert not result.modified and len(reasons) == 9
    assert (
        sum(
            "stays a LayerNormalization: on NCHW permuted to NHWC and back" in r and "opset" in r
            for r in reasons
        )
        == 5
    )
    report = rewrite_file(
        corpus(name).model,
        tmp_path / "out.onnx",
        passes=["preln-to-rmsnorm"],
        options=Options(target="ort"),
        checks=VerifyOptions(inputs=corpus(name).load_inputs()),
    )
    assert report.passes[0].stats["converted"] == 1


@pytest.mark.parametrize("name", ["gptneox-ts17", "gptneox-dyn18"])
def test_layernorm_ops_sharing_an_input_stay_unless_the_target_fuses_their_rmsnorms(
    corpus, tmp_path, name
):
    """GPT-NeoX's parallel block: two LayerNormalization ops read the block input. Below opset 23
    --target onnx would emit two decomposed RMSNorms of one input, which onnxruntime does not
    fuse (measured 1.02x slower): both stay; the final norm converts. --target ort converts all."""
    model = io.load(corpus(name).model)
    annotate(model)
    result = PreLNToRMSNorm(Options(target="onnx")).run(model)
    reasons = [r.reason for r in result.refusals]
    assert result.stats["converted"] == 1 and len(reasons) == 4
    assert all(
        r.startswith("stays a LayerNormalization: another norm reads its input") for r in reasons
    )
    report = rewrite_file(
        corpus(name).model,
        tmp_path / "out.onnx",
        passes=["preln-to-rmsnorm"],
        options=Options(target="ort"),
        checks=VerifyOptions(inputs=corpus(name).load_inputs()),
    )
    assert report.passes[0].stats["converted"] == 5


def test_post_ln_blocks_stay_and_the_embedding_norm_converts(corpus, tmp_path):
    """BERT: each block's LayerNorm writes the stream the next block's Q/K/V read, so those
    stay (each refusal names the reader); the embedding LayerNorm reads centrable tables."""
    paths = corpus("bert-ts17")
    report = rewrite_file(
        paths.model,
        tmp_path / "out.onnx",
        passes=["preln-to-rmsnorm"],
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    result = report.passes[0]
    assert result.stats["converted"] == 1 and len(result.refusals) == 4
    for refusal in result.refusals:  # one recentring each, no gain; the blocker is named
        assert (
            "would need 1 explicit recentring(s), which cost more than converting them saves"
            in refusal.reason
        )
        assert (
            "which must keep its numbers: MatMul" in refusal.reason
            and "would see the recentred values" in refusal.reason
        )
    assert_matches_reference(tmp_path / "out.onnx", paths)


def _cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "normopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_hidden_state_outputs_stay_unless_allowed(corpus, tmp_path):
    """GPT-2 returning every hidden state: without the flag the norms reading an output stay
    (the outputs keep their numbers); the last block's two would need one explicit recentring,
    which costs more than converting two saves: nothing converts (exit 3, reasons named). With
    it every norm converts and the stream outputs are reported as changed."""
    src, out, report = corpus("gpt2hidden-ts17").model, tmp_path / "o.onnx", tmp_path / "r.json"
    proc = _cli(
        "rewrite", src, out, "--passes", "preln-to-rmsnorm", "--explain", "--report", report
    )
    assert proc.returncode == 3 and not out.exists(), proc.stderr
    reasons = [r["reason"] for r in json.loads(report.read_text())["passes"][0]["refusals"]]
    assert any(
        "'hidden_1' is a graph output" in r and "--allow-hidden-state-change" in r for r in reasons
    )
    assert sum("which cost more than converting them saves" in r for r in reasons) == 2
    proc = _cli(
        "rewrite",
        src,
        out,
        "--passes",
        "preln-to-rmsnorm",
        "--allow-hidden-state-change",
        "--report",
        report,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(report.read_text())["passes"][0]["stats"]["converted"] == 5
    checks = {o["name"]: o for o in json.loads(report.read_text())["verification"]["outputs"]}
    assert checks["logits"]["skipped"] is None and checks["logits"]["max_rel"] < 1e-5
    assert (
        checks["hidden_0"]["skipped"] and checks["hidden_1"]["skipped"]
    )  # the stream: changed on request
    assert checks["hidden_2"]["skipped"] is None  # after ln_f: unchanged


def test_fp16_model(tmp_path):
    """A float16 Pre-LN model (hand-built: onnxruntime's CPU kernels for these ops exist in
    fp16)."""
    model = _blocks(dtype=np.float16)
    feeds = {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)}
    rewritten = _convert(model)
    got, ref = ort_run(rewritten, feeds)["y"], ort_run(model, feeds)["y"]
    check = compare_output("y", ref, got, None, None)  # fp16: 1e-2 x scale
    assert check.ok and check.max_rel > 0, check


# ------------------------------------------------------------------------- hand-built


@pytest.fixture
def cheap_recentring(monkeypatch):
    """Recentring mechanics on graphs too small for an explicit recentring to pay (2 or 3 norms
    per recentring); what a recentring costs is tested on its own (Peri-LN, hidden states)."""
    monkeypatch.setattr(stream_plan, "RECENTRING_COST", 1)


def _blocks(
    dtype=np.float32,
    reader=None,
    branch_tail=None,
    shared_table=False,
    ln_op=True,
    opset=17,
    stream_output=False,
    layerscale=False,
):
    """ids -> Gather(table) + pos -> [x + W2(LN(x))] x2 -> LN -> MatMul(head).
    reader: (make node reading a value, its output dtype, its output shape): an extra op reading
    the stream, whose output becomes a graph output;
    branch_tail: an op applied to the branch before the residual Add."""
    d, vocab = 8, 16
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [
        const("table", rng.standard_normal((vocab, d)).astype(dtype)),
        const("pos", rng.standard_normal((1, 4, d)).astype(dtype)),
        const("g", (1 + 0.2 * rng.standard_normal(d)).astype(dtype)),
        const("b", (0.1 * rng.standard_normal(d)).astype(dtype)),
        const(
            "head",
            (rng.standard_normal((d, vocab)) if not shared_table else np.zeros((1,))).astype(dtype),
        ),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["tok"]),
        helper.make_node("Add", ["tok", "pos"], ["x0"]),
    ]
    x = "x0"
    for i in range(2):
        inits += [
            const(f"w{i}", rng.standard_normal((d, d)).astype(dtype)),
            const(f"c{i}", rng.standard_normal(d).astype(dtype)),
        ]
        nodes += [
            _ln(x, f"n{i}", ln_op),
            helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"c{i}"], [f"f{i}"]),
        ]
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
        nodes += [
            helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
            helper.make_node("MatMul", ["final", "table_t"], ["y"]),
        ]
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
    return make_model(
        nodes, [tensor("ids", TensorProto.INT64, (2, 4))], outputs, inits, opset=opset
    )


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
        np.testing.assert_allclose(
            after["y"].astype(np.float64),
            before["y"].astype(np.float64),
            rtol=tol,
            atol=tol * np.abs(before["y"]).max(),
        )
        return rewritten
    return result.refusals[0].reason


def test_hand_built_converts_and_centres_table_and_constants():
    rewritten = _convert(_blocks())
    ops = collections.Counter(n.op_type for n in rewritten.graph.node)
    assert (
        ops["LayerNormalization"] == 0 and ops["Sqrt"] == 3
    )  # three decomposed RMSNorms (opset 17)


def test_opset_23_uses_rmsnormalization():
    rewritten = _convert(_blocks(opset=23))
    assert collections.Counter(n.op_type for n in rewritten.graph.node)["RMSNormalization"] == 3


def test_shared_table_gets_one_explicit_recentring_not_a_copy():
    model = _blocks(shared_table=True)
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = PreLNToRMSNorm().run(ir_model)
    assert result.modified and "shared" in recentred(result)["tok"]
    assert len(ir_model.graph.initializers["table"].uses()) == 2  # still one table, still shared
    _convert(model)


@pytest.mark.parametrize("op", ["Relu", "Sigmoid"])
def test_non_shift_invariant_reader_refused_by_name(op):
    reader = (lambda x: helper.make_node(op, [x], ["extra"], name="culprit"), None, (2, 4, 8))
    reason = _convert(_blocks(reader=reader), expect=False)
    assert f"{op} culprit reads 'x1' and would see the recentred values" in reason


def test_shape_and_token_readers_are_allowed():
    def pool_then_norm(x):  # mean over tokens keeps each vector zero-mean; the LN then converts
        return [
            helper.make_node("ReduceMean", [x], ["pooled"], axes=[1], keepdims=0),
            helper.make_node(
                "LayerNormalization", ["pooled", "g", "b"], ["extra"], axis=-1, epsilon=1e-5
            ),
        ]

    def pool(x):
        return helper.make_node("ReduceMean", [x], ["extra"], axes=[1], keepdims=0)

    _convert(_blocks(reader=(pool_then_norm, None, (2, 8))))
    # the pooled vector itself is a stream value: as a graph output it would change
    assert "'extra' is a graph output" in _convert(
        _blocks(reader=(pool, None, (2, 8))), expect=False
    )
    _convert(
        _blocks(
            reader=(lambda x: helper.make_node("Shape", [x], ["extra"]), TensorProto.INT64, (3,))
        )
    )

    def cast_like(x):  # reads only the stream's dtype (dynamo exports do this)
        one = helper.make_tensor("one", TensorProto.DOUBLE, [], [1.0])
        return [
            helper.make_node("Constant", [], ["one_d"], value=one),
            helper.make_node("CastLike", ["one_d", x], ["extra"]),
        ]

    _convert(_blocks(reader=(cast_like, None, ())))


def test_reduce_over_hidden_axis_is_refused():
    def hidden_mean(x):
        return helper.make_node(
            "ReduceMean", [x], ["extra"], axes=[-1], keepdims=1, name="hidden_mean"
        )

    reason = _convert(_blocks(reader=(hidden_mean, None, (2, 4, 1))), expect=False)
    assert "ReduceMean hidden_mean reads 'x1'" in reason


def test_stream_output_refused_unless_allowed():
    assert "'x1' is a graph output" in _convert(_blocks(stream_output=True), expect=False)
    ir_model = ir.serde.deserialize_model(_blocks(stream_output=True))
    annotate(ir_model)
    result = PreLNToRMSNorm(Options(allow_hidden_state_change=True)).run(ir_model)
    assert result.modified and result.changed_outputs == ["x1"]


@pytest.mark.usefixtures("cheap_recentring")
def test_non_linear_branch_writer_gets_an_explicit_recentring():
    """Each block's branch ends in Tanh: the branches are recentred explicitly (2), which buys
    3 LayerNorms; each recentring names the writer it could not centre."""
    rewritten = _convert(_blocks(branch_tail="Tanh"))
    ir_model = ir.serde.deserialize_model(_blocks(branch_tail="Tanh"))
    annotate(ir_model)
    result = PreLNToRMSNorm().run(ir_model)
    assert "converted 3 LayerNorm(s) reading the stream to RMSNorm" in result.lines[0]
    assert sum("Tanh" in why for why in recentred(result).values()) == 2
    assert (
        collections.Counter(n.op_type for n in rewritten.graph.node)["ReduceMean"] == 2 + 3
    )  # 2 means, 3 RMS


@pytest.mark.usefixtures("cheap_recentring")
def test_layernorm_statistics_outputs_read():
    """The LN whose Mean output is read stays (named); the stream it reads keeps its numbers,
    the rest of the stream is recentred once after it, and the two later norms convert."""
    model = _blocks()
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    ln.output.extend(["ln_mean"])
    model.graph.output.append(helper.make_tensor_value_info("ln_mean", TensorProto.FLOAT, None))
    result, rewritten = _run(model)
    assert result.stats["converted"] == 2 and any(
        "Mean/InvStdDev outputs are read" in r.reason for r in result.refusals
    )
    _assert_same(model, rewritten, {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)})


def test_beta_folds_into_the_linear_readers_only():
    """Each block LN's beta moves into the bias of the MatMul reading it (one Add less per
    norm). The final LN's reader, the head, has no bias: folding would add an Add as wide as
    the vocabulary (GPT-2 124M: 1.01x slower), so that beta stays an Add after the norm."""
    ir_model = ir.serde.deserialize_model(_blocks())
    annotate(ir_model)
    result = PreLNToRMSNorm().run(ir_model)
    assert (
        "folded 2 LayerNorm beta(s) into the biases of the linear ops reading them" in result.lines
    )
    rewritten = _convert(_blocks())
    head = next(n for n in rewritten.graph.node if n.op_type == "MatMul" and "head" in n.input)
    assert not [
        n for n in rewritten.graph.node if head.output[0] in n.input
    ]  # no Add after the head
    # the final norm's output is also a graph output: its beta stays an Add either way
    model = _blocks()
    model.graph.output.append(tensor("final", TensorProto.FLOAT, (2, 4, 8)))
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    assert (
        "folded 2 LayerNorm beta(s) into the biases of the linear ops reading them"
        in PreLNToRMSNorm().run(ir_model).lines
    )
    _convert(model)


@pytest.mark.parametrize("name", ["preln-ts17", "gpt2-ts17"])
def test_fp16_copy_of_a_real_export(corpus, tmp_path, name):
    """onnxruntime's float16 converter makes the copy; fp16 tolerance (1e-2 x scale) applies."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    paths = corpus(name)
    src = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(paths.model)), keep_io_types=False), str(src))
    feeds = {
        k: v.astype(np.float16) if v.dtype == np.float32 else v
        for k, v in paths.load_inputs().items()
    }
    report = rewrite_file(src, tmp_path / "out.onnx", checks=VerifyOptions(inputs=feeds))
    preln = next(p for p in report.passes if p.name == "preln-to-rmsnorm")
    assert "converted 5 LayerNorm(s)" in preln.lines[0]
    [check] = report.verification.outputs
    assert check.dtype == "float16" and check.ok and check.rtol == 1e-2 and check.max_rel < 5e-3


def test_layerscale_is_folded_into_its_writer_first():
    model = _blocks(layerscale=True)
    rewritten = _convert(model)  # equivalent in ORT
    assert not [
        n for n in rewritten.graph.node if {"ls0", "ls1"} & set(n.input)
    ]  # the Muls are gone
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    assert "folded 2 LayerScale Mul(s) into their writers" in PreLNToRMSNorm().run(ir_model).lines


# ------------------------------------------ regressions: the smallest graphs found from outside


def _run(model, **options):
    """preln-to-rmsnorm on a hand-built graph; (result, rewritten proto)."""
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = PreLNToRMSNorm(Options(**options)).run(ir_model)
    rewritten = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(rewritten, full_check=True)
    return result, rewritten


def _assert_same(model, rewritten, feeds):
    before, after = ort_run(model, feeds), ort_run(rewritten, feeds)
    for name, ref in before.items():
        np.testing.assert_allclose(after[name], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def _ln_decomposed(x, out, axes, gamma, beta):
    """x - mean, over `axes`, then / sqrt(var + eps) * gamma + beta (TorchScript's form)."""
    return [
        helper.make_node(
            "ReduceMean", [x], [f"{out}_mu"], axes=axes, keepdims=1, name=f"{out}_mean"
        ),
        helper.make_node("Sub", [x, f"{out}_mu"], [f"{out}_d"], name=f"{out}_sub"),
        helper.make_node("Mul", [f"{out}_d", f"{out}_d"], [f"{out}_sq"]),
        helper.make_node("ReduceMean", [f"{out}_sq"], [f"{out}_var"], axes=axes, keepdims=1),
        helper.make_node("Add", [f"{out}_var", "eps"], [f"{out}_ve"]),
        helper.make_node("Sqrt", [f"{out}_ve"], [f"{out}_std"]),
        helper.make_node("Div", [f"{out}_d", f"{out}_std"], [f"{out}_n"]),
        helper.make_node("Mul", [f"{out}_n", gamma], [f"{out}_s"]),
        helper.make_node("Add", [f"{out}_s", beta], [out]),
    ]


def _one_block(first_norm, d=7, tokens=5, extra_inits=()):
    """x [2, T, 1] -> MatMul -> x0; x0 + W(first_norm(x0)) -> LN -> MatMul."""
    inits = [
        const("w_in", rng.standard_normal((1, d)).astype(np.float32)),
        const("w_b", rng.standard_normal((d, d)).astype(np.float32)),
        const("w_head", rng.standard_normal((d, 3)).astype(np.float32)),
        const("g", (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("b", (0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("eps", np.float32(1e-3)),
        *extra_inits,
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["x0"]),
        *first_norm("x0", "h"),
        helper.make_node("MatMul", ["h", "w_b"], ["br"]),
        helper.make_node("Add", ["x0", "br"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["f"], axis=-1),
        helper.make_node("MatMul", ["f", "w_head"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor("x", shape=(2, tokens, 1))], [tensor("y", shape=(2, tokens, 3))], inits
    )
    return model, {"x": rng.standard_normal((2, tokens, 1)).astype(np.float32)}


@pytest.mark.parametrize("form", ["op", "decomposed"])
def test_layernorm_over_the_last_two_axes_of_the_stream_is_refused(form):
    """Found from outside (fuzz_tf_02048): LN over [-2, -1] was converted as if over [-1].
    Centring shifts each token by its own mean, which a norm over tokens and hidden sees."""
    extra = []
    if form == "op":  # scale and bias of the normalized shape (older onnxruntime broadcasts none)
        extra = [
            const("g2", np.ones((5, 7), np.float32)),
            const("b2", np.zeros((5, 7), np.float32)),
        ]

        def first(x, out):
            return [
                helper.make_node(
                    "LayerNormalization", [x, "g2", "b2"], [out], axis=-2, name="two_axes"
                )
            ]
    else:

        def first(x, out):
            return _ln_decomposed(x, out, [-2, -1], "g", "b")

    model, feeds = _one_block(first, extra_inits=extra)
    result, rewritten = _run(model)
    reasons = [r.reason for r in result.refusals]
    assert not result.modified and any(
        "normalizes the last 2 axes, not the hidden axis alone" in r for r in reasons
    )
    _assert_same(model, rewritten, feeds)


def test_two_axis_layernorm_with_a_token_by_hidden_beta_is_refused_not_a_crash():
    """Found from outside (fuzz_tf_00584): gamma/beta of shape [T, D] crashed the beta fold."""
    d, tokens = 7, 5
    extra = [
        const("g2", (1 + 0.3 * rng.standard_normal((tokens, d))).astype(np.float32)),
        const("b2", (0.3 * rng.standard_normal((tokens, d))).astype(np.float32)),
    ]
    model, feeds = _one_block(
        lambda x, out: _ln_decomposed(x, out, [-2, -1], "g2", "b2"), d, tokens, extra
    )
    result, rewritten = _run(model)
    assert not result.modified and any(
        "normalizes the last 2 axes" in r.reason for r in result.refusals
    )
    _assert_same(model, rewritten, feeds)


def _tied_start(embscale: bool, decomposed: bool):
    """ids -> Gather(table) [* sqrt(d)] + pos -> one Pre-LN block -> LN -> x @ table^T."""
    d, vocab = 8, 12
    inits = [
        const("table", rng.standard_normal((vocab, d)).astype(np.float32)),
        const("scale", np.float32(np.sqrt(d))),
        const("pos", rng.standard_normal((4, d)).astype(np.float32)),
        const("g", (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("b", (0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("eps", np.float32(1e-5)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
    ]
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"])]
    if embscale:
        nodes.append(helper.make_node("Mul", ["e", "scale"], ["es"]))
    nodes.append(helper.make_node("Add", ["es" if embscale else "e", "pos"], ["x0"]))
    nodes += (
        _ln_decomposed("x0", "h", [-1], "g", "b")
        if decomposed
        else [helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1)]
    )
    nodes += [
        helper.make_node("MatMul", ["h", "w"], ["br"]),
        helper.make_node("Add", ["x0", "br"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["f"], axis=-1),
        helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "tt"], ["y"]),
    ]
    model = make_model(
        nodes, [tensor("ids", TensorProto.INT64, (2, 4))], [tensor("y", shape=(2, 4, vocab))], inits
    )
    return model, {"ids": rng.integers(0, vocab, (2, 4)).astype(np.int64)}


@pytest.mark.usefixtures("cheap_recentring")
def test_refused_initial_writer_leaves_nothing_of_its_plan_behind():
    """Found from outside: in `Gather(tied table) * sqrt(d) + pos` the scalar Mul was taken for
    a LayerScale and removed, while the refused tied table was rolled back (relative error
    0.5). Each writer is planned on its own now: refused, it gets an explicit recentring."""
    model, feeds = _tied_start(embscale=True, decomposed=False)
    result, rewritten = _run(model)
    assert result.modified and "LayerScale" not in " ".join(result.lines)
    assert "shared" in recentred(result)["es"]
    assert "scale" in {
        i for n in rewritten.graph.node if n.op_type == "Mul" for i in n.input
    }  # the Mul stays
    _assert_same(model, rewritten, feeds)


@pytest.mark.usefixtures("cheap_recentring")
def test_tied_embedding_and_a_decomposed_first_layernorm():
    """Found from outside (fuzz_tf_02756, and a speech encoder export): the explicit recentring
    moved the LN's readers, and the conversion then looked for its ReduceMean on the old value
    (StopIteration). The conversion keeps the nodes it matched."""
    model, feeds = _tied_start(embscale=False, decomposed=True)
    result, rewritten = _run(model)
    assert result.modified and "converted 2 LayerNorm(s)" in result.lines[0]
    _assert_same(model, rewritten, feeds)


@pytest.mark.usefixtures("cheap_recentring")
def test_layernorm_scale_that_is_a_graph_input():
    """Found from outside: LayerNormalization(x, gamma=graph input) crashed (AttributeError).
    The conversion never needs gamma's values: it stays the RMSNorm's scale, fed as before."""
    d = 8
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gin", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w"], ["br"]),
        helper.make_node("Add", ["x", "br"], ["x2"]),
        helper.make_node("LayerNormalization", ["x2", "g", "b"], ["y"], axis=-1),
    ]
    inits = [
        const("g", np.ones(d, np.float32)),
        const("b", (0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=(2, d)), tensor("gin", shape=(d,))],
        [tensor("y", shape=(2, d))],
        inits,
    )
    result, rewritten = _run(model)
    assert result.modified and "x" in recentred(result)
    _assert_same(
        model,
        rewritten,
        {
            "x": rng.standard_normal((2, d)).astype(np.float32),
            "gin": rng.standard_normal(d).astype(np.float32),
        },
    )


def _patch_model(groups=1, inner_reader=False):
    """image -> Conv(patch, groups) -> Reshape -> Transpose -> x0; one Pre-LN block."""
    d, ch = 4, 2
    inits = [
        const("wc", rng.standard_normal((d, ch // groups, 1, 1)).astype(np.float32)),
        const("shape", np.array([1, d, 3], np.int64)),
        const("g", np.ones(d, np.float32)),
        const("b", np.zeros(d, np.float32)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
        const("bias", rng.standard_normal(d).astype(np.float32)),
        const("head", rng.standard_normal((d, 2)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Conv", ["img", "wc"], ["c"], group=groups, name="patch"),
        helper.make_node("Reshape", ["c", "shape"], ["r"]),
        helper.make_node("Transpose", ["r"], ["x0"], perm=[0, 2, 1]),
        helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w"], ["m"], name="proj"),
        helper.make_node("Add", ["m", "bias"], ["br"]),
        helper.make_node("Add", ["x0", "br"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["f"], axis=-1),
        helper.make_node("MatMul", ["f", "head"], ["y"]),
    ]
    outputs = [tensor("y", shape=(1, 3, 2))] + (
        [tensor("m", shape=(1, 3, d))] if inner_reader else []
    )
    model = make_model(nodes, [tensor("img", shape=(1, ch, 3, 1))], outputs, inits)
    return model, {"img": rng.standard_normal((1, ch, 3, 1)).astype(np.float32)}


@pytest.mark.usefixtures("cheap_recentring")
def test_grouped_patch_conv_is_not_centred_per_channel():
    """Found by the fuzzer's mutation runs: centring a grouped Conv over all output channels is
    wrong (each channel reads other inputs); the initial value is recentred explicitly instead."""
    model, feeds = _patch_model(groups=2)
    result, rewritten = _run(model)
    assert result.modified and any("grouped Conv patch writes" in c for c in result.lines)
    _assert_same(model, rewritten, feeds)
    result, rewritten = _run(_patch_model(groups=1)[0])
    assert not any("inserted" in c for c in result.lines)  # an ungrouped patch Conv is centred


@pytest.mark.usefixtures("cheap_recentring")
def test_value_the_centring_changes_must_have_no_other_reader():
    """The branch's MatMul output is also a graph output: centring its weight would change it.
    It keeps its numbers; the branch is recentred explicitly after its bias Add instead."""
    model, feeds = _patch_model(inner_reader=True)
    result, rewritten = _run(model)
    assert result.modified and recentred(result)["br"].startswith(
        "it is computed from 'm', which must keep its numbers: 'm' is a graph output"
    )
    _assert_same(model, rewritten, feeds)  # 'm' (an output) included


@pytest.mark.usefixtures("cheap_recentring")
def test_positional_table_sliced_on_the_hidden_axis_is_centred_after_the_slice():
    """Centring a table that is then sliced along the hidden axis would not centre the slice: the
    slice (a constant, evaluated) is centred, the table is left as it is."""
    d = 4
    inits = [
        const("wide", rng.standard_normal((3, d + 2)).astype(np.float32)),
        const("starts", np.array([0])),
        const("ends", np.array([d])),
        const("axes", np.array([1])),
        const("g", np.ones(d, np.float32)),
        const("b", np.zeros(d, np.float32)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
        const("w_in", rng.standard_normal((d, d)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("Slice", ["wide", "starts", "ends", "axes"], ["pos"], name="cut"),
        helper.make_node("MatMul", ["x", "w_in"], ["t"]),
        helper.make_node("Add", ["t", "pos"], ["x0"]),
        helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w"], ["br"]),
        helper.make_node("Add", ["x0", "br"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["y"], axis=-1),
    ]
    model = make_model(nodes, [tensor("x", shape=(2, 3, d))], [tensor("y", shape=(2, 3, d))], inits)
    result, rewritten = _run(model)
    assert result.modified and not recentred(result)
    add = next(n for n in rewritten.graph.node if n.op_type == "Add" and n.input[0] == "t")
    centred = next(
        onnx.numpy_helper.to_array(i) for i in rewritten.graph.initializer if i.name == add.input[1]
    )
    np.testing.assert_allclose(centred.sum(-1), 0, atol=1e-6)
    wide = next(
        onnx.numpy_helper.to_array(i) for i in rewritten.graph.initializer if i.name == "wide"
    )
    np.testing.assert_array_equal(wide, onnx.numpy_helper.to_array(inits[0]))
    _assert_same(model, rewritten, {"x": rng.standard_normal((2, 3, d)).astype(np.float32)})


@pytest.mark.usefixtures("cheap_recentring")
def test_a_computed_table_sliced_on_the_hidden_axis_is_recentred_explicitly():
    """The table is a graph input: its slice is no constant to centre, and centring the input
    upstream would not centre the slice."""
    d = 4
    inits = [
        const("starts", np.array([0])),
        const("ends", np.array([d])),
        const("axes", np.array([1])),
        const("g", np.ones(d, np.float32)),
        const("b", np.zeros(d, np.float32)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
        const("w_in", rng.standard_normal((d, d)).astype(np.float32)),
        const("w_t", rng.standard_normal((d + 2, d + 2)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["table", "w_t"], ["wide"], name="make"),
        helper.make_node("Slice", ["wide", "starts", "ends", "axes"], ["pos"], name="cut"),
        helper.make_node("MatMul", ["x", "w_in"], ["t"]),
        helper.make_node("Add", ["t", "pos"], ["x0"]),
        helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h"], axis=-1),
        helper.make_node("MatMul", ["h", "w"], ["br"]),
        helper.make_node("Add", ["x0", "br"], ["x1"]),
        helper.make_node("LayerNormalization", ["x1", "g", "b"], ["y"], axis=-1),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=(2, 3, d)), tensor("table", shape=(3, d + 2))],
        [tensor("y", shape=(2, 3, d))],
        inits,
    )
    result, rewritten = _run(model)
    assert result.modified and recentred(result)["pos"].startswith(
        "Slice cut slices the hidden axis"
    )
    _assert_same(
        model,
        rewritten,
        {
            "x": rng.standard_normal((2, 3, d)).astype(np.float32),
            "table": rng.standard_normal((3, d + 2)).astype(np.float32),
        },
    )


def _patch_merging(d=4, tokens=4):
    """x0 (centrable) -> Pre-LN block -> patch merging (even/odd token slices joined on the
    hidden axis, LN over 2d, reduction to d) -> Pre-LN block -> LN."""
    inits = [
        const("w_in", rng.standard_normal((3, d)).astype(np.float32)),
        const("g", (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("b", (0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("g2", (1 + 0.3 * rng.standard_normal(2 * d)).astype(np.float32)),
        const("b2", np.zeros(2 * d, np.float32)),
        const("w0", rng.standard_normal((d, d)).astype(np.float32)),
        const("w1", rng.standard_normal((d, d)).astype(np.float32)),
        const("red", rng.standard_normal((2 * d, d)).astype(np.float32)),
        const("zero", np.array([0])),
        const("one", np.array([1])),
        const("end", np.array([tokens])),
        const("ax", np.array([1])),
        const("two", np.array([2])),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["x0"]),
        helper.make_node("LayerNormalization", ["x0", "g", "b"], ["h0"], axis=-1, name="stage1_ln"),
        helper.make_node("MatMul", ["h0", "w0"], ["br0"]),
        helper.make_node("Add", ["x0", "br0"], ["x1"]),
        helper.make_node("Slice", ["x1", "zero", "end", "ax", "two"], ["even"]),
        helper.make_node("Slice", ["x1", "one", "end", "ax", "two"], ["odd"]),
        helper.make_node("Concat", ["even", "odd"], ["merged"], axis=-1, name="merge"),
        helper.make_node(
            "LayerNormalization", ["merged", "g2", "b2"], ["mn"], axis=-1, name="merge_ln"
        ),
        helper.make_node("MatMul", ["mn", "red"], ["s0"]),
        helper.make_node("LayerNormalization", ["s0", "g", "b"], ["h1"], axis=-1, name="stage2_ln"),
        helper.make_node("MatMul", ["h1", "w1"], ["br1"]),
        helper.make_node("Add", ["s0", "br1"], ["s1"]),
        helper.make_node("LayerNormalization", ["s1", "g", "b"], ["y"], axis=-1, name="final_ln"),
    ]
    model = make_model(
        nodes, [tensor("x", shape=(2, tokens, 3))], [tensor("y", shape=(2, tokens // 2, d))], inits
    )
    return model, {"x": rng.standard_normal((2, tokens, 3)).astype(np.float32)}


def test_patch_merging_is_not_recentred(monkeypatch):
    """Swin-style patch merging joins token slices of the stage-1 stream on the hidden axis.
    Recentred, each slice would shift by its own token's mean, and the LayerNorm over the joined
    vector sees those different shifts: stage 1 keeps its numbers (its norm and the merge's
    stay, named); stage 2, which starts at the reduction, converts. Treating the Concat as
    carrying the recentring (a zero-mean concat of zero-mean pieces) would be wrong, as the
    second half shows."""
    from normopt.rewriter import stream_regions

    model, feeds = _patch_merging()
    result, rewritten = _run(model)
    assert result.stats["converted"] == 2  # stage2_ln, final_ln
    reasons = {r.candidate: r.reason for r in result.refusals}
    for ln in ("stage1_ln", "merge_ln"):
        assert (
            "Concat merge" in reasons[f"layernorm at {ln}"]
            and "along the hidden axis" in reasons[f"layernorm at {ln}"]
        )
    _assert_same(model, rewritten, feeds)

    merge = stream_regions.merge_inputs

    def concat_carries_it(node):  # the unsound rule: a Concat of zero-mean pieces is zero-mean
        if node is not None and node.op_type == "Concat":
            return [v for v in node.inputs if folded_value(v) is None]
        return merge(node)

    monkeypatch.setattr(stream_regions, "merge_inputs", concat_carries_it)
    result, wrong = _run(model)
    assert result.stats["converted"] == 4
    before, after = ort_run(model, feeds)["y"], ort_run(wrong, feeds)["y"]
    assert np.abs(after - before).max() > 0.1 * np.abs(before).max()


@pytest.mark.usefixtures("cheap_recentring")
def test_an_rmsnorm_reading_the_stream_keeps_it():
    """An RMSNorm is not shift-invariant: the stream value it reads keeps its numbers, and the
    stream is recentred explicitly after the next residual Add (the recentring names why)."""
    model = _blocks(opset=23)
    first = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    first.op_type = "RMSNormalization"
    del first.input[2]
    result, rewritten = _run(model)
    assert result.stats == {
        "layernorms": 2,
        "converted": 2,
        "recentrings": 1,
        "centred_constants": 2,
    }
    assert "is not shift-invariant" in recentred(result)["x1"]
    _assert_same(model, rewritten, {"ids": np.array([[1, 5, 7, 2], [3, 3, 0, 9]], np.int64)})


def _flattened_stream(axis: int, d: int = 6, tokens: int = 4):
    """Two Pre-LN blocks with the stream flattened between them: [1, T, d] -> Flatten(axis)."""
    inits = [
        const("w_in", rng.standard_normal((3, d)).astype(np.float32)),
        const("w1", rng.standard_normal((d, d)).astype(np.float32)),
        const("w2", rng.standard_normal((d, d)).astype(np.float32)),
        const("g", (1 + 0.3 * rng.standard_normal(d)).astype(np.float32)),
        const("b", (0.3 * rng.standard_normal(d)).astype(np.float32)),
    ]

    def ln(x, out):
        return helper.make_node(
            "LayerNormalization", [x, "g", "b"], [out], axis=-1, name=f"ln_{out}"
        )

    flat = d if axis == 2 else tokens * d
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["s0"]),
        ln("s0", "n1"),
        helper.make_node("MatMul", ["n1", "w1"], ["b1"]),
        helper.make_node("Add", ["s0", "b1"], ["s1"]),
        helper.make_node("Flatten", ["s1"], ["f"], axis=axis, name="flatten"),
        ln("f", "n2"),
        helper.make_node("MatMul", ["n2", "w2" if axis == 2 else "w_wide"], ["b2"]),
        helper.make_node("Add", ["f", "b2"], ["s2"]),
        ln("s2", "y"),
    ]
    if axis != 2:  # [1, T*d]: the norms read the whole flattened row
        inits = [
            *inits[:3],
            const("g", np.ones(flat, np.float32)),
            const("b", np.zeros(flat, np.float32)),
            const("w_wide", rng.standard_normal((flat, flat)).astype(np.float32)),
        ]
        nodes[1] = helper.make_node(
            "LayerNormalization", ["s0", "g_d", "b_d"], ["n1"], axis=-1, name="ln_n1"
        )
        inits += [const("g_d", np.ones(d, np.float32)), const("b_d", np.zeros(d, np.float32))]
    out_shape = (tokens, d) if axis == 2 else (1, flat)
    model = make_model(
        nodes, [tensor("x", shape=(1, tokens, 3))], [tensor("y", shape=out_shape)], inits
    )
    return model, {"x": rng.standard_normal((1, tokens, 3)).astype(np.float32)}


def test_a_flatten_that_keeps_the_hidden_axis_carries_the_stream():
    """Flatten [1, T, d] -> [T, d] keeps every hidden vector whole: a recentring passes
    through it (axis_rules: Flatten's `stream` column), so all three LayerNorms convert with no
    explicit recentring. Before Flatten was on the stream, the Flatten blocked s1."""
    model, feeds = _flattened_stream(axis=2)
    result, rewritten = _run(model)
    assert result.stats["converted"] == 3 and not recentred(result)
    _assert_same(model, rewritten, feeds)


def test_a_flatten_that_joins_hidden_vectors_blocks_the_stream():
    """Flatten [1, T, d] -> [1, T*d] joins the tokens' hidden vectors: recentred apart, they
    would shift by different amounts, which the norm over the joined row sees."""
    model, feeds = _flattened_stream(axis=1)
    result, rewritten = _run(model)
    reasons = {r.candidate: r.reason for r in result.refusals}
    assert "Flatten flatten reads 's1'" in reasons["layernorm at ln_n1"]
    _assert_same(model, rewritten, feeds)


@pytest.mark.parametrize("name", ["dit-ts17", "dit-dyn18"])
def test_a_dit_s_gated_branches_are_refused_or_recentred_never_converted_silently(
    corpus, tmp_path, name
):
    """DiT (adaLN-Zero): a per-sample, per-channel gate on each branch output breaks the zero-mean
    stream. By default the conversion is refused, naming each gate's Mul; priced lower, it
    recentres exactly those four gated branch outputs and is exact."""
    paths = corpus(name)
    model = io.load(paths.model)
    annotate(model)
    result = PreLNToRMSNorm().run(model)
    assert not result.modified and len(result.refusals) == 5
    assert all(
        "would need 4 explicit recentring(s)" in r.reason and "is not a linear op" in r.reason
        for r in result.refusals
    )
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model,
        out,
        passes=["preln-to-rmsnorm{recentring_cost=1}"],
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    result = report.passes[0]
    assert result.stats["converted"] == 5 and result.stats["recentrings"] == 4
    assert len(recentred(result)) == 4
    assert all("Mul" in why and "not a linear op" in why for why in recentred(result).values())
    assert_matches_reference(out, paths)
