"""The runtime-only install: `pip wheel .` builds a wheel that installs into a clean virtual
environment (no test extras: no torch) and rewrites a model there."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]


def _conv_bn(path: Path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "w": rng.standard_normal((8, 3, 3, 3)),
        "g": 1 + rng.random(8),
        "b": rng.standard_normal(8),
        "m": rng.standard_normal(8),
        "v": 1 + rng.random(8),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv_bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 8, 16, 16])],
        [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    return path


@pytest.mark.slow
def test_the_wheel_installs_alone_and_rewrites(tmp_path):
    def run(*args, **kwargs):
        proc = subprocess.run(
            [str(a) for a in args], capture_output=True, text=True, timeout=900, **kwargs
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return proc

    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", ROOT)
    wheel = next((tmp_path / "dist").glob("normopt-*.whl"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    run(venv / "bin" / "python", "-m", "pip", "install", "-q", wheel)
    src = _conv_bn(tmp_path / "m.onnx")
    proc = run(venv / "bin" / "normopt", "rewrite", src, tmp_path / "out.onnx")
    assert "folded 1 batchnorm" in proc.stdout
    api = run(
        venv / "bin" / "python",
        "-c",
        "import onnx, normopt, normopt.schema as s; "
        f"m, r = normopt.rewrite(onnx.load({str(src)!r})); "
        "print(s.schema()['title'], r.to_json()['versions']['normopt'], len(m.graph.node))",
    )
    assert api.stdout.split()[-2:] == ["0.1.0", "1"]  # the schema file ships in the wheel
    modules = run(
        venv / "bin" / "python",
        "-c",
        "import sys, normopt.cli; "
        "print(sorted(m for m in ('torch', 'triton', 'onnxruntime', 'matplotlib') if m in "
        "sys.modules))",
    )
    assert modules.stdout.strip() == "[]"  # heavy imports wait for the commands that need them
    absent = run(
        venv / "bin" / "python", "-c", "import importlib.util as u; print(u.find_spec('torch'))"
    )
    assert absent.stdout.strip() == "None"  # the runtime install pulls no torch
