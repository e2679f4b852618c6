"""convbn-tune: each block form equals the original as a function of the BN parameters (not
only at their values, which a deploy fold also does), and every precondition is refused with
its reason."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models.corpus import CORPUS
from normopt import files
from normopt.passes.base import Options
from normopt.passes.convbn_tune import ConvBNTune
from normopt.passes.fold_affine_norms import FoldAffineNorms
from normopt.rewriter import io
from tests.helpers import annotate, const, make_model, ort_run, run_pass, tensor

rng = np.random.default_rng(0)
BN_EXPORTS = sorted(n for n, e in CORPUS.items() if e.family in ("resnet18", "mobilenetv2"))
PARAMS = ("g", "b", "m", "v")  # gamma, beta, mean, var, as the hand-built BNs name them


def bn_inits(name: str, c: int, dtype=np.float32) -> list[onnx.TensorProto]:
    return [
        const(f"{name}_g", rng.uniform(0.5, 1.5, c).astype(dtype)),
        const(f"{name}_b", rng.standard_normal(c).astype(dtype)),
        const(f"{name}_m", rng.standard_normal(c).astype(dtype)),
        const(f"{name}_v", rng.uniform(0.5, 1.5, c).astype(dtype)),
    ]


def bn_node(name: str, inp: str, out: str, **attrs) -> onnx.NodeProto:
    return helper.make_node(
        "BatchNormalization", [inp, *(f"{name}_{k}" for k in PARAMS)], [out], name=name, **attrs
    )


def conv_bn(bias=True, dtype=np.float32, transpose=False, group=1, pads=(1, 1, 1, 1)):
    t = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    op = "ConvTranspose" if transpose else "Conv"
    w_shape = (4, 6 // group, 3, 3) if transpose else (6, 4 // group, 3, 3)
    inits = [const("w", rng.standard_normal(w_shape).astype(dtype)), *bn_inits("bn", 6, dtype)]
    if bias:
        inits.append(const("cb", rng.standard_normal(6).astype(dtype)))
    conv = helper.make_node(
        op, ["x", "w", *(["cb"] if bias else [])], ["c"], name="conv", pads=list(pads), group=group
    )
    out_hw = 8 + 2 - 2 * pads[0] if transpose else 8 + pads[0] + pads[2] - 2
    return make_model(
        [conv, bn_node("bn", "c", "y")],
        [tensor("x", t, (2, 4, 8, 8))],
        [tensor("y", t, (2, 6, out_hw, out_hw))],
        inits,
    ), {"x": rng.standard_normal((2, 4, 8, 8)).astype(dtype)}


def gemm_bn(trans_b: int, beta: float = 1.0, bias=True):
    w = rng.standard_normal((5, 6) if not trans_b else (6, 5)).astype(np.float32)
    inits = [const("w", w), *bn_inits("bn", 6)] + (
        [const("cb", rng.standard_normal(6).astype(np.float32))] if bias else []
    )
    nodes = [
        helper.make_node(
            "Gemm",
            ["x", "w", *(["cb"] if bias else [])],
            ["c"],
            name="gemm",
            transB=trans_b,
            beta=beta,
            alpha=0.7,
        ),
        bn_node("bn", "c", "y"),
    ]
    return make_model(nodes, [tensor("x", shape=(3, 5))], [tensor("y", shape=(3, 6))], inits), {
        "x": rng.standard_normal((3, 5)).astype(np.float32)
    }


def matmul_token_bn(bias=True):
    """[B, N, C] tokens: MatMul (+ bias Add) -> Transpose -> BatchNorm over C -> Transpose."""
    inits = [
        const("w", rng.standard_normal((5, 6)).astype(np.float32)),
        *bn_inits("bn", 6),
        const("cb", rng.standard_normal(6).astype(np.float32)),
    ]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["c0"], name="mm")]
    nodes += [helper.make_node("Add", ["c0", "cb"], ["c"], name="bias")] if bias else []
    nodes += [
        helper.make_node("Transpose", ["c" if bias else "c0"], ["ct"], perm=[0, 2, 1], name="t1"),
        bn_node("bn", "ct", "yt"),
        helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 1], name="t2"),
    ]
    inits = inits if bias else inits[:-1]
    return make_model(
        nodes, [tensor("x", shape=(2, 7, 5))], [tensor("y", shape=(2, 7, 6))], inits
    ), {"x": rng.standard_normal((2, 7, 5)).astype(np.float32)}


def tune(model: onnx.ModelProto, tune_params: str = "constants", expect_modified: bool = True):
    return run_pass(ConvBNTune(Options(tune_params=tune_params)), model, expect_modified)


def replaced(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with these initializers given new values (same names)."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    for init in out.graph.initializer:
        if init.name in values:
            init.CopyFrom(numpy_helper.from_array(values[init.name], init.name))
    return out


def new_bn_values(model: onnx.ModelProto, name: str = "bn") -> dict[str, np.ndarray]:
    """Random new gamma, beta, mean and var (var > 0) for BN `name`, in its dtype."""
    dtype = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == f"{name}_g")
    ).dtype
    c = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == f"{name}_g")
    ).size
    return {
        f"{name}_g": rng.uniform(-2, 2, c).astype(dtype),
        f"{name}_b": rng.standard_normal(c).astype(dtype),
        f"{name}_m": rng.standard_normal(c).astype(dtype),
        f"{name}_v": rng.uniform(0.1, 3, c).astype(dtype),
    }


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    for k in a:
        scale = float(np.max(np.abs(a[k].astype(np.float64)))) or 1.0
        np.testing.assert_allclose(
            b[k].astype(np.float64), a[k].astype(np.float64), rtol=0, atol=tol * scale
        )


CASES = {
    "conv+bias": lambda: conv_bn(),
    "conv": lambda: conv_bn(bias=False),
    "grouped conv": lambda: conv_bn(group=2),
    "conv transpose": lambda: conv_bn(transpose=True, pads=(0, 0, 0, 0)),
    "gemm": lambda: gemm_bn(0),
    "gemm transB beta": lambda: gemm_bn(1, beta=0.5),
    "gemm no bias": lambda: gemm_bn(1, bias=False),
    "token bn": lambda: matmul_token_bn(),
    "token bn, no bias": lambda: matmul_token_bn(bias=False),
}


@pytest.mark.parametrize("case", CASES)
def test_tune_mode_equals_the_original_as_a_function_of_the_bn_parameters(case):
    model, feeds = CASES[case]()
    result, tuned = tune(model)
    assert "BatchNormalization" not in [n.op_type for n in tuned.graph.node]
    names = {i.name for i in tuned.graph.initializer}
    assert {f"bn_{k}" for k in PARAMS} <= names and "w" in names  # the original names survive ...
    for init in model.graph.initializer:  # ... with their values
        np.testing.assert_array_equal(
            numpy_helper.to_array(next(i for i in tuned.graph.initializer if i.name == init.name)),
            numpy_helper.to_array(init),
        )
    assert_close(ort_run(model, feeds), ort_run(tuned, feeds))
    for _ in range(3):  # new parameters in both: still equal (a deploy fold fails here, below)
        values = new_bn_values(model)
        assert_close(
            ort_run(replaced(model, values), feeds), ort_run(replaced(tuned, values), feeds)
        )
    assert result.changes[0].kind == "tuned" and "bn" in result.changes[0].nodes


def test_a_deploy_fold_agrees_only_at_the_current_values():
    model, feeds = conv_bn()
    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    assert FoldAffineNorms().run(ir_model).modified
    folded = ir.serde.serialize_model(ir_model)
    assert_close(ort_run(model, feeds), ort_run(folded, feeds))
    values = new_bn_values(model)
    with pytest.raises(AssertionError):  # the parameter-replacement test is what tells them apart
        assert_close(
            ort_run(replaced(model, values), feeds), ort_run(replaced(folded, values), feeds)
        )


def test_the_sensitivity_to_a_parameter_is_the_same():
    model, feeds = conv_bn()
    _, tuned = tune(model)
    gamma = numpy_helper.to_array(
        next(i for i in model.graph.initializer if i.name == "bn_g")
    ).astype(np.float64)
    h = 1e-2

    def derivative(m: onnx.ModelProto) -> np.ndarray:
        up, down = gamma.copy(), gamma.copy()
        up[0], down[0] = up[0] + h, down[0] - h
        run = [
            ort_run(replaced(m, {"bn_g": g.astype(np.float32)}), feeds)["y"].astype(np.float64)
            for g in (up, down)
        ]
        return (run[0] - run[1]) / (2 * h)

    expected = derivative(model)
    assert np.abs(expected).max() > 0.1  # gamma[0] moves channel 0
    np.testing.assert_allclose(derivative(tuned), expected, atol=1e-3 * np.abs(expected).max())


def test_parameters_as_graph_inputs_run_fed_and_unfed():
    model, feeds = conv_bn()
    result, tuned = tune(model, "inputs")
    inputs = [i.name for i in tuned.graph.input]
    assert inputs == ["x", *(f"bn_{k}" for k in PARAMS)] and "w" not in inputs
    assert_close(ort_run(model, feeds), ort_run(tuned, feeds))  # the defaults
    values = new_bn_values(model)
    assert_close(ort_run(replaced(model, values), feeds), ort_run(tuned, {**feeds, **values}))
    _, everything = tune(model, "inputs:all")
    assert {"w", "cb"} <= {i.name for i in everything.graph.input}
    w = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    assert_close(ort_run(replaced(model, {"w": w}), feeds), ort_run(everything, {**feeds, "w": w}))


def test_float16_weights_are_computed_in_float32():
    model, feeds = conv_bn(dtype=np.float16)
    _, tuned = tune(model)
    casts = [n for n in tuned.graph.node if n.op_type == "Cast"]
    assert {a.i for n in casts for a in n.attribute} == {TensorProto.FLOAT, TensorProto.FLOAT16}
    reference = ort_run(model, feeds)["y"].astype(np.float64)
    exact = ort_run(conv_bn_wide(model), {"x": feeds["x"].astype(np.float32)})["y"].astype(
        np.float64
    )
    error = np.abs(ort_run(tuned, feeds)["y"].astype(np.float64) - exact).max()
    assert error <= 2 * np.abs(reference - exact).max()  # no worse than the fp16 original


def conv_bn_wide(model: onnx.ModelProto) -> onnx.ModelProto:
    """The float16 model in float32 (its reference)."""
    wide = onnx.ModelProto.FromString(model.SerializeToString())
    for init in wide.graph.initializer:
        init.CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)
        )
    for value in (*wide.graph.input, *wide.graph.output):
        value.type.tensor_type.elem_type = TensorProto.FLOAT
    return wide


# ------------------------------------------------------------------------ refusals


def refusal(model: onnx.ModelProto, tune_params: str = "constants") -> str:
    result, _ = tune(model, tune_params, expect_modified=False)
    return result.refusals[0].reason


def test_a_bn_after_a_nonlinear_op_is_refused():
    model, _ = conv_bn()
    model.graph.node.insert(1, helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.node[2].input[0] = "r"
    assert "not produced by" in refusal(model) and "Relu" in refusal(model)


def test_a_conv_output_read_twice_is_refused():
    model, _ = conv_bn()
    model.graph.node.append(helper.make_node("Relu", ["c"], ["r"], name="relu"))
    model.graph.output.append(tensor("r", shape=(2, 6, 8, 8)))
    assert "'c' has 2 readers" in refusal(model)


def test_repbn_and_training_mode_are_refused():
    model, _ = conv_bn()
    model.graph.node[1].attribute.append(helper.make_attribute("training_mode", 1))
    model.graph.node[1].output.extend(["running_mean", "running_var"])
    model.opset_import[0].version = 15
    assert "training mode" in refusal(model)
    model, _ = conv_bn()  # SLAB's RepBN: BN(c) + alpha * c
    model.graph.node[1].output[0] = "n"
    model.graph.initializer.append(const("alpha", np.array(0.3, np.float32)))
    model.graph.node.extend(
        [
            helper.make_node("Mul", ["c", "alpha"], ["ac"], name="scaled"),
            helper.make_node("Add", ["n", "ac"], ["y"], name="repbn"),
        ]
    )
    assert refusal(model).startswith("it is SLAB's RepBN")


def test_grouped_conv_transpose_is_refused():
    model, _ = conv_bn(transpose=True, group=2, pads=(0, 0, 0, 0))
    assert "ConvTranspose conv has groups" in refusal(model)


def test_a_computed_parameter_cannot_become_an_input():
    model, _ = conv_bn()
    gamma = next(i for i in model.graph.initializer if i.name == "bn_g")
    model.graph.initializer.remove(gamma)
    model.graph.node.insert(
        0, helper.make_node("Constant", [], ["bn_g"], value=gamma, name="gamma_constant")
    )
    assert (
        refusal(model, "inputs")
        == "bn_g not initializers: they cannot become graph inputs (--tune-params inputs)"
    )
    tune(model)  # as constants it tunes


# ------------------------------------------------------------------------ real exports


@pytest.mark.parametrize("tune_params", ["constants", "inputs"])
@pytest.mark.parametrize("name", BN_EXPORTS)
def test_every_bn_the_fold_removes_is_tuned_in_the_exports(corpus, tmp_path, name, tune_params):
    paths = corpus(name)
    proto = onnx.load(paths.model)
    bns = [n for n in proto.graph.node if n.op_type == "BatchNormalization"]
    model = io.load(paths.model)
    annotate(model)
    result = ConvBNTune(Options(tune_params=tune_params)).run(model)
    assert result.modified and not result.refusals
    assert len([c for c in result.changes if c.kind == "tuned"]) == len(bns)
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    tuned = onnx.load(out)
    assert "BatchNormalization" not in [n.op_type for n in tuned.graph.node]
    kept = {i.name for i in tuned.graph.initializer}
    assert {v for n in bns for v in n.input[1:5]} <= kept  # every BN parameter by its name
    feeds = paths.load_inputs()
    assert_close(paths.load_reference(), ort_run(tuned, feeds))
    first = bns[0]
    c = numpy_helper.to_array(
        next(i for i in proto.graph.initializer if i.name == first.input[1])
    ).size
    values = {
        first.input[1]: rng.uniform(-2, 2, c).astype(np.float32),
        first.input[2]: rng.standard_normal(c).astype(np.float32),
        first.input[3]: rng.standard_normal(c).astype(np.float32),
        first.input[4]: rng.uniform(0.1, 3, c).astype(np.float32),
    }
    assert_close(ort_run(replaced(proto, values), feeds), ort_run(replaced(tuned, values), feeds))
    if tune_params == "inputs":  # fed instead of replaced: the same
        assert {i.name for i in tuned.graph.input} >= set(values)
        assert_close(ort_run(replaced(proto, values), feeds), ort_run(tuned, {**feeds, **values}))


def test_a_second_batchnorm_after_a_tuned_op_stays_and_a_second_run_changes_nothing():
    model, feeds = conv_bn()
    model.graph.node[1].output[0] = "y1"
    model.graph.initializer.extend(bn_inits("bn2", 6))
    model.graph.node.append(bn_node("bn2", "y1", "y"))
    _, tuned = tune(model)
    assert [n.op_type for n in tuned.graph.node].count("BatchNormalization") == 1
    result, again = tune(tuned, expect_modified=False)
    assert "already computes its weight from BatchNorm 'bn'" in result.refusals[0].reason
    assert_close(ort_run(model, feeds), ort_run(again, feeds))
