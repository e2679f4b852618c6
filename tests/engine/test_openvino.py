"""OpenVINO's CPU plugin as a second engine: profile, verify and the speed guard on it, and
what its compiler makes of normopt's rewrites (an RMSNorm becomes one RMS layer)."""

import json
import os
import sys

import numpy as np
import onnx
import pytest

import normopt
from normopt.errors import BadInput
from tests.helpers import cli

pytest.importorskip("openvino")


def run(*args):
    return cli(*args, env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"})


@pytest.fixture(scope="module")
def gpt2(corpus, tmp_path_factory):
    src = corpus("gpt2-ts17").model
    out = tmp_path_factory.mktemp("ov") / "rms.onnx"
    normopt.rewrite(src, out)
    return src, out


def test_profile_on_openvino_times_an_a_a_pair_within_noise_and_shows_its_fusions(gpt2, tmp_path):
    src, out = gpt2
    report = tmp_path / "p.json"
    proc = run("profile", src, src, "--backend", "openvino", "--runs", "30", "--report", report)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(report.read_text())
    twin = data["summary"][f"{src}#2"]
    assert twin["ci95"][0] <= twin["ratio"] <= twin["ci95"][1]
    assert twin["verdict"] == "within noise" and data["environment"]["backend"] == "openvino"
    assert "OpenVINO layers by type" in proc.stdout
    proc = run("profile", src, out, "--backend", "openvino", "--runs", "3", "--report", report)
    layers = json.loads(report.read_text())["runtime_ops"]
    assert layers[str(src)].get("MVN") == 5 and "RMS" not in layers[str(src)]
    assert layers[str(out)].get("RMS") == 5 and "MVN" not in layers[str(out)]


def test_verify_on_openvino_passes_the_rewrite_and_fails_a_changed_model(gpt2, tmp_path):
    src, out = gpt2
    assert normopt.verify(src, out, backend="openvino").ok
    changed = onnx.load(str(out))
    weight = next(t for t in changed.graph.initializer if len(t.dims) == 2 and t.dims[0] > 8)
    array = onnx.numpy_helper.to_array(weight) * np.float32(1.01)
    weight.CopyFrom(onnx.numpy_helper.from_array(array, weight.name))
    onnx.save(changed, str(tmp_path / "changed.onnx"))
    steps = []
    report = normopt.verify(
        src, tmp_path / "changed.onnx", backend="openvino", on_step=steps.append
    )
    assert not report.ok and any("on OpenVINO" in s for s in steps)
    with pytest.raises(BadInput, match="--method local runs on onnxruntime"):
        normopt.verify(src, out, backend="openvino", method="local")


def test_the_speed_guard_times_on_openvino(gpt2, tmp_path):
    src, _ = gpt2
    _, report = normopt.rewrite(src, tmp_path / "o.onnx", speed_guard=True, backend="openvino")
    assert report.guard.backend == "openvino" and report.written


def test_without_openvino_the_backend_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    from normopt.engine.openvino import load_openvino

    with pytest.raises(BadInput, match=r"pip install 'normopt\[openvino\]'"):
        load_openvino()
