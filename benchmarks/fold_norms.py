"""ORT CPU latency of `fold-affine-norms`, in one run, interleaved.

    python benchmarks/fold_norms.py [--rounds 30] [--threads 2]

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

from common import environment, interleaved, runner, summarize, write


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(title=f"fold-affine-norms, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} threads, "
                        f"{args.rounds} interleaved rounds (paired median ratios)")
    for col in ("model", "variant", "median ms", "p90 ms", "x original", "note"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, peer in (("resnet18-full-dyn18", "resnet18-full-dyn18-folded"), ("repbn-vits-dyn18", None)):
            paths = build(entry)
            folded = Path(tmp) / f"{entry}-folded.onnx"
            report = rewrite(paths.model, folded, passes=["fold-affine-norms"],
                             verification=VerifyOptions(inputs=paths.load_inputs()))
            feeds = paths.load_inputs()
            runners = {"original": runner(paths.model, feeds, args.threads),
                       "normopt folded": runner(folded, feeds, args.threads)}
            if peer:
                runners["exporter folded"] = runner(build(peer).model, feeds, args.threads)
            summary = summarize(interleaved(runners, rounds=args.rounds), "original")
            if peer:
                ratio = summarize(interleaved({k: runners[k] for k in ("exporter folded", "normopt folded")},
                                              rounds=args.rounds, seed=1), "exporter folded")["normopt folded"]["ratio"]
                summary["normopt folded"]["x_exporter_folded"] = ratio
            for name, s in summary.items():
                note = "; ".join(report.passes[0].changes) if name == "normopt folded" else ""
                if "x_exporter_folded" in s:
                    note += f"; {s['x_exporter_folded']:.3f}x the exporter's folded export"
                table.add_row(entry, name, f"{s['median_ms']:.2f}", f"{s['p90_ms']:.2f}", f"{s['ratio']:.3f}", note)
            results[entry] = {"summary": summary, "changes": report.passes[0].changes,
                              "max_rel_error": max(o.max_rel for o in report.verification.outputs)}
    Console(width=160).print(table)
    print(f"wrote {write('fold_norms', {'environment': env, 'rounds': args.rounds, 'results': results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
