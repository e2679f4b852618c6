"""fold-norm-affine: gamma and beta move into every linear reader exactly; each precondition is
refused with its reason; real exports stay equal to their reference."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.corpus import CORPUS

# ort_ops: the checker must know SimplifiedLayerNormalization
from normopt import files
from normopt.passes.fold_norm_affine import FoldNormAffine
from normopt.rewriter import io, ort_ops  # noqa: F401
from normopt.rewriter.norms import find_norms
from tests.helpers import (
    annotate,
    assert_matches_reference,
    const,
    make_model,
    ort_run,
    run_pass,
    tensor,
)

rng = np.random.default_rng(0)
D = 8
EXPORTS = sorted(
    n
    for n, e in CORPUS.items()
    if e.family in ("gpt2", "vit", "opt", "gptneox", "bloom", "clip", "preln")
    and n.endswith(("ts17", "dyn18"))
)


def norm_to_readers(
    op="LayerNormalization", opset=17, bias=True, readers=("q", "k", "gemm"), axis=-1
):
    """x [6, D] -> norm -> MatMul q (+ bias Add), MatMul k, Gemm (transB, alpha, beta, C)."""
    inits = [const("g", (1 + 0.3 * rng.standard_normal(D)).astype(np.float32))]
    inputs = ["x", "g"]
    if bias:
        inits.append(const("b", rng.standard_normal(D).astype(np.float32)))
        inputs.append("b")
    attrs = (
        {"axis": axis, "epsilon": 1e-5}
        if op != "SimplifiedLayerNormalization"
        else {"axis": -1, "epsilon": 1e-5}
    )
    nodes = [helper.make_node(op, inputs, ["n"], name="norm", **attrs)]
    outputs = []
    for r in readers:
        inits.append(const(f"w_{r}", rng.standard_normal((D, 5)).astype(np.float32)))
        if r == "q":
            inits.append(const("bq", rng.standard_normal(5).astype(np.float32)))
            nodes += [
                helper.make_node("MatMul", ["n", "w_q"], ["mq"], name="mm_q"),
                helper.make_node("Add", ["mq", "bq"], ["q"], name="add_q"),
            ]
        elif r == "k":
            nodes.append(helper.make_node("MatMul", ["n", "w_k"], ["k"], name="mm_k"))
        elif r == "gemm":
            inits[-1] = const("w_gemm", rng.standard_normal((5, D)).astype(np.float32))
            inits.append(const("c", rng.standard_normal(5).astype(np.float32)))
            nodes.append(
                helper.make_node(
                    "Gemm",
                    ["n", "w_gemm", "c"],
                    ["gemm"],
                    name="gemm",
                    transB=1,
                    alpha=0.5,
                    beta=2.0,
                )
            )
        else:
            nodes.append(helper.make_node(r, ["n"], [r.lower()], name=r.lower()))
        outputs.append(
            tensor(
                r if r in ("q", "k", "gemm") else r.lower(),
                shape=(6, 5 if r in ("q", "k", "gemm") else D),
            )
        )
    return make_model(nodes, [tensor("x", shape=(6, D))], outputs, inits, opset=opset), {
        "x": (rng.standard_normal((6, D)) * 2 + 0.5).astype(np.float32)
    }


def run(model: onnx.ModelProto, expect_modified: bool = True):
    return run_pass(FoldNormAffine(), model, expect_modified, full_check=False)


@pytest.mark.parametrize(
    "op,opset,bias",
    [
        ("LayerNormalization", 17, True),
        ("LayerNormalization", 17, False),
        ("RMSNormalization", 23, False),
        ("SimplifiedLayerNormalization", 17, False),
    ],
)
def test_every_reader_takes_the_affine_and_the_norm_is_left_affine_free(op, opset, bias):
    model, feeds = norm_to_readers(op, opset, bias)
    result, folded = run(model)
    onnx.checker.check_model(folded, full_check=op != "SimplifiedLayerNormalization")
    norm = next(n for n in folded.graph.node if n.name == "norm")
    scale = numpy_helper.to_array(
        next(i for i in folded.graph.initializer if i.name == norm.input[1])
    )
    assert np.all(scale == 1) and len(norm.input) == 2
    before, after = ort_run(model, feeds), ort_run(folded, feeds)
    for name in before:
        np.testing.assert_allclose(
            after[name], before[name], rtol=1e-5, atol=1e-5 * np.abs(before[name]).max()
        )
    assert result.changes[0].nodes == ("norm", "mm_q", "mm_k", "gemm")
    assert not run(folded, expect_modified=False)[0].modified  # a second run changes nothing


def test_a_beta_gives_a_bias_to_a_reader_that_had_none():
    model, feeds = norm_to_readers(readers=("k",))
    _, folded = run(model)
    assert [n.op_type for n in folded.graph.node] == ["LayerNormalization", "MatMul", "Add"]
    np.testing.assert_allclose(
        ort_run(folded, feeds)["k"], ort_run(model, feeds)["k"], rtol=1e-5, atol=1e-5
    )


def refusal(model: onnx.ModelProto) -> str:
    result, _ = run(model, expect_modified=False)
    return result.refusals[0].reason


def test_a_reader_that_is_not_linear_is_named():
    assert (
        refusal(norm_to_readers(readers=("q", "Relu"))[0])
        == "read by Relu relu, not by a MatMul or Gemm"
    )


def test_a_norm_output_that_is_a_graph_output_is_refused():
    model, _ = norm_to_readers(readers=("k",))
    model.graph.output.append(tensor("n", shape=(6, D)))
    assert refusal(model) == "its output 'n' is a graph output"


def test_a_shared_weight_is_refused():
    model, _ = norm_to_readers(readers=("k",))
    model.graph.node.append(helper.make_node("MatMul", ["x", "w_k"], ["other"], name="other"))
    model.graph.output.append(tensor("other", shape=(6, 5)))
    assert (
        refusal(model)
        == "MatMul mm_k's weight 'w_k' is shared with another node (folding would copy it)"
    )


def test_two_axes_decomposed_and_affine_free_norms_are_refused():
    model, _ = norm_to_readers(readers=("k",))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 6
    two_axes = make_model(
        [
            helper.make_node("LayerNormalization", ["x", "g"], ["n"], axis=-2, name="norm"),
            helper.make_node("MatMul", ["n", "w"], ["y"], name="mm"),
        ],
        [tensor("x", shape=(2, 3, D))],
        [tensor("y", shape=(2, 3, 5))],
        [const("g", np.ones((3, D), np.float32) * 2), const("w", np.ones((D, 5), np.float32))],
    )
    assert refusal(two_axes) == "it normalizes 2 axes, not the last one alone"
    plain = make_model(
        [
            helper.make_node("LayerNormalization", ["x", "g"], ["n"], name="norm"),
            helper.make_node("MatMul", ["n", "w"], ["y"], name="mm"),
        ],
        [tensor("x", shape=(6, D))],
        [tensor("y", shape=(6, 5))],
        [const("g", np.ones(D, np.float32)), const("w", np.ones((D, 5), np.float32))],
    )
    assert refusal(plain) == "already affine-free"
    mean = [
        helper.make_node("ReduceMean", ["x"], ["mu"], axes=[-1], name="mean"),
        helper.make_node("Sub", ["x", "mu"], ["d"], name="sub"),
        helper.make_node("Mul", ["d", "d"], ["sq"], name="sq"),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1], name="var"),
        helper.make_node("Add", ["var", "eps"], ["ve"], name="add_eps"),
        helper.make_node("Sqrt", ["ve"], ["std"], name="sqrt"),
        helper.make_node("Div", ["d", "std"], ["z"], name="div"),
        helper.make_node("Mul", ["z", "g"], ["n"], name="scale"),
        helper.make_node("MatMul", ["n", "w"], ["y"], name="mm"),
    ]
    decomposed = make_model(
        mean,
        [tensor("x", shape=(6, D))],
        [tensor("y", shape=(6, 5))],
        [
            const("eps", np.array(1e-5, np.float32)),
            const("g", np.full(D, 2, np.float32)),
            const("w", np.ones((D, 5), np.float32)),
        ],
        opset=17,
    )
    assert refusal(decomposed) == "a decomposed norm (canonicalize-norms fuses it first)"


@pytest.mark.parametrize("name", EXPORTS)
def test_real_exports_stay_equal(corpus, tmp_path, name):
    paths = corpus(name)
    model = io.load(paths.model)
    annotate(model)
    result = FoldNormAffine().run(model)
    assert result.modified, result.refusals
    affine_free = [
        m
        for m in find_norms(model.graph)
        if m.form == "op" and np.all(m.scale.const_value.numpy() == 1)
    ]
    assert len(affine_free) >= len(result.changes) >= 1
    for refusal in result.refusals:  # what stays has a reason a user can act on
        assert refusal.reason.startswith(
            ("read by", "its output", "a decomposed", "MatMul", "Gemm", "a Skip")
        )
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    assert_matches_reference(out, paths)


def test_float16_weights_keep_their_dtype():
    model, feeds = norm_to_readers(readers=("k",))
    for init in model.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        )
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    _, folded = run(model)
    assert {i.data_type for i in folded.graph.initializer} == {TensorProto.FLOAT16}
    half = {"x": feeds["x"].astype(np.float16)}
    np.testing.assert_allclose(
        ort_run(folded, half)["k"].astype(np.float32),
        ort_run(model, half)["k"].astype(np.float32),
        rtol=2e-2,
        atol=2e-2,
    )


def _through(carrier_nodes, carrier_inits, out_shape, reader_input="c"):
    """x [2, 3, D] -> LayerNorm -> carrier nodes (n -> c) -> MatMul."""
    inits = [
        const("g", (1 + 0.3 * rng.standard_normal(D)).astype(np.float32)),
        const("b", rng.standard_normal(D).astype(np.float32)),
        const("w", rng.standard_normal((D, 5)).astype(np.float32)),
        *carrier_inits,
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "g", "b"], ["n"], name="norm", axis=-1),
        *carrier_nodes,
        helper.make_node("MatMul", [reader_input, "w"], ["y"], name="mm"),
    ]
    return make_model(
        nodes, [tensor("x", shape=(2, 3, D))], [tensor("y", shape=out_shape)], inits
    ), {"x": rng.standard_normal((2, 3, D)).astype(np.float32)}


@pytest.mark.parametrize("pool", ["ReduceMean", "ReduceSum"])
def test_the_affine_reaches_a_head_through_pooling_over_tokens(pool):
    """Mean pooling carries beta as it is; a sum over 3 tokens carries 3 beta."""
    pooling = (
        helper.make_node(pool, ["n"], ["c"], name="pool", axes=[1], keepdims=0)
        if pool == "ReduceMean"
        else helper.make_node(pool, ["n", "axes"], ["c"], name="pool", keepdims=0)
    )  # opset 17 forms
    model, feeds = _through([pooling], [const("axes", np.array([1], np.int64))], (2, 5))
    result, folded = run(model)
    np.testing.assert_allclose(
        ort_run(folded, feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-5, atol=1e-5
    )


def test_the_affine_reaches_readers_through_carriers_that_keep_channels_together():
    flat = _through(
        [helper.make_node("Reshape", ["n", "to"], ["c"], name="flat")],
        [const("to", np.array([-1, D], np.int64))],
        (6, 5),
    )
    cls = _through(
        [helper.make_node("Gather", ["n", "zero"], ["c"], name="cls", axis=1)],
        [const("zero", np.array(0, np.int64))],
        (2, 5),
    )
    for model, feeds in (flat, cls):
        result, folded = run(model)
        np.testing.assert_allclose(
            ort_run(folded, feeds)["y"], ort_run(model, feeds)["y"], rtol=1e-5, atol=1e-5
        )
    split = _through(
        [helper.make_node("Reshape", ["n", "to"], ["c"], name="split")],
        [const("to", np.array([2, 3, 2, D // 2], np.int64))],
        (2, 3, 2, 5),
    )
    split[0].graph.initializer[2].CopyFrom(
        const("w", rng.standard_normal((D // 2, 5)).astype(np.float32))
    )
    assert refusal(split[0]) == "Reshape split does not keep the channel axis whole and last"
    channel = _through(
        [helper.make_node("Gather", ["n", "idx"], ["c"], name="pick", axis=2)],
        [const("idx", np.arange(D)[::-1].copy())],
        (2, 3, 5),
    )
    # a permutation of the channels
    assert refusal(channel[0]) == "Gather pick gathers along the channel axis"


def test_a_scale_that_is_not_constant_is_refused():
    model, _ = norm_to_readers(readers=("k",))
    gamma = next(i for i in model.graph.initializer if i.name == "g")
    model.graph.initializer.remove(gamma)
    model.graph.input.append(tensor("g", shape=(D,)))
    assert refusal(model) == "its scale or bias is not constant"
