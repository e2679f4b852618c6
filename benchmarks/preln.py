"""Pre-LN -> Pre-RMSNorm end to end and in the norm ops, ORT CPU, one interleaved run.

    python benchmarks/preln.py [--rounds 30] [--reps 2] [--threads 2] [--skip-peer] [--only
    SUBSTRING]

Variants per model: the original; `normopt rewrite` with --target onnx (decomposed RMSNorm that
onnxruntime fuses, or RMSNormalization at opset >= 23) and with --target ort
(SimplifiedLayerNormalization); the original after onnxruntime's transformers optimizer (the
peer; its CPU SkipLayerNormalization is known to be slow). Figures: end-to-end median latency,
paired per-round ratio to the original with its bootstrap 95% interval and an A/A control row
(the original in a second session); the optimizer's output alone and normopt --target ort
followed by the optimizer (its ratio is to the optimizer alone: what a user of that optimizer
gains by adding normopt); normopt --target ort on the optimizer's output (a graph already
fused, as many are published: its SkipLayerNormalization become SkipSimplifiedLayerNormalization;
ratio to the optimizer alone); and from onnxruntime's profiler (after its own ORT_ENABLE_ALL
fusions) the time in norms (LayerNormalization, SimplifiedLayerNormalization, RMSNormalization,
Skip*LayerNormalization, and the nodes of norms ORT leaves decomposed) plus the other Add ops
(the residual Adds a Skip* norm absorbs are Adds elsewhere), per run, as a ratio to the original.
Writes results/preln.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import (
    CELLS,
    CONTROL,
    by_op_type,
    cells,
    compare,
    environment,
    node_breakdown,
    norm_ms,
    norm_nodes,
    timing_parser,
    write_results,
)
from common import feeds as bench_feeds

CASES = [
    # entry, label, peer model type, heads, hidden, feeds
    ("gpt2-768x12-ts17", "GPT-2 768x12, 1x128 tokens", "gpt2", 12, 768, {"batch": 1, "seq": 128}),
    ("vit-b16-dyn18", "ViT-B/16, batch 1", "vit", 12, 768, {"batch": 1}),
    (
        "gpt2-128x4-ts17",
        "GPT-2 128x4 (norm-heavy), 8x512 tokens",
        "gpt2",
        4,
        128,
        {"batch": 8, "seq": 512},
    ),
    # per-norm decisions: a hierarchical vision model (its last stage converts) and an LM with a
    # LayerNorm on its embeddings (one explicit recentring); no peer for these model types
    ("swin-t-ts17", "Swin-T, batch 1", None, 0, 0, {"batch": 1}),
    (
        "bloom-512x8-ts17",
        "BLOOM 512x8 (embedding LN), 1x128 tokens",
        None,
        0,
        0,
        {"batch": 1, "seq": 128},
    ),
]


PEER = "ORT transformers optimizer alone"
PAIRED = "normopt --target ort, then the optimizer (x optimizer alone)"
FUSED = "the optimizer's output, then normopt --target ort (x optimizer alone)"


def norm_time(path: Path, feeds: dict, threads: int, extra: set[str] = frozenset()) -> dict:
    """Milliseconds per run in norms (fused ops, decomposed norms' nodes and the `extra` nodes), in
    the other Add ops, in all, and per op type (onnxruntime's profiler)."""
    per_node, members = (
        node_breakdown(path, feeds, "ort-cpu", threads, runs=10),
        norm_nodes(path) | extra,
    )
    per_op, norms = by_op_type(per_node), norm_ms(per_node, members)
    adds = sum(ms for (node, op), ms in per_node.items() if op == "Add" and node not in members)
    return {
        "norm_ms": norms,
        "add_ms": adds,
        "norm_plus_add_ms": norms + adds,
        "total_ms": sum(per_op.values()),
        "by_op": per_op,
    }


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.passes.base import Options
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__)
    parser.add_argument(
        "--skip-peer", action="store_true", help="leave out onnxruntime's transformers optimizer"
    )
    parser.add_argument("--only", help="run only the models whose label contains this")
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(
        title=f"preln-to-rmsnorm, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} "
        "threads, "
        f"{args.reps} x {args.rounds} interleaved rounds; ratios to the original unless noted"
    )
    for col in ("model", "variant", *CELLS, "norm+Add ms/run", "x original"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, label, model_type, heads, hidden, sizes in CASES:
            if args.only and args.only not in label:
                continue
            src = build(entry).model
            feeds = bench_feeds(build(entry).load_inputs(), **sizes)
            variants = {"original": src}
            for target in ("onnx", "ort"):
                dst = Path(tmp) / f"{entry}-{target}.onnx"
                rewrite_file(
                    src,
                    dst,
                    options=Options(target=target),
                    checks=VerifyOptions(inputs=feeds),
                )
                variants[f"normopt --target {target}"] = dst
            against = {}
            if not args.skip_peer and model_type is not None:
                from onnxruntime.transformers import optimizer

                def optimized(path: Path, name: str) -> Path:
                    out = Path(tmp) / name
                    optimizer.optimize_model(
                        str(path),
                        model_type=model_type,
                        num_heads=heads,
                        hidden_size=hidden,
                        use_gpu=False,
                    ).save_model_to_file(str(out))
                    return out

                variants[PEER] = optimized(src, f"{entry}-ortopt.onnx")
                variants[PAIRED] = optimized(
                    variants["normopt --target ort"], f"{entry}-ort-ortopt.onnx"
                )
                against[PAIRED] = PEER
                variants[FUSED] = Path(tmp) / f"{entry}-ortopt-ort.onnx"  # an already fused graph
                rewrite_file(
                    variants[PEER],
                    variants[FUSED],
                    options=Options(target="ort"),
                    checks=VerifyOptions(inputs=feeds),
                )
                against[FUSED] = PEER
            figures = compare(
                variants,
                "original",
                feeds,
                threads=args.threads,
                rounds=args.rounds,
                reps=args.reps,
                against=against,
            )
            profiles = {k: norm_time(v, feeds, args.threads) for k, v in variants.items()}
            results[label] = {}
            for k, figure in figures.items():
                p = profiles[k.removesuffix(CONTROL)]
                ref = profiles[against.get(k, "original")]["norm_plus_add_ms"]
                table.add_row(
                    label,
                    k,
                    *cells(figure),
                    f"{p['norm_plus_add_ms']:.3f} (norms {p['norm_ms']:.3f})",
                    f"{p['norm_plus_add_ms'] / ref:.3f}",
                )
                results[label][k] = {
                    **figure.to_json(),
                    "against": against.get(k, "original"),
                    "profile": p,
                    "norm_plus_add_ratio": p["norm_plus_add_ms"] / ref,
                    "norm_ratio": p["norm_ms"] / profiles[against.get(k, "original")]["norm_ms"],
                }
    Console(width=200).print(table)
    write_results("preln", env, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
