"""benchmarks/norm_kernels.py runs on a GPU only through the device tool, so its logic is checked
here: the byte counts, the goal verdicts (never 'met' without a measurement), and a --smoke run
of the whole script on CPU through Triton's interpreter."""

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "norm_kernels.py"
spec = importlib.util.spec_from_file_location("norm_kernels_benchmark", PATH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_minimal_bytes():
    assert bench.minimal_bytes("rms_norm", 16384, 4096, 2) == (2 * 16384 * 4096 + 4096) * 2
    assert bench.minimal_bytes("crms_norm", 1, 767, 2) == (2 * 767 + 767) * 2
    assert bench.minimal_bytes("add_rms_norm", 8, 10, 4) == (4 * 8 * 10 + 10) * 4
    assert bench.minimal_bytes("layer_norm", 8, 10, 2) == (2 * 8 * 10 + 2 * 10) * 2


def row(
    kernel, of_copy=0.95, x_compile=1.1, tokens=16384, hidden=4096, dtype="float16", config=None
):
    return {
        "kernel": kernel,
        "tokens": tokens,
        "hidden": hidden,
        "dtype": dtype,
        "config": config,
        "of_copy": of_copy,
        "x_compile": x_compile,
    }


def verdicts(rows):
    return {v["goal"]: v["verdict"] for v in bench.goals(rows)}


def test_goals_are_not_met_without_measurements():
    assert set(verdicts([]).values()) == {"not measured"}


def test_goals_judge_the_default_config_at_the_goal_shape():
    kernels = ("rms_norm", "crms_norm", "add_rms_norm")
    good = [row(k) for k in kernels]
    assert set(verdicts(good).values()) == {"met"}
    slow_copy = [row("rms_norm", of_copy=0.89)] + good[1:]
    v = verdicts(slow_copy)
    assert [g for g, s in v.items() if s != "met"] == [
        "rms_norm >= 90% of copy bandwidth at 16384 x 4096 float16"
    ]
    # one slower shape with >= 2048 tokens fails the compile goal; fewer tokens do not count
    v = verdicts(good + [row("crms_norm", x_compile=0.97, tokens=2048, hidden=767)])
    assert v["crms_norm >= 1.0x torch.compile at every shape with >= 2048 tokens"] == "NOT MET"
    assert set(verdicts(good + [row("crms_norm", x_compile=0.5, tokens=128)]).values()) == {"met"}
    # a tuning row (non-default config) is not the kernel as shipped
    assert set(
        verdicts(good + [row("rms_norm", of_copy=0.1, x_compile=0.1, config=(256, 1))]).values()
    ) == {"met"}


def test_smoke_run_writes_the_table_and_json(tmp_path, capsys):
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "norm_kernels.json").read_text())
    kernels = {(r["kernel"], r["hidden"], r["config"] is None) for r in data["rows"]}
    assert kernels == {(k, h, d) for k in bench.KERNELS for h in (48, 47) for d in (True, False)}
    assert all(r["runs"] == 3 and r["rel_error"] < 2e-2 for r in data["rows"])
    assert {v["verdict"] for v in data["goals"]} == {"not measured"}
    assert (tmp_path / "norm_kernels.md").read_text().count("| float16 |") == 2 * 2 * 4
    assert "not measured" in capsys.readouterr().out
