"""ORT CPU latency of the default rewrite on timm's EvoNorm models, and how much of the rewritten
model's time its EvoNorms take (the fused-kernel question of the EvoNorm issue).

    python benchmarks/evonorm.py [--rounds 30] [--reps 2] [--threads 2]

- timm's regnetz_b16_evos (68 EvoNorm-S0a, SE, SiLU) and resnetv2_50d_evos (51 EvoNorm-S0),
  TorchScript 17, and ResNetV2-26d with EvoNorm-B0 (dynamo 18: its running-variance branch
  arrives as a constant of the input's full shape), random weights, 64x64, batch 1 and 8.
- Original vs normopt's default rewrite (fold-affine-norms folds the trailing affines that a
  Conv/Gemm can take; simplify-evonorm lets B0's per-channel values broadcast), paired.
- onnxruntime's profiler on the rewritten model (10 runs): ms per run in the EvoNorms' nodes
  (as normopt's matcher finds them), in Conv (with its fused forms and the NCHWc reorders it
  brings) and in everything else.
Writes results/evonorm.json.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
from common import (
    CELLS,
    applied,
    cells,
    compare,
    environment,
    feeds,
    timing_parser,
    write_results,
)
from preln import norm_time

MODELS = ("regnetz-b16-evos-ts17", "resnetv2-50d-evos-ts17", "resnetv2-26d-evob-dyn18")
CONV_OPS = ("Conv", "FusedConv", "NchwcConv", "ReorderInput", "ReorderOutput")


def shares(path: Path, example, threads: int) -> dict:
    """preln.norm_time, and the ms per run in convolutions (and their layout reorders)."""
    profile = norm_time(path, example, threads)
    conv = sum(ms for op, ms in profile["by_op"].items() if op in CONV_OPS)
    return {**profile, "conv_ms": conv}


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    args = timing_parser(__doc__).parse_args()
    env = environment(args.threads)
    table = Table(
        title=f"EvoNorm models, default rewrite, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, "
        f"{args.threads} threads, {args.reps} x {args.rounds} interleaved rounds"
    )
    for col in ("model", "batch", "variant", *CELLS, "nodes", "EvoNorms / Conv / rest ms"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in MODELS:
            paths = build(entry)
            out = Path(tmp) / f"{entry}.onnx"
            report = rewrite_file(
                paths.model, out, checks=VerifyOptions(inputs=paths.load_inputs())
            )
            ops = {
                k: collections.Counter(n.op_type for n in onnx.load(str(p)).graph.node)
                for k, p in (("original", paths.model), ("rewritten", out))
            }
            delta = {
                op: ops["rewritten"][op] - ops["original"][op]
                for op in ops["original"] | ops["rewritten"]
                if ops["rewritten"][op] != ops["original"][op]
            }
            results[entry] = {
                "changes": applied(report),
                "max_rel_error": max(o.max_rel for o in report.verification.outputs),
                "nodes": {k: sum(c.values()) for k, c in ops.items()},
                "op_delta": delta,
                "bytes": {"original": paths.model.stat().st_size, "rewritten": out.stat().st_size},
                "batches": {},
            }
            for batch in (1, 8):
                example = feeds(paths.load_inputs(), batch=batch)
                variants = {"original": paths.model, "normopt": out}
                figures = compare(
                    variants,
                    "original",
                    example,
                    threads=args.threads,
                    rounds=args.rounds,
                    reps=args.reps,
                )
                split = {k: shares(Path(p), example, args.threads) for k, p in variants.items()}
                for name, figure in figures.items():
                    s = split.get(name)
                    text = (
                        f"{s['norm_ms']:.2f} / {s['conv_ms']:.2f} / "
                        f"{s['total_ms'] - s['norm_ms'] - s['conv_ms']:.2f}"
                        if s
                        else ""
                    )
                    nodes = (
                        str(
                            results[entry]["nodes"].get(
                                "rewritten" if name == "normopt" else "original", ""
                            )
                        )
                        if s
                        else ""
                    )
                    table.add_row(entry, str(batch), name, *cells(figure), nodes, text)
                results[entry]["batches"][batch] = {
                    "figures": {k: f.to_json() for k, f in figures.items()},
                    "profile": split,
                }
    Console(width=220).print(table)
    write_results("evonorm", env, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
