"""Would QuaRot's online Hadamard before the MLP's down-projection (R4) pay on top of
rotate-stream? One model with planted outliers (benchmarks/quantize.py's), ORT CPU.

    python benchmarks/quantize_r4.py [--model gpt2-768x12-ts17] [--pattern "mlp/c_proj/Gemm"]

The rotated model (`rewrite --rotate hadamard`) against the same with, before every MatMul /
Gemm whose name matches --pattern, an inserted x H (a dense normalized Hadamard MatMul of the
down-projection's input width, left float as QuaRot leaves its online ones) and the weight
H^T W: the float error (exactness), the error of each quantization of benchmarks/quantize.py
against the float32 original, and the paired latency of the two float models (A/A control).
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

import quantize as bench
from common import compare


def with_r4(src: Path, dst: Path, pattern: str) -> int:
    """`src` with x H before each matching linear op (its weight H^T W); how many."""
    import onnx
    from onnx import helper, numpy_helper

    from normopt.rewriter.numerics import Rotation, rotate

    model = onnx.load(str(src))
    weights = {i.name: i for i in model.graph.initializer}
    count = 0
    for node in list(model.graph.node):
        if node.op_type not in ("MatMul", "Gemm") or not re.search(pattern, node.name):
            continue
        if node.input[1] not in weights:
            continue
        w = numpy_helper.to_array(weights[node.input[1]])
        q = Rotation(w.shape[0], "hadamard", seed=count)
        h, out, name = f"r4_{count}.rotation", f"r4_{count}.out", f"r4_{count}.weight"
        model.graph.initializer.append(numpy_helper.from_array(q.matrix().astype(w.dtype), h))
        model.graph.initializer.append(numpy_helper.from_array(rotate(w, 0, q), name))
        at = list(model.graph.node).index(node)
        model.graph.node.insert(at, helper.make_node("MatMul", [node.input[0], h], [out]))
        node.input[0], node.input[1] = out, name
        count += 1
    onnx.save(model, str(dst))
    return count


def main() -> int:
    from models.corpus import build

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-768x12-ts17")
    parser.add_argument("--pattern", default="mlp/c_proj/Gemm")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        paths = build(args.model)
        feeds = paths.load_inputs()
        planted = tmp / "planted.onnx"
        bench.plant(paths.model, planted)
        ref = bench.run(planted, feeds)
        found = bench.variants(planted, tmp, feeds)
        found["rotated + R4"] = tmp / "r4.onnx"
        print(f"R4 before {with_r4(found['rotated'], found['rotated + R4'], args.pattern)} ops")
        for name in ("rotated", "rotated + R4"):
            e = bench.errors(bench.run(found[name], feeds), ref, True)
            print(f"float32 {name}: max rel {e['max_rel']:.1e}")
        for quant in bench.QUANTS:
            for name in ("original", "rotated", "rotated + R4"):
                q = tmp / f"{name.replace(' ', '')}-{quant.replace(' ', '_')}.onnx"
                bench.quantize(found[name], q, quant)
                e = bench.errors(bench.run(q, feeds), ref, True)
                print(f"{quant:12s} {name:14s} mean rel {e['mean_rel']:.4f} top-1 {e['top1']:.3f}")
        timed = {k: found[k] for k in ("rotated", "rotated + R4")}
        for k, figure in compare(timed, "rotated", feeds, rounds=10, reps=2).items():
            print(f"latency {k}: {figure.text()} {figure.verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
