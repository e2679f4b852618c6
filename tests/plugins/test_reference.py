"""The plugins' CPU references: the lowered graphs (what verification runs) against the numpy
references, and the Triton kernels (under the interpreter on CPU) against the lowered graphs
on the same inputs: the kernels, the graph's decomposed CRMSNorm and numpy agree."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

from normopt import lowering
from normopt.plugins import reference
from normopt.plugins.spec import ADD_RMS_NORM, CRMS_NORM, DOMAIN, PLUGINS, RMS_NORM
from tests.helpers import IR_VERSION, ort_run, tensor

NP = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
TOL = {TensorProto.FLOAT: 1e-6, TensorProto.FLOAT16: 1e-3}


def plugin_model(spec, shape, dtype, eps=1e-5, opset=17):
    """One plugin node over inputs named as its spec (weight an input too), lowered."""
    inputs = [tensor(n, dtype, shape if n != "weight" else shape[-1:]) for n in spec.inputs]
    node = helper.make_node(
        spec.op_type,
        list(spec.inputs),
        list(spec.outputs),
        name="plugin",
        domain=DOMAIN,
        **spec.attributes(eps),
    )
    graph = helper.make_graph([node], "g", inputs, [tensor(n, dtype, shape) for n in spec.outputs])
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        ir_version=IR_VERSION,
    )
    ir_model = ir.serde.deserialize_model(model)
    assert lowering.lower(ir_model) == 1
    return ir.serde.serialize_model(ir_model)


def feeds_for(spec, shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    out = {
        n: (
            rng.standard_normal(shape if n != "weight" else shape[-1:])
            * (1 if n != "weight" else 0.3)
            + (1 if n == "weight" else 0)
        ).astype(NP[dtype])
        for n in spec.inputs
    }
    return out


def numpy_reference(spec, feeds, eps=1e-5):
    if spec is RMS_NORM:
        return [reference.rms_norm(feeds["x"], feeds["weight"], eps)]
    if spec is CRMS_NORM:
        return [reference.crms_norm(feeds["x"], feeds["weight"], eps)]
    return list(reference.add_rms_norm(feeds["x"], feeds["residual"], feeds["weight"], eps))


@pytest.mark.parametrize("opset", [13, 17, 18])
@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
@pytest.mark.parametrize("op_type", sorted(PLUGINS))
def test_lowered_plugins_compute_their_numpy_reference(op_type, dtype, opset):
    spec, shape = PLUGINS[op_type], (2, 3, 17)
    feeds = feeds_for(spec, shape, dtype)
    got = ort_run(plugin_model(spec, shape, dtype, opset=opset), feeds)
    for name, want in zip(spec.outputs, numpy_reference(spec, feeds)):
        assert got[name].dtype == want.dtype
        np.testing.assert_allclose(
            got[name].astype(np.float64),
            want.astype(np.float64),
            rtol=TOL[dtype],
            atol=TOL[dtype] * np.abs(want).max(),
        )


def test_crms_norm_is_rms_norm_of_the_full_zero_mean_vector():
    rng = np.random.default_rng(1)
    full = rng.standard_normal((4, 9))
    full -= full.mean(-1, keepdims=True)
    w = rng.standard_normal(9)
    np.testing.assert_allclose(
        reference.crms_norm(full[:, :-1], w[:-1], 1e-5),
        reference.rms_norm(full, w, 1e-5)[:, :-1],
        rtol=1e-12,
    )


@pytest.mark.parametrize("op_type", sorted(PLUGINS))
def test_triton_kernels_agree_with_the_lowered_graphs(op_type):
    """The same inputs through the Triton kernel (interpreter on CPU) and through the graph
    verification runs (decomposed ONNX ops): the CRMSNorm kernel and the decomposed CRMSNorm
    agree."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from normopt.plugins.kernels import norms

    spec, shape = PLUGINS[op_type], (3, 767)
    feeds = feeds_for(spec, shape, TensorProto.FLOAT, seed=2)
    graph = ort_run(plugin_model(spec, shape, TensorProto.FLOAT, eps=1e-6), feeds)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}
    kernel = getattr(norms, spec.kernel.removesuffix("_kernel"))
    if spec is ADD_RMS_NORM:
        got = kernel(args["x"], args["residual"], args["weight"], 1e-6)
    else:
        got = (kernel(args["x"], args["weight"], 1e-6),)
    for name, value in zip(spec.outputs, got):
        np.testing.assert_allclose(
            value.cpu().numpy(), graph[name], rtol=2e-5, atol=2e-5 * np.abs(graph[name]).max()
        )
