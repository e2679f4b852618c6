"""Decoders with a KV cache: generated inputs tie what the graph ties (each past tensor's
sequence axis, the attention mask's past + new length, the position ids), and verification
runs a decode step and a prefill without --inputs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import normopt
from models.corpus import KV_FAMILIES
from normopt.inputs import DECODE, PREFILL, InputOptions, cache_layout, input_trials
from normopt.rewriter import io
from tests.helpers import const, make_model

D, HEADS, DH, VOCAB = 8, 2, 4, 11
rng = np.random.default_rng(7)


def _weight(name, *shape):
    return const(name, (0.3 * rng.standard_normal(shape)).astype(np.float32))


def decoder(positions: bool = False) -> onnx.ModelProto:
    """One Pre-LN attention block with a KV cache, every dynamic dim named apart (as a dynamo
    export names them): input_ids [s0, s1], attention_mask [s2, s3] (past + new), past key and
    value [s4, 2, s5, 4] / [s6, 2, s7, 4], concatenated with the new ones on axis 2."""
    n = helper.make_node
    heads = [0, 0, HEADS, DH]
    nodes = [
        n("Gather", ["table", "input_ids"], ["h"], name="embed"),
        *(
            [n("Gather", ["pos_table", "position_ids"], ["p"]), n("Add", ["h", "p"], ["h0"])]
            if positions
            else [n("Identity", ["h"], ["h0"])]
        ),
        n("LayerNormalization", ["h0", "g1", "b1"], ["x"], axis=-1, name="ln1"),
    ]
    for t in "qkv":
        nodes += [
            n("MatMul", ["x", f"w{t}"], [f"{t}0"]),
            n("Reshape", [f"{t}0", "heads"], [f"{t}1"]),
            n("Transpose", [f"{t}1"], [f"{t}h"], perm=[0, 2, 1, 3]),
        ]
    nodes += [
        n("Concat", ["past_key", "kh"], ["present_key"], axis=2),
        n("Concat", ["past_value", "vh"], ["present_value"], axis=2),
        n("Transpose", ["present_key"], ["kt"], perm=[0, 1, 3, 2]),
        n("MatMul", ["qh", "kt"], ["s"]),
        n("Mul", ["s", "scale"], ["ss"]),
        n("Cast", ["attention_mask"], ["mf"], to=TensorProto.FLOAT),
        n("Unsqueeze", ["mf", "axes12"], ["m4"]),
        n("Sub", ["one", "m4"], ["inv"]),
        n("Mul", ["inv", "big"], ["bias"]),
        n("Add", ["ss", "bias"], ["sb"]),
        n("Softmax", ["sb"], ["pr"], axis=-1),
        n("MatMul", ["pr", "present_value"], ["o"]),
        n("Transpose", ["o"], ["ot"], perm=[0, 2, 1, 3]),
        n("Reshape", ["ot", "flat"], ["of"]),
        n("MatMul", ["of", "wo"], ["branch"]),
        n("Add", ["h0", "branch"], ["h2"]),
        n("LayerNormalization", ["h2", "g1", "b1"], ["y"], axis=-1, name="ln_f"),
        n("MatMul", ["y", "head"], ["logits"]),
    ]
    inits = [
        _weight("table", VOCAB, D),
        _weight("pos_table", 32, D),
        *(_weight(f"w{t}", D, D) for t in "qkvo"),
        _weight("head", D, VOCAB),
        const("g1", (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)),
        const("b1", (0.2 * rng.standard_normal(D)).astype(np.float32)),
        const("heads", np.array(heads, np.int64)),
        const("flat", np.array([0, 0, D], np.int64)),
        const("scale", np.float32(DH**-0.5)),
        const("axes12", np.array([1, 2], np.int64)),
        const("one", np.float32(1)),
        const("big", np.float32(-1e4)),
    ]
    if not positions:
        inits = [i for i in inits if i.name != "pos_table"]
    f = TensorProto.FLOAT
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["s0", "s1"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["s2", "s3"]),
        *(
            [helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["s8", "s9"])]
            if positions
            else []
        ),
        helper.make_tensor_value_info("past_key", f, ["s4", HEADS, "s5", DH]),
        helper.make_tensor_value_info("past_value", f, ["s6", HEADS, "s7", DH]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", f, ["s0", "s1", VOCAB]),
        helper.make_tensor_value_info("present_key", f, ["s4", HEADS, "t", DH]),
        helper.make_tensor_value_info("present_value", f, ["s6", HEADS, "t", DH]),
    ]
    return make_model(nodes, inputs, outputs, inits, opset=18)


def test_the_cache_is_found_and_its_dims_tied(tmp_path):
    onnx.save(decoder(positions=True), tmp_path / "d.onnx")
    spec = io.load(tmp_path / "d.onnx")
    layout = cache_layout(spec)
    assert layout.past == {"past_key": 2, "past_value": 2}
    assert (layout.tokens, layout.mask, layout.positions) == (
        "input_ids",
        "attention_mask",
        "position_ids",
    )
    step, prefill = input_trials(spec, InputOptions())
    (past, new), batch = DECODE, 2
    assert step["past_key"].shape == (batch, HEADS, past, DH) == step["past_value"].shape
    assert step["input_ids"].shape == (batch, new)
    assert step["attention_mask"].shape == (batch, past + new)
    assert step["position_ids"].tolist() == [[past]] * batch
    assert prefill["past_key"].shape == (batch, HEADS, PREFILL[0], DH)
    assert prefill["position_ids"].tolist() == [list(range(PREFILL[1]))] * batch


@pytest.mark.parametrize("positions", [False, True])
def test_a_decoder_is_rewritten_without_inputs_at_a_decode_step_and_a_prefill(tmp_path, positions):
    """Without the tie, the generated mask (16 long) never matches past + new (32): every
    KV-cache export exited 2 without --inputs."""
    src = tmp_path / "d.onnx"
    onnx.save(decoder(positions), src)
    out, report = normopt.rewrite(src, tmp_path / "o.onnx")
    assert report.written and report.verification.ok and report.changed
    doc = report.to_json()
    assert doc["inputs"]["cache"] == (
        "KV cache of 2 past input(s), dims tied: decode step: past 4, new 1, mask 5; "
        "prefill: past 0, new 4, mask 4"
    )
    shapes = [t["attention_mask"]["shape"] for t in doc["inputs"]["trials"]]
    assert shapes == [[2, 5], [2, 4]] and report.verification.note is None
    # and on the user's own inputs: three cached tokens, two new
    feeds = {
        "input_ids": np.array([[3, 5], [1, 2]], np.int64),
        "attention_mask": np.ones((2, 5), np.int64),
        "past_key": rng.standard_normal((2, HEADS, 3, DH)).astype(np.float32),
        "past_value": rng.standard_normal((2, HEADS, 3, DH)).astype(np.float32),
    }
    if positions:
        feeds["position_ids"] = np.array([[3, 4], [3, 4]], np.int64)
    assert normopt.verify(src, out, inputs=feeds).ok


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"{f}-{e}" for f in KV_FAMILIES for e in ("ts17", "dyn18")])
def test_a_kv_cache_export_is_rewritten_with_no_options(corpus, tmp_path, name):
    """Both exporters' GPT-2, OPT, GPT-NeoX, BLOOM (ALiBi), Falcon (multi-query: one key/value
    head) and Phi with their KV cache (dynamo names every dim apart; TorchScript's first cache
    update is a Concat of the past alone): `normopt rewrite IN OUT` exits 0, verified at a decode
    step and a prefill, and equal on the export's own inputs (3 cached tokens, 2 new)."""
    paths = corpus(name)
    out, report = normopt.rewrite(paths.model, tmp_path / "o.onnx")
    assert report.written and report.verification.ok and report.verification.note is None
    assert report.to_json()["inputs"]["cache"].startswith("KV cache of 4 past input(s)")
    assert any(p.name == "preln-to-rmsnorm" and p.modified for p in report.passes)
    assert normopt.verify(paths.model, out, inputs=paths.load_inputs()).ok
