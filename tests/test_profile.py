"""`normopt profile` and `rewrite --profile`: files and figures exist and load. No timing
assertions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from normopt.profiling import CONTROL, compare, interleaved, ratio_interval, summarize, verdict


def run(*args):
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps table headers on narrow terminals
    return subprocess.run(
        [sys.executable, "-m", "normopt", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def test_profile_two_models_json_and_plots(corpus, tmp_path):
    a = corpus("preln-ts17").model
    out = tmp_path / "r.onnx"
    assert run("rewrite", a, out).returncode == 0
    report, png, html = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "p.html"
    proc = run("profile", a, out, "--runs", "3", "--warmup", "1", "--report", report, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert (
        "x first (paired)" in proc.stdout
        and "time per op type" in proc.stdout
        and "all norms" in proc.stdout
    )
    data = json.loads(report.read_text())
    assert data["models"] == [str(a), str(out)]
    first, second = (data["summary"][m] for m in data["models"])
    assert first["ratio"] == 1.0 and second["ratio"] > 0 and second["runs"] == 3
    assert {"median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s"} <= set(first)
    assert data["ops_ms_per_run"][str(a)] and data["environment"]["threads"] == 2
    control = data["summary"][f"{a} (A/A)"]  # the first model in a second session
    assert control["runs"] == 3 and control["verdict"] in ("within noise", "faster", "slower")
    assert first["verdict"] == "baseline" and len(second["ci95"]) == 2
    assert second["ci95"][0] <= second["ratio"] <= second["ci95"][1]
    assert "one profiled run each" in proc.stdout and "r.onnx" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run("profile", a, a, "--runs", "2", "--plot", html).returncode == 0
    assert (
        html.read_text().startswith("<!doctype html>")
        and "data:image/png;base64," in html.read_text()
    )
    assert png.exists()  # the HTML's own image never overwrites a user's file


def test_rewrite_profile(corpus, tmp_path):
    proc = run("rewrite", corpus("gpt2-ts14").model, tmp_path / "o.onnx", "--profile")
    assert proc.returncode == 0 and "x first (paired)" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--backend", "tensorrt"], "TensorRT"),
        (["--backend", "ort-cuda"], "onnxruntime-gpu"),
        (["--backend", "npu"], "--backend must be one of"),
        (["--runs", "0"], "--runs and --threads must be at least 1"),
        (["--plot", "x.svg"], "--plot writes .png or .html"),
    ],
)
def test_profile_bad_options(corpus, tmp_path, args, message):
    proc = run(
        "profile",
        corpus("preln-ts17").model,
        *[str(tmp_path / a) if a.endswith(".svg") else a for a in args],
        "--runs" if "--runs" not in args else "--warmup",
        "1",
    )
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_models_with_other_inputs_are_refused_before_any_timing(corpus, tmp_path):
    """Models timed side by side run on the same inputs: one that takes others is exit 2
    naming them (it was an internal error, exit 4, once onnxruntime got the wrong feeds)."""
    import onnx

    a = corpus("preln-ts17").model
    other = onnx.load(str(a))
    old = other.graph.input[0].name
    other.graph.input[0].name = "renamed"
    for node in other.graph.node:
        node.input[:] = ["renamed" if i == old else i for i in node.input]
    b = tmp_path / "b.onnx"
    onnx.save(other, str(b))
    proc = run("profile", a, b, "--runs", "1", "--warmup", "0")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"'{b}' takes the inputs renamed, not the ones every model is timed on" in proc.stderr


def test_models_are_labelled_by_the_shortest_path_end_that_tells_them_apart():
    from normopt.profiler import ProfileReport

    def labels(*models):
        return ProfileReport(list(models), {}, {}, {}, {}).labels

    assert labels("models/x.onnx", "out/x.onnx") == ["models/x.onnx", "out/x.onnx"]
    assert labels("/a/b/x.onnx", "/a/c/y.onnx") == ["x.onnx", "y.onnx"]
    assert labels("/a/x.onnx", "/a/x.onnx#2") == ["x.onnx", "x.onnx#2"]


def test_interleaving_and_paired_ratio_are_computed_per_round():
    calls = []
    times = interleaved(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=5, warmup=1, seed=3
    )
    assert calls.count("a") == calls.count("b") == 6 and len(times["a"]) == len(times["b"]) == 5
    orders = {tuple(calls[i : i + 2]) for i in range(2, len(calls), 2)}
    assert orders == {("a", "b"), ("b", "a")}  # a fresh random order each round, not a fixed one
    summary = summarize({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}, "a", batch=4)
    assert summary["b"]["ratio"] == 1.0 and summary["a"]["median_ms"] == 2000.0
    assert summary["a"]["throughput_per_s"] == pytest.approx(2.0) and np.isclose(
        summary["b"]["std_ms"], 0
    )


def test_verdict_needs_an_interval_off_one_and_apart_from_the_controls():
    assert verdict(1.05, 1.03, 1.07, control=(0.99, 1.01)) == "slower"
    assert verdict(0.95, 0.93, 0.97, control=(0.99, 1.02)) == "faster"
    assert (
        verdict(1.05, 0.99, 1.10, control=(0.99, 1.01)) == "within noise"
    )  # the interval holds 1.0
    # a copy of the baseline measured as far off: no change at all looks like this
    assert verdict(0.988, 0.984, 0.996, control=(0.990, 1.004)) == "within noise"


def test_ratio_interval_brackets_the_median_and_narrows_with_more_rounds():
    rng = np.random.default_rng(0)
    few, many = rng.normal(1.05, 0.05, 10), rng.normal(1.05, 0.05, 1000)
    lo_few, hi_few = ratio_interval(few)
    lo_many, hi_many = ratio_interval(many)
    assert lo_few <= np.median(few) <= hi_few and lo_many <= np.median(many) <= hi_many
    assert hi_many - lo_many < (hi_few - lo_few) / 3
    assert ratio_interval([1.2]) == (1.2, 1.2)


def test_compare_has_a_control_row_repetitions_with_fresh_runners_and_other_references():
    made = []

    def factory(name):
        def make():
            made.append(name)
            return lambda: None

        return make

    figures = compare(
        {"a": factory("a"), "b": factory("b"), "c": factory("c")},
        "a",
        rounds=4,
        reps=3,
        warmup=0,
        against={"c": "b"},
    )
    assert list(figures) == ["a", "a" + CONTROL, "b", "c"]
    assert (
        sorted(made) == ["a"] * 6 + ["b"] * 3 + ["c"] * 3
    )  # fresh runners each repetition; the control is a second one
    assert figures["a"].verdict == "baseline" and figures["a" + CONTROL].verdict == "A/A control"
    assert all(len(f.reps) == 3 for f in figures.values()) and figures["a"].ratio == 1.0
    assert figures["b"].verdict in ("faster", "slower", "within noise")
    assert set(figures["c"].to_json()) == {
        "ratio",
        "ci95",
        "reps",
        "median_ms",
        "p90_ms",
        "verdict",
    }


def test_a_decomposed_norm_counts_as_a_norm(corpus):
    """Found from outside: "norm ops 0.000 ms" for a model whose norms onnxruntime leaves
    decomposed (LLaMA's dynamo RMSNorm), so the rewrite's fused norms looked like a loss. The
    decomposed norms' nodes (by the matcher) count as norms."""
    from normopt.profiler import norm_nodes, profile
    from normopt.profiling import NORM_OPS

    paths = corpus("llama-dyn18")
    assert len(norm_nodes(paths.model)) >= 5 * 6  # five RMSNorms of several nodes each
    report = profile([paths.model], paths.load_inputs(), runs=2, warmup=1, op_runs=2)
    assert report.norms_ms[str(paths.model)] > 0
    assert not set(report.ops[str(paths.model)]) & NORM_OPS  # ...though no node is a fused norm
