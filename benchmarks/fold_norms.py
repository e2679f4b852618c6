"""ORT CPU latency of `fold-affine-norms` and `merge-branches`, in one run, interleaved.

    python benchmarks/fold_norms.py [--rounds 30] [--reps 2] [--threads 2]

- ResNet-18 (torchvision width, 224x224, batch 1), dynamo export with BatchNorm kept
  (optimize=False: the conv bias arrives through Expand, and onnxruntime keeps all 20 BNs):
  original vs normopt-folded vs the exporter's own folded export (the peer).
- RepBN ViT-S/16 (SLAB-style BN(x) + alpha*x on token features, 224x224, batch 1), dynamo:
  original vs folded.
- timm's RepVGG-A0 (224x224, batch 1), dynamo, in its training form (3x3+BN, 1x1+BN, identity
  BN per block): original vs normopt's default pipeline (folds, then merge-branches) vs the
  export of timm's own reparameterize_model() (the peer).
- The RepBN transformer with a mean-pooled head (corpus size, dynamo, batch 8): its last BN
  folds into the head through the mean over tokens.
- An ACNet block, a Diverse Branch Block (four branches, two sequential) and a DEA-Net DEConv
  (kernel computed in forward), 64 channels at 112x112, dynamo, training form: original vs
  normopt's default pipeline (one Conv per block).
Goals (issues "Fold ...", "Structural re-parameterization"): ResNet-18 <= 0.70x and <= 1.00x
the exporter's folded export; RepBN ViT-S <= 0.88x; RepVGG <= 1.00x timm's reparameterized
export. Writes results/fold_norms.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

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


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__)
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(
        title=f"fold-affine-norms, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} "
        "threads, "
        f"{args.reps} x {args.rounds} interleaved rounds (paired median ratios to the original "
        f"unless noted)"
    )
    for col in ("model", "variant", *CELLS, "note"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, peer, passes, batch in (
            (
                "resnet18-full-dyn18",
                ("exporter folded", "resnet18-full-dyn18-folded"),
                ["fold-affine-norms"],
                None,
            ),
            ("repbn-vits-dyn18", None, ["fold-affine-norms"], None),
            ("repvgg-a0-dyn18", ("timm reparameterized", "repvgg-a0-deploy-dyn18"), None, None),
            ("repbnpool-dyn18", None, ["fold-affine-norms"], 8),
            ("repblocks-64-dyn18", None, None, None),
        ):
            paths = build(entry)
            example = feeds(paths.load_inputs(), batch=batch) if batch else paths.load_inputs()
            folded = Path(tmp) / f"{entry}-folded.onnx"
            report = rewrite_file(
                paths.model, folded, passes=passes, checks=VerifyOptions(inputs=example)
            )
            variants = {"original": paths.model, "normopt folded": folded}
            against = {}
            if peer:
                variants[peer[0]] = build(peer[1]).model
                vs_peer = f"normopt folded (x {peer[0]})"
                variants[vs_peer] = folded
                against[vs_peer] = peer[0]
            figures = compare(
                variants,
                "original",
                example,
                threads=args.threads,
                rounds=args.rounds,
                reps=args.reps,
                against=against,
            )
            changes = applied(report)
            for name, figure in figures.items():
                note = "; ".join(changes) if name == "normopt folded" else ""
                table.add_row(entry, name, *cells(figure), note)
            results[entry] = {
                "figures": {k: f.to_json() for k, f in figures.items()},
                "against": against,
                "changes": changes,
                "max_rel_error": max(o.max_rel for o in report.verification.outputs),
            }
    Console(width=200).print(table)
    write_results("fold_norms", env, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
