"""Input safety of `normopt rewrite`: IN (the model and every external data file it names) is
never written, and no output, data file, report or temp file resolves to one of them; a run
that is killed leaves nothing a later run does not remove. Every refusal is one line, exit 2."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import helper

from tests.helpers import const, make_model, mlp, save, tensor
from tests.test_cli import assert_one_line_error, run


def digests(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()
    }


def _external(tmp_path, name="m.onnx", location="m.onnx.data"):
    """mlp() with its weights in one external data file named `location`."""
    proto = mlp()
    onnx.save(
        proto,
        str(tmp_path / name),
        save_as_external_data=True,
        location=location,
        size_threshold=0,
        all_tensors_to_one_file=True,
    )
    return tmp_path / name


def test_in_data_file_named_like_out_data_is_refused(tmp_path, cli_env):
    """Found from outside: m.onnx keeps its weights in out.onnx.data; `rewrite m.onnx out.onnx`
    exited 0 and replaced IN's weights with the rewritten ones."""
    src = _external(tmp_path, location="out.onnx.data")
    before = digests(tmp_path)
    proc = run("rewrite", src, tmp_path / "out.onnx", env=cli_env)
    assert_one_line_error(proc, 2, "output data file")
    assert "out.onnx.data' is input data file" in proc.stderr
    assert digests(tmp_path) == before and not (tmp_path / "out.onnx").exists()


def test_out_naming_in_data_file_is_refused(tmp_path, cli_env):
    src = _external(tmp_path, location="w.data")
    before = digests(tmp_path)
    assert_one_line_error(
        run("rewrite", src, tmp_path / "w.data", env=cli_env), 2, "is input data file"
    )
    assert digests(tmp_path) == before


@pytest.mark.parametrize("target", ["in", "in data", "out", "out data", "inputs"])
def test_report_never_lands_on_an_input_or_the_output(tmp_path, cli_env, target):
    """Found from outside: --report IN overwrote the input with JSON; --report OUT left the
    JSON where the model should be."""
    src = _external(tmp_path)
    np.savez(tmp_path / "in.npz", x=np.ones((2, 8), np.float32))
    report = {
        "in": src,
        "in data": tmp_path / "m.onnx.data",
        "out": tmp_path / "o.onnx",
        "out data": tmp_path / "o.onnx.data",
        "inputs": tmp_path / "in.npz",
    }[target]
    before = digests(tmp_path)
    proc = run(
        "rewrite",
        src,
        tmp_path / "o.onnx",
        "--inputs",
        tmp_path / "in.npz",
        "--report",
        report,
        env=cli_env,
    )
    assert_one_line_error(proc, 2, "report")
    assert digests(tmp_path) == before and not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_out_that_is_in_by_another_name_is_refused(tmp_path, cli_env, link):
    src = save(mlp(), tmp_path / "m.onnx")
    other = tmp_path / "alias.onnx"
    (os.symlink if link == "symlink" else os.link)(src, other)
    before = digests(tmp_path)
    assert_one_line_error(
        run("rewrite", src, other, env=cli_env), 2, "is the input; pass --in-place"
    )
    assert digests(tmp_path) == before


@pytest.mark.parametrize(
    "link,message",
    [
        ("symlink", "is input data file"),
        ("hardlink", "has 2 hard links"),  # onnx will not read a multiply linked data file
    ],
)
def test_data_file_linked_to_in_data_is_refused(tmp_path, cli_env, link, message):
    src = _external(tmp_path)
    (os.symlink if link == "symlink" else os.link)(
        tmp_path / "m.onnx.data", tmp_path / "o.onnx.data"
    )
    before = digests(tmp_path)
    assert_one_line_error(run("rewrite", src, tmp_path / "o.onnx", env=cli_env), 2, message)
    assert digests(tmp_path) == before


def test_out_may_not_be_the_inputs_file(tmp_path, cli_env):
    src = save(mlp(), tmp_path / "m.onnx")
    np.savez(tmp_path / "in.npz", x=np.ones((2, 8), np.float32))
    before = digests(tmp_path)
    assert_one_line_error(
        run("rewrite", src, tmp_path / "in.npz", "--inputs", tmp_path / "in.npz", env=cli_env),
        2,
        "is inputs file",
    )
    assert digests(tmp_path) == before


def test_in_place_never_replaces_in_data_while_in_points_into_it(tmp_path, cli_env):
    """--in-place replaces the model file by a rename; its new data goes to a new file, so a
    run killed between the two renames cannot leave IN pointing into rewritten data."""
    src = _external(tmp_path)
    proto = onnx.load(str(src))
    proto.graph.node.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    onnx.save(proto, str(src), save_as_external_data=True, location="m.onnx.data", size_threshold=0)
    old_data = (tmp_path / "m.onnx.data").read_bytes()
    proc = run("rewrite", src, src, "--in-place", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.onnx.data").read_bytes() == old_data
    assert (tmp_path / "m.onnx.1.data").exists()
    assert (
        "normopt: note: m.onnx now reads its weights from m.onnx.1.data; m.onnx.data, the "
        "input's data file, was left as it was" in proc.stderr
    )
    assert run("verify", src, src, env=cli_env).returncode == 0


def test_unwritable_output_folder_is_one_line(cli_env, tmp_path):
    src = save(mlp(), tmp_path / "m.onnx")
    proc = run("rewrite", src, "/proc/normopt-out.onnx", env=cli_env)
    assert_one_line_error(proc, 2, "/proc")


def test_immutable_output_is_one_line(tmp_path, cli_env):
    src = save(mlp(), tmp_path / "m.onnx")
    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    try:
        assert_one_line_error(run("rewrite", src, out, env=cli_env), 2, "o.onnx")
        assert out.read_bytes() == b"previous"
    finally:
        subprocess.run(["chattr", "-i", str(out)])
    assert not list(tmp_path.glob(".normopt-tmp-*"))


def _slow_model(tmp_path):
    """Large enough (64 MB of weights) that saving and verifying take a noticeable while."""
    rng = np.random.default_rng(0)
    n = 2048
    nodes = [
        helper.make_node("MatMul", ["x", f"w{i}"] if i == 0 else [f"h{i - 1}", f"w{i}"], [f"h{i}"])
        for i in range(4)
    ]
    nodes.append(helper.make_node("Relu", ["h3"], ["y"]))
    inits = [const(f"w{i}", (rng.standard_normal((n, n)) / n).astype(np.float32)) for i in range(4)]
    proto = make_model(nodes, [tensor("x", shape=(1, n))], [tensor("y", shape=(1, n))], inits)
    onnx.save(
        proto, str(tmp_path / "big.onnx"), save_as_external_data=True, location="big.onnx.data"
    )
    return tmp_path / "big.onnx"


def _start_and_kill_when_staged(src, out, sig, cli_env):
    proc = subprocess.Popen(
        [sys.executable, "-m", "normopt", "rewrite", str(src), str(out)],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while (
        not list(out.parent.glob(".normopt-tmp-*"))
        and proc.poll() is None
        and time.monotonic() < deadline
    ):
        time.sleep(0.005)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    return proc.returncode, stderr


def test_sigterm_cleans_up_like_sigint(tmp_path, cli_env):
    src = _slow_model(tmp_path)
    before = digests(tmp_path)
    code, stderr = _start_and_kill_when_staged(src, tmp_path / "out.onnx", signal.SIGTERM, cli_env)
    assert code == 143 and "normopt: terminated" in stderr, stderr
    assert digests(tmp_path) == before  # nothing left, nothing written, IN intact


def test_sigkill_leftovers_are_removed_by_the_next_run(tmp_path, cli_env):
    src = _slow_model(tmp_path)
    code, _ = _start_and_kill_when_staged(src, tmp_path / "out.onnx", signal.SIGKILL, cli_env)
    assert code == -signal.SIGKILL
    assert list(tmp_path.glob(".normopt-tmp-*"))  # no handler runs on SIGKILL
    small = save(mlp(), tmp_path / "m.onnx")
    assert run("rewrite", small, tmp_path / "o.onnx", env=cli_env).returncode == 0
    assert not list(tmp_path.glob(".normopt-tmp-*")) and not (tmp_path / "out.onnx").exists()


def test_only_temp_files_of_dead_runs_on_this_host_are_removed(tmp_path, cli_env):
    from normopt.files import _temp_tag

    src = save(mlp(), tmp_path / "m.onnx")
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid, host = int(finished.stdout), _temp_tag().split("@", 1)[1]
    dead_here = tmp_path / f".normopt-tmp-{dead_pid}@{host}x"
    dead_elsewhere = (
        tmp_path / f".normopt-tmp-{dead_pid}@another_machine-x"
    )  # NFS: not ours to judge
    alive_here = tmp_path / f"{_temp_tag()}x"  # this test's own process
    for folder in (dead_here, dead_elsewhere, alive_here):
        folder.mkdir()
    assert run("rewrite", src, tmp_path / "o.onnx", env=cli_env).returncode == 0
    assert not dead_here.exists() and dead_elsewhere.exists() and alive_here.exists()


def test_report_is_written_atomically_on_failure_too(tmp_path, cli_env):
    src = save(mlp(), tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    proc = run(
        "rewrite",
        src,
        tmp_path / "o.onnx",
        "--passes",
        "preln-to-rmsnorm",
        "--report",
        report,
        env=cli_env,
    )
    assert proc.returncode == 3
    assert json.loads(report.read_text())["exit_code"] == 3
    assert not list(tmp_path.glob(".normopt-tmp-*"))


def test_profile_never_writes_over_a_model_it_times(tmp_path, cli_env):
    src = save(mlp(), tmp_path / "m.onnx")
    before = digests(tmp_path)
    assert_one_line_error(
        run("profile", src, "--runs", "1", "--report", src, env=cli_env), 2, "--report"
    )
    assert digests(tmp_path) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8, 1.5])
def test_a_signal_from_the_first_instruction_is_a_clean_exit(tmp_path, cli_env, sig, delay):
    """Found from outside: SIGTERM in the first ~0.5 s (imports, argument parsing) gave exit 1
    ("Aborted!", or a traceback). From the first instruction of the entry point on it is 143 for
    SIGTERM and 130 for SIGINT, one line at most, never a traceback; before that (Python
    itself starting) the signal's default action ends the process."""
    src = save(mlp(), tmp_path / "m.onnx")
    proc = subprocess.Popen(
        [sys.executable, "-m", "normopt", "rewrite", str(src), str(tmp_path / "o.onnx")],
        env=cli_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the rewrite finished before the signal")
    assert proc.returncode in (128 + sig, -sig), (proc.returncode, stderr)
    assert "Traceback" not in stderr and "Aborted" not in stderr, stderr
    assert len(stderr.strip().splitlines()) <= 1, stderr


def test_scratch_files_outside_the_output_folder_are_named_and_swept(tmp_path, monkeypatch):
    """Found from outside: SIGKILL during `--crms auto` left a /tmp/tmpXXXX folder (profiler
    traces) that no later run removed. Scratch folders in the system's temp folder carry the
    run's tag, and a later run removes those of dead runs."""
    import tempfile

    import normopt
    from normopt.files import _temp_tag

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = _temp_tag().split("@", 1)[1]
    stale = tmp_path / f".normopt-tmp-{int(finished.stdout)}@{host}scratch"
    stale.mkdir()
    normopt.rewrite(mlp())  # an in-memory model: its files go to a scratch folder
    assert not stale.exists() and not list(tmp_path.iterdir())


def test_an_existing_data_file_no_output_read_is_replaced_with_a_note(tmp_path, cli_env):
    """OUT's data file name was taken by a file no OUT read (another model's?): it is
    replaced, and the run says so in one line."""
    src = _external(tmp_path)
    out = tmp_path / "o.onnx"
    (tmp_path / "o.onnx.data").write_bytes(b"someone else's weights")
    proc = run("rewrite", src, out, "--no-verify", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    assert "normopt: note: o.onnx.data existed and no o.onnx read it" in proc.stderr
    again = run("rewrite", src, out, "--no-verify", env=cli_env)  # now OUT's own: no note
    assert again.returncode == 0 and "existed" not in again.stderr
