"""Side-by-side latency profiling (the measurement rules: docs/design.md, "Measuring").

All models run in one process; every round runs each model once, in a fresh random order, so
drift hits all alike; onnxruntime's intra-op spinning is off (else the session that just ran
steals a core from the next). The figure that compares models is the paired ratio: per round
B/A, then the median. A separate profiled pass per model gives time per op type from
onnxruntime's profiler.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normopt.files import scratch_folder
from normopt.rewriter.norms import NORM_OPS
from normopt.schema import versions
from normopt.sessions import timing_session


def interleaved(
    runners: Mapping[str, Callable[[], None]],
    rounds: int = 30,
    warmup: int = 3,
    seed: int = 0,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call for each runner: one call each per round, in a random order per round (a
    runner that returns a number has timed itself: a GPU runner's CUDA events)."""
    for run in runners.values():
        for _ in range(warmup):
            run()
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        order = list(runners)
        rng.shuffle(order)
        for name in order:
            t = time.perf_counter()
            own = runners[name]()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
        if on_round:
            on_round(r + 1)
    return times


def summarize(times: Mapping[str, list[float]], baseline: str, batch: int = 1) -> dict[str, dict]:
    """Median, p90, p99, mean, std (ms), throughput (samples/s) and the paired ratio to
    `baseline`."""
    base = times[baseline]
    out = {}
    for name, ts in times.items():
        ms = sorted(t * 1e3 for t in ts)
        med = statistics.median(ms)
        out[name] = {
            "median_ms": med,
            "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": statistics.fmean(ms),
            "std_ms": statistics.pstdev(ms),
            "runs": len(ms),
            "throughput_per_s": batch * 1e3 / med if med else float("inf"),
            "ratio": statistics.median(t / b for t, b in zip(ts, base)),
        }
    return out


def ratio_interval(
    ratios: Sequence[float], seed: int = 0, resamples: int = 2000
) -> tuple[float, float]:
    """Bootstrap 95% interval of the median of paired per-round ratios."""
    data = np.asarray(ratios, dtype=float)
    if data.size < 2:
        return (float(data[0]), float(data[0])) if data.size else (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    medians = np.median(data[rng.integers(0, data.size, (resamples, data.size))], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


CONTROL = " (A/A)"  # suffix of the control row: the baseline in a second session of its own


def verdict(ratio: float, low: float, high: float, control: tuple[float, float] | None) -> str:
    """ "faster" / "slower", or "within noise" when the interval holds 1.0 or overlaps the A/A
    control's (`control`: its interval; the baseline against a copy of itself is what no
    change looks like: sessions of one model differ by 1-2% on a shared CPU)."""
    if low <= 1.0 <= high or (control is not None and low <= control[1] and control[0] <= high):
        return "within noise"
    return "faster" if ratio < 1.0 else "slower"


@dataclass
class Figure:
    """One model against the baseline: the paired ratio (median of per-round ratios, every
    repetition pooled), its bootstrap 95% interval, each repetition's own median, the verdict."""

    ratio: float
    low: float
    high: float
    reps: list[float]
    median_ms: float
    p90_ms: float
    verdict: str

    def text(self) -> str:
        return f"{self.ratio:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def to_json(self) -> dict:
        return {
            "ratio": self.ratio,
            "ci95": [self.low, self.high],
            "reps": self.reps,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "verdict": self.verdict,
        }


def compare(
    models: Mapping[str, str | os.PathLike | Callable[[], Callable[[], None]]],
    baseline: str,
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    backend: str = "ort-cpu",
    threads: int = 2,
    rounds: int = 30,
    reps: int = 2,
    warmup: int = 3,
    seed: int = 0,
    against: Mapping[str, str] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> dict[str, Figure]:
    """Time every model against `baseline` and against itself (the A/A control row, named
    `baseline + CONTROL`): `reps` repetitions, each with fresh sessions and `rounds` interleaved
    rounds in a fresh random order. A model is a path (an onnxruntime session is made for it,
    run on `feeds`) or a factory returning a fresh runner. `against` names, for some rows,
    another row to take the ratio to instead (normopt + a peer tool vs the peer tool alone).
    Returns one Figure per row, the baseline's own row (ratio 1) first."""

    def make(model) -> Callable[[], None]:
        if callable(model):
            return model()
        s = timing_session(model, backend, threads)
        return lambda: s.run(None, dict(feeds or {}))

    rows = {
        baseline: models[baseline],
        baseline + CONTROL: models[baseline],
        **{k: v for k, v in models.items() if k != baseline},
    }
    ratios: dict[str, list[float]] = {k: [] for k in rows}
    per_rep: dict[str, list[float]] = {k: [] for k in rows}
    ms: dict[str, list[float]] = {k: [] for k in rows}
    done = 0
    for rep in range(reps):
        runners = {k: make(v) for k, v in rows.items()}
        times = interleaved(
            runners,
            rounds=rounds,
            warmup=warmup,
            seed=seed + rep,
            on_round=None if on_round is None else (lambda r: on_round(done + r)),
        )
        del runners
        done += rounds
        for k, ts in times.items():
            paired = [t / b for t, b in zip(ts, times[(against or {}).get(k, baseline)])]
            ratios[k] += paired
            per_rep[k].append(statistics.median(paired))
            ms[k] += [t * 1e3 for t in ts]
    return _figures(rows, baseline, ratios, per_rep, ms, seed)


def _figures(rows, baseline: str, ratios: dict, per_rep: dict, ms: dict, seed: int) -> dict:
    """One Figure per row from its paired ratios, with the verdict against the A/A control."""
    control = ratio_interval(ratios[baseline + CONTROL], seed)
    out = {}
    for k in rows:
        ratio = statistics.median(ratios[k])
        low, high = ratio_interval(ratios[k], seed)
        if k == baseline:
            judged = "baseline"
        elif k == baseline + CONTROL:
            judged = "A/A control"
        else:
            judged = verdict(ratio, low, high, control)
        p90 = float(np.percentile(ms[k], 90))
        out[k] = Figure(ratio, low, high, per_rep[k], statistics.median(ms[k]), p90, judged)
    return out


def node_breakdown(
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    backend: str = "ort-cpu",
    threads: int = 2,
    runs: int = 10,
) -> dict[tuple[str, str], float]:
    """Milliseconds per run spent in each node of the graph onnxruntime runs after its fusions,
    keyed `(node name, op type)`, from its profiler; the first (warm-up) run is left out.
    OpenVINO: its layers (fused as it compiled them) from its performance counters."""
    if backend == "openvino":
        return _openvino_layers(path, feeds, threads, runs)
    with scratch_folder() as tmp:
        s = timing_session(path, backend, threads, profile_prefix=str(tmp / "profile"))
        for _ in range(1 + runs):
            s.run(None, dict(feeds))
        events = json.loads(Path(s.end_profiling()).read_text())
    model_runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
    cutoff, counted = (
        (model_runs[0]["ts"] + model_runs[0]["dur"], runs) if model_runs else (0, 1 + runs)
    )
    spent: dict[tuple[str, str], float] = {}
    for e in events:
        if (
            e.get("cat") == "Node"
            and e.get("name", "").endswith("_kernel_time")
            and e.get("ts", 0) >= cutoff
        ):
            key = (e["name"].removesuffix("_kernel_time"), e.get("args", {}).get("op_name", "?"))
            spent[key] = spent.get(key, 0.0) + e["dur"] / 1e3 / counted
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def _openvino_layers(path, feeds, threads: int, runs: int) -> dict[tuple[str, str], float]:
    session = timing_session(path, "openvino", threads, profile_prefix="on")
    session.run(None, dict(feeds))  # warm-up
    spent: dict[tuple[str, str], float] = {}
    for _ in range(runs):
        session.run(None, dict(feeds))
        for key, ms in session.layer_ms().items():
            spent[key] = spent.get(key, 0.0) + ms / runs
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def by_op_type(per_node: Mapping[tuple[str, str], float]) -> dict[str, float]:
    """A node breakdown summed per op type, largest first."""
    per_op: dict[str, float] = {}
    for (_node, op), ms in per_node.items():
        per_op[op] = per_op.get(op, 0.0) + ms
    return dict(sorted(per_op.items(), key=lambda kv: -kv[1]))


def norm_ms(per_node: Mapping[tuple[str, str], float], members: set[str]) -> float:
    """Milliseconds per run in the model's norms: fused norm ops, and the nodes of every norm
    onnxruntime left decomposed (`members`: `norm_nodes` of the model; ORT keeps an unfused
    node's name), so a decomposed original and its fused rewrite compare alike."""
    from normopt.engine.openvino import NORM_LAYERS

    return sum(
        ms
        for (node, op), ms in per_node.items()
        if op in NORM_OPS or op in NORM_LAYERS or node in members
    )


def environment(threads: int, backend: str) -> dict:
    import onnxruntime

    return {
        **versions(),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "backend": backend,
        "providers": onnxruntime.get_available_providers(),
    }


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
