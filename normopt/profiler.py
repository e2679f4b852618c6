"""`normopt profile`: models (or TensorRT engines) timed side by side, with their time per op
type and the share of their norms; `plot` draws the figures. The measurement itself is
normopt.profiling's.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from normopt.errors import BadInput
from normopt.files import write_bytes_atomic
from normopt.inputs import InputOptions, input_trials
from normopt.profiling import (
    CONTROL,
    by_op_type,
    environment,
    interleaved,
    node_breakdown,
    norm_ms,
    ratio_interval,
    summarize,
    verdict,
)
from normopt.schema import document, inputs_json, now
from normopt.sessions import timing_session


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
    # OpenVINO: each model's compiled layers by type (what it fused); None on other backends
    runtime_ops: dict[str, dict[str, int]] | None = None

    # the document's stamp, one per report: every copy of the document carries it
    created: str = field(default_factory=now, repr=False)

    @property
    def labels(self) -> list[str]:
        """Each model by the shortest end of its path that tells it apart from the others
        (`x.onnx`; `models/x.onnx` and `out/x.onnx`; a model given twice keeps its `#2`)."""
        parts = [Path(name).parts or (name,) for name in self.models]
        for k in range(1, max(len(p) for p in parts) + 1):
            labels = ["/".join(p[-k:]) for p in parts]
            if len(set(labels)) == len(labels):
                return labels
        return list(self.models)

    def to_json(self) -> dict:
        """`normopt profile`'s document (normopt.schema)."""
        return document(
            "profile",
            {
                "models": self.models,
                "summary": self.summary,
                "ops_ms_per_run": self.ops,
                "norms_ms_per_run": self.norms_ms,
                "runtime_ops": self.runtime_ops,
                "times_ms": self.times_ms,
                "environment": self.environment,
            },
            seconds=self.seconds,
            inputs=self.inputs,
            created=self.created,
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
    control = names[0] + CONTROL  # the first model in a second session: what no change gives
    sessions[control] = timing_session(paths[0], backend, threads)
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
        _verdicts(summarize(times, names[0], batch), times, names[0], control, seed),
        ops,
        {n: [t * 1e3 for t in ts] for n, ts in times.items()},
        environment(threads, backend),
        inputs_json([feeds], inputs_from, seed),
        norms,
        {"total": time.perf_counter() - start},
        _runtime_ops(names, paths, threads) if backend == "openvino" else None,
    )


def _runtime_ops(names, paths, threads: int) -> dict[str, dict[str, int]]:
    from normopt.engine.openvino import Session

    return {n: Session(p, threads).runtime_ops() for n, p in zip(names, paths)}


def _verdicts(summary: dict, times: dict, first: str, control: str, seed: int) -> dict:
    """Each model's paired ratio to the first with its bootstrap 95% interval and a verdict
    against the A/A control's interval (normopt.profiling: the speed guard's rules)."""
    intervals = {
        n: ratio_interval([t / b for t, b in zip(ts, times[first])], seed)
        for n, ts in times.items()
    }
    for name, row in summary.items():
        row["ci95"] = list(intervals[name])
        row["verdict"] = (
            "baseline"
            if name == first
            else verdict(
                row["ratio"], *intervals[name], None if name == control else intervals[control]
            )
        )
    return summary


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
    if not any(engines):
        _check_inputs(paths, feeds)
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


def _check_inputs(paths: Sequence[Path], feeds: Mapping[str, np.ndarray]) -> None:
    """Models timed side by side run on the same inputs: each must take exactly those names
    (BadInput naming the first model that does not, before any timing)."""
    from normopt.rewriter.file_checks import parse_checked

    for path in paths:
        graph = parse_checked(path).graph
        weights = {t.name for t in graph.initializer}
        needed = {v.name for v in graph.input} - weights
        missing, extra = sorted(needed - set(feeds)), sorted(set(feeds) - needed)
        if missing or extra:
            given = ", ".join(sorted(feeds)) or "none"
            raise BadInput(
                f"'{path}' takes the inputs {', '.join(sorted(needed)) or 'none'}, not the ones "
                f"every model is timed on ({given}); models timed side by side run on the same "
                "inputs"
            )


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
    op type, side by side; written atomically."""
    out = check_plot_path(out)
    labels = report.labels
    png = _png(report, labels)
    data = png if out.suffix == ".png" else _html(report, labels, png).encode()
    write_bytes_atomic(out, data)
    return out


def _png(report: ProfileReport, labels: list[str]) -> bytes:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BadInput("--plot needs matplotlib (pip install 'normopt[plot]')") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.5))
    ax1.boxplot([report.times_ms[n] for n in report.models], showfliers=True)
    ax1.set_xticks(range(1, len(labels) + 1), labels, rotation=15, ha="right", fontsize=8)
    ax1.set_ylabel("latency per run (ms)")
    runs = report.summary[report.models[0]]["runs"]
    ax1.set_title(f"latency distribution ({runs} runs, interleaved)")
    top = sorted(
        {op for n in report.models for op in list(report.ops[n])[:8]},
        key=lambda op: -max(report.ops[n].get(op, 0.0) for n in report.models),
    )[:10]
    width = 0.8 / len(report.models)
    for i, n in enumerate(report.models):
        heights = [report.ops[n].get(op, 0.0) for op in top]
        ax2.bar(np.arange(len(top)) + i * width, heights, width, label=labels[i])
    ax2.set_xticks(np.arange(len(top)) + 0.4 - width / 2, top, rotation=30, ha="right", fontsize=8)
    ax2.set_ylabel("ms per run")
    ax2.set_title("time per op type (onnxruntime profiler)")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _html(report: ProfileReport, labels: list[str], png: bytes) -> str:
    import base64
    import html

    image = base64.b64encode(png).decode()
    rows = "".join(
        f"<tr><td>{html.escape(labels[i])}</td>"
        + "".join(
            f"<td>{report.summary[n][k]:.3f}</td>"
            for k in ("median_ms", "p90_ms", "p99_ms", "mean_ms", "std_ms", "ratio")
        )
        + "</tr>"
        for i, n in enumerate(report.models)
    )
    head = "".join(
        f"<th>{h}</th>"
        for h in ("model", "median ms", "p90", "p99", "mean", "std", "x first (paired)")
    )
    return (
        "<!doctype html><meta charset=utf-8><title>normopt profile</title>"
        f"<h1>normopt profile</h1><table border=1 cellpadding=4><tr>{head}</tr>{rows}</table>"
        f"<p><img src='data:image/png;base64,{image}'></p>"
        f"<pre>{html.escape(json.dumps(report.environment, indent=2))}</pre>"
    )
