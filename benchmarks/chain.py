"""Analysis cost against graph size: the default pipeline on Pre-LN chains of 100 to 2,000 layers.

    python benchmarks/chain.py [--layers 100 500 2000] [--rounds 3]

Each layer is LN -> MatMul -> bias Add -> residual Add (hidden 16, so the weights are small
and the time is the analysis and the edits). Prints, per size, the pipeline time (median of
`--rounds`, each on a freshly loaded model; shape annotation included), the time per 1,000
nodes, and the growth against the smallest size: linear analysis keeps the time per node flat.
Writes results/chain.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx_ir as ir
from common import write  # noqa: F401  (puts the repository root on the path)
from onnx import TensorProto, helper, numpy_helper

from normopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline


def chain(layers: int, d: int = 16):
    rng = np.random.default_rng(0)

    def const(name, array):
        return numpy_helper.from_array(np.asarray(array, np.float32), name)

    inits = [
        const("g", np.ones(d)),
        const("b", np.zeros(d)),
        const("w_in", rng.standard_normal((4, d))),
    ]
    nodes = [helper.make_node("MatMul", ["inp", "w_in"], ["x"])]
    x = "x"
    for i in range(layers):
        inits += [
            const(f"w{i}", rng.standard_normal((d, d)) / 4),
            const(f"c{i}", rng.standard_normal(d)),
        ]
        nodes += [
            helper.make_node("LayerNormalization", [x, "g", "b"], [f"h{i}"], axis=-1),
            helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"m{i}"]),
            helper.make_node("Add", [f"m{i}", f"c{i}"], [f"f{i}"]),
            helper.make_node("Add", [x, f"f{i}"], [f"x{i}"]),
        ]
        x = f"x{i}"
    nodes.append(helper.make_node("LayerNormalization", [x, "g", "b"], ["y"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "chain",
        [helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, 8, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, d])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = []
    for layers in args.layers:
        proto = chain(layers)
        times = []
        for _ in range(args.rounds):
            model = ir.serde.deserialize_model(proto)
            start = time.perf_counter()
            results = run_pipeline(model, list(DEFAULT_PIPELINE))
            times.append(time.perf_counter() - start)
        assert results[0].modified, results[0].refusals
        rows.append(
            {"layers": layers, "nodes": len(proto.graph.node), "seconds": statistics.median(times)}
        )
    first = rows[0]
    print(
        f"{'layers':>7} {'nodes':>7} {'passes s':>9} {'ms / 1k nodes':>14} {'x time':>7} "
        f"{'x nodes':>8}"
    )
    for row in rows:
        row["ms_per_1k_nodes"] = 1e6 * row["seconds"] / row["nodes"]
        print(
            f"{row['layers']:>7} {row['nodes']:>7} {row['seconds']:>9.2f} "
            f"{row['ms_per_1k_nodes']:>14.0f} "
            f"{row['seconds'] / first['seconds']:>7.1f} {row['nodes'] / first['nodes']:>8.1f}"
        )
    print(f"wrote {write('chain', {'rounds': args.rounds, 'rows': rows})}")


if __name__ == "__main__":
    main()
