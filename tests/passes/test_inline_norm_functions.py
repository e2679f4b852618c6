"""inline-norm-functions: a LayerNorm exported as a model-local function is inlined and then
converted; a function without a norm is left as it is, with the reason."""

import numpy as np
import onnx
import pytest
from onnx import helper

import normopt
from tests.helpers import const, tensor

rng = np.random.default_rng(3)
D = 6


def _with_functions() -> onnx.ModelProto:
    """A Pre-LN block whose two LayerNorms are calls of a local function `mods.LayerNorm`
    (export_modules_as_functions), and whose branch activation is a call of `mods.Act`."""
    ln = helper.make_function(
        "mods",
        "LayerNorm",
        ["x", "g", "b"],
        ["y"],
        [helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], axis=-1)],
        [helper.make_opsetid("", 17)],
    )
    act = helper.make_function(
        "mods",
        "Act",
        ["x"],
        ["y"],
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_opsetid("", 17)],
    )
    n = helper.make_node
    nodes = [
        n("MatMul", ["x", "w_in"], ["h"]),
        n("LayerNorm", ["h", "g", "b"], ["a"], domain="mods", name="ln1"),
        n("MatMul", ["a", "w1"], ["m"]),
        n("Act", ["m"], ["r"], domain="mods", name="act"),
        n("MatMul", ["r", "w2"], ["branch"]),
        n("Add", ["h", "branch"], ["h2"]),
        n("LayerNorm", ["h2", "g", "b"], ["y0"], domain="mods", name="ln_f"),
        n("MatMul", ["y0", "head"], ["y"]),
    ]
    inits = [
        const("w_in", rng.standard_normal((3, D)).astype(np.float32)),
        const("w1", rng.standard_normal((D, D)).astype(np.float32)),
        const("w2", rng.standard_normal((D, D)).astype(np.float32)),
        const("head", rng.standard_normal((D, 2)).astype(np.float32)),
        const("g", (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)),
        const("b", (0.2 * rng.standard_normal(D)).astype(np.float32)),
    ]
    graph = helper.make_graph(
        nodes, "g", [tensor("x", shape=(2, 4, 3))], [tensor("y", shape=(2, 4, 2))], inits
    )
    model = helper.make_model(
        graph,
        functions=[ln, act],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("mods", 1)],
        ir_version=8,
    )
    onnx.checker.check_model(model)
    return model


def test_a_layernorm_in_a_local_function_is_inlined_and_converted(tmp_path):
    src = tmp_path / "f.onnx"
    onnx.save(_with_functions(), src)
    out, report = normopt.rewrite(src, tmp_path / "o.onnx")
    assert report.written and report.verification.ok
    results = {p.name: p for p in report.passes}
    inlined = results["inline-norm-functions"]
    assert inlined.lines == ["inlined 2 call(s) of model-local functions holding a norm"]
    assert [(r.candidate, r.reason) for r in inlined.refusals] == [
        ("function mods::Act", "holds no norm: left as it is")
    ]
    assert results["preln-to-rmsnorm"].stats["converted"] == 2
    written = onnx.load(out)
    assert [f.name for f in written.functions] == ["Act"]  # kept as it was
    assert "LayerNorm" not in {n.op_type for n in written.graph.node}


def test_a_model_without_functions_is_idle(tmp_path):
    from tests.helpers import mlp, save

    _, report = normopt.rewrite(save(mlp(), tmp_path / "m.onnx"), tmp_path / "o.onnx")
    inlined = next(p for p in report.passes if p.name == "inline-norm-functions")
    assert not inlined.modified and inlined.refusals[0].reason == "no model-local function"


@pytest.mark.slow
def test_a_torchscript_export_with_layernorm_functions_converts_and_stays_equal(tmp_path):
    """The hand-written Pre-LN model exported with `export_modules_as_functions={LayerNorm}`:
    its five LayerNorms are function calls; inlined, all convert, and the rewrite equals torch
    on the export's inputs."""
    import torch

    from models.common import export, randomize_norms_and_biases
    from models.corpus import CORPUS
    from normopt.sessions import run_ort

    built = CORPUS["preln-ts17"].builder()()
    randomize_norms_and_biases(built.module, seed=1)
    built.functions = (torch.nn.LayerNorm,)
    src = tmp_path / "fn.onnx"
    export(built, src, exporter="ts", opset=17)
    assert [f.name for f in onnx.load(src).functions] == ["LayerNorm"]
    feeds = {k: v.numpy() for k, v in built.inputs.items()}
    out, report = normopt.rewrite(src, tmp_path / "out.onnx", inputs=feeds)
    results = {p.name: p for p in report.passes}
    assert results["inline-norm-functions"].modified
    assert results["preln-to-rmsnorm"].stats["converted"] == 5
    with torch.no_grad():
        want = built.module(*built.inputs.values()).numpy()
    got = run_ort(out, feeds)[built.outputs[0]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
