"""Residual-stream analysis: classification of every corpus model and of hand-built blocks."""

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from models.corpus import CORPUS
from normopt.rewriter.io import load
from normopt.rewriter.norms import find_norms
from normopt.rewriter.stream import analyze
from tests.helpers import const, make_model, tensor

EXPECTED = {
    "gpt2": "pre-ln",
    "gpt2hidden": "pre-ln",
    "gpt2kv": "pre-ln",
    "optkv": "pre-ln",
    "gptneoxkv": "pre-ln",
    "bloomkv": "pre-ln",
    "falconkv": "pre-ln",
    "phikv": "pre-ln",
    "opt": "pre-ln",
    "gptneox": "pre-ln",
    "vit": "pre-ln",
    "preln": "pre-ln",
    "bert": "post-ln",
    # onnxruntime-fused: each SkipLayerNormalization is a residual Add and the next block's norm
    "gpt2fused": "pre-ln",
    "vitfused": "pre-ln",
    "bertfused": "post-ln",
    "llama": "pre-rmsnorm",
    "resnet18": "none",
    "mobilenetv2": "none",
    "clip": "pre-ln",
    "bloom": "pre-ln",  # with a LayerNorm on the embeddings (named in the reasons)
    "swin": "pre-ln",
    "whisper": "pre-ln",
    "scaledpool": "pre-ln",
    "periln": "peri-ln",
    "mixln": "mixed",
    "wav2vec2": "mixed",  # its conv positional embedding is a residual Add without a norm
    "repbn": "none",
    "repbnpool": "none",
    "unifiednorm": "none",
    "convnext": "none",
    "convnext2d": "none",
    "repvgg": "none",
    "repblocks": "none",
    "mobileone": "none",
    "levit": "none",
    "evonorms": "none",
    "regnetzevos": "none",
    "resnetv2evos": "none",
    "resnetv2evob": "none",
    "dit": "pre-ln",  # its branches gated per channel by the conditioning (adaLN-Zero)
}
RESIDUAL_ADDS = {
    "gpt2": 4,
    "gpt2hidden": 4,
    "gpt2kv": 4,
    "optkv": 4,
    "gptneoxkv": 2,
    "bloomkv": 4,
    "falconkv": 2,  # parallel blocks: attention and MLP added at once
    "phikv": 2,
    "opt": 4,
    "gptneox": 2,
    "vit": 4,
    "preln": 4,
    "bert": 4,
    "llama": 4,
    "clip": 4,
    "gpt2fused": 4,
    "vitfused": 4,
    "bertfused": 4,
    "dit": 4,
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_architecture(corpus, name):
    family = CORPUS[name].family
    graph = load(corpus(name).model).graph
    result = analyze(graph, find_norms(graph))
    assert result.architecture == EXPECTED[family], result.reasons
    if family in ("clip", "bloom"):
        assert any("1 norm(s) write the start of a stream" in r for r in result.reasons)
    if family in RESIDUAL_ADDS:
        assert len(result.residual_adds) == RESIDUAL_ADDS[family]  # no mask or GELU Adds
        assert len(result.final_norms) == (
            0 if family == "clip" else 1
        )  # CLIP normalizes the pooled cls token


def _blocks(kinds: list[str], d: int = 8):
    """A stream of blocks; each kind is pre | post | peri | plain (no norm) | rms (pre RMSNorm)."""
    rng = np.random.default_rng(0)
    nodes, inits, x = [], [], "x"
    inits += [const("g", np.ones(d, np.float32)), const("b", np.zeros(d, np.float32))]

    def norm(inp, out, rms=False):
        if rms:
            return helper.make_node("RMSNormalization", [inp, "g"], [out], axis=-1)
        return helper.make_node("LayerNormalization", [inp, "g", "b"], [out], axis=-1)

    for i, kind in enumerate(kinds):
        inits.append(const(f"w{i}", rng.standard_normal((d, d)).astype(np.float32)))
        if kind in ("pre", "peri", "rms"):
            nodes.append(norm(x, f"n{i}", rms=kind == "rms"))
            nodes.append(helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"f{i}"]))
        else:
            nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"f{i}"]))
        branch = f"f{i}"
        if kind == "peri":
            nodes.append(norm(f"f{i}", f"p{i}"))
            branch = f"p{i}"
        nodes.append(helper.make_node("Add", [x, branch], [f"s{i}"]))
        x = f"s{i}"
        if kind == "post":
            nodes.append(norm(x, f"ln{i}"))
            x = f"ln{i}"
    # a tanh-GELU style Add (x + c*x^3): not residual, no linear op between
    nodes += [
        helper.make_node("Pow", [x, "three"], ["cube"]),
        helper.make_node("Mul", ["cube", "c"], ["cc"]),
        helper.make_node("Add", [x, "cc"], ["y"]),
    ]
    inits += [const("three", np.float32(3)), const("c", np.float32(0.044715))]
    model = make_model(
        nodes,
        [tensor("x", TensorProto.FLOAT, (2, 4, d))],
        [tensor("y", TensorProto.FLOAT, (2, 4, d))],
        inits,
        opset=23,
    )
    graph = ir.serde.deserialize_model(model).graph
    return analyze(graph, find_norms(graph))


@pytest.mark.parametrize(
    "kinds,expected",
    [
        (["pre", "pre", "pre"], "pre-ln"),
        (["post", "post", "post"], "post-ln"),
        (["peri", "peri"], "peri-ln"),
        (["rms", "rms"], "pre-rmsnorm"),
        (["pre", "post", "pre"], "mixed"),  # Mix-LN
        (["pre", "rms"], "mixed"),
        (["pre", "plain", "pre"], "mixed"),
        (["plain", "plain"], "none"),
    ],
)
def test_hand_built_streams(kinds, expected):
    result = _blocks(kinds)
    assert result.architecture == expected, result.reasons
    assert len(result.residual_adds) == len(kinds)  # the GELU-style Add is not residual
    assert result.reasons


def test_no_residual_add():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor("x")], [tensor("y")])
    graph = ir.serde.deserialize_model(model).graph
    result = analyze(graph, find_norms(graph))
    assert result.architecture == "none" and "no residual Add" in result.reasons[0]


def test_stream_json_lists_writers_and_readers(corpus):
    graph = load(corpus("gpt2-ts17").model).graph
    data = analyze(graph, find_norms(graph)).to_json()
    assert data["architecture"] == "pre-ln" and data["residual_adds"] == 4
    roles = [w["role"] for w in data["writers"]]
    assert roles.count("initial") == 1 and roles.count("branch") == 4
    assert set(data["other_readers"]) <= {"Shape"}  # GPT-2's stream feeds only norms, Adds, Shape


def test_a_beta_two_norms_share_is_no_residual_skip():
    """One constant beta added after both RMSNorms (exporters share equal initializers): it reaches
    the second norm's input through the first block's MatMul, but a constant is never the stream."""
    d = 4
    rng = np.random.default_rng(0)
    inits = [
        const("g", np.ones(d, np.float32)),
        const("beta", rng.standard_normal(d).astype(np.float32)),
        const("w", rng.standard_normal((d, d)).astype(np.float32)),
        const("head", rng.standard_normal((d, 2)).astype(np.float32)),
    ]
    nodes = [
        helper.make_node("RMSNormalization", ["x", "g"], ["n0"], axis=-1),
        helper.make_node("Add", ["n0", "beta"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["br"]),
        helper.make_node("Add", ["x", "br"], ["x1"]),
        helper.make_node("RMSNormalization", ["x1", "g"], ["n1"], axis=-1),
        helper.make_node("Add", ["n1", "beta"], ["z"]),
        helper.make_node("MatMul", ["z", "head"], ["y"]),
    ]
    model = ir.serde.deserialize_model(
        make_model(
            nodes, [tensor("x", shape=(2, 3, d))], [tensor("y", shape=(2, 3, 2))], inits, opset=23
        )
    )
    analysis = analyze(model.graph, find_norms(model.graph))
    assert analysis.architecture == "pre-rmsnorm" and [
        r.node.outputs[0].name for r in analysis.residual_adds
    ] == ["x1"]
