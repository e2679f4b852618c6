"""Shared measurement rules (shared/docs/benchmarks.md): ORT_ENABLE_ALL, fixed intra-op
threads with spinning off, warm-up, then rounds in a fresh random order; figures are paired
ratios (per-round B/A, then the median) next to medians and p90 of each variant."""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))  # the models/ package


def session(path: str | os.PathLike, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def runner(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], threads: int = 2) -> Callable[[], None]:
    s = session(path, threads)
    return lambda: s.run(None, dict(feeds))


def interleaved(runners: Mapping[str, Callable[[], None]], rounds: int = 30, warmup: int = 3,
                seed: int = 0) -> dict[str, list[float]]:
    """Seconds per call for each runner, one call each per round, in a random order per round."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        order = list(runners)
        rng.shuffle(order)
        for name in order:
            t = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t)
    return times


def summarize(times: Mapping[str, list[float]], baseline: str) -> dict[str, dict]:
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        out[name] = {
            "median_ms": statistics.median(ms),
            "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
            "runs": len(ts),
        }
    return out


def environment(threads: int) -> dict:
    import onnxruntime

    return {"python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "machine": platform.machine(), "cpu_count": os.cpu_count(), "threads": threads,
            "processor": _cpu_name()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path
