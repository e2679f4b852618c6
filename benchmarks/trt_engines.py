"""TensorRT engine latency: original vs normopt's rewrites, fp16, on a machine with TensorRT and a
CUDA GPU. NOT RUN in this project's CI or workplace (TensorRT cannot be installed there): without
TensorRT it exits 2 with the reason.

    python benchmarks/trt_engines.py [--models gpt2-768x12-dyn18 vit-b16-dyn18 llama-512x4-dyn18]
                                     [--batch 8] [--seq 512] [--rounds 50] [--reps 2]

Per model: an fp16 copy (onnxruntime's converter), then three engines, each strongly typed
from its graph: `original`; `native` (the default pipeline for --target tensorrt as the
installed TensorRT imports it: native RMSNormalization where it can, fp16 norms in fp32);
`plugins` (--trt-version 10.9: every RMSNorm normopt's plugin, residual Adds fused). Built with
one profile at the benchmark shape, timed with CUDA events in CUDA graphs, interleaved, paired
ratios with an A/A control (normopt.profiling.compare). Writes results/trt_engines.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common import CELLS, cells, compare, feeds, write


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.engine.build import build_engine
    from normopt.engine.timing import engine_runner
    from normopt.engine.trt import load_tensorrt
    from normopt.errors import BadInput
    from normopt.passes.base import Options
    from tests.helpers import rewrite_file

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["gpt2-768x12-dyn18", "vit-b16-dyn18", "llama-512x4-dyn18"]
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--reps", type=int, default=2)
    args = parser.parse_args()
    try:
        trt, caps = load_tensorrt("benchmarks/trt_engines.py")
    except BadInput as exc:
        print(f"trt_engines: {exc}", file=sys.stderr)
        return 2
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    table = Table(
        title=f"TensorRT {trt.__version__} engines, fp16, batch {args.batch} (paired median ratios)"
    )
    for col in ("model", "variant", *CELLS, "note"):
        table.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            paths = build(name)
            example = feeds(paths.load_inputs(), batch=args.batch, seq=args.seq)
            fp16 = Path(tmp) / f"{name}-fp16.onnx"
            onnx.save(
                convert_float_to_float16(onnx.load(str(paths.model)), keep_io_types=True), str(fp16)
            )
            graphs = {"original": fp16}
            for variant, version in (("native", None), ("plugins", "10.9")):
                graphs[variant] = Path(tmp) / f"{name}-{variant}.onnx"
                rewrite_file(
                    fp16,
                    graphs[variant],
                    options=Options(target="tensorrt", trt_version=version),
                    verify=False,
                )
            shapes = {k: (v.shape,) * 3 for k, v in example.items()}
            engines = {}
            for variant, graph in graphs.items():
                engines[variant] = Path(tmp) / f"{name}-{variant}.engine"
                build_engine(graph, engines[variant], shapes=shapes)
            figures = compare(
                {v: (lambda e=e: engine_runner(e)[0]) for v, e in engines.items()},
                "original",
                rounds=args.rounds,
                reps=args.reps,
            )
            results[name] = {v: f.to_json() for v, f in figures.items()}
            for variant, figure in figures.items():
                table.add_row(name, variant, *cells(figure), "")
    Console().print(table)
    write("trt_engines", {"tensorrt": trt.__version__, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
