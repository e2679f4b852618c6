"""The Python API: model in (path, onnx.ModelProto, onnx_ir.Model), the same kind out."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

import normopt
from normopt.errors import BadInput, NotApplied, VerificationFailed
from tests.helpers import mlp, ort_run, save

ROOT = Path(__file__).resolve().parents[1]
FEEDS = {"x": np.linspace(-2, 2, 16, dtype=np.float32).reshape(2, 8)}


def dead_mlp() -> onnx.ModelProto:
    proto = mlp()
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    return proto


def test_a_model_proto_comes_back_rewritten_and_the_one_passed_in_is_unchanged():
    proto = dead_mlp()
    before = proto.SerializeToString()
    rewritten, report = normopt.rewrite(proto)
    assert isinstance(rewritten, onnx.ModelProto) and proto.SerializeToString() == before
    assert report.changed and report.verification.ok and report.to_json()["command"] == "rewrite"
    assert report.input == report.output == "<in memory>"
    assert [n.op_type for n in rewritten.graph.node] == ["MatMul", "Add", "Relu", "MatMul"]
    np.testing.assert_array_equal(ort_run(rewritten, FEEDS)["y"], ort_run(proto, FEEDS)["y"])


def test_an_onnx_ir_model_comes_back_as_one():
    model = ir.serde.deserialize_model(dead_mlp())
    rewritten, report = normopt.rewrite(model, verify=False)
    assert isinstance(rewritten, ir.Model) and report.verification is None
    assert [n.op_type for n in rewritten.graph] == ["MatMul", "Add", "Relu", "MatMul"]
    assert "Neg" in [n.op_type for n in model.graph]  # the model passed in keeps its nodes


def test_a_path_is_written_to_output_and_never_over_the_input(tmp_path):
    src = save(dead_mlp(), tmp_path / "m.onnx", external=True)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    out, report = normopt.rewrite(src, tmp_path / "o.onnx", report=tmp_path / "r.json")
    assert (
        out == tmp_path / "o.onnx"
        and out.exists()
        and report.written
        and (tmp_path / "r.json").exists()
    )
    assert {
        k: p.read_bytes() for k, p in ((p.name, p) for p in tmp_path.iterdir()) if k in before
    } == before
    with pytest.raises(BadInput, match="needs an output path"):
        normopt.rewrite(src)
    with pytest.raises(BadInput, match="is the input"):
        normopt.rewrite(src, src)
    with pytest.raises(BadInput, match="not int"):
        normopt.rewrite(3)
    with pytest.raises(BadInput, match="leave out `output`"):
        normopt.rewrite(mlp(), tmp_path / "x.onnx")


def test_errors_carry_the_cli_exit_codes():
    with pytest.raises(NotApplied, match="preln-to-rmsnorm") as info:
        normopt.rewrite(mlp(), passes=["preln-to-rmsnorm"])
    assert info.value.exit_code == 3
    with pytest.raises(BadInput, match="trials \\(--trials\\) must be an integer >= 1"):
        normopt.rewrite(mlp(), trials=0)


def test_verify_and_inspect_take_every_kind(tmp_path):
    a, b = mlp(0), mlp(1)
    assert normopt.verify(a, ir.serde.deserialize_model(a)).ok
    report = normopt.verify(save(a, tmp_path / "a.onnx"), b, inputs=FEEDS)
    assert (
        not report.ok and report.to_json()["exit_code"] == 1 and report.inputs["source"] == "given"
    )
    info = normopt.inspect(a)
    assert info["command"] == "inspect" and info["model"]["path"] == "<in memory>"
    assert normopt.inspect(tmp_path / "a.onnx")["operators"] == info["operators"]


def test_a_wrong_in_memory_rewrite_is_refused(monkeypatch):
    from normopt.passes import pipeline
    from normopt.passes.base import Change, Pass, Plan

    class Double(Pass):
        name, summary = "double", "doubles a weight (wrong on purpose)"

        def plan(self, model):
            return Plan(["double w1"])

        def apply(self, model, plan):
            value = model.graph.initializers["w1"]
            value.const_value = ir.tensor(value.const_value.numpy() * 2, name="w1")
            return [Change("doubled", "a weight", (), ("w1",))]

    monkeypatch.setitem(pipeline.PASSES, "double", Double)
    with pytest.raises(VerificationFailed):
        normopt.rewrite(mlp(), passes=["double"])


def test_no_submodule_shadows_an_api_function():
    """Python binds a package attribute to each submodule it imports: a module named like an
    API function would replace it. No module or package has such a name, and importing the
    driver, verification and inspection modules leaves the functions (and onnxruntime and
    torch unimported)."""
    package = ROOT / "normopt"
    names = {p.stem for p in package.glob("*.py")} | {
        p.name for p in package.iterdir() if p.is_dir()
    }
    assert not names & set(normopt.__all__)
    code = (
        "import normopt.driver, normopt.verification, normopt.inspection, normopt.recalibration\n"
        "import normopt\n"
        "import sys\n"
        "assert all(callable(getattr(normopt, n)) for n in normopt.__all__ if n != '__version__')\n"
        "assert 'onnxruntime' not in sys.modules and 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.slow
def test_the_readme_example_runs(tmp_path, corpus, monkeypatch):
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API") :]
    example = re.search(r"```python\n(.*?)```", section, re.S)[1]
    shutil.copy(corpus("gpt2-ts14").model, tmp_path / "model.onnx")
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "README.md", "exec"), {})
    assert {"model.rms.onnx", "model.opt.onnx"} <= set(os.listdir(tmp_path))


def test_inspect_never_edits_the_callers_model(corpus):
    """The CRMS question needs preln-to-rmsnorm run first: on a file or a proto normopt's own
    copy takes it; a caller's ir.Model is asked as it is, and stays as it was."""
    import onnx

    path = corpus("preln-dyn18").model
    proto = onnx.load(path)
    before = proto.SerializeToString()
    assert (
        normopt.inspect(proto)["crms"]["after"] == "preln-to-rmsnorm"
        and proto.SerializeToString() == before
    )
    model = ir.serde.deserialize_model(proto)
    ops = sorted(n.op_type for n in model.graph)
    crms = normopt.inspect(model)["crms"]
    assert (
        crms["after"] is None
        and not crms["applies"]
        and sorted(n.op_type for n in model.graph) == ops
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"seed": -1}, r"seed \(--seed\) must be an integer >= 0"),
        ({"seed": 1.5}, r"seed \(--seed\) must be an integer >= 0"),
        ({"trials": 2.5}, r"trials \(--trials\) must be an integer >= 1"),
        ({"trials": True}, r"trials \(--trials\) must be an integer >= 1"),
        ({"dims": {"batch": 2.0}}, r"dims \(--dim\) batch=2.0"),
        ({"shapes": {"x": (2, 8.0)}}, r"shapes \(--shape\) x=.*integers"),
        ({"rtol": "1e-3"}, r"rtol \(--rtol\) must be a finite number"),
        ({"target": "tensorrt", "trt_version": 10.9}, r"trt_version .* version string"),
        ({"passes": "preln-to-rmsnorm"}, "passes is a list of pass names, not the string"),
    ],
)
def test_bad_api_arguments_are_bad_input_in_api_words(kwargs, message):
    """Found from outside: seed=-1, trials=2.5, trt_version=10.9 (a float) and passes="name"
    (split into one-letter names) raised plain TypeError/ValueError/AttributeError. Each is a
    BadInput naming the argument as the API does (and the CLI flag)."""
    with pytest.raises(BadInput, match=message):
        normopt.rewrite(mlp(), **kwargs)
