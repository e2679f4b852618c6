"""Pre-CRMSNorm (d-1 stream) against Pre-RMSNorm, ORT CPU, one interleaved run.

    python benchmarks/crmsnorm.py [--rounds 30] [--reps 2] [--threads 2] [--only SUBSTRING]

Variants per model: the original; RMS (`preln-to-rmsnorm`, --target onnx: the decomposed
RMSNorm onnxruntime fuses); CRMS (`preln-to-rmsnorm`, `preln-to-crmsnorm`: decomposed CRMSNorm,
which onnxruntime does not fuse, and a d-1 wide stream: every matrix product's K or N is d-1);
RMS + fold-norm-affine (--target ort: SimplifiedLayerNormalization with its scale folded into
the readers). End-to-end paired ratios to the original with bootstrap intervals and an A/A
control, and the time in norms from onnxruntime's profiler (normopt.profiling); then what
`rewrite --crms auto` keeps (its own side-by-side timing: CRMS against RMS) and why. A model
whose CRMS rewrite is refused says why. Writes results/crmsnorm.json.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import CELLS, CONTROL, cells, compare, environment, timing_parser, write_results
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
    "RMS + fold-norm-affine": (
        ["preln-to-rmsnorm", "canonicalize-norms", "fold-norm-affine"],
        "ort",
    ),
}


def crms_nodes(path: Path) -> set[str]:
    """The nodes of the CRMSNorms preln-to-crmsnorm made (named after their norm, `.crms.`):
    normopt's matcher does not know that form, the profile counts them as norms by name."""
    import onnx

    return {
        n.name
        for n in onnx.load(str(path), load_external_data=False).graph.node
        if ".crms." in n.name
    }


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.errors import NotApplied
    from normopt.passes.base import Options
    from normopt.request import Timing
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__)
    parser.add_argument("--only", help="run only the models whose label contains this")
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(
        title=f"Pre-CRMSNorm vs Pre-RMSNorm, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, "
        f"{args.threads} "
        f"threads, {args.reps} x {args.rounds} interleaved rounds; ratios to the original"
    )
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
                    rewrite_file(
                        src,
                        dst,
                        passes=passes,
                        options=Options(target=target),
                        crms="on" if "preln-to-crmsnorm" in passes else None,
                        checks=VerifyOptions(inputs=feeds),
                    )
                    variants[name] = dst
                except NotApplied as exc:
                    notes[name] = str(exc)
            auto = rewrite_file(
                src,
                Path(tmp) / f"{entry}-auto.onnx",
                passes=VARIANTS["CRMS"][0],
                checks=VerifyOptions(inputs=feeds),
                timing=Timing(threads=args.threads, rounds=args.rounds, reps=args.reps),
            ).crms
            figures = compare(
                variants,
                "original",
                feeds,
                threads=args.threads,
                rounds=args.rounds,
                reps=args.reps,
            )
            profiles = {
                k: norm_time(v, feeds, args.threads, extra=crms_nodes(v))
                for k, v in variants.items()
            }
            results[label] = {"refused": notes, "auto": auto.to_json() if auto else None}
            for k, figure in figures.items():
                p = profiles[k.removesuffix(CONTROL)]
                table.add_row(label, k, *cells(figure), f"{p['norm_ms']:.3f}", "")
                results[label][k] = {**figure.to_json(), "profile": p}
            for k, why in notes.items():
                table.add_row(label, k, "", "", "", "refused", why[:120])
            if auto is not None:
                table.add_row(
                    label,
                    f"--crms auto (CRMS x RMS): kept {auto.kept}",
                    *cells(auto.crms),
                    "",
                    auto.why[:160],
                )
    Console(width=220).print(table)
    write_results("crmsnorm", env, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
