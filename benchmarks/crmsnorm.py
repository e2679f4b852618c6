"""Pre-CRMSNorm (d-1 stream) against Pre-RMSNorm, ORT CPU, one interleaved run.

    python benchmarks/crmsnorm.py [--rounds 30] [--reps 2] [--threads 2] [--only SUBSTRING]

Variants per model: the original; RMS (`preln-to-rmsnorm`, --target onnx: the decomposed
RMSNorm onnxruntime fuses); CRMS (`preln-to-rmsnorm`, `preln-to-crmsnorm`: decomposed CRMSNorm,
which onnxruntime does not fuse, and a d-1 wide stream: every matrix product's K or N is d-1);
RMS + fold-norm-affine (--target ort: SimplifiedLayerNormalization with its scale folded into
the readers). End-to-end paired ratios to the original with bootstrap intervals and an A/A
control, and the time in norms from onnxruntime's profiler (normopt.profiling). A model whose
CRMS rewrite is refused says why. Writes results/crmsnorm.json.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import CELLS, CONTROL, cells, compare, environment, write
from common import feeds as bench_feeds
from preln import norm_time

CASES = [
    ("gpt2-768x12-dyn18", "GPT-2 768x12, 1x128 tokens", {"batch": 1, "seq": 128}),
    ("vit-b16-dyn18", "ViT-B/16, batch 1", {"batch": 1}),
    ("gpt2-128x4-ts17", "GPT-2 128x4 (norm-heavy), 8x512 tokens", {"batch": 8, "seq": 512}),
]
VARIANTS = {
    "RMS": (["preln-to-rmsnorm"], "onnx"),
    "CRMS": (["preln-to-rmsnorm", "preln-to-crmsnorm"], "onnx"),
    "RMS + fold-norm-affine": (["preln-to-rmsnorm", "canonicalize-norms", "fold-norm-affine"], "ort"),
}


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.errors import NotApplied
    from normopt.passes.base import Options
    from normopt.rewrite import rewrite
    from normopt.verify import VerifyOptions

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--reps", type=int, default=2, help="repetitions, each with fresh sessions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="run only the models whose label contains this")
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(title=f"Pre-CRMSNorm vs Pre-RMSNorm, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} "
                        f"threads, {args.reps} x {args.rounds} interleaved rounds; ratios to the original")
    for col in ("model", "variant", *CELLS, "norms ms/run", "note"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry, label, sizes in CASES:
            if args.only and args.only not in label:
                continue
            src = build(entry).model
            feeds = bench_feeds(build(entry).load_inputs(), **sizes)
            variants, notes = {"original": src}, {}
            for name, (passes, target) in VARIANTS.items():
                dst = Path(tmp) / f"{entry}-{name.replace(' ', '_')}.onnx"
                try:
                    rewrite(src, dst, passes=passes, options=Options(target=target), crms="on",
                            verification=VerifyOptions(inputs=feeds))
                    variants[name] = dst
                except NotApplied as exc:
                    notes[name] = str(exc)
            figures = compare(variants, "original", feeds, threads=args.threads, rounds=args.rounds, reps=args.reps)
            profiles = {k: norm_time(v, feeds, args.threads) for k, v in variants.items()}
            results[label] = {"refused": notes}
            for k, figure in figures.items():
                p = profiles[k.removesuffix(CONTROL)]
                table.add_row(label, k, *cells(figure), f"{p['norm_ms']:.3f}", "")
                results[label][k] = {**figure.to_json(), "profile": p}
            for k, why in notes.items():
                table.add_row(label, k, "", "", "", "refused", why[:120])
    Console(width=220).print(table)
    print(f"wrote {write('crmsnorm', {'environment': env, 'rounds': args.rounds, 'reps': args.reps, 'results': results})}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
