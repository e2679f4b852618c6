"""--target tensorrt: norms as the targeted TensorRT imports them (native RMSNormalization from
10.15, normopt's plugins before, residual Add + RMSNorm fused, fp16 LayerNorms in fp32), every
corpus model verified on CPU through the plugins' float64 references."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from models.corpus import CORPUS
from normopt.passes.base import Options
from normopt.passes.tensorrt_norms import TensorRTNorms
from normopt.plugins.spec import ADD_RMS_NORM, DOMAIN, PLUGINS, RMS_NORM
from normopt.verification import VerifyOptions
from tests.helpers import const, make_model, rewrite_file, run_pass, tensor

rng = np.random.default_rng(0)


def _ops(path) -> collections.Counter:
    return collections.Counter(
        f"{n.domain}:{n.op_type}" if n.domain else n.op_type for n in onnx.load(path).graph.node
    )


def _plugin_attributes_are_complete(path) -> None:
    for node in onnx.load(path).graph.node:
        if node.domain == DOMAIN:
            spec = PLUGINS[node.op_type]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            expected = spec.attributes(attrs["epsilon"])
            assert attrs == {
                k: v.encode() if isinstance(v, str) else v for k, v in expected.items()
            }, node.name
            assert len(node.input) == len(spec.inputs) and len(node.output) == len(spec.outputs)


TENSORRT_CASES = [(name, "10.9") for name in sorted(CORPUS)]
TENSORRT_CASES += [
    (name, "11.4") for name in sorted(CORPUS) if CORPUS[name].opset >= 23
]  # native RMSNorm


@pytest.mark.parametrize(("name", "version"), TENSORRT_CASES)
def test_every_corpus_model_rewritten_for_tensorrt_verifies_on_cpu(corpus, tmp_path, name, version):
    """The gate stays on: the plugins run as their float64 references in onnxruntime. TensorRT
    10.9 has no RMSNormalization importer (plugins everywhere); 11.4 imports it (opset 23)."""
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model,
        out,
        options=Options(target="tensorrt", trt_version=version),
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    assert report.verification.ok
    ops = _ops(out)
    _plugin_attributes_are_complete(out)
    assert not ops["SimplifiedLayerNormalization"]
    if version == "10.9":
        assert not ops["RMSNormalization"]
    else:
        assert (
            not ops[f"{DOMAIN}:{RMS_NORM.op_type}"] and not ops[f"{DOMAIN}:{ADD_RMS_NORM.op_type}"]
        )


def test_llama_residual_adds_fuse_with_the_next_norm(corpus, tmp_path):
    """Llama (opset 18, decomposed RMSNorms): 5 norms, 4 of them read a residual Add of two
    [batch, tokens, d] values: 4 NormoptAddRMSNorm and the first norm's NormoptRMSNorm (it reads
    the embedding)."""
    paths = corpus("llama-dyn18")
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model,
        out,
        options=Options(target="tensorrt", trt_version="10.9"),
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    ops = _ops(out)
    assert ops[f"{DOMAIN}:{ADD_RMS_NORM.op_type}"] == 4 and ops[f"{DOMAIN}:{RMS_NORM.op_type}"] == 1
    assert next(p for p in report.passes if p.name == "tensorrt-norms").lines == [
        "fused 4 residual Add(s) + RMSNorm into NormoptAddRMSNorm"
    ]


def _rms_op(x_shape=(2, 3, 8), dtype=TensorProto.FLOAT, axis=-1, residual=False, r_shape=None):
    d = x_shape[-1] if axis == -1 else int(np.prod(x_shape[axis:]))
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    inputs = [tensor("x", dtype, x_shape)]
    nodes = []
    x = "x"
    if residual:
        inputs.append(tensor("r", dtype, r_shape or x_shape))
        nodes.append(helper.make_node("Add", ["x", "r"], ["s"], name="add"))
        x = "s"
    scale = const(
        "g",
        (1 + 0.2 * rng.standard_normal(x_shape[axis:] if axis != -1 else (d,))).astype(np_dtype),
    )
    nodes.append(
        helper.make_node("RMSNormalization", [x, "g"], ["y"], name="rms", axis=axis, epsilon=1e-5)
    )
    outputs = [tensor("y", dtype, x_shape)] + ([tensor("s", dtype, x_shape)] if residual else [])
    model = make_model(nodes, inputs, outputs, [scale], opset=23)
    feeds = {
        i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(
            np_dtype
        )
        for i in inputs
    }
    return model, feeds


def test_rmsnormalization_becomes_the_plugin_below_10_15_and_stays_from_there():
    model, _ = _rms_op()
    result, out = run_pass(TensorRTNorms(Options(target="tensorrt", trt_version="10.14")), model)
    assert [n.op_type for n in out.graph.node] == [RMS_NORM.op_type]
    assert {o.domain: o.version for o in out.opset_import}[DOMAIN] == 1
    result, _ = run_pass(
        TensorRTNorms(Options(target="tensorrt", trt_version="10.15")), model, expect_modified=False
    )
    assert result.refusals[0].reason == "no norm TensorRT needs otherwise"
    result, _ = run_pass(TensorRTNorms(Options(target="onnx")), model, expect_modified=False)
    assert result.refusals[0].reason == "the target is not tensorrt"


def test_a_norm_over_more_than_the_last_axis_stays_with_its_reason():
    model, _ = _rms_op(axis=-2)
    result, _ = run_pass(
        TensorRTNorms(Options(target="tensorrt", trt_version="10.9")), model, expect_modified=False
    )
    assert (
        result.refusals[0].reason
        == "RMSNormalization rms normalizes from axis -2, not the last axis alone"
    )


def test_the_residual_add_fuses_only_without_broadcasting():
    model, _ = _rms_op(residual=True)
    _, out = run_pass(TensorRTNorms(Options(target="tensorrt", trt_version="10.9")), model)
    assert [n.op_type for n in out.graph.node] == [ADD_RMS_NORM.op_type]
    assert list(out.graph.node[0].output) == ["s", "y"]  # both outputs keep their names
    broadcast, _ = _rms_op(residual=True, r_shape=(1, 3, 8))
    _, out = run_pass(TensorRTNorms(Options(target="tensorrt", trt_version="10.9")), broadcast)
    assert [n.op_type for n in out.graph.node] == ["Add", RMS_NORM.op_type]


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_plugin_graphs_verify_through_their_reference(tmp_path, dtype):
    """rewrite's check runs the plugin nodes as their float64 references, fp16 included (which
    onnxruntime-extensions' Python custom ops cannot take)."""
    model, feeds = _rms_op(dtype=dtype, residual=True)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    report = rewrite_file(
        src,
        tmp_path / "out.onnx",
        options=Options(target="tensorrt", trt_version="10.9"),
        checks=VerifyOptions(inputs=feeds),
    )
    assert (
        report.verification.ok
        and _ops(tmp_path / "out.onnx")[f"{DOMAIN}:{ADD_RMS_NORM.op_type}"] == 1
    )


@pytest.mark.parametrize("name", ["bert-ts17", "vit-ts17"])
def test_fp16_layernorms_compute_in_fp32_and_err_no_more_than_the_original(corpus, tmp_path, name):
    """An fp16 copy: every LayerNormalization left reads a Cast to float32 (TensorRT computes a
    norm in its input type), and the rewrite's error against the fp32 model is no larger than
    the fp16 original's."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    from normopt.sessions import run_ort

    paths = corpus(name)
    src = tmp_path / "fp16.onnx"
    onnx.save(convert_float_to_float16(onnx.load(str(paths.model)), keep_io_types=False), str(src))
    feeds = {
        k: v.astype(np.float16) if v.dtype == np.float32 else v
        for k, v in paths.load_inputs().items()
    }
    out = tmp_path / "out.onnx"
    rewrite_file(
        src,
        out,
        options=Options(target="tensorrt", trt_version="10.9"),
        checks=VerifyOptions(inputs=feeds),
    )
    graph = onnx.load(out).graph
    producers = {o: n for n in graph.node for o in n.output}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    plugins = [n for n in graph.node if n.domain == DOMAIN]  # they accumulate in float32 themselves
    assert len(norms) + len(plugins) == 5 and (norms if name.startswith("bert") else plugins)
    assert all(
        producers[n.input[0]].op_type == "Cast"
        and producers[n.input[0]].attribute[0].i == TensorProto.FLOAT
        for n in norms
    )
    reference = run_ort(paths.model, paths.load_inputs())
    original, rewritten = run_ort(src, feeds), run_ort(out, feeds)
    for key, want in reference.items():
        base = np.abs(original[key].astype(np.float64) - want).max()
        assert np.abs(rewritten[key].astype(np.float64) - want).max() <= max(
            1.5 * base, 1e-3 * np.abs(want).max()
        )
