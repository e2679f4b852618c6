"""`normopt build` without TensorRT (this workplace, CI): one line naming what to install, exit 2,
no traceback, nothing written; and the parts that need no TensorRT: the optimization profiles."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from normopt.engine.build import profile_shapes
from normopt.errors import BadInput

NO_TENSORRT = importlib.util.find_spec("tensorrt") is None
needs_no_tensorrt = pytest.mark.skipif(not NO_TENSORRT, reason="TensorRT is installed here")


def normopt(*args):
    return subprocess.run(
        [sys.executable, "-m", "normopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@needs_no_tensorrt
@pytest.mark.parametrize(
    "command",
    [
        ["build", "{model}", "{out}"],
        ["build", "{model}", "{out}", "--json"],
        ["profile", "{model}", "--backend", "tensorrt"],
    ],
)
def test_tensorrt_commands_without_tensorrt_say_so_in_one_line(corpus, tmp_path, command):
    model, out = corpus("gpt2-ts17").model, tmp_path / "model.engine"
    done = normopt(*(c.format(model=model, out=out) for c in command))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "needs TensorRT" in line and "pip install 'normopt[tensorrt]'" in line
    assert not out.exists()
    if "--json" in command:
        doc = json.loads(done.stdout)
        assert (
            doc["command"] == "build" and doc["exit_code"] == 2 and "needs TensorRT" in doc["error"]
        )


def test_profiles_from_static_dims_named_dims_and_shapes():
    inputs = {"ids": ["batch", 8], "mask": [2, 8]}
    assert profile_shapes(inputs, {}, {"batch": 4}) == {"ids": ((4, 8),) * 3, "mask": ((2, 8),) * 3}
    given = {"ids": ((1, 8), (4, 8), (16, 8))}
    assert profile_shapes(inputs, given, {})["ids"] == ((1, 8), (4, 8), (16, 8))
    with pytest.raises(
        BadInput, match="input 'ids' has a dynamic dim 'batch': give --shape ids:MIN/OPT/MAX"
    ):
        profile_shapes(inputs, {}, {})


@pytest.mark.parametrize("name", ["bert-ts17", "vit-dyn18"])
def test_fp16_lowering_for_build_keeps_layernorms_in_fp32(corpus, tmp_path, name):
    """`build --fp16` lowers the graph before TensorRT parses it (a strongly typed engine computes
    in the graph's types): float32 inputs and outputs, every LayerNormalization reading a float32
    Cast; equal to the float32 model within float16's tolerance (run here on CPU)."""
    import numpy as np
    import onnx

    from normopt.engine.precision import convert
    from normopt.sessions import run_ort

    paths = corpus(name)
    out = tmp_path / "fp16.onnx"
    summary = convert(paths.model, out, "fp16")
    assert summary["precision"] == "fp16" and summary["norms_in_fp32"] >= 1
    graph = onnx.load(out).graph
    producers = {o: n for n in graph.node for o in n.output}
    norms = [n for n in graph.node if n.op_type == "LayerNormalization"]
    assert norms and all(producers[n.input[0]].op_type == "Cast" for n in norms)
    assert {
        i.type.tensor_type.elem_type for i in graph.input if i.type.tensor_type.elem_type in (1, 10)
    } <= {1}
    feeds = paths.load_inputs()
    want, got = run_ort(paths.model, feeds), run_ort(out, feeds)
    for k, ref in want.items():
        assert got[k].dtype == ref.dtype
        assert np.abs(got[k] - ref).max() <= 2e-2 * max(np.abs(ref).max(), 1e-3), k


def test_bf16_lowering_retypes_every_float16_from_the_float32_values(corpus, tmp_path):
    """--bf16: no float16 left anywhere; initializers rounded to bfloat16 from the float32 model
    (not from the float16 clamp); the graph passes onnx.checker."""
    import ml_dtypes
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    from normopt.engine.precision import convert

    paths = corpus("gpt2-ts17")
    out = tmp_path / "bf16.onnx"
    convert(paths.model, out, "bf16")
    model = onnx.load(out)
    onnx.checker.check_model(model)
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(paths.model).graph.initializer}
    bf16 = [i for i in model.graph.initializer if i.data_type == TensorProto.BFLOAT16]
    assert bf16 and not [i for i in model.graph.initializer if i.data_type == TensorProto.FLOAT16]
    assert not [
        a
        for n in model.graph.node
        for a in n.attribute
        if a.name == "to" and a.i == TensorProto.FLOAT16
    ]
    for init in bf16:
        if init.name in original:
            want = original[init.name].astype(ml_dtypes.bfloat16)
            assert np.array_equal(
                numpy_helper.to_array(init).view(np.uint16), want.view(np.uint16)
            ), init.name


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--fp16", "--bf16"], "--fp16 and --bf16 exclude each other"),
        (["--plugins", "python"], "--plugins takes aot or jit, not 'python'"),
        (["--workspace", "0"], "--workspace must be at least 1 MiB"),
    ],
)
def test_bad_build_options_are_one_line_whether_or_not_tensorrt_is_there(
    corpus, tmp_path, options, reason
):
    """Options are checked before TensorRT is loaded: the same line here and on a TensorRT
    machine."""
    out = tmp_path / "m.engine"
    done = normopt("build", corpus("gpt2-ts17").model, out, *options)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"normopt: error: {reason}"
    ]
    assert not out.exists()
