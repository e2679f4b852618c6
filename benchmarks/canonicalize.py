"""ORT CPU latency before/after `canonicalize-norms`, in one run, interleaved.

    python benchmarks/canonicalize.py [--rounds 40] [--reps 2] [--threads 2]

Cases where onnxruntime's own optimizer (ORT_ENABLE_ALL) leaves a norm decomposed:
- LLaMA 512x4, dynamo opset 18: RMSNorm in the Reciprocal form -> SimplifiedLayerNormalization
  (--target ort);
- ConvNeXt 128x4: hand-written LayerNorm over the last axis of an NHWC tensor ->
  LayerNormalization. onnxruntime 1.31 fuses the dynamo-18 form itself (expect ~1.00x) but
  not the TorchScript opset-14 form, which --target ort fuses into ORT's contrib op;
- timm's ConvNeXt (atto widths), TorchScript opset 14: LayerNorm2d (permute, decomposed
  LayerNorm over the channels, permute back) -> LayerNormalization between the permutes.
Prints a table (rewritten / original, paired per-round ratio with its 95% interval, A/A row) and
writes results/canonicalize.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import CELLS, cells, compare, environment, timing_parser, write
from common import feeds as bench_feeds

CASES = [
    # (corpus entry, target, label, inputs by name -> shape)
    ("llama-512x4-dyn18", "ort", "LLaMA 512x4 dyn18, 1x128 tokens", {"batch": 1, "seq": 128}),
    ("llama-512x4-dyn18", "ort", "LLaMA 512x4 dyn18, 8x128 tokens", {"batch": 8, "seq": 128}),
    ("convnext-128x4-ts14", "ort", "ConvNeXt 128x4 ts14, batch 8 (64x64)", {"batch": 8}),
    ("convnext-128x4-dyn18", "onnx", "ConvNeXt 128x4 dyn18, batch 8 (64x64)", {"batch": 8}),
    (
        "convnext2d-bench-ts14",
        "ort",
        "timm ConvNeXt (LayerNorm2d) ts14, batch 8 (128x128)",
        {"batch": 8},
    ),
]


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.passes.base import Options
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__, rounds=40)
    args = parser.parse_args()
    results = []
    table = Table(
        title=f"canonicalize-norms, ORT {environment(args.threads)['onnxruntime']} CPU, "
        "ORT_ENABLE_ALL, "
        f"{args.threads} threads, {args.reps} x {args.rounds} interleaved rounds"
    )
    for col in ("model", "fused", "row", *CELLS):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp:
        for entry, target, label, sizes in CASES:
            src = build(entry).model
            dst = Path(tmp) / f"{entry}-{target}.onnx"
            feeds = bench_feeds(build(entry).load_inputs(), **sizes)
            report = rewrite_file(
                src,
                dst,
                passes=["canonicalize-norms"],
                options=Options(target=target),
                checks=VerifyOptions(inputs=feeds),
            )
            figures = compare(
                {"original": src, "rewritten": dst},
                "original",
                feeds,
                threads=args.threads,
                rounds=args.rounds,
                reps=args.reps,
            )
            fused = "; ".join(report.passes[0].lines)
            for row, figure in figures.items():
                table.add_row(label, fused if row == "rewritten" else "", row, *cells(figure))
            results.append(
                {
                    "case": label,
                    "entry": entry,
                    "target": target,
                    "fused": fused,
                    "max_rel_error": max(x.max_rel for x in report.verification.outputs),
                    "figures": {k: f.to_json() for k, f in figures.items()},
                }
            )
    Console(width=200).print(table)
    path = write(
        "canonicalize",
        {
            "environment": environment(args.threads),
            "rounds": args.rounds,
            "reps": args.reps,
            "results": results,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
