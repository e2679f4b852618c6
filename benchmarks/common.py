"""What every benchmark shares: the measurement rules live in normopt.profiling (ORT_ENABLE_ALL,
fixed threads, spinning off, random order per round, paired ratios); this adds the models/
package to the path and a JSON writer for results/."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from normopt.profiling import environment as _environment
from normopt.profiling import interleaved, op_breakdown, session, summarize  # noqa: F401  (re-exported)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
sys.path.insert(0, str(ROOT))  # the models/ package


def runner(path: str | os.PathLike, feeds: Mapping[str, np.ndarray], threads: int = 2) -> Callable[[], None]:
    s = session(path, "ort-cpu", threads)
    return lambda: s.run(None, dict(feeds))


def environment(threads: int) -> dict:
    return _environment(threads, "ort-cpu")


def write(name: str, data: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=float))
    return path
