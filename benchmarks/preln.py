"""Pre-LN -> Pre-RMSNorm end to end and in the norm ops, ORT CPU, one interleaved run.

    python benchmarks/preln.py [--rounds 30] [--threads 2] [--skip-peer] [--only SUBSTRING]

Variants per model: the original; `normopt rewrite` with --target onnx (decomposed RMSNorm that
onnxruntime fuses, or RMSNormalization at opset >= 23) and with --target ort
(SimplifiedLayerNormalization); the original after onnxruntime's transformers optimizer (the
peer; its CPU SkipLayerNormalization is known to be slow). Figures: end-to-end median latency,
paired per-round ratio to the original; and from onnxruntime's profiler (after its own
ORT_ENABLE_ALL fusions) the time in norm ops (LayerNormalization, SimplifiedLayerNormalization,
RMSNormalization, Skip*LayerNormalization) plus the Add ops (the residual Adds a Skip* norm
absorbs are Adds elsewhere), per run, as a ratio to the original.
Writes results/preln.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import environment, interleaved, op_breakdown, runner, summarize, write

from normopt.profiling import NORM_OPS

CASES = [
    # entry, label, peer model type, heads, hidden, feeds
    ("gpt2-768x12-ts17", "GPT-2 768x12, 1x128 tokens", "gpt2", 12, 768, {"batch": 1, "seq": 128}),
    ("vit-b16-dyn18", "ViT-B/16, batch 1", "vit", 12, 768, {"batch": 1}),
    ("gpt2-128x4-ts17", "GPT-2 128x4 (norm-heavy), 8x512 tokens", "gpt2", 4, 128, {"batch": 8, "seq": 512}),
    # per-norm decisions: a hierarchical vision model (its last stage converts) and an LM with a
    # LayerNorm on its embeddings (one explicit recentring); no peer for these model types
    ("swin-t-ts17", "Swin-T, batch 1", None, 0, 0, {"batch": 1}),
    ("bloom-512x8-ts17", "BLOOM 512x8 (embedding LN), 1x128 tokens", None, 0, 0, {"batch": 1, "seq": 128}),
]


def feeds_for(entry: str, sizes: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if entry.startswith(("vit", "swin")):
        return {"pixel_values": rng.standard_normal((sizes["batch"], 3, 224, 224)).astype(np.float32)}
    b, s = sizes["batch"], sizes["seq"]
    return {"input_ids": rng.integers(0, 128, (b, s)).astype(np.int64), "attention_mask": np.ones((b, s), np.int64)}


def norm_time(path: Path, feeds: dict, threads: int) -> dict:
    """Milliseconds per run in norm ops and in Add ops (onnxruntime's profiler)."""
    per_op = op_breakdown(path, feeds, "ort-cpu", threads, runs=10)
    norms = sum(v for k, v in per_op.items() if k in NORM_OPS)
    adds = per_op.get("Add", 0.0)
    return {"norm_ms": norms, "add_ms": adds, "norm_plus_add_ms": norms + adds, "total_ms": sum(per_op.values())}


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.passes.base import Options
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-peer", action="store_true", help="leave out onnxruntime's transformers optimizer")
    parser.add_argument("--only", help="run only the models whose label contains this")
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(title=f"preln-to-rmsnorm, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} threads, "
                        f"{args.rounds} interleaved rounds")
    for col in ("model", "variant", "median ms", "x original (paired)", "norm+Add ms/run", "x original"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, label, model_type, heads, hidden, sizes in CASES:
            if args.only and args.only not in label:
                continue
            src = build(entry).model
            feeds = feeds_for(entry, sizes)
            variants = {"original": src}
            for target in ("onnx", "ort"):
                dst = Path(tmp) / f"{entry}-{target}.onnx"
                rewrite(src, dst, options=Options(target=target), verification=VerifyOptions(inputs=feeds))
                variants[f"normopt --target {target}"] = dst
            if not args.skip_peer and model_type is not None:
                from onnxruntime.transformers import optimizer

                peer = Path(tmp) / f"{entry}-ortopt.onnx"
                optimizer.optimize_model(str(src), model_type=model_type, num_heads=heads, hidden_size=hidden,
                                         use_gpu=False).save_model_to_file(str(peer))
                variants["ORT transformers optimizer (peer)"] = peer
            summary = summarize(interleaved({k: runner(v, feeds, args.threads) for k, v in variants.items()},
                                            rounds=args.rounds), "original")
            profiles = {k: norm_time(v, feeds, args.threads) for k, v in variants.items()}
            base = profiles["original"]["norm_plus_add_ms"]
            for k in variants:
                p = profiles[k]
                table.add_row(label, k, f"{summary[k]['median_ms']:.2f}", f"{summary[k]['ratio']:.3f}",
                              f"{p['norm_plus_add_ms']:.3f} (norms {p['norm_ms']:.3f})", f"{p['norm_plus_add_ms'] / base:.3f}")
                summary[k]["profile"] = p
                summary[k]["norm_plus_add_ratio"] = p["norm_plus_add_ms"] / base
            results[label] = summary
    Console(width=170).print(table)
    print(f"wrote {write('preln', {'environment': env, 'rounds': args.rounds, 'results': results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
