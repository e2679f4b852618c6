"""What every benchmark shares: the measurement rules live in normopt.profiling (ORT_ENABLE_ALL,
fixed threads, spinning off, random order per round, paired ratios; `compare`: an A/A control
row, at least 2 repetitions with fresh sessions, bootstrap 95% intervals, a verdict per figure);
this adds the models/ package to the path, the timing arguments, the table cells of a figure,
and a JSON writer for results/."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from normopt.profiler import norm_nodes  # noqa: F401  (re-exported)
from normopt.profiling import (
    CONTROL,
    Figure,
    by_op_type,
    compare,
    node_breakdown,
    norm_ms,
)  # noqa: F401  (re-exported)
from normopt.profiling import environment as _environment

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))  # the models/ package


def timing_parser(doc: str, rounds: int = 30) -> argparse.ArgumentParser:
    """A parser with the arguments every timing benchmark takes: --rounds, --reps, --threads."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--reps", type=int, default=2, help="repetitions, each with fresh sessions")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def cells(figure: Figure) -> list[str]:
    """Table cells: median ms, the ratio with its interval, each repetition's ratio, the verdict."""
    return [
        f"{figure.median_ms:.2f}",
        figure.text(),
        " / ".join(f"{r:.3f}" for r in figure.reps),
        figure.verdict,
    ]


CELLS = ("median ms", "ratio [95% CI]", "per repetition", "verdict")


def feeds(
    example: Mapping[str, np.ndarray],
    batch: int | None = None,
    seq: int | None = None,
    side: int | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Benchmark inputs shaped like a model's example inputs, resized: `batch` samples, `seq`
    tokens (input_ids random, attention_mask ones, position_ids 0..seq-1), images `side` x
    `side`; other inputs as in the example."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, x in example.items():
        b = batch or x.shape[0]
        if name == "input_ids":
            out[name] = rng.integers(0, 128, (b, seq or x.shape[1])).astype(x.dtype)
        elif name == "attention_mask":
            out[name] = np.ones((b, seq or x.shape[1]), x.dtype)
        elif name == "position_ids":
            s = seq or x.shape[-1]
            out[name] = np.broadcast_to(np.arange(s), (b, s)).astype(x.dtype).copy()
        elif x.ndim == 4 and x.dtype.kind == "f":
            h, w = (side, side) if side else x.shape[2:]
            out[name] = rng.standard_normal((b, x.shape[1], h, w)).astype(x.dtype)
        else:
            out[name] = x
    return out


def environment(threads: int) -> dict:
    return _environment(threads, "ort-cpu")


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path


def write_results(name: str, env: dict, args, results: dict) -> None:
    """results/NAME.json: the environment, the timing arguments and the results; says where."""
    document = {"environment": env, "rounds": args.rounds, "reps": args.reps, "results": results}
    print(f"wrote {write(name, document)}")


def applied(report) -> list[str]:
    """What a rewrite report's passes changed, one line each (cleanup's housekeeping left out)."""
    return [line for p in report.passes if p.modified and p.name != "cleanup" for line in p.lines]
