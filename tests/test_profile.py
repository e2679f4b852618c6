"""`normopt profile` and `rewrite --profile`: files and figures exist and load. No timing assertions."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from normopt.profiling import interleaved, summarize


def run(*args):
    env = {**os.environ, "COLUMNS": "200"}  # rich wraps table headers on narrow terminals
    return subprocess.run([sys.executable, "-m", "normopt", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env)


def test_profile_two_models_json_and_plots(corpus, tmp_path):
    a = corpus("preln-ts17").model
    out = tmp_path / "r.onnx"
    assert run("rewrite", a, out).returncode == 0
    report, png, html = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "p.html"
    proc = run("profile", a, out, "--runs", "3", "--warmup", "1", "--json", report, "--plot", png)
    assert proc.returncode == 0, proc.stderr
    assert "x first (paired)" in proc.stdout and "time per op type" in proc.stdout and "all norm ops" in proc.stdout
    data = json.loads(report.read_text())
    assert data["models"] == [str(a), str(out)]
    first, second = (data["summary"][m] for m in data["models"])
    assert first["ratio"] == 1.0 and second["ratio"] > 0 and second["runs"] == 3
    assert {"median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "throughput_per_s"} <= set(first)
    assert data["ops_ms_per_run"][str(a)] and data["environment"]["threads"] == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run("profile", a, a, "--runs", "2", "--plot", html).returncode == 0
    assert html.read_text().startswith("<!doctype html>") and "data:image/png;base64," in html.read_text()
    assert png.exists()  # the HTML's own image never overwrites a user's file


def test_rewrite_profile(corpus, tmp_path):
    proc = run("rewrite", corpus("gpt2-ts14").model, tmp_path / "o.onnx", "--profile")
    assert proc.returncode == 0 and "x first (paired)" in proc.stdout


@pytest.mark.parametrize("args,message", [
    (["--backend", "tensorrt"], "TensorRT"),
    (["--backend", "ort-cuda"], "onnxruntime-gpu"),
    (["--backend", "npu"], "--backend must be one of"),
    (["--runs", "0"], "--runs and --threads must be at least 1"),
    (["--plot", "x.svg"], "--plot writes .png or .html"),
])
def test_profile_bad_options(corpus, tmp_path, args, message):
    proc = run("profile", corpus("preln-ts17").model, *[str(tmp_path / a) if a.endswith(".svg") else a for a in args],
               "--runs" if "--runs" not in args else "--warmup", "1")
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_interleaving_and_paired_ratio_are_computed_per_round():
    calls = []
    times = interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=5, warmup=1, seed=3)
    assert calls.count("a") == calls.count("b") == 6 and len(times["a"]) == len(times["b"]) == 5
    orders = {tuple(calls[i:i + 2]) for i in range(2, len(calls), 2)}
    assert orders == {("a", "b"), ("b", "a")}  # a fresh random order each round, not a fixed one
    summary = summarize({"a": [1.0, 2.0, 4.0], "b": [2.0, 2.0, 2.0]}, "a", batch=4)
    assert summary["b"]["ratio"] == 1.0 and summary["a"]["median_ms"] == 2000.0
    assert summary["a"]["throughput_per_s"] == pytest.approx(2.0) and np.isclose(summary["b"]["std_ms"], 0)
