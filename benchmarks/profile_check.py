"""Does `normopt profile` measure what it claims? Two checks, one run.

    python benchmarks/profile_check.py [--runs 60]

1. A model against itself: the paired ratio should be within 3% of 1.0.
2. Original vs rewritten (preln-to-rmsnorm on the norm-heavy GPT-2 128x4, 8x512 tokens): the
   ratio from normopt.profiling next to an independent loop written here with plain
   onnxruntime sessions (strict A/B alternation, ratio of medians), in the same run.
Writes results/profile_check.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import write


def independent_ratio(a: Path, b: Path, feeds: dict, runs: int, threads: int = 2) -> float:
    import onnxruntime as ort

    def make(path):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    sa, sb = make(a), make(b)
    ta, tb = [], []
    for _ in range(3):
        sa.run(None, feeds), sb.run(None, feeds)
    for _ in range(runs):
        for s, ts in ((sa, ta), (sb, tb)):
            t = time.perf_counter()
            s.run(None, feeds)
            ts.append(time.perf_counter() - t)
    return statistics.median(tb) / statistics.median(ta)


def main() -> int:
    from models.corpus import build
    from normopt.profiler import profile
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=60)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    results = {}

    llama = build("llama-512x4-dyn18").model
    feeds = {
        "input_ids": rng.integers(0, 128, (1, 128)).astype(np.int64),
        "attention_mask": np.ones((1, 128), np.int64),
        "position_ids": np.arange(128, dtype=np.int64)[None],
    }
    self_report = profile([llama, llama], feeds, runs=args.runs)
    results["self_ratio"] = self_report.summary[self_report.models[1]]["ratio"]
    print(f"1. LLaMA 512x4 (1x128 tokens) against itself: paired ratio {results['self_ratio']:.4f}")

    src = build("gpt2-128x4-ts17").model
    feeds = {
        "input_ids": rng.integers(0, 128, (8, 512)).astype(np.int64),
        "attention_mask": np.ones((8, 512), np.int64),
    }
    with tempfile.TemporaryDirectory() as tmp:
        dst = Path(tmp) / "rewritten.onnx"
        rewrite_file(src, dst, checks=VerifyOptions(inputs=feeds))
        report = profile([src, dst], feeds, runs=args.runs)
        results["profile_ratio"] = report.summary[report.models[1]]["ratio"]
        results["independent_ratio"] = independent_ratio(src, dst, feeds, args.runs)
    print(
        "2. GPT-2 128x4 (8x512) rewritten / original: normopt profile "
        f"{results['profile_ratio']:.4f}, "
        f"independent loop {results['independent_ratio']:.4f}"
    )
    print(f"wrote {write('profile_check', {'runs': args.runs, **results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
