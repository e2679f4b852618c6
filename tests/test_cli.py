"""The CLI contract: exit codes, one-line errors, no output unless success, JSON shapes."""

import hashlib
import json
import re
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper
from typer.testing import CliRunner

from normopt.cli import app
from normopt.passes import base as pass_base
from normopt.passes import pipeline
from normopt.passes.pipeline import DEFAULT_PIPELINE
from tests.helpers import const, mlp, save


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "normopt", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def assert_one_line_error(proc, code, pattern=""):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("normopt: error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert pattern in lines[0], lines[0]


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def model(tmp_path):
    return save(mlp(), tmp_path / "m.onnx")


@pytest.fixture
def dead_model(tmp_path):
    proto = mlp()
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    return save(proto, tmp_path / "dead.onnx", external=True)


def test_version_and_passes(cli_env):
    assert run("--version", env=cli_env).stdout.startswith("normopt ")
    listing = run("passes", env=cli_env)
    assert listing.returncode == 0 and "cleanup" in listing.stdout
    data = json.loads(run("passes", "--json", env=cli_env).stdout)
    assert "cleanup" in data["passes"] and data["always_after"] == ["cleanup"]
    # in the order they run: the default pipeline, the opt-in passes, what always runs last
    names = list(data["passes"])
    assert names[: len(DEFAULT_PIPELINE)] == list(DEFAULT_PIPELINE) and names[-1] == "cleanup"


def test_a_mistyped_pass_name_gets_a_suggestion(tmp_path, model, cli_env):
    proc = run("rewrite", model, tmp_path / "o.onnx", "--passes", "preln-to-rmsnrom", env=cli_env)
    assert_one_line_error(
        proc, 2, "unknown pass 'preln-to-rmsnrom' (did you mean 'preln-to-rmsnorm'?)"
    )


def test_verify_same_model_exits_0_and_perturbed_exits_1(tmp_path, model, cli_env):
    proc = run("verify", model, model, env=cli_env)
    assert proc.returncode == 0 and "ok" in proc.stdout
    perturbed = mlp()
    w = onnx.numpy_helper.to_array(perturbed.graph.initializer[2]).copy()
    w[3, 1] *= 1.01
    perturbed.graph.initializer[2].CopyFrom(const("w2", w))
    other = save(perturbed, tmp_path / "p.onnx")
    proc = run("verify", model, other, "--json", env=cli_env)
    assert proc.returncode == 1
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["outputs"][0]["max_abs"] > 0
    assert report["outputs"][0]["cosine"] < 1


def test_verify_options(tmp_path, model, cli_env):
    np.savez(tmp_path / "in.npz", x=np.ones((3, 8), np.float32))
    proc = run("verify", model, model, "--inputs", tmp_path / "in.npz", "--json", env=cli_env)
    assert json.loads(proc.stdout)["inputs"]["trials"][0]["x"]["shape"] == [3, 8]
    proc = run(
        "verify",
        model,
        model,
        "--dim",
        "batch=5",
        "--rtol",
        "0",
        "--atol",
        "0",
        "--json",
        env=cli_env,
    )
    assert proc.returncode == 0 and json.loads(proc.stdout)["inputs"]["trials"][0]["x"][
        "shape"
    ] == [5, 8]


def test_rewrite_writes_and_reports(tmp_path, dead_model, cli_env):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    before = {p.name: digest(p) for p in tmp_path.iterdir()}
    proc = run("rewrite", dead_model, out, "--report", report, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "removed 1 dead node(s)" in proc.stdout
    assert out.exists() and (tmp_path / "out.onnx.data").exists()  # input had external data
    data = json.loads(report.read_text())
    assert data["written"] and data["exit_code"] == 0 and data["verification"]["ok"]
    assert {
        "pass": "cleanup",
        "kind": "removed",
        "what": "dead node(s)",
        "nodes": ["dead"],
        "values": [],
        "why": None,
    } in data["changes"]
    passes = {p["name"]: p for p in data["passes"]}
    assert list(passes) == [*DEFAULT_PIPELINE, "cleanup"] and passes["cleanup"]["modified"]
    assert (
        passes["canonicalize-norms"]["refusals"][0]["reason"]
        == "no decomposed LayerNorm or RMSNorm"
    )
    assert data["nodes_before"]["Neg"] == 1 and "Neg" not in data["nodes_after"]
    assert {
        k: v for k, v in ((p.name, digest(p)) for p in tmp_path.iterdir()) if k in before
    } == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [*before, "out.onnx", "out.onnx.data", "r.json"]
    )


def test_rewrite_requested_pass_that_applies_nowhere_exits_3(tmp_path, model, cli_env):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    proc = run(
        "rewrite", model, out, "--passes", "cleanup", "--explain", "--report", report, env=cli_env
    )
    assert proc.returncode == 3
    assert "applied nowhere" in proc.stderr and "no dead nodes" in proc.stderr
    assert "no dead nodes" in proc.stdout  # --explain table
    assert not out.exists()
    data = json.loads(report.read_text())
    assert data["exit_code"] == 3 and not data["written"]


def test_rewrite_in_place(tmp_path, dead_model, cli_env):
    assert_one_line_error(run("rewrite", dead_model, dead_model, env=cli_env), 2, "--in-place")
    proc = run("rewrite", dead_model, dead_model, "--in-place", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "Neg" not in {n.op_type for n in onnx.load(str(dead_model)).graph.node}
    assert run("verify", dead_model, dead_model, env=cli_env).returncode == 0


def _truncated(tmp_path):
    data = mlp().SerializeToString()
    (tmp_path / "t.onnx").write_bytes(data[: len(data) // 2])
    return tmp_path / "t.onnx"


def _no_data(tmp_path):
    path = save(mlp(), tmp_path / "e.onnx", external=True)
    (tmp_path / "e.onnx.data").unlink()
    return path


def _old_opset(tmp_path):
    proto = mlp()
    proto.opset_import[0].version = 9
    return save(proto, tmp_path / "old.onnx")


def _negative_offset(tmp_path):
    path = save(mlp(), tmp_path / "neg.onnx", external=True)
    proto = onnx.load(str(path), load_external_data=False)
    entry = next(e for e in proto.graph.initializer[0].external_data if e.key == "offset")
    entry.value = "-64"
    onnx.save(proto, str(path))
    return path


def _new_ir(tmp_path):
    proto = mlp()
    proto.ir_version = onnx.IR_VERSION + 1  # newer than the installed onnx reads
    return save(proto, tmp_path / "new.onnx")


BAD_INPUTS = {
    "missing file": (lambda t: t / "nope.onnx", "does not exist"),
    "not onnx": (lambda t: (t / "x.onnx").write_text("hello") and t / "x.onnx", "not a valid ONNX"),
    "truncated": (_truncated, "not a valid ONNX"),
    "missing external data": (_no_data, "missing"),
    "old opset": (_old_opset, "opset 9; normopt supports opsets 13-"),
    "new IR version": (_new_ir, f"IR version {onnx.IR_VERSION + 1}; normopt supports"),
    "directory": (lambda t: (t / "d").mkdir() or t / "d", "is a directory"),
    "negative external data offset": (_negative_offset, "negative external data offset"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("command", ["rewrite", "verify", "inspect"])
def test_bad_input_exits_2_with_one_line(tmp_path, cli_env, case, command):
    make, message = BAD_INPUTS[case]
    bad = make(tmp_path)
    out = tmp_path / "out.onnx"
    args = {"rewrite": [bad, out], "verify": [bad, bad], "inspect": [bad]}[command]
    proc = run(command, *args, env=cli_env)
    assert_one_line_error(proc, 2, message)
    assert not out.exists() and not list(tmp_path.glob(".normopt-tmp-*"))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--passes", "nope"], "unknown pass 'nope'"),
        (["--target", "gpu"], "--target must be"),
        (["--dim", "batch"], "--dim takes NAME=VALUE"),
        (["--dim", "batch=0"], "a dimension is an integer >= 1"),
        (["--rtol", "-1"], "rtol (--rtol) must be a finite number >= 0"),
        (["--atol", "nan"], "atol (--atol) must be a finite number >= 0"),
        (["--passes", ""], "--passes names no pass"),
        (["--passes", " , "], "--passes names no pass"),
    ],
)
def test_bad_options_exit_2(tmp_path, model, cli_env, args, message):
    proc = run("rewrite", model, tmp_path / "o.onnx", *args, env=cli_env)
    assert_one_line_error(proc, 2, message)
    assert not (tmp_path / "o.onnx").exists()


def test_output_folder_missing_or_directory(tmp_path, model, cli_env):
    assert_one_line_error(
        run("rewrite", model, tmp_path / "no" / "o.onnx", env=cli_env), 2, "does not exist"
    )
    assert_one_line_error(run("rewrite", model, tmp_path, env=cli_env), 2, "is a directory")
    (tmp_path / "file").write_text("")
    assert_one_line_error(
        run("rewrite", model, tmp_path / "file" / "o.onnx", env=cli_env),
        2,
        "output folder '" + str(tmp_path / "file") + "' is a file, not a folder",
    )


def test_inspect_json(model, cli_env):
    proc = run("inspect", model, "--json", env=cli_env)
    data = json.loads(proc.stdout)
    assert data["model"]["nodes"] == 4 and data["operators"] == {"Add": 1, "MatMul": 2, "Relu": 1}
    assert data["passes"]["cleanup"] == {
        "applies": False,
        "reason": "model: no dead nodes, unused initializers or unsorted nodes",
    }
    human = run("inspect", model, env=cli_env)
    assert human.returncode == 0 and "MatMul" in human.stdout


class _Corrupt(pass_base.Pass):
    """Before: a model. After: the first initializer doubled (wrong on purpose)."""

    name = "corrupt"
    summary = "test-only: changes the function"

    def plan(self, model):
        return pass_base.Plan(actions=["double a weight"])

    def apply(self, model, plan):
        value = next(iter(model.graph.initializers.values()))
        value.const_value = ir.tensor(value.const_value.numpy() * 2, name=value.name)
        return [pass_base.Change("doubled", "an initializer", (), (value.name,))]


class _Unrunnable(_Corrupt):
    """Valid for the checker, but the MatMul shapes no longer fit at run time."""

    name = "unrunnable"

    def apply(self, model, plan):
        value = model.graph.initializers["w1"]
        value.const_value = ir.tensor(np.ones((8, 3), np.float32), name="w1")
        value.shape = ir.Shape([8, 3])
        return [pass_base.Change("reshaped", "an initializer", (), ("w1",))]


class _Crash(_Corrupt):
    name = "crash"

    def apply(self, model, plan):
        raise RuntimeError("boom")


@pytest.fixture
def broken_passes(monkeypatch):
    for cls in (_Corrupt, _Crash, _Unrunnable):
        monkeypatch.setitem(pipeline.PASSES, cls.name, cls)


def test_verification_failure_exits_1_and_writes_nothing(tmp_path, model, broken_passes):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(
        app, ["rewrite", str(model), str(out), "--passes", "corrupt", "--report", str(report)]
    )
    assert result.exit_code == 1, result.output
    assert "differs from the original" in result.output and "FAIL" in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]
    assert json.loads(report.read_text())["verification"]["ok"] is False
    skipped = CliRunner().invoke(
        app, ["rewrite", str(model), str(out), "--passes", "corrupt", "--no-verify"]
    )
    assert skipped.exit_code == 0 and out.exists()


def test_internal_error_is_one_line_exit_4_and_debug_shows_traceback(
    tmp_path, model, broken_passes
):
    result = CliRunner().invoke(
        app, ["rewrite", str(model), str(tmp_path / "o.onnx"), "--passes", "crash"]
    )
    assert result.exit_code == 4 and "internal error: RuntimeError: boom" in result.output
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(
        app, ["--debug", "rewrite", str(model), str(tmp_path / "o.onnx"), "--passes", "crash"]
    )
    assert isinstance(debug.exception, RuntimeError)


def test_bf16_model_cannot_be_verified_on_cpu_but_rewrites_without_verification(tmp_path, cli_env):
    proto = mlp()
    for init in proto.graph.initializer:
        array = onnx.numpy_helper.to_array(init).astype(np.float32)
        init.CopyFrom(
            onnx.helper.make_tensor(
                init.name, onnx.TensorProto.BFLOAT16, array.shape, array.flatten().tolist()
            )
        )
    for value in [*proto.graph.input, *proto.graph.output]:
        value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    src, out = save(proto, tmp_path / "bf16.onnx"), tmp_path / "o.onnx"
    refused = run("rewrite", src, out, env=cli_env)
    assert_one_line_error(refused, 2, "rewrite with --no-verify")
    assert not refused.stdout and not out.exists()  # said before the passes: no pass table
    proc = run("rewrite", src, out, "--no-verify", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert {i.data_type for i in onnx.load(str(out)).graph.initializer} == {
        onnx.TensorProto.BFLOAT16
    }


def test_rewritten_model_that_does_not_run_exits_4(tmp_path, model, broken_passes):
    """The original runs, the rewrite does not: normopt's bug (exit 4), not bad input, not a
    verification verdict; the message names OUT, not the temp folder."""
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(app, ["rewrite", str(model), str(out), "--passes", "unrunnable"])
    assert result.exit_code == 4, result.output
    assert "rewritten model does not run (a bug in normopt" in result.output and not out.exists()
    assert ".normopt-tmp-" not in result.output


def test_input_shapes_by_name_and_unknown_names(model, cli_env):
    proc = run("verify", model, model, "--shape", "x=3x8", "--json", env=cli_env)
    assert proc.returncode == 0 and json.loads(proc.stdout)["inputs"]["trials"][0]["x"][
        "shape"
    ] == [3, 8]
    assert_one_line_error(
        run("verify", model, model, "--shape", "x=3,8", env=cli_env), 2, "--shape takes NAME=AxBxC"
    )
    assert_one_line_error(
        run("verify", model, model, "--dim", "seq=4", env=cli_env),
        2,
        "--dim seq: no input has a dimension of that name; the inputs are x [batch, 8]",
    )


def test_logs_without_a_terminal_wrap_at_160_columns_and_cut_nothing(corpus, tmp_path, cli_env):
    """Found from outside: in CI (no terminal, 80 columns) rich cut cells to "hidden_s…" and
    reasons mid-word; then, at full width, `--explain` lines ran to 1,401 characters. Without a
    terminal normopt wraps at 160 columns (ASCII tables, cells folded, never cut), and the
    explained rewrite of a GPT-2 export ends with its op diff and sizes."""
    env = {**cli_env, "COLUMNS": "80"}
    proc = run(
        "rewrite", corpus("gpt2-ts17").model, tmp_path / "o.onnx", "--explain", "--timings", env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout + proc.stderr and "━" not in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 160
    assert "opset 17 has no RMSNormalization (needs >= 23)" in proc.stdout
    assert re.search(r"^ops: .*LayerNormalization -5", proc.stdout, re.M)
    assert re.search(r"^nodes \d+ -> \d+ \(\+\d+\), size [\d.]+ MB -> [\d.]+ MB", proc.stdout, re.M)
    assert re.search(
        r"\| preln-to-rmsnorm +\| converted +\| .* \| 5 +\| /model/transformer/h\.0/ln_1,",
        proc.stdout,
    )
    proc = run("inspect", corpus("bert-ts17").model, env=env)
    assert proc.returncode == 0 and "…" not in proc.stdout


def test_a_rewrite_that_changes_nothing_says_so_and_require_change_makes_it_exit_3(
    tmp_path, model, cli_env
):
    out = tmp_path / "o.onnx"
    proc = run("rewrite", model, out, env=cli_env)
    assert proc.returncode == 0 and "unchanged: no pass changed the model" in proc.stderr
    out.unlink()
    assert_one_line_error(
        run("rewrite", model, out, "--require-change", env=cli_env),
        3,
        "no pass changed the model (--require-change); nothing written",
    )
    assert not out.exists()


def test_a_failing_verification_has_its_table_once_and_one_fail_line_on_stderr(
    tmp_path, model, broken_passes, cli_env
):
    broken = tmp_path / "broken.onnx"
    assert (
        CliRunner()
        .invoke(app, ["rewrite", str(model), str(broken), "--passes", "corrupt", "--no-verify"])
        .exit_code
        == 0
    )
    proc = run("verify", model, broken, env=cli_env)
    assert proc.returncode == 1 and "FAIL" in proc.stdout
    assert proc.stderr.startswith("FAIL: 1 of 1 output(s) outside tolerance (output 'y': max abs")
    assert len(proc.stderr.splitlines()) == 1  # with 2>&1 the table is not there twice


def test_the_rewrite_ends_with_a_summary(tmp_path, cli_env, corpus):
    """Op diff, node count, sizes, time, the verdict in one line, and why the graph grew."""
    src = corpus("gpt2-ts17").model
    proc = run("rewrite", src, tmp_path / "o.onnx", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    ops = next(line for line in lines if line.startswith("ops: "))
    assert "LayerNormalization -" in ops and "ReduceMean +" in ops
    facts = next(line for line in lines if line.startswith("nodes "))
    assert re.fullmatch(r"nodes \d+ -> \d+ \(\+\d+\), size [\d.]+ MB -> [\d.]+ MB, [\d.]+ s", facts)
    assert any(re.match(r"verified \(full\): \d output\(s\) within tolerance", x) for x in lines)
    assert any(line.startswith("the graph grew: below opset 23") for line in lines)
    ort = run("rewrite", src, tmp_path / "p.onnx", "--target", "ort", "--no-verify", env=cli_env)
    assert "not verified (--no-verify)" in ort.stdout and "the graph grew" not in ort.stdout


def test_models_onnxruntime_runs_are_rewritten_unsorted_or_at_the_newest_ir(tmp_path, cli_env):
    """What a fresh install writes (onnx 1.23: IR 14) and what onnxruntime's float16 converter
    writes (nodes out of order) are rewritten and verified, not refused."""
    newest = mlp()
    newest.ir_version = onnx.IR_VERSION
    unsorted = mlp()
    nodes = list(unsorted.graph.node)
    del unsorted.graph.node[:]
    unsorted.graph.node.extend(reversed(nodes))
    for name, proto in (("newest", newest), ("unsorted", unsorted)):
        src, out = tmp_path / f"{name}.onnx", tmp_path / f"{name}.out.onnx"
        onnx.save(proto, src)
        result = run("rewrite", src, out, "--json", env=cli_env)
        doc = json.loads(result.stdout)
        assert result.returncode == 0 and doc["written"] and doc["verification"]["ok"], name
        onnx.checker.check_model(onnx.load(out))
    assert doc["changed"] and any("out of order" in c["what"] for c in doc["changes"])


def test_debug_is_accepted_after_the_command_too(tmp_path):
    """Found from outside: the exit-4 hint says "rerun with --debug", but `normopt rewrite ...
    --debug` was "No such option". It means `normopt --debug rewrite ...` wherever it stands."""
    missing = tmp_path / "missing.onnx"
    plain = run("rewrite", missing, tmp_path / "o.onnx")
    assert_one_line_error(plain, 2, "does not exist")
    debug = run("rewrite", missing, tmp_path / "o.onnx", "--debug")
    assert "No such option" not in debug.stderr and "Traceback" in debug.stderr
    assert "does not exist" in debug.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["rewrite", "a.onnx", "b.onnx", "--verfy", "local"], ("No such option", "--verfy")),
        (["rewrit"], ("No such command 'rewrit'", "Did you mean 'rewrite'?")),
    ],
)
def test_usage_errors_are_one_line(cli_env, args, message):
    """Click's usage errors come as one line like normopt's own (not a 5-line box); the words
    are Click's (they differ a little between its versions)."""
    proc = run(*args, env=cli_env)
    assert proc.returncode == 2 and not proc.stdout
    assert proc.stderr.startswith("normopt: error: ")
    assert all(part in proc.stderr for part in message)
    assert len(proc.stderr.splitlines()) == 1 and "--help')" in proc.stderr


def test_a_tensorrt_rewrite_names_its_version_and_the_plugins_it_needs(tmp_path, cli_env, corpus):
    proc = run(
        "rewrite",
        corpus("gpt2-ts17").model,
        tmp_path / "o.onnx",
        "--target",
        "tensorrt",
        "--trt-version",
        "10.9",
        env=cli_env,
    )
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("written for TensorRT"))
    assert line.startswith("written for TensorRT 10.9 (--trt-version); it uses normopt's plugins")
    assert "NormoptRMSNorm" in line and "normopt build" in line


def test_in_a_120_column_terminal_nothing_is_cut_to_one_prefix(corpus, tmp_path, cli_env):
    """On a terminal the tables fit its width and fold long cells: the norms keep their own
    names (they were all cut to `/model/transformer/h.0/…`)."""
    env = {**cli_env, "COLUMNS": "120", "FORCE_COLOR": "1"}
    env.pop("NO_COLOR", None)
    proc = run(
        "rewrite",
        corpus("gpt2-ts17").model,
        tmp_path / "o.onnx",
        "--explain",
        "--no-verify",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    text = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout)
    if "┃" not in text:
        pytest.skip("this rich does not take FORCE_COLOR for a terminal")
    assert max(len(line) for line in text.splitlines()) <= 120 and "…" not in text
    assert "/model/transformer/h.0/ln_1" in text and "/model/transformer/h.0/ln_2" in text
