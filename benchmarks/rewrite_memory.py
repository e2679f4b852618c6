"""Rewrite cost on a large external-data model: wall time and peak RSS of `normopt rewrite`
next to a plain onnx-ir load+save round trip of the same model, in the same run.

    python benchmarks/rewrite_memory.py                 # 3.2 GB model, 3 rounds
    python benchmarks/rewrite_memory.py --gb 1 --rounds 1
    python benchmarks/rewrite_memory.py --embedded --gb 1   # weights inside the .onnx
    python benchmarks/rewrite_memory.py --model gpt2-768x12-ts17   # a corpus export (or a path)

Each variant runs in a fresh subprocess (so its peak RSS is its own), in alternating order
every round; the table shows medians, and where the rewrite's time goes (its report's
`seconds`, medians). Goals: `rewrite --no-verify` <= 1.3x the plain round trip's wall time and
<= 1.1x its peak RSS. RSS counts the memory-mapped weight
pages a process touched, so reading every weight once costs up to 1x the model's bytes.
The model: a chain of [d, d] fp32 MatMuls written straight to the data file (never held in
memory whole), plus a dead branch for cleanup to remove.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RESULTS = Path(__file__).parent / "results"
D = 4096


def make_embedded_model(folder: Path, gigabytes: float) -> Path:
    """The same chain with its weights inside the .onnx (protobuf allows < 2 GB)."""
    src = make_model(folder, gigabytes)
    model = onnx.load(str(src))  # reads the external data in
    path = folder / "big-embedded.onnx"
    onnx.save(model, str(path))
    src.unlink()
    (folder / "big.onnx.data").unlink()
    return path


def make_model(folder: Path, gigabytes: float) -> Path:
    layers = max(2, int(gigabytes * 1e9 / (D * D * 4)))
    path, data = folder / "big.onnx", folder / "big.onnx.data"
    rng = np.random.default_rng(0)
    inits, nodes, offset = [], [], 0
    with open(data, "wb") as f:
        for i in range(layers):
            w = (rng.standard_normal((D, D), dtype=np.float32) / np.sqrt(D)).astype(np.float32)
            f.write(w.tobytes())
            t = helper.make_tensor_value_info(f"w{i}", TensorProto.FLOAT, [D, D])
            tensor = TensorProto(
                name=f"w{i}",
                data_type=TensorProto.FLOAT,
                dims=[D, D],
                data_location=TensorProto.EXTERNAL,
            )
            for key, value in (
                ("location", data.name),
                ("offset", str(offset)),
                ("length", str(w.nbytes)),
            ):
                tensor.external_data.add(key=key, value=value)
            offset += w.nbytes
            inits.append(tensor)
            del t
            nodes.append(
                helper.make_node(
                    "MatMul", [f"h{i}" if i else "x", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}"
                )
            )
    nodes.append(helper.make_node("Neg", ["x"], ["dead"], name="dead"))
    nodes.append(helper.make_node("Identity", [f"h{layers}"], ["y"], name="out"))
    graph = helper.make_graph(
        nodes,
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, D])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def _corpus_model(name: str) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from models.corpus import build

    return build(name).model


def child(variant: str, src: str, dst: str) -> None:
    """Runs in a subprocess: one variant, then prints its wall time and peak RSS as JSON."""
    t = time.perf_counter()
    if variant == "plain":
        import onnx_ir as ir

        t1 = time.perf_counter()
        model = ir.load(src)
        external = any(
            isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values()
        )
        t2 = time.perf_counter()
        ir.save(model, dst, external_data=Path(dst).name + ".data" if external else None)
        code = 0
        steps = {"import": t1 - t, "load": t2 - t1, "save": time.perf_counter() - t2}
    else:
        from normopt.cli import app

        imported = time.perf_counter() - t
        report = Path(dst).with_suffix(".report.json")
        args = ["rewrite", src, dst, "--report", str(report)]
        args += ["--no-verify"] if variant.endswith("-no-verify") else []
        args += ["--rotate", "hadamard"] if variant.startswith("rotate") else []
        try:
            app(args, prog_name="normopt", standalone_mode=False)
            code = 0
        except SystemExit as exc:
            code = exc.code
        document = json.loads(report.read_text())
        steps = {"import": imported, **document["seconds"]}
        if document.get("verification"):
            steps["verified by"] = document["verification"]["method"]
        report.unlink()
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {"variant": variant, "seconds": seconds, "peak_rss": peak, "exit": code, "steps": steps}
        )
    )


def measure(src: Path, variants: list[str], rounds: int, folder: Path) -> dict | None:
    """Each variant on `src` `rounds` times, in alternating order, each in a fresh subprocess;
    their results by variant (None, with the failing run's stderr printed, on a failure)."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for r in range(rounds):
        for v in variants if r % 2 == 0 else reversed(variants):
            dst = folder / f"out-{v}.onnx"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", v, str(src), str(dst)],
                capture_output=True,
                text=True,
                check=False,
            )
            lines = proc.stdout.strip().splitlines()
            result = json.loads(lines[-1]) if lines else {"exit": proc.returncode}
            if result["exit"] != 0:
                print(proc.stderr, file=sys.stderr)
                return None
            runs[v].append(result)
            dst.unlink()
            dst.with_name(dst.name + ".data").unlink(missing_ok=True)
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/normopt-bench-memory"))
    parser.add_argument("--verify", action="store_true", help="also time rewrite with verification")
    parser.add_argument(
        "--embedded", action="store_true", help="weights inside the .onnx (use --gb < 1.9)"
    )
    parser.add_argument(
        "--model", help="a corpus export's name or a model path instead of the generated chain"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return 0
    from rich.console import Console
    from rich.table import Table

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.model:
        src = Path(args.model) if Path(args.model).exists() else _corpus_model(args.model)
        model_bytes = src.stat().st_size + sum(
            f.stat().st_size for f in src.parent.glob(f"{src.name}.data")
        )
    elif args.embedded:
        src = args.dir / "big-embedded.onnx"
        if not src.exists() or src.stat().st_size < args.gb * 0.95e9:
            make_embedded_model(args.dir, args.gb)
        model_bytes = src.stat().st_size
    else:
        src = args.dir / "big.onnx"
        if not src.exists() or (args.dir / "big.onnx.data").stat().st_size < args.gb * 0.95e9:
            make_model(args.dir, args.gb)
        model_bytes = src.stat().st_size + (args.dir / "big.onnx.data").stat().st_size
    variants = ["plain", "rewrite-no-verify"] + (["rewrite"] if args.verify else [])
    runs = measure(src, variants, args.rounds, args.dir)
    if runs is None:
        return 1
    plain_s = statistics.median(x["seconds"] for x in runs["plain"])
    plain_rss = statistics.median(x["peak_rss"] for x in runs["plain"])
    kind = Path(args.model).name if args.model else "embedded" if args.embedded else "external-data"
    table = Table(
        title=f"rewrite cost, {model_bytes / 1e9:.2f} GB {kind} model, {args.rounds} rounds "
        "(medians)"
    )
    for col in ("variant", "wall s", "x plain", "peak RSS GB", "RSS x plain", "RSS / model bytes"):
        table.add_column(col, justify="right")
    summary = {}
    for v in variants:
        s = statistics.median(x["seconds"] for x in runs[v])
        rss = statistics.median(x["peak_rss"] for x in runs[v])
        summary[v] = {
            "seconds": s,
            "x_plain": s / plain_s,
            "peak_rss": rss,
            "rss_x_plain": rss / plain_rss,
            "rss_over_model": rss / model_bytes,
        }
        table.add_row(
            v,
            f"{s:.2f}",
            f"{s / plain_s:.2f}",
            f"{rss / 1e9:.2f}",
            f"{rss / plain_rss:.2f}",
            f"{rss / model_bytes:.2f}",
        )
    console = Console(width=200)
    console.print(table)
    steps = Table(title="where the time goes (s, medians; rewrite's steps from its report)")
    steps.add_column("step")
    for v in ("plain", "rewrite-no-verify"):
        steps.add_column(v, justify="right")
    names = list(
        dict.fromkeys([*runs["rewrite-no-verify"][0]["steps"], *runs["plain"][0]["steps"]])
    )
    for name in names:
        steps.add_row(
            name,
            *(
                f"{statistics.median(x['steps'].get(name, 0.0) for x in runs[v]):.2f}"
                for v in ("plain", "rewrite-no-verify")
            ),
        )
    console.print(steps)
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_{Path(args.model).stem}" if args.model else "_embedded" if args.embedded else ""
    out = RESULTS / f"rewrite_memory{suffix}.json"
    out.write_text(
        json.dumps(
            {
                "model_bytes": model_bytes,
                "rounds": args.rounds,
                "summary": summary,
                "runs": runs,
                "machine": platform.machine(),
                "python": platform.python_version(),
                "cpu_count": __import__("os").cpu_count(),
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
