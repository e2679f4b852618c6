"""Quantization error of the original against the rotated stream (rotate-stream), ORT CPU.

    python benchmarks/quantize.py [--only SUBSTRING] [--rounds 20] [--reps 2] [--threads 2]

Per model (corpus exports and GPT-2 124M), without and with planted outliers (3 channels of
every LayerNorm gamma x30 and 2 residual-stream channels x40, written into the stream's first
writers: what trained LLMs show, LLM.int8 / QuaRot): the float32 model, then each variant
quantized with onnxruntime's `quantize_dynamic` (int8 weights, dynamic uint8 activations): `int8`
with its default op types (embedding tables too), `int8 linear` MatMul / Gemm alone (W8A8, the
tables float, as in QuaRot); and its
4-bit weight-only `MatMulNBitsQuantizer` (block 32, symmetric). Variants: `original`; `rms`
(`rewrite`, the default pipeline: Pre-LN -> Pre-RMSNorm, no rotation); `rotated` (`rewrite
--rotate hadamard`). Error against the float32 original's first output: max |y - ref| / max
|ref|, mean |y - ref| / mean |ref|, and for the LMs top-1 agreement of the logits. rotate-stream's
inserted online rotations (an x Q MatMul after a writer no constant holds: BLOOM's embedding
LayerNorm) are left unquantized, as QuaRot leaves its online Hadamards. Then the rotated
model's latency, float32 and quantized, against the float32 original (paired rounds, A/A
control).
Writes results/quantize.json.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from common import CELLS, cells, compare, environment, timing_parser, write

CASES = [
    ("gpt2-ts17", "GPT-2 (corpus)", True),
    ("opt-ts17", "OPT (corpus)", True),
    ("bloom-ts17", "BLOOM (corpus)", True),
    ("phikv-ts17", "Phi, KV cache (corpus)", True),
    ("vit-ts17", "ViT (corpus)", False),
    ("gpt2-768x12-ts17", "GPT-2 124M", True),
    ("opt-512x8-ts17", "OPT 512x8", True),
    ("bloom-512x8-ts17", "BLOOM 512x8", True),
    ("phi-512x8-ts17", "Phi 512x8", True),
]
OPS = ["MatMul", "Gemm"]  # the linear layers (W8A8); its default also makes embedding tables int8
QUANTS = ("int8", "int8 linear", "4-bit")
GAMMA_CHANNELS, GAMMA_FACTOR = 3, 30.0
STREAM_CHANNELS, STREAM_FACTOR = 2, 40.0


class _Writers:
    """The constants that write the stream's first values along its hidden axis (the writer
    walk of normopt.rewriter.writers); an embedding LayerNorm's gamma and beta."""

    combines = ("Add", "Sub", "Concat")
    where = ""
    through_scalars = True  # scaling a channel commutes with a scalar

    def __init__(self) -> None:
        self.found: dict = {}

    def special(self, node, value, hidden, depth) -> bool:
        if node.op_type == "LayerNormalization":
            self.found[(node, 1)] = self.found[(node, 2)] = -1
            return True
        return False

    def constant(self, node, index, axis, what) -> None:
        self.found[(node, index)] = axis

    def recurse(self, node, value, hidden, depth) -> None:
        from normopt.rewriter import writers

        writers.walk(value, hidden, self, depth + 1)

    def moved(self, node, out_hidden, in_hidden) -> None:
        pass


def plant(src: Path, dst: Path, seed: int = 0) -> None:
    """`src` with outliers: LayerNorm gammas x30 on 3 channels, the stream x40 on 2."""
    import onnx_ir as ir

    from normopt.rewriter.shapes import annotated

    model = ir.load(str(src))
    with annotated(model):
        _plant(model, seed)
    ir.save(model, str(dst))


def _plant(model, seed: int) -> None:
    import onnx_ir as ir

    from normopt.rewriter import writers
    from normopt.rewriter.graph import folded_value
    from normopt.rewriter.norms import find_norms
    from normopt.rewriter.stream import analyze

    norms = find_norms(model.graph)
    analysis = analyze(model.graph, norms)
    d = analysis.initial[0].shape[-1]
    rng = np.random.default_rng(seed)
    gamma_ch = rng.choice(d, GAMMA_CHANNELS, replace=False)
    stream_ch = rng.choice(d, STREAM_CHANNELS, replace=False)
    edits = {}
    for match in norms:
        if (
            match.kind == "layernorm"
            and match.scale is not None
            and match.scale.const_value is not None
        ):
            edits[match.scale] = (gamma_ch, GAMMA_FACTOR, -1)
    walk = _Writers()
    for value in analysis.initial:
        writers.walk(value, None, walk)
    for (node, index), axis in walk.found.items():
        edits[node.inputs[index]] = (stream_ch, STREAM_FACTOR, axis)
    for value, (channels, factor, axis) in edits.items():
        array = folded_value(value)
        if value.const_value is None or array.ndim < -axis or array.shape[axis] != d:
            continue
        array, index = np.array(array), [slice(None)] * array.ndim
        index[axis] = channels
        array[tuple(index)] *= factor
        value.const_value = ir.Tensor(array, name=value.name)


def quantize(src: Path, dst: Path, kind: str) -> None:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    online = [  # rotate-stream's inserted x Q / x Q^T stay float (QuaRot keeps its online ones)
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and re.search(r"\.(un)?rotation(_\d+)?$", n.input[1])
    ]
    if kind.startswith("int8"):
        quantize_dynamic(
            src, dst, op_types_to_quantize=OPS if kind == "int8 linear" else None,
            weight_type=QuantType.QInt8, nodes_to_exclude=online,
        )  # fmt: skip
        return
    quant = MatMulNBitsQuantizer(
        model, bits=4, block_size=32, is_symmetric=True, nodes_to_exclude=online
    )
    quant.process()
    quant.model.save_model_to_file(str(dst), False)


def run(path: Path, feeds: dict) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0].astype(np.float64)


def errors(y: np.ndarray, ref: np.ndarray, lm: bool) -> dict:
    out = {
        "max_rel": float(np.abs(y - ref).max() / np.abs(ref).max()),
        "mean_rel": float(np.abs(y - ref).mean() / np.abs(ref).mean()),
    }
    if lm:
        out["top1"] = float((y.argmax(-1) == ref.argmax(-1)).mean())
    return out


def variants(src: Path, tmp: Path, feeds: dict) -> dict[str, Path]:
    from normopt import api

    out = {"original": src}
    for name, rotate in (("rms", None), ("rotated", "hadamard")):
        dst = tmp / f"{src.stem}-{name}.onnx"
        api.rewrite(str(src), dst, rotate=rotate, inputs=feeds)
        out[name] = dst
    return out


def main() -> int:
    from rich.console import Console
    from rich.table import Table

    from models.corpus import build

    parser = timing_parser(__doc__, rounds=20)
    parser.add_argument("--only", help="run only the models whose label contains this")
    args = parser.parse_args()
    env = environment(args.threads)
    errs = Table(title=f"Quantization error against float32, ORT {env['onnxruntime']} CPU")
    for col in ("model", "outliers", "quant", "variant", "max rel", "mean rel", "top-1", "x orig"):
        errs.add_column(col)
    speed = Table(title=f"Rotated model, quantized vs float32 original, {args.threads} threads")
    for col in ("model", "variant", *CELLS):
        speed.add_column(col)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for entry, label, lm in CASES:
            if args.only and args.only not in label:
                continue
            paths = build(entry)
            feeds = paths.load_inputs()
            planted = tmp / f"{entry}-planted.onnx"
            plant(paths.model, planted)
            results[label] = {}
            for outliers, src in (("none", paths.model), ("planted", planted)):
                ref = run(src, feeds)
                found = variants(Path(src), tmp, feeds)
                row = results[label][outliers] = {}
                # the rotated model, in float32 and quantized
                timed = {"original": found["original"], "rotated float32": found["rotated"]}
                for quant in QUANTS:
                    for name, path in found.items():
                        q = tmp / f"{entry}-{outliers}-{name}-{quant}.onnx"
                        quantize(path, q, quant)
                        row[f"{quant} {name}"] = e = errors(run(q, feeds), ref, lm)
                        base = row[f"{quant} original"]["mean_rel"]
                        errs.add_row(
                            label, outliers, quant, name, f"{e['max_rel']:.3f}",
                            f"{e['mean_rel']:.4f}", f"{e.get('top1', float('nan')):.3f}",
                            f"{e['mean_rel'] / base:.2f}",
                        )  # fmt: skip
                        if name == "rotated":
                            timed[f"rotated {quant}"] = q
                if outliers == "planted":
                    figures = compare(
                        timed, "original", feeds, threads=args.threads, rounds=args.rounds,
                        reps=args.reps,
                    )  # fmt: skip
                    for k, figure in figures.items():
                        speed.add_row(label, k, *cells(figure))
                        results[label][f"latency {k}"] = figure.to_json()
    console = Console(width=200)
    console.print(errs)
    console.print(speed)
    document = {"environment": env, "results": results}
    print(f"wrote {write('quantize', document)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
