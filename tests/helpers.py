"""Hand-built ONNX graphs for tests (small, exact, every case written out)."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

IR_VERSION = 10  # onnx's helper defaults to the newest IR, newer than onnxruntime loads


@functools.cache
def supported_opset() -> int:
    """The newest ai.onnx opset both the installed onnx and onnxruntime take (the floors of
    pyproject, onnx 1.17 and onnxruntime 1.21, stop at 22: RMSNormalization is opset 23)."""
    import onnxruntime as ort

    for opset in range(onnx.defs.onnx_opset_version(), 13, -1):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "probe",
            [tensor("x", shape=(1,))],
            [tensor("y", shape=(1,))],
        )
        probe = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
        )
        try:
            ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
            return opset
        except Exception:
            continue
    return 13


def make_model(
    nodes, inputs, outputs, initializers=(), opset=17, domains=(), **kwargs
) -> onnx.ModelProto:
    """A checked model; `domains`: further opset imports (name, version). A test needing an
    opset the installed onnx or onnxruntime lacks is skipped (the lowest-versions CI run)."""
    if opset > supported_opset():
        pytest.skip(f"opset {opset} needs a newer onnx and onnxruntime than installed")
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    imports = [helper.make_opsetid("", opset), *(helper.make_opsetid(*d) for d in domains)]
    model = helper.make_model(graph, opset_imports=imports, ir_version=IR_VERSION, **kwargs)
    onnx.checker.check_model(model)
    return model


def tensor(name: str, dtype=TensorProto.FLOAT, shape=(2, 8)):
    return helper.make_tensor_value_info(name, dtype, list(shape))


def const(name: str, array) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def mlp(seed: int = 0, d: int = 8, dtype=np.float32) -> onnx.ModelProto:
    """y = relu(x W1 + b1) W2: two MatMuls, an Add, a Relu."""
    rng = np.random.default_rng(seed)
    onnx_dtype = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="add1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    inits = [
        const("w1", rng.standard_normal((d, d)).astype(dtype)),
        const("b1", rng.standard_normal(d).astype(dtype)),
        const("w2", rng.standard_normal((d, d)).astype(dtype)),
    ]
    return make_model(
        nodes,
        [tensor("x", onnx_dtype, ("batch", d))],
        [tensor("y", onnx_dtype, ("batch", d))],
        inits,
    )


def save(model: onnx.ModelProto, path: Path, external: bool = False) -> Path:
    if external:
        onnx.save(
            model,
            str(path),
            save_as_external_data=True,
            location=path.name + ".data",
            size_threshold=0,
            all_tensors_to_one_file=True,
        )
    else:
        onnx.save(model, str(path))
    return path


def ort_run(
    model: onnx.ModelProto, feeds: dict[str, np.ndarray], extra_outputs=()
) -> dict[str, np.ndarray]:
    """Run an in-memory model on ORT CPU without graph optimizations (extra values as outputs)."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for name in extra_outputs:
        if name not in [o.name for o in model.graph.output]:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
    )
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def assert_matches_reference(model_path, paths) -> None:
    """A rewritten corpus model is checker-valid (full check) and, on the entry's saved inputs,
    gives onnxruntime's reference outputs within each dtype's default tolerance."""
    from normopt.sessions import run_ort
    from normopt.verification import compare_output

    onnx.checker.check_model(str(model_path), full_check=True)
    got = run_ort(model_path, paths.load_inputs())
    for output, reference in paths.load_reference().items():
        check = compare_output(output, reference, got.get(output), None, None)  # fp32: 1e-5 x scale
        assert check.ok, check


_KEPT: list = []


def annotate(model) -> None:
    """Shape annotation for the rest of a test, as the pipeline does around its passes (never
    taken back: the test owns the model; the open context is kept so it is not closed when
    garbage-collected)."""
    from normopt.rewriter.shapes import annotated

    context = annotated(model)
    context.__enter__()
    _KEPT.append(context)


def run_pass(pass_, model: onnx.ModelProto, expect_modified: bool = True, full_check: bool = True):
    """Run one pass (an instance) on a copy of `model` as the pipeline would (shapes annotated);
    returns its result and the rewritten proto, checked by onnx.checker."""
    import onnx_ir as ir

    ir_model = ir.serde.deserialize_model(model)
    annotate(ir_model)
    result = pass_.run(ir_model)
    assert result.modified == expect_modified, result.refusals
    rewritten = ir.serde.serialize_model(ir_model)
    onnx.checker.check_model(rewritten, full_check=full_check)
    return result, rewritten


def rewrite_file(src, dst, **fields):
    """The rewrite driver on a request (normopt.request.RewriteRequest fields by keyword)."""
    from normopt.driver import rewrite
    from normopt.request import RewriteRequest

    return rewrite(RewriteRequest(src, dst, **fields))


def cli(*args, env=None, timeout: int = 600):
    """`normopt ARGS...` in a subprocess (arguments as strings), its CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "normopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
