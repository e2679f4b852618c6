"""Every export in models/ x both targets, rewritten with the default pipeline, timed against its
original: the list of rewrites slower than their noise. Run it before resolving any issue that
changes emitted graphs.

    python benchmarks/sweep.py [--large] [--only SUBSTRING] [--rounds 20] [--reps 2] [--threads 2]
                               [--nodes N] [--backends ort-cpu,openvino]

Per export and target: `normopt rewrite` (verified), then `normopt.profiling.compare` (the
original, its A/A control, the rewrite; paired per-round ratios, bootstrap 95% interval,
`--reps` repetitions with fresh sessions), on the export's own example inputs, or for the
benchmark-size exports the inputs the other benchmarks use (BENCH_SIZES). A rewrite slower
beyond noise is listed with, with `--nodes N`, the N nodes of onnxruntime's optimized graph whose
time changed most (its profiler, node level). `--backends ort-cpu,openvino` times every rewrite
on each engine (OpenVINO's CPU plugin next to onnxruntime's), a column group each. Writes
results/sweep.json (sweep_<backends>.json for other backends).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from common import CELLS, cells, compare, environment, feeds, node_breakdown, timing_parser, write

# The inputs the benchmarks time the benchmark-size exports at (the rest use their own examples).
BENCH_SIZES = {
    "gpt2-768x12-ts17": {"batch": 1, "seq": 128},
    "gpt2-768x12-dyn18": {"batch": 1, "seq": 128},
    "gpt2-128x4-ts17": {"batch": 8, "seq": 512},
    "llama-512x4-dyn18": {"batch": 8, "seq": 128},
    "bloom-512x8-ts17": {"batch": 1, "seq": 128},
    "convnext-128x4-dyn18": {"batch": 8},
    "convnext-128x4-ts14": {"batch": 8},
    "convnext2d-bench-ts14": {"batch": 8},
    "convnext2d-bench-ts17": {"batch": 8},
    "convnext2d-bench-dyn18": {"batch": 8},
}


def node_changes(a: Path, b: Path, example: dict, threads: int, top: int) -> list[str]:
    """The `top` nodes (of onnxruntime's optimized graphs) whose time per run changed most."""
    before = node_breakdown(a, example, "ort-cpu", threads, runs=10)
    after = node_breakdown(b, example, "ort-cpu", threads, runs=10)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in {*before, *after}}
    return [
        f"{k[0]} ({k[1]}): {before.get(k, 0.0):.3f} -> {after.get(k, 0.0):.3f} ms"
        for k in sorted(delta, key=lambda k: -abs(delta[k]))[:top]
    ]


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import CORPUS, LARGE, build
    from normopt.passes.base import Options
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__, rounds=20)
    parser.add_argument("--large", action="store_true", help="the benchmark-size exports too")
    parser.add_argument("--only", help="run only the exports whose name contains this")
    parser.add_argument(
        "--nodes",
        type=int,
        default=0,
        help="for each slower rewrite, the N nodes that changed most",
    )
    parser.add_argument("--backends", default="ort-cpu", help="comma-separated: ort-cpu,openvino")
    args = parser.parse_args()
    backends = args.backends.split(",")
    env = environment(args.threads)
    names = [
        n for n in [*CORPUS, *(LARGE if args.large else ())] if not args.only or args.only in n
    ]
    table = Table(
        title=f"default pipeline vs original on {', '.join(backends)} (ORT {env['onnxruntime']} "
        f"ORT_ENABLE_ALL), {args.threads} threads, {args.reps} x {args.rounds} interleaved rounds"
    )
    for col in ("export", "target", "applied"):
        table.add_column(col)
    for backend in backends:
        for col in ("A/A", *CELLS):
            table.add_column(f"{backend}: {col}" if len(backends) > 1 else col)
    results, slower = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            paths = build(name)
            example = feeds(paths.load_inputs(), **BENCH_SIZES.get(name, {}))
            for target in ("onnx", "ort"):
                out = Path(tmp) / f"{name}-{target}.onnx"
                report = rewrite_file(
                    paths.model,
                    out,
                    options=Options(target=target),
                    checks=VerifyOptions(inputs=example),
                )
                applied = (
                    ", ".join(p.name for p in report.passes if p.modified and p.name != "cleanup")
                    or "-"
                )
                shown = [name, target, applied]
                for backend in backends:
                    figures = compare(
                        {"original": paths.model, "rewritten": out},
                        "original",
                        example,
                        backend=backend,
                        threads=args.threads,
                        rounds=args.rounds,
                        reps=args.reps,
                    )
                    figure, control = figures["rewritten"], figures["original (A/A)"]
                    row = {
                        "export": name,
                        "target": target,
                        "backend": backend,
                        "applied": applied,
                        "control": control.to_json(),
                        **figure.to_json(),
                    }
                    if figure.verdict == "slower":
                        row["nodes"] = (
                            node_changes(paths.model, out, example, args.threads, args.nodes)
                            if args.nodes
                            else []
                        )
                        slower.append(row)
                    results.append(row)
                    shown += [f"{control.ratio:.3f}", *cells(figure)]
                table.add_row(*shown)
    console = Console(width=200)
    console.print(table)
    console.print(f"{len(slower)} of {len(results)} rewrites slower than their noise")
    for row in slower:
        console.print(
            f"  {row['export']} --target {row['target']} on {row['backend']} ({row['applied']}): "
            f"{row['ratio']:.3f} "
            f"[{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}]"
        )
        for line in row.get("nodes", []):
            console.print(f"      {line}")
    document = {"environment": env, "rounds": args.rounds, "reps": args.reps, "results": results}
    stem = "sweep" if backends == ["ort-cpu"] else "sweep_" + "_".join(backends)
    print(f"wrote {write(stem, document)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
