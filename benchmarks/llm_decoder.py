"""A synthetic Pre-LN decoder of a real LLM's shapes, written straight into its data file.

GPT-2/OPT-style blocks at opset 17: LayerNormalization (gamma, beta) before a fused QKV MatMul
+ bias, causal multi-head attention, an output projection + bias into the residual stream; a
second LayerNormalization before fc1 + bias, Gelu (erf form), fc2 + bias; token and position
embeddings; a final LayerNormalization and an untied head. Weights are random (normal, scaled
like a trained model's), each tensor generated and written on its own: the whole model never
exists in memory, so a 13.7 GB model is made on a 24 GB machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

POOL = 1 << 24  # random values drawn once; each tensor is a randomly placed, signed slice


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    vocab: int = 50272
    positions: int = 2048
    dtype: type = np.float32

    @property
    def params(self) -> int:
        d = self.hidden
        return self.layers * (12 * d * d + 13 * d) + (2 * self.vocab + self.positions) * d + 2 * d


SIZES = {
    "124M": Shape(768, 12, 12, positions=1024),
    "1.3B": Shape(2048, 24, 32),
    "2.7B": Shape(2560, 32, 32),
    "6.7B": Shape(4096, 32, 32, dtype=np.float16),
}


class _Writer:
    """Initializers appended to one data file, each at a 4 KiB-aligned offset."""

    def __init__(self, data: Path, dtype: type, seed: int = 0) -> None:
        self.file = open(data, "wb")  # noqa: SIM115 (closed by finish)
        self.name = data.name
        self.dtype = np.dtype(dtype)
        self.rng = np.random.default_rng(seed)
        self.pool = self.rng.standard_normal(POOL, dtype=np.float32)
        self.tensors: list[TensorProto] = []

    def add(self, name: str, shape: tuple[int, ...], scale: float, mean: float = 0.0) -> str:
        offset = -self.file.tell() % 4096
        self.file.write(b"\0" * offset)
        start = self.file.tell()
        count = int(np.prod(shape))
        done = 0
        while done < count:  # a block at a time: never the whole tensor in memory
            n = min(count - done, POOL // 2)
            at = int(self.rng.integers(0, POOL - n + 1))
            sign = 1.0 if self.rng.random() < 0.5 else -1.0
            block = self.pool[at : at + n] * np.float32(sign * scale) + np.float32(mean)
            self.file.write(block.astype(self.dtype).tobytes())
            done += n
        tensor = TensorProto(
            name=name,
            data_type=helper.np_dtype_to_tensor_dtype(self.dtype),
            dims=list(shape),
            data_location=TensorProto.EXTERNAL,
        )
        for key, value in (
            ("location", self.name),
            ("offset", str(start)),
            ("length", str(count * self.dtype.itemsize)),
        ):
            tensor.external_data.add(key=key, value=value)
        self.tensors.append(tensor)
        return name

    def finish(self) -> list[TensorProto]:
        self.file.close()
        return self.tensors


def build(path: Path, shape: Shape, seed: int = 0) -> Path:
    """Write the decoder to `path` and `path`.data; returns `path`."""
    data = path.with_name(path.name + ".data")
    w = _Writer(data, shape.dtype, seed)
    d, heads = shape.hidden, shape.heads
    nodes: list[onnx.NodeProto] = []
    consts: list[TensorProto] = []
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(shape.dtype))

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def const(name: str, values, dtype=np.int64) -> str:
        consts.append(
            helper.make_tensor(
                name,
                helper.np_dtype_to_tensor_dtype(np.dtype(dtype)),
                [len(values)] if isinstance(values, list) else [],
                values if isinstance(values, list) else [values],
            )
        )
        return name

    def layernorm(x: str, prefix: str) -> str:
        gamma = w.add(f"{prefix}.weight", (d,), 0.1, mean=1.0)
        beta = w.add(f"{prefix}.bias", (d,), 0.1)
        return node("LayerNormalization", [x, gamma, beta], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def linear(x: str, prefix: str, k: int, n: int) -> str:
        weight = w.add(f"{prefix}.weight", (k, n), 1 / np.sqrt(k))
        bias = w.add(f"{prefix}.bias", (n,), 0.02)
        return node("Add", [node("MatMul", [x, weight], f"{prefix}.mm"), bias], f"{prefix}.out")

    const("zero", 0)
    const("one", 1)
    const("heads_shape", [0, 0, heads, d // heads])
    const("merge_shape", [0, 0, d])
    const("split", [d, d, d])
    const("axis0", [0])
    const("scale", 1 / np.sqrt(d // heads), shape.dtype)
    const("neg", -1e4 if shape.dtype == np.float16 else -1e9, shape.dtype)
    const("half", 0.5, shape.dtype)
    const("unit", 1.0, shape.dtype)
    const("root2", np.sqrt(2.0), shape.dtype)
    node("Gather", [node("Shape", ["input_ids"], "ids_shape"), "one"], "seq", axis=0)
    positions = node("Range", ["zero", "seq", "one"], "positions")
    square = node("Concat", [node("Unsqueeze", ["seq", "axis0"], "seq1"), "seq1"], "sq", axis=0)
    ones = node(
        "ConstantOfShape",
        [square],
        "ones",
        value=helper.make_tensor("v", TensorProto.BOOL, [1], [True]),
    )
    causal = node("Trilu", [ones], "causal", upper=0)
    wte = w.add("wte", (shape.vocab, d), 0.02)
    wpe = w.add("wpe", (shape.positions, d), 0.01)
    x = node(
        "Add",
        [node("Gather", [wte, "input_ids"], "tok"), node("Gather", [wpe, positions], "pos")],
        "embed",
    )
    for i in range(shape.layers):
        p = f"h{i}"
        qkv = linear(layernorm(x, f"{p}.ln1"), f"{p}.qkv", d, 3 * d)
        nodes.append(
            helper.make_node(
                "Split", [qkv, "split"], [f"{p}.{c}" for c in "qkv"], name=f"{p}.split", axis=-1
            )
        )
        q, k, v = (
            node(
                "Transpose",
                [node("Reshape", [f"{p}.{c}", "heads_shape"], f"{p}.{c}r")],
                f"{p}.{c}t",
                perm=[0, 2, 3, 1] if c == "k" else [0, 2, 1, 3],
            )
            for c in "qkv"
        )
        scores = node("Mul", [node("MatMul", [q, k], f"{p}.qk"), "scale"], f"{p}.scores")
        masked = node("Where", [causal, scores, "neg"], f"{p}.masked")
        probs = node("Softmax", [masked], f"{p}.probs", axis=-1)
        ctx = node(
            "Transpose", [node("MatMul", [probs, v], f"{p}.ctx")], f"{p}.ctxt", perm=[0, 2, 1, 3]
        )
        merged = node("Reshape", [ctx, "merge_shape"], f"{p}.merged")
        x = node("Add", [x, linear(merged, f"{p}.proj", d, d)], f"{p}.res1")
        h = linear(layernorm(x, f"{p}.ln2"), f"{p}.fc1", d, 4 * d)
        erf = node("Erf", [node("Div", [h, "root2"], f"{p}.scaled")], f"{p}.erf")
        gelu = node(
            "Mul",
            [node("Mul", [h, "half"], f"{p}.halfx"), node("Add", [erf, "unit"], f"{p}.erf1")],
            f"{p}.gelu",
        )
        x = node("Add", [x, linear(gelu, f"{p}.fc2", 4 * d, d)], f"{p}.res2")
    head = w.add("lm_head", (d, shape.vocab), 1 / np.sqrt(d))
    node("MatMul", [layernorm(x, "ln_f"), head], "logits")
    graph = helper.make_graph(
        nodes,
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", elem, ["batch", "seq", shape.vocab])],
        initializer=consts + w.finish(),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path
