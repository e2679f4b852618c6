"""ORT CPU latency of `fold-affine-norms`, in one run, interleaved.

    python benchmarks/fold_norms.py [--rounds 30] [--reps 2] [--threads 2]

- ResNet-18 (torchvision width, 224x224, batch 1), dynamo export with BatchNorm kept
  (optimize=False: the conv bias arrives through Expand, and onnxruntime keeps all 20 BNs):
  original vs normopt-folded vs the exporter's own folded export (the peer).
- RepBN ViT-S/16 (SLAB-style BN(x) + alpha*x on token features, 224x224, batch 1), dynamo:
  original vs folded.
Goals (issue "Fold ..."): ResNet-18 <= 0.70x and <= 1.00x the exporter's folded export;
RepBN ViT-S <= 0.88x. Writes results/fold_norms.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import CELLS, cells, compare, environment, write

VS_PEER = "normopt folded (x the exporter's folded export)"


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2, help="repetitions, each with fresh sessions")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(title=f"fold-affine-norms, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} threads, "
                        f"{args.reps} x {args.rounds} interleaved rounds (paired median ratios to the original "
                        f"unless noted)")
    for col in ("model", "variant", *CELLS, "note"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, peer in (("resnet18-full-dyn18", "resnet18-full-dyn18-folded"), ("repbn-vits-dyn18", None)):
            paths = build(entry)
            folded = Path(tmp) / f"{entry}-folded.onnx"
            report = rewrite(paths.model, folded, passes=["fold-affine-norms"],
                             verification=VerifyOptions(inputs=paths.load_inputs()))
            variants = {"original": paths.model, "normopt folded": folded}
            against = {}
            if peer:
                variants["exporter folded"] = build(peer).model
                variants[VS_PEER] = folded
                against[VS_PEER] = "exporter folded"
            figures = compare(variants, "original", paths.load_inputs(), threads=args.threads, rounds=args.rounds,
                              reps=args.reps, against=against)
            for name, figure in figures.items():
                note = "; ".join(report.passes[0].lines) if name == "normopt folded" else ""
                table.add_row(entry, name, *cells(figure), note)
            results[entry] = {"figures": {k: f.to_json() for k, f in figures.items()}, "against": against,
                              "changes": report.passes[0].lines,
                              "max_rel_error": max(o.max_rel for o in report.verification.outputs)}
    Console(width=200).print(table)
    print(f"wrote {write('fold_norms', {'environment': env, 'rounds': args.rounds, 'reps': args.reps, 'results': results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
