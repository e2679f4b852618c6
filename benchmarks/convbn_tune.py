"""ORT CPU latency of ConvBN Tune mode (`convbn-tune`), and `recalibrate`'s throughput, in one run.

    python benchmarks/convbn_tune.py [--rounds 30] [--reps 2] [--threads 2] [--samples 64]

Per model and batch, interleaved (normopt.profiling.compare: A/A row, bootstrap intervals):
  (a) eval mode: Conv + BatchNorm with the BN parameters as graph inputs (their initializers as
      defaults: onnxruntime cannot fold what a caller may feed), the baseline;
  (b) tune mode with the same inputs (`--passes convbn-tune --tune-params inputs`): one Conv,
      its weight computed from the parameters on every run;
  (c) deploy fold (`--passes fold-affine-norms`): constant weights, the parameters gone.
Models: ResNet-18 (torchvision width, 224x224, batch 1 and 8) and the corpus MobileNetV2
(batch 1, 8 and 32). Then `normopt recalibrate` on `--samples` random images at batch 8: samples/s
against plain inference of the same model on the same batches. Writes results/convbn_tune.json.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from common import CELLS, cells, compare, environment, feeds, timing_parser, write_results

CASES = (
    ("resnet18-full-dyn18", 1),
    ("resnet18-full-dyn18", 8),
    ("mobilenetv2-dyn18", 1),
    ("mobilenetv2-dyn18", 8),
    ("mobilenetv2-dyn18", 32),
)


def eval_with_inputs(src: Path, dst: Path) -> Path:
    """`src` with every BatchNorm's parameters also graph inputs (their values as defaults)."""
    model = onnx.load(src)
    inits = {i.name: i for i in model.graph.initializer}
    present = {i.name for i in model.graph.input}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            for name in node.input[1:5]:
                if name in inits and name not in present:
                    model.graph.input.append(
                        onnx.helper.make_tensor_value_info(
                            name, inits[name].data_type, list(inits[name].dims)
                        )
                    )
                    present.add(name)
    onnx.save(model, dst)
    return dst


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build
    from normopt.passes.base import Options
    from normopt.recalibration import recalibrate
    from normopt.verification import VerifyOptions
    from tests.helpers import rewrite_file

    parser = timing_parser(__doc__)
    parser.add_argument(
        "--samples", type=int, default=64, help="calibration samples for the throughput figure"
    )
    args = parser.parse_args()
    env = environment(args.threads)
    table = Table(
        title=f"ConvBN modes, ORT {env['onnxruntime']} CPU, ORT_ENABLE_ALL, {args.threads} "
        "threads, "
        f"{args.reps} x {args.rounds} interleaved rounds (paired median ratios to eval mode)"
    )
    for col in ("model", "batch", "variant", *CELLS):
        table.add_column(col)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for entry, batch in CASES:
            paths = build(entry)
            example = feeds(
                paths.load_inputs(), batch=batch, side=224 if entry.startswith("resnet") else None
            )
            check = VerifyOptions(inputs=example, trials=1)
            base = eval_with_inputs(paths.model, tmp / f"{entry}-eval.onnx")
            tuned, folded = tmp / f"{entry}-tune.onnx", tmp / f"{entry}-fold.onnx"
            rewrite_file(
                base,
                tuned,
                passes=["convbn-tune"],
                options=Options(tune_params="inputs"),
                checks=check,
            )
            rewrite_file(paths.model, folded, passes=["fold-affine-norms"], checks=check)
            variants = {
                "(a) eval, BN params as inputs": base,
                "(b) tune mode, same inputs": tuned,
                "(c) deploy fold (constants)": folded,
            }
            figures = compare(
                variants,
                "(a) eval, BN params as inputs",
                example,
                threads=args.threads,
                rounds=args.rounds,
                reps=args.reps,
            )
            for name, figure in figures.items():
                table.add_row(entry, str(batch), name, *cells(figure))
            results[f"{entry}@{batch}"] = {k: f.to_json() for k, f in figures.items()}
        Console(width=220).print(table)

        paths = build("resnet18-full-dyn18")
        rng = np.random.default_rng(0)
        images = rng.standard_normal((args.samples, 3, 224, 224)).astype(np.float32)
        np.savez(tmp / "calibration.npz", image=images)
        report = recalibrate(
            paths.model, tmp / "recalibrated.onnx", tmp / "calibration.npz", batch_size=8
        )
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(paths.model), opts, providers=["CPUExecutionProvider"])
        start = time.perf_counter()
        for i in range(0, args.samples, 8):
            session.run(None, {"image": images[i : i + 8]})
        inference = args.samples / (time.perf_counter() - start)
        calibration = report.to_json()["data"]["samples_per_s"]
        print(
            f"recalibrate ResNet-18 224x224, batch 8, {args.samples} samples: {calibration:.1f} "
            "samples/s "
            f"(calibration pass alone; plain inference {inference:.1f} samples/s, ratio "
            f"{calibration / inference:.2f}); "
            f"whole command {report.seconds['total']:.1f} s"
        )
        results["recalibrate"] = {
            "samples": args.samples,
            "calibration_samples_per_s": calibration,
            "inference_samples_per_s": inference,
            "total_s": report.seconds["total"],
        }
    write_results("convbn_tune", env, args, results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
