"""ORT CPU latency before/after `canonicalize-norms`, in one run, interleaved.

    python benchmarks/canonicalize.py [--rounds 40] [--threads 2]

Cases where onnxruntime's own optimizer (ORT_ENABLE_ALL) leaves a norm decomposed:
- LLaMA 512x4, dynamo opset 18: RMSNorm in the Reciprocal form -> SimplifiedLayerNormalization
  (--target ort);
- ConvNeXt 128x4: hand-written LayerNorm over the last axis of an NHWC tensor ->
  LayerNormalization. onnxruntime 1.31 fuses the dynamo-18 form itself (expect ~1.00x) but
  not the TorchScript opset-14 form, which --target ort fuses into ORT's contrib op.
Prints a table (rewritten / original, paired per-round ratio) and writes results/canonicalize.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import environment, interleaved, runner, summarize, write

CASES = [
    # (corpus entry, target, label, inputs by name -> shape)
    ("llama-512x4-dyn18", "ort", "LLaMA 512x4 dyn18, 1x128 tokens", {"batch": 1, "seq": 128}),
    ("llama-512x4-dyn18", "ort", "LLaMA 512x4 dyn18, 8x128 tokens", {"batch": 8, "seq": 128}),
    ("convnext-128x4-ts14", "ort", "ConvNeXt 128x4 ts14, batch 8 (64x64)", {"batch": 8}),
    ("convnext-128x4-dyn18", "onnx", "ConvNeXt 128x4 dyn18, batch 8 (64x64)", {"batch": 8}),
]


def feeds_for(entry: str, sizes: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    if entry.startswith("llama"):
        b, s = sizes["batch"], sizes["seq"]
        return {"input_ids": rng.integers(0, 128, (b, s)).astype(np.int64),
                "attention_mask": np.ones((b, s), np.int64),
                "position_ids": np.broadcast_to(np.arange(s), (b, s)).astype(np.int64).copy()}
    return {"image": rng.standard_normal((sizes["batch"], 3, 64, 64)).astype(np.float32)}


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.passes.base import Options
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = []
    table = Table(title=f"canonicalize-norms, ORT {environment(args.threads)['onnxruntime']} CPU, "
                        f"ORT_ENABLE_ALL, {args.threads} threads, {args.rounds} interleaved rounds")
    for col in ("model", "fused", "original ms (median / p90)", "rewritten ms (median / p90)", "rewritten / original"):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for entry, target, label, sizes in CASES:
            src = build(entry).model
            dst = Path(tmp) / f"{entry}-{target}.onnx"
            feeds = feeds_for(entry, sizes)
            report = rewrite(src, dst, passes=["canonicalize-norms"], options=Options(target=target),
                             verification=VerifyOptions(inputs=feeds))
            times = interleaved({"original": runner(src, feeds, args.threads),
                                 "rewritten": runner(dst, feeds, args.threads)}, rounds=args.rounds)
            summary = summarize(times, "original")
            fused = "; ".join(report.passes[0].changes)
            o, r = summary["original"], summary["rewritten"]
            table.add_row(label, fused, f"{o['median_ms']:.2f} / {o['p90_ms']:.2f}",
                          f"{r['median_ms']:.2f} / {r['p90_ms']:.2f}", f"{r['ratio']:.3f}")
            results.append({"case": label, "entry": entry, "target": target, "fused": fused,
                            "max_rel_error": max(x.max_rel for x in report.verification.outputs),
                            "summary": summary})
    Console(width=150).print(table)
    path = write("canonicalize", {"environment": environment(args.threads), "rounds": args.rounds,
                                  "results": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
