"""fold-affine-norms: every fold form exact in ORT, every precondition refused with its reason."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from models.corpus import CORPUS
from normopt import files
from normopt.passes.fold_affine_norms import FoldAffineNorms
from normopt.rewriter import io
from normopt.rewriter.norms import find_norms
from tests.evo_graphs import Evo, build, build_tf
from tests.helpers import annotate, assert_matches_reference, const, make_model, ort_run, tensor

rng = np.random.default_rng(0)
FOLDABLE = sorted(
    n
    for n, e in CORPUS.items()
    if e.family in ("resnet18", "mobilenetv2", "repbn", "repbnpool", "unifiednorm")
)


@pytest.mark.parametrize("name", FOLDABLE)
def test_every_norm_in_the_exports_folds(corpus, tmp_path, name):
    paths = corpus(name)
    model = io.load(paths.model)
    annotate(model)
    result = FoldAffineNorms().run(model)
    assert result.modified and not result.refusals, result.refusals
    assert not [m for m in find_norms(model.graph) if m.kind in ("batchnorm", "affine")]
    assert not FoldAffineNorms().run(model).modified  # idempotent
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    assert_matches_reference(out, paths)


# ------------------------------------------------------------------------ hand-built graphs


def bn(name, inp, out, c, shift=True):
    """A BatchNormalization with random statistics; without `shift`, mean = beta = 0, so
    c = beta - mean * s is exactly zero (float32 rounding would make any other choice inexact)."""
    gamma, var = rng.uniform(0.5, 1.5, c), rng.uniform(0.5, 1.5, c)
    mean = rng.standard_normal(c) if shift else np.zeros(c)
    beta = rng.standard_normal(c) if shift else np.zeros(c)
    inits = [
        const(f"{name}_{k}", v.astype(np.float32))
        for k, v in (("g", gamma), ("b", beta), ("m", mean), ("v", var))
    ]
    node = helper.make_node("BatchNormalization", [inp, *(i.name for i in inits)], [out], name=name)
    return node, inits


def run_fold(model, feeds, expect_modified=True):
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = FoldAffineNorms().run(ir_model)
    assert result.modified == expect_modified, result.refusals
    rewritten = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(rewritten, full_check=True)
    before, after = ort_run(model, feeds), ort_run(rewritten, feeds)
    for k in before:
        np.testing.assert_allclose(after[k], before[k], rtol=1e-5, atol=1e-5)
    return result, ir_model


def image(c=4, hw=6):
    return {"x": rng.standard_normal((2, c, hw, hw)).astype(np.float32)}


@pytest.mark.parametrize("groups,bias", [(1, True), (2, False), (4, True)])
def test_conv_then_bn(groups, bias):
    nodes = [
        helper.make_node(
            "Conv", ["x", "w"] + (["cb"] if bias else []), ["h"], pads=[1, 1, 1, 1], group=groups
        )
    ]
    inits = [const("w", rng.standard_normal((4, 4 // groups, 3, 3)).astype(np.float32))]
    inits += [const("cb", rng.standard_normal(4).astype(np.float32))] if bias else []
    node, extra = bn("bn", "h", "y", 4)
    model = make_model(
        nodes + [node],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 6, 6))],
        inits + extra,
    )
    result, out = run_fold(model, image())
    assert [n.op_type for n in out.graph] == ["Conv"] and "y" in [v.name for v in out.graph.outputs]
    assert result.lines == ["folded 1 batchnorm into preceding Conv"]


def test_conv_transpose_then_bn():
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["h"], strides=[2, 2], group=2)]
    node, extra = bn("bn", "h", "y", 6)
    model = make_model(
        nodes + [node],
        [tensor("x", shape=(2, 4, 5, 5))],
        [tensor("y", shape=(2, 6, 11, 11))],
        [const("w", rng.standard_normal((4, 3, 3, 3)).astype(np.float32))] + extra,
    )
    _, out = run_fold(model, image(4, 5))
    assert [n.op_type for n in out.graph] == ["ConvTranspose"]


@pytest.mark.parametrize("trans_b,beta,with_c", [(0, 1.0, True), (1, 0.5, True), (1, 1.0, False)])
def test_gemm_then_bn_and_bn_then_gemm(trans_b, beta, with_c):
    w = rng.standard_normal((6, 5) if trans_b else (5, 6)).astype(np.float32)
    gemm = helper.make_node(
        "Gemm", ["x", "w"] + (["c"] if with_c else []), ["h"], transB=trans_b, alpha=0.7, beta=beta
    )
    node, extra = bn("bn", "h", "y", 6)
    inits = [const("w", w), const("c", rng.standard_normal(6).astype(np.float32))][
        : 2 if with_c else 1
    ]
    model = make_model(
        [gemm, node], [tensor("x", shape=(3, 5))], [tensor("y", shape=(3, 6))], inits + extra
    )
    _, out = run_fold(model, {"x": rng.standard_normal((3, 5)).astype(np.float32)})
    assert [n.op_type for n in out.graph] == ["Gemm"]
    # and the other side: BN on the Gemm's input
    node, extra = bn("bn", "x", "xn", 5)
    gemm = helper.make_node(
        "Gemm", ["xn", "w"] + (["c"] if with_c else []), ["y"], transB=trans_b, alpha=0.7, beta=beta
    )
    model = make_model(
        [node, gemm], [tensor("x", shape=(3, 5))], [tensor("y", shape=(3, 6))], inits + extra
    )
    result, out = run_fold(model, {"x": rng.standard_normal((3, 5)).astype(np.float32)})
    assert [n.op_type for n in out.graph] == ["Gemm"] and "following Gemm" in result.lines[0]


def _tokens_bn(perm_name="x"):
    """Transpose -> BN -> Transpose on [B, N, C] token features."""
    node, extra = bn("bn", "xt", "yt", 8)
    return [
        helper.make_node("Transpose", [perm_name], ["xt"], perm=[0, 2, 1]),
        node,
        helper.make_node("Transpose", ["yt"], ["yn"], perm=[0, 2, 1]),
    ], extra


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_then_token_bn_and_token_bn_then_matmul(bias):
    tokens = {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)}
    w = const("w", rng.standard_normal((8, 8)).astype(np.float32))
    mm = [helper.make_node("MatMul", ["x", "w"], ["h0"])]
    mm += (
        [helper.make_node("Add", ["h0", "b"], ["h"])]
        if bias
        else [helper.make_node("Identity", ["h0"], ["h"])]
    )
    norm, extra = _tokens_bn("h")
    inits = [w] + ([const("b", rng.standard_normal(8).astype(np.float32))] if bias else [])
    model = make_model(
        mm + norm + [helper.make_node("Relu", ["yn"], ["y"])],
        [tensor("x", shape=(2, 5, 8))],
        [tensor("y", shape=(2, 5, 8))],
        inits + extra,
    )
    if not bias:  # the Identity sits between MatMul and BN: preceding is refused, nothing follows
        run_fold(model, tokens, expect_modified=False)
    else:
        _, out = run_fold(model, tokens)
        assert "BatchNormalization" not in [n.op_type for n in out.graph]
    norm, extra = _tokens_bn("x")
    after = [helper.make_node("MatMul", ["yn", "w"], ["m"])]
    after += (
        [helper.make_node("Add", ["m", "b"], ["y"])]
        if bias
        else [helper.make_node("Relu", ["m"], ["y"])]
    )
    model = make_model(
        norm + after, [tensor("x", shape=(2, 5, 8))], [tensor("y", shape=(2, 5, 8))], inits + extra
    )
    _, out = run_fold(model, tokens)
    ops = [n.op_type for n in out.graph]
    assert ops == (
        ["MatMul", "Add"] if bias else ["MatMul", "Add", "Relu"]
    )  # a bias Add appears where none was


def test_affine_chain_and_fp16_parameters():
    c = 8
    nodes = [
        helper.make_node("Div", ["x", "s"], ["d"]),
        helper.make_node("Mul", ["d", "g"], ["e"]),
        helper.make_node("Add", ["e", "b"], ["n"]),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    inits = [
        const("s", rng.uniform(0.5, 2, c).astype(np.float16)),
        const("g", rng.uniform(0.5, 2, c).astype(np.float16)),
        const("b", rng.standard_normal(c).astype(np.float16)),
        const("w", rng.standard_normal((c, 4)).astype(np.float16)),
    ]
    model = make_model(
        nodes,
        [tensor("x", TensorProto.FLOAT16, (3, c))],
        [tensor("y", TensorProto.FLOAT16, (3, 4))],
        inits,
    )
    ir_model = ir.serde.deserialize_model(model)
    assert FoldAffineNorms().run(ir_model).modified
    assert [n.op_type for n in ir_model.graph] == ["MatMul", "Add"]
    assert {v.const_value.dtype for v in ir_model.graph.initializers.values()} == {
        ir.DataType.FLOAT16
    }
    x = {"x": rng.standard_normal((3, c)).astype(np.float16)}
    np.testing.assert_allclose(
        ort_run(ir.serde.serialize_model(ir_model), x)["y"].astype(np.float32),
        ort_run(model, x)["y"].astype(np.float32),
        rtol=2e-2,
        atol=2e-2,
    )


# ----------------------------------------------------------------------------- refusals


def refusal(model) -> str:
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = FoldAffineNorms().run(ir_model)
    assert not result.modified
    return " | ".join(r.reason for r in result.refusals)


@pytest.mark.parametrize("shift", [True, False])
def test_following_zero_padded_conv_only_without_shift(shift):
    node, extra = bn("bn", "x", "xn", 4, shift=shift)
    conv = helper.make_node("Conv", ["xn", "w"], ["y"], pads=[1, 1, 1, 1])
    model = make_model(
        [node, conv],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 3, 6, 6))],
        [const("w", rng.standard_normal((3, 4, 3, 3)).astype(np.float32))] + extra,
    )
    if shift:
        assert "zero-pads its input" in refusal(model)
    else:  # c == 0: exact even with padding
        _, out = run_fold(model, image())
        assert [n.op_type for n in out.graph] == ["Conv"]


def test_following_unpadded_conv_with_shift_folds():
    node, extra = bn("bn", "x", "xn", 4)
    conv = helper.make_node("Conv", ["xn", "w"], ["y"], group=2)
    model = make_model(
        [node, conv],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 6, 4, 4))],
        [const("w", rng.standard_normal((6, 2, 3, 3)).astype(np.float32))] + extra,
    )
    run_fold(model, image())


def test_shared_weight_is_copied_not_edited():
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv1"),
        helper.make_node("Conv", ["x", "w"], ["other"], name="conv2"),
    ]
    node, extra = bn("bn", "h", "y", 4)
    model = make_model(
        nodes + [node],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 4, 4)), tensor("other", shape=(2, 4, 4, 4))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))] + extra,
    )
    _, out = run_fold(model, image())
    conv1, conv2 = [n for n in out.graph if n.op_type == "Conv"]
    assert conv2.inputs[1].name == "w" and conv1.inputs[1].name != "w"


def test_graph_output_between_norm_and_linear():
    node, extra = bn("bn", "h", "y", 4)
    conv = helper.make_node("Conv", ["x", "w"], ["h"])
    model = make_model(
        [conv, node],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 4, 4)), tensor("h", shape=(2, 4, 4, 4))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))] + extra,
    )
    assert "'h' is a graph output" in refusal(model)
    node, extra = bn("bn", "x", "xn", 4)
    conv = helper.make_node("Conv", ["xn", "w"], ["y"])
    model = make_model(
        [node, conv],
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 4, 4)), tensor("xn", shape=(2, 4, 6, 6))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))] + extra,
    )
    assert "'xn' is a graph output" in refusal(model)


def test_non_constant_parameters():
    node = helper.make_node("BatchNormalization", ["h", "g", "b", "m", "v"], ["y"], name="bn")
    conv = helper.make_node("Conv", ["x", "w"], ["h"])
    inputs = [tensor("x", shape=(2, 4, 6, 6))] + [tensor(n, shape=(4,)) for n in "gbmv"]
    model = make_model(
        [conv, node],
        inputs,
        [tensor("y", shape=(2, 4, 4, 4))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))],
    )
    assert "parameters are not constant" in refusal(model)


def test_activation_between_norm_and_linear():
    node, extra = bn("bn", "r", "y", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        node,
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 4, 4))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))] + extra,
    )
    reason = refusal(model)
    assert "(by Relu)" in reason and "graph output" in reason
    node, extra = bn("bn", "x", "xn", 4)
    nodes = [
        node,
        helper.make_node("Relu", ["xn"], ["r"]),
        helper.make_node("Conv", ["r", "w"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 4, 4))],
        [const("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))] + extra,
    )
    assert "read by Relu" in refusal(model)


def test_channel_axis_must_map_onto_the_weight():
    """A per-channel Mul+Add along axis 1 of [B, C, N] feeding a MatMul that contracts axis 2."""
    nodes = [
        helper.make_node("Mul", ["x", "g"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["n"]),
        helper.make_node("MatMul", ["n", "w"], ["y"]),
    ]
    inits = [
        const("g", rng.uniform(0.5, 2, (5, 1)).astype(np.float32)),
        const("b", rng.standard_normal((5, 1)).astype(np.float32)),
        const("w", rng.standard_normal((8, 3)).astype(np.float32)),
    ]
    model = make_model(nodes, [tensor("x", shape=(2, 5, 8))], [tensor("y", shape=(2, 5, 3))], inits)
    assert "is not the last axis" in refusal(model)


def test_conv_bn_bn_conv_folds_both_and_a_second_run_changes_nothing():
    """Found from outside (fuzz_cnn_01507): the second BN's fold read the value the first fold
    had replaced (StopIteration). Folds now read their input where the pattern reads it."""
    n1, e1 = bn("bn1", "h", "h1", 6)
    n2, e2 = bn("bn2", "h1", "h2", 6)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
        n1,
        n2,
        helper.make_node("Conv", ["h2", "w2", "cb"], ["y"]),
    ]
    inits = [
        const("w1", rng.standard_normal((6, 4, 3, 3)).astype(np.float32)),
        const("w2", rng.standard_normal((5, 6, 2, 2)).astype(np.float32)),
        const("cb", rng.standard_normal(5).astype(np.float32)),
    ]
    model = make_model(
        nodes, [tensor("x", shape=(2, 4, 6, 6))], [tensor("y", shape=(2, 5, 5, 5))], inits + e1 + e2
    )
    result, out = run_fold(model, image())
    assert [n.op_type for n in out.graph] == ["Conv", "Conv"]
    assert sorted(result.lines) == [
        "folded 1 batchnorm into following Conv",
        "folded 1 batchnorm into preceding Conv",
    ]
    assert not FoldAffineNorms().run(out).modified


def test_a_fold_that_makes_another_possible_is_made_in_the_same_run():
    """Conv -> BN -> BN -> Relu: the second BN reaches the Conv once the first is folded."""
    n1, e1 = bn("bn1", "h", "h1", 4)
    n2, e2 = bn("bn2", "h1", "h2", 4)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        n1,
        n2,
        helper.make_node("Relu", ["h2"], ["y"]),
    ]
    model = make_model(
        nodes,
        [tensor("x", shape=(2, 4, 6, 6))],
        [tensor("y", shape=(2, 4, 6, 6))],
        [const("w", rng.standard_normal((4, 4, 1, 1)).astype(np.float32))] + e1 + e2,
    )
    result, out = run_fold(model, image())
    assert [n.op_type for n in out.graph] == ["Conv", "Relu"] and not result.refusals
    assert result.lines == ["folded 2 batchnorm into preceding Conv"]


def test_norm_with_other_channel_count_than_the_weight_is_refused():
    """A per-channel constant that broadcasts the data up to more channels is not an affine of
    the linear op's output channels."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"]),
        helper.make_node("Mul", ["h", "k"], ["m"]),
        helper.make_node("Add", ["m", "c"], ["y"]),
    ]
    inits = [
        const("w", rng.standard_normal((1, 4, 1, 1)).astype(np.float32)),
        const("k", rng.uniform(0.5, 2, (3, 1, 1)).astype(np.float32)),
        const("c", rng.standard_normal((3, 1, 1)).astype(np.float32)),
    ]
    model = make_model(
        nodes, [tensor("x", shape=(2, 4, 6, 6))], [tensor("y", shape=(2, 3, 6, 6))], inits
    )
    assert "the affine has 3 channels, Conv 's weight 1" in refusal(model)


def test_following_gemm_with_a_computed_bias_is_refused():
    """The folded bias would replace Gemm's C, which here is computed, not a constant."""
    node, extra = bn("bn", "x", "xn", 5)
    nodes = [
        node,
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Gemm", ["xn", "w", "r6"], ["y"]),
        helper.make_node("MatMul", ["r", "p"], ["r6"]),
    ]
    inits = [
        const("w", rng.standard_normal((5, 6)).astype(np.float32)),
        const("p", rng.standard_normal((5, 6)).astype(np.float32)),
    ]
    model = make_model(
        [nodes[0], nodes[1], nodes[3], nodes[2]],
        [tensor("x", shape=(3, 5))],
        [tensor("y", shape=(3, 6))],
        inits + extra,
    )
    assert "has a non-constant bias" in refusal(model)


# ------------------------------------------------------------ through pooling (issue "Structural
# re-parameterization")


def test_bn_then_global_pool_flatten_gemm_folds_into_the_head():
    node, inits = bn("bn", "r", "y", 4)
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        node,
        helper.make_node("GlobalAveragePool", ["y"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flat", axis=1),
        helper.make_node("Gemm", ["f", "w", "cb"], ["z"], name="head", transB=1),
    ]
    inits += [
        const("w", rng.standard_normal((3, 4)).astype(np.float32)),
        const("cb", rng.standard_normal(3).astype(np.float32)),
    ]
    model = make_model(nodes, [tensor("x", shape=(2, 4, 6, 6))], [tensor("z", shape=(2, 3))], inits)
    result, out = run_fold(model, image())
    assert "following Gemm" in result.lines[0] and "BatchNormalization" not in [
        n.op_type for n in out.graph
    ]


@pytest.mark.parametrize("pool", ["ReduceMean", "ReduceSum"])
def test_token_bn_then_pooling_over_tokens_folds_into_the_head(pool):
    """A BN transformer's mean-pooled head: tokens -> token BN -> mean (or sum) over tokens ->
    MatMul."""
    nodes, inits = _tokens_bn("r")
    pooling = (
        helper.make_node(pool, ["yn"], ["p"], name="pool", axes=[1], keepdims=0)
        if pool == "ReduceMean"
        else helper.make_node(pool, ["yn", "axes"], ["p"], name="pool", keepdims=0)
    )  # axes an input from 13
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        *nodes,
        pooling,
        helper.make_node("MatMul", ["p", "w"], ["z"], name="head"),
    ]
    inits += [
        const("w", rng.standard_normal((8, 3)).astype(np.float32)),
        const("axes", np.array([1], np.int64)),
    ]
    model = make_model(nodes, [tensor("x", shape=(2, 5, 8))], [tensor("z", shape=(2, 3))], inits)
    result, out = run_fold(model, {"x": rng.standard_normal((2, 5, 8)).astype(np.float32)})
    assert "following MatMul" in result.lines[0]


def test_pooling_that_reads_the_channels_or_sums_unknown_counts_is_refused():
    nodes, inits = _tokens_bn("r")
    base = [helper.make_node("Relu", ["x"], ["r"], name="relu"), *nodes]
    inits.append(const("w", rng.standard_normal((5, 3)).astype(np.float32)))
    over_channels = make_model(
        base
        + [
            helper.make_node("ReduceMean", ["yn"], ["p"], name="pool", axes=[2], keepdims=0),
            helper.make_node("MatMul", ["p", "w"], ["z"], name="head"),
        ],
        [tensor("x", shape=(2, 5, 8))],
        [tensor("z", shape=(2, 3))],
        inits,
    )
    assert "ReduceMean pool reduces the channel axis" in refusal(over_channels)
    inits[-1] = const("w", rng.standard_normal((8, 3)).astype(np.float32))
    unknown = make_model(
        base
        + [
            helper.make_node("ReduceSum", ["yn", "axes"], ["p"], name="pool", keepdims=0),
            helper.make_node("MatMul", ["p", "w"], ["z"], name="head"),
        ],
        [tensor("x", shape=(2, "tokens", 8))],
        [tensor("z", shape=(2, 3))],
        inits + [const("axes", np.array([1], np.int64))],
        opset=18,
    )
    assert "ReduceSum pool sums dims of unknown size" in refusal(unknown)


def _linear_bn1d(flatten: bool, bias: bool, mix: bool = False):
    """LeViT's Linear + BatchNorm1d: [B, N, C] @ W (+ b) -> [B*N, C] -> BN -> [B, N, C].
    `mix`: the reshape folds channels into tokens ([B, N*C/2, 2]) instead."""
    c, n = 6, 5
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    inits = [const("w", rng.standard_normal((c, c)).astype(np.float32))]
    if bias:
        nodes.append(helper.make_node("Add", ["h", "bias"], ["hb"]))
        inits.append(const("bias", rng.standard_normal(c).astype(np.float32)))
    h = "hb" if bias else "h"
    flat, channels = (2 * n * c // 2, 2) if mix else (2 * n, c)
    if flatten and not mix:
        nodes.append(helper.make_node("Flatten", [h], ["flat"], axis=2))  # [B*N, C]
    else:
        inits.append(const("to2", np.array([flat, channels], np.int64)))
        nodes.append(helper.make_node("Reshape", [h, "to2"], ["flat"]))
    node, bn_inits = bn("bn", "flat", "normed", channels)
    inits += [*bn_inits, const("back", np.array([2, n, c], np.int64))]
    nodes += [node, helper.make_node("Reshape", ["normed", "back"], ["y"])]
    model = make_model(nodes, [tensor("x", shape=(2, n, c))], [tensor("y", shape=(2, n, c))], inits)
    return model, {"x": rng.standard_normal((2, n, c)).astype(np.float32)}


@pytest.mark.parametrize("flatten", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_then_reshape_then_batchnorm1d_folds(flatten, bias):
    """Found from outside: LeViT's Linear -> Flatten -> BatchNorm1d -> Reshape was refused
    "not produced by Conv/ConvTranspose/Gemm/MatMul (by Flatten)" (13 of its 14 BNs stayed).
    The fold traces the channel axis back through reshapes that keep each channel vector whole
    and last."""
    model, feeds = _linear_bn1d(flatten, bias)
    result, ir_model = run_fold(model, feeds)
    assert not any(n.op_type == "BatchNormalization" for n in ir_model.graph)


def test_a_reshape_that_splits_the_channel_vectors_stops_the_fold():
    model, _ = _linear_bn1d(flatten=False, bias=True, mix=True)
    assert "cannot tell where the hidden axis goes through Reshape" in refusal(model)


@pytest.mark.parametrize("name", ["levit-ts17", "levit-dyn18"])
def test_timm_levit_folds_every_batchnorm(corpus, tmp_path, name):
    """Found from outside: LeViT's Linear -> Flatten -> BatchNorm1d -> Reshape was refused "not
    produced by Conv/ConvTranspose/Gemm/MatMul (by Flatten)" (13 of 14 BNs stayed); the dynamo
    export's head BN, after the mean pooling, is read through an Identity. All 52 fold now, each
    into the MatMul/Gemm beside it, equal to the export's reference."""
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(paths.model, out, checks=VerifyOptions(inputs=paths.load_inputs()))
    ops = collections.Counter(n.op_type for n in onnx.load(out).graph.node)
    assert ops["BatchNormalization"] == 0 and report.verification.ok
    assert_matches_reference(out, paths)


# ------------------------------------------------------------------------------ EvoNorms

EVONORM_EXPORTS = sorted(
    n
    for n, e in CORPUS.items()
    if e.family in ("evonorms", "regnetzevos", "resnetv2evos", "resnetv2evob")
)


@pytest.mark.parametrize("name", EVONORM_EXPORTS)
def test_evonorm_models_fold_their_affines_and_stay_equal(corpus, tmp_path, name):
    """timm's EvoNorm layers: each trailing `* gamma + beta` followed by a Conv that can take it
    is folded (the rest say why), equal to the reference; the EvoNorms are still found after."""
    paths = corpus(name)
    model = io.load(paths.model)
    annotate(model)
    evos = [m for m in find_norms(model.graph) if m.kind == "evonorm"]
    result = FoldAffineNorms().run(model)
    folded = [c for c in result.changes if c.what.startswith("evonorm affine into following ")]
    refused = [r for r in result.refusals if r.candidate.startswith("evonorm ")]
    assert folded and len(folded) + len(refused) == len(evos)
    assert all(
        "cannot fold before (it follows the EvoNorm's division)" in r.reason for r in refused
    )
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    assert_matches_reference(out, paths)
    after = [m for m in find_norms(io.load(out).graph) if m.kind == "evonorm"]
    assert [m.detail for m in after] == [m.detail for m in evos]
    assert sum(m.scale is None for m in after) == len(folded)


@pytest.mark.parametrize("variant", ["S0", "S0a", "S1", "S2", "B0", "B1", "B2"])
def test_an_evonorm_affine_folds_into_a_following_1x1_conv(variant):
    model, _ = build(Evo(variant))
    x = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    result, out = run_fold(model, {"x": x})  # equal in onnxruntime
    assert [c.what for c in result.changes] == ["evonorm affine into following Conv"]
    assert not [n for n in out.graph if n.name in ("qg", "evo")]


@pytest.mark.parametrize(
    "follow, reason",
    [
        ("conv3x3", "zero-pads its input: the shift c would reach border outputs only partly"),
        ("add", "read by Add y, not by Conv/MatMul/Gemm"),
    ],
)
def test_an_evonorm_affine_that_cannot_fold_says_why(follow, reason):
    model, _ = build(Evo("S0", follow=follow))
    x = rng.standard_normal((2, 8, 4, 4)).astype(np.float32)
    result, _ = run_fold(model, {"x": x}, expect_modified=False)
    (refusal,) = result.refusals
    assert refusal.candidate.startswith("evonorm S0 at ")
    assert "cannot fold before (it follows the EvoNorm's division)" in refusal.reason
    assert reason in refusal.reason


@pytest.mark.parametrize(
    "data_format, into", [("channels_last", "MatMul"), ("channels_first", "Conv")]
)
@pytest.mark.parametrize("variant", ["S0", "B0"])
def test_the_tensorflow_forms_affine_folds_along_its_layout_s_channels(variant, data_format, into):
    model, _ = build_tf(variant, data_format)
    shape = (2, 4, 4, 8) if data_format == "channels_last" else (2, 8, 4, 4)
    result, _ = run_fold(model, {"x": rng.standard_normal(shape).astype(np.float32)})
    assert [c.what for c in result.changes] == [f"evonorm affine into following {into}"]


@pytest.mark.parametrize("name", ["evonorms-ts17", "evonorms-dyn18", "resnetv2evob-dyn18"])
def test_evonorm_models_in_float16_stay_as_close_to_float32_as_the_original(corpus, tmp_path, name):
    """onnxruntime's float16 converter (float32 inputs and outputs, float16 inside, as mixed
    precision models ship): the EvoNorms are still found, the rewrite applies and its error
    against the float32 reference stays within the fp16 original's own (x 1.5)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    paths = corpus(name)
    src, out = tmp_path / "fp16.onnx", tmp_path / "out.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(paths.model)), keep_io_types=True), str(src))
    # the converter computes Max in float32: Casts around it and its operands (B variants)
    count = 15 if name.startswith("resnetv2evob") else 8
    assert sum(m.kind == "evonorm" for m in find_norms(io.load(src).graph)) == count
    inputs = paths.load_inputs()
    report = rewrite_file(src, out, checks=VerifyOptions(inputs=inputs))
    assert report.written and report.verification.ok
    modified = {p.name for p in report.passes if p.modified}
    assert {"fold-affine-norms", "simplify-evonorm"} <= modified
    reference = paths.load_reference()
    for key, want in reference.items():
        scale = np.abs(want).max()
        own = np.abs(ort_run(onnx.load(str(src)), inputs)[key] - want).max() / scale
        got = np.abs(ort_run(onnx.load(str(out)), inputs)[key] - want).max() / scale
        assert got <= 1.5 * own + 1e-4, (got, own)
