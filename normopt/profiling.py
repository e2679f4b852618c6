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
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normopt.errors import BadInput
from normopt.inputs import InputOptions, input_trials
from normopt.schema import document, inputs_json, versions
from normopt.sessions import timing_session

NORM_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BatchNormalization",
}


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
    control = ratio_interval(ratios[baseline + CONTROL], seed)
    out = {}
    for k in rows:
        ratio = statistics.median(ratios[k])
        low, high = ratio_interval(ratios[k], seed)
        out[k] = Figure(
            ratio,
            low,
            high,
            per_rep[k],
            statistics.median(ms[k]),
            float(np.percentile(ms[k], 90)),
            "baseline"
            if k == baseline
            else "A/A control"
            if k == baseline + CONTROL
            else verdict(ratio, low, high, control),
        )
    return out


def node_breakdown(
    path: str | os.PathLike,
    feeds: Mapping[str, np.ndarray],
    backend: str = "ort-cpu",
    threads: int = 2,
    runs: int = 10,
) -> dict[tuple[str, str], float]:
    """Milliseconds per run spent in each node of the graph onnxruntime runs after its fusions,
    keyed `(node name, op type)`, from its profiler; the first (warm-up) run is left out."""
    with tempfile.TemporaryDirectory() as tmp:
        s = timing_session(path, backend, threads, profile_prefix=str(Path(tmp) / "profile"))
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
    return sum(ms for (node, op), ms in per_node.items() if op in NORM_OPS or node in members)


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


@dataclass
class ProfileReport:
    models: list[str]
    summary: dict[str, dict]
    ops: dict[str, dict[str, float]]
    times_ms: dict[str, list[float]]
    environment: dict
    inputs: dict | None = None  # what it ran on (normopt.schema.inputs_json)
    norms_ms: dict[str, float] = field(
        default_factory=dict
    )  # fused norm ops and decomposed norms' nodes
    seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        """`normopt profile`'s document (normopt.schema)."""
        return document(
            "profile",
            {
                "models": self.models,
                "summary": self.summary,
                "ops_ms_per_run": self.ops,
                "norms_ms_per_run": self.norms_ms,
                "times_ms": self.times_ms,
                "environment": self.environment,
            },
            seconds=self.seconds,
            inputs=self.inputs,
        )


def profile(
    paths: Sequence[str | os.PathLike],
    feeds: Mapping[str, np.ndarray],
    *,
    backend: str = "ort-cpu",
    threads: int = 2,
    warmup: int = 3,
    runs: int = 30,
    op_runs: int = 10,
    seed: int = 0,
    inputs_from: str | os.PathLike | None = None,
    on_round: Callable[[int], None] | None = None,
) -> ProfileReport:
    """Time every model interleaved, then break each down by op type. Keys are the paths as given
    (the same file twice gets a #2 suffix). `inputs_from`: the .npz the feeds came from (for the
    report; None: generated with `seed`)."""
    start = time.perf_counter()
    names: list[str] = []
    for p in paths:
        name, i = str(p), 2
        while name in names:
            name, i = f"{p}#{i}", i + 1
        names.append(name)
    if backend == "tensorrt" and all(Path(p).suffix in ENGINE_SUFFIXES for p in paths):
        return _profile_engines(names, paths, warmup, runs, seed, on_round, start)
    sessions = {n: timing_session(p, backend, threads) for n, p in zip(names, paths)}
    runners = {n: (lambda s=s: s.run(None, dict(feeds))) for n, s in sessions.items()}
    times = interleaved(runners, rounds=runs, warmup=warmup, seed=seed, on_round=on_round)
    del sessions, runners
    batch = next((v.shape[0] for v in feeds.values() if getattr(v, "ndim", 0) > 0), 1)
    ops, norms = {}, {}
    for n, p in zip(names, paths):
        per_node = node_breakdown(p, feeds, backend, threads, op_runs)
        ops[n], norms[n] = by_op_type(per_node), norm_ms(per_node, norm_nodes(p))
    return ProfileReport(
        names,
        summarize(times, names[0], batch),
        ops,
        {n: [t * 1e3 for t in ts] for n, ts in times.items()},
        environment(threads, backend),
        inputs_json([feeds], inputs_from, seed),
        norms,
        {"total": time.perf_counter() - start},
    )


def profile_models(
    paths: Sequence[Path],
    *,
    backend: str,
    threads: int,
    options: InputOptions,
    warmup: int = 3,
    runs: int = 30,
    feeds: Mapping[str, np.ndarray] | None = None,
    on_round: Callable[[int], None] | None = None,
) -> ProfileReport:
    """`normopt profile`'s body: models (or TensorRT engine files, with backend tensorrt) timed
    on `feeds`, else on inputs from `options` for the first model (normopt.inputs)."""
    if runs < 1 or warmup < 0 or threads < 1:
        raise BadInput("--runs and --threads must be at least 1, --warmup at least 0")
    engines = [p.suffix in ENGINE_SUFFIXES for p in paths]
    if any(engines):  # TensorRT engine files: random inputs of their profiles' opt shapes
        if backend != "tensorrt" or not all(engines):
            raise BadInput(
                "engine files (.engine, .plan, .trt) are timed with --backend tensorrt, and "
                "only with other engine files"
            )
        from normopt.engine.trt import load_tensorrt

        load_tensorrt("profile --backend tensorrt")
        feeds = {}
    elif feeds is None:
        from normopt.rewriter import io

        feeds = input_trials(io.load(paths[0]), options)[0]
    source = options.inputs if isinstance(options.inputs, (str, os.PathLike)) else None
    return profile(
        paths,
        feeds,
        backend=backend,
        threads=threads,
        warmup=warmup,
        runs=runs,
        seed=options.seed,
        inputs_from=source,
        on_round=on_round,
    )


ENGINE_SUFFIXES = (".engine", ".plan", ".trt")


def _profile_engines(names, paths, warmup, runs, seed, on_round, start) -> ProfileReport:
    """TensorRT engine files: CUDA-event times, interleaved; per-layer times as the op table."""
    from normopt.engine.timing import engine_runner

    made = {n: engine_runner(Path(p)) for n, p in zip(names, paths)}
    times = interleaved(
        {n: run for n, (run, _) in made.items()},
        rounds=runs,
        warmup=warmup,
        seed=seed,
        on_round=on_round,
    )
    layers = {n: layer_times() for n, (_, layer_times) in made.items()}
    return ProfileReport(
        names,
        summarize(times, names[0]),
        layers,
        {n: [t * 1e3 for t in ts] for n, ts in times.items()},
        environment(1, "tensorrt"),
        None,
        {},
        {"total": time.perf_counter() - start},
    )


def norm_nodes(path: str | os.PathLike) -> set[str]:
    """The names of the nodes that make up the model's norms as normopt's matcher finds them:
    a norm onnxruntime leaves decomposed runs as these nodes and counts as a norm."""
    from normopt.rewriter import io
    from normopt.rewriter.norms import find_norms

    return {
        node.name for match in find_norms(io.load(path).graph) for node in match.nodes if node.name
    }


def check_plot_path(out: str | os.PathLike) -> Path:
    """Refuse a plot path of a kind `plot` cannot write (before anything is timed)."""
    out = Path(out)
    if out.suffix not in (".png", ".html"):
        raise BadInput(f"--plot writes .png or .html, not '{out.suffix}'")
    return out


def plot(report: ProfileReport, out: str | os.PathLike) -> Path:
    """A PNG (or an HTML page embedding it and the tables): latency distributions and time per
    op type, side by side."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib (pip install 'normopt[plot]')") from None
    out = check_plot_path(out)
    labels = [
        Path(n).name if "#" not in n else Path(n.split("#")[0]).name + "#" + n.split("#")[1]
        for n in report.models
    ]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    ax1.boxplot([report.times_ms[n] for n in report.models], showfliers=True)
    ax1.set_xticks(range(1, len(labels) + 1), labels, rotation=15, ha="right", fontsize=8)
    ax1.set_ylabel("latency per run (ms)")
    ax1.set_title(
        "latency distribution ({} runs, interleaved)".format(
            report.summary[report.models[0]]["runs"]
        )
    )
    top = sorted(
        {op for n in report.models for op in list(report.ops[n])[:8]},
        key=lambda op: -max(report.ops[n].get(op, 0.0) for n in report.models),
    )[:10]
    width = 0.8 / len(report.models)
    for i, n in enumerate(report.models):
        ax2.bar(
            np.arange(len(top)) + i * width,
            [report.ops[n].get(op, 0.0) for op in top],
            width,
            label=labels[i],
        )
    ax2.set_xticks(np.arange(len(top)) + 0.4 - width / 2, top, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("ms per run")
    ax2.set_title("time per op type (onnxruntime profiler)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    png = (
        out if out.suffix == ".png" else Path(tempfile.mkstemp(suffix=".png")[1])
    )  # never a user's file
    fig.savefig(png, dpi=110)
    plt.close(fig)
    if out.suffix == ".html":
        import base64
        import html

        image = base64.b64encode(png.read_bytes()).decode()
        png.unlink()
        rows = "".join(
            f"<tr><td>{html.escape(labels[i])}</td>"
            + "".join(
                f"<td>{report.summary[n][k]:.3f}</td>"
                for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "ratio")
            )
            + "</tr>"
            for i, n in enumerate(report.models)
        )
        out.write_text(
            f"<!doctype html><meta charset=utf-8><title>normopt profile</title>"
            "<h1>normopt profile</h1><table border=1 cellpadding=4><tr><th>model</th><th>median "
            "ms</th>"
            "<th>p90</th><th>p99</th><th>mean</th><th>std</th><th>x first "
            f"(paired)</th></tr>{rows}</table>"
            f"<p><img src='data:image/png;base64,{image}'></p>"
            f"<pre>{html.escape(json.dumps(report.environment, indent=2))}</pre>"
        )
    return out
