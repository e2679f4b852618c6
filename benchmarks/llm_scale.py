"""LLM-scale rewrites: synthetic Pre-LN decoders of real sizes (benchmarks/llm_decoder.py,
written straight into their data files), each rewritten with and without verification next to a
plain onnx-ir load+save round trip of the same model, wall time and peak RSS side by side.

    python benchmarks/llm_scale.py                          # 124M, 1.3B, 2.7B fp32; 6.7B fp16
    python benchmarks/llm_scale.py --sizes 124M,1.3B --rounds 3

Each variant runs in a fresh subprocess (its peak RSS is its own), in alternating order every
round (benchmarks/rewrite_memory.py's `measure`); the table shows medians. A model is built once
into --dir and deleted after its size is measured (unless --keep): 6.7B fp16 takes 13.7 GB and
its output as much again. Goals (issue "LLM scale"): 1.3B `rewrite --no-verify` <= 1.5x the
round trip's time, peak RSS <= 1.2x the model's bytes, with verification <= 1.5x; 6.7B fp16
verified (by segments) with a peak RSS under 20 GB on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from llm_decoder import SIZES, build
from rewrite_memory import measure

RESULTS = Path(__file__).parent / "results"
VARIANTS = ["plain", "rewrite-no-verify", "rewrite"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/normopt-llm-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    parser.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"of {', '.join(VARIANTS)}, rotate-no-verify, rotate (rewrite --rotate hadamard)",
    )
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = {}
    for size in args.sizes.split(","):
        shape = SIZES[size]
        src = args.dir / f"decoder-{size}.onnx"
        data = src.with_name(src.name + ".data")
        if not data.exists():
            print(f"building {size} ({shape.params / 1e9:.2f}B parameters)", file=sys.stderr)
            build(src, shape)
        model_bytes = src.stat().st_size + data.stat().st_size
        runs = measure(src, args.variants.split(","), args.rounds, args.dir)
        if not args.keep:
            src.unlink()
            data.unlink()
        if runs is None:
            return 1
        rows[size] = {
            "model_bytes": model_bytes,
            "dtype": shape.dtype.__name__,
            "rounds": args.rounds,
            "runs": runs,
        }
        _print_row(size, rows[size])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "llm_scale.json"
    earlier = json.loads(out.read_text())["sizes"] if out.exists() else {}
    out.write_text(
        json.dumps(
            {
                "sizes": {**earlier, **rows},  # a size measured again replaces its entry
                "machine": platform.machine(),
                "cpu_count": os.cpu_count(),
                "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


def _print_row(size: str, row: dict) -> None:
    """One Markdown table row: the model, then each variant's time and RSS (medians) next to
    the round trip's."""
    med = {
        v: (
            statistics.median(r["seconds"] for r in runs),
            statistics.median(r["peak_rss"] for r in runs),
        )
        for v, runs in row["runs"].items()
    }
    plain = med["plain"][0]
    verified = [r for v, runs in row["runs"].items() for r in runs if "verified by" in r["steps"]]
    method = verified[0]["steps"]["verified by"]["method"] if verified else "-"
    gb = row["model_bytes"] / 1e9
    cells = [f"{size} {row['dtype']}", f"{gb:.2f} GB", f"{plain:.1f} s"]
    for v in (v for v in row["runs"] if v != "plain"):
        seconds, rss = med[v]
        cells += [
            f"{v}: {seconds:.1f} s ({seconds / plain:.2f}x)",
            f"{rss / 1e9:.2f} GB ({rss / row['model_bytes']:.2f}x)",
        ]
    print("| " + " | ".join([*cells, method]) + " |", flush=True)


if __name__ == "__main__":
    print(
        "| model | file | round trip | variant: time | peak RSS | ... | verified by |", flush=True
    )
    sys.exit(main())
