"""The graph fuzzer: random Pre-LN transformers and Conv/BN/affine graphs, and the judge.

Graphs are built with `onnx.helper` from choices drawn through `Choices` (hypothesis in the
tests, so failures shrink; a seeded `random.Random` in `benchmarks/fuzz.py`). Weights come from
a numpy generator seeded by one drawn number. Every graph is valid ONNX that onnxruntime runs.

The judge runs a pipeline on the graph in process (no output check of normopt's own: the
property is judged here) and holds it to: nothing raises; the output passes `onnx.checker`
(with the full check where the original does) and runs in onnxruntime; a pass that changes nothing
says why; every output the
user did not allow to change equals the original's. Equality is judged against a float64
evaluation of the original (onnx's reference evaluator on a float64 copy), so that rounding
the graph itself amplifies (constant / x, a norm of a nearly constant vector) is not counted:
the rewrite may be as far from the float64 value as the dtype's tolerance, or as a few times
the original's own error, whichever is larger. The original's own error is the larger of its
onnxruntime result's distance from the float64 value and the change a one-ulp move of its
weights makes (what a fold's rounding of the new weights alone can do). (Where onnx's evaluator
cannot run
a graph, e.g. a grouped ConvTranspose, onnxruntime on a float32 copy is the reference.)
"""

from __future__ import annotations

import collections
import math
import random
import traceback
import warnings
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from normopt.sessions import compute_of
from tests.helpers import ort_run, supported_opset

IR_VERSION = 10
ONNX_TYPE = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}
TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 2e-2}  # x output scale
UNIT_ROUNDOFF = {np.dtype(np.float32): 2.0**-24, np.dtype(np.float16): 2.0**-11}
OWN_NOISE_FACTOR = 8.0


# ------------------------------------------------------------------------------- choices


class RandomChoices:
    """Choices from a seeded `random.Random` (the long campaign)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def integer(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)

    def pick(self, options):
        return options[self.rng.randrange(len(options))]

    def coin(self, p: float = 0.5) -> bool:
        return self.rng.random() < p


class HypothesisChoices:
    """Choices drawn from hypothesis (`st.data()`), shrinking towards small graphs with
    every optional feature off."""

    def __init__(self, data) -> None:
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def integer(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def pick(self, options):
        return self.data.draw(self.st.sampled_from(options))

    def coin(self, p: float = 0.5) -> bool:
        return self.data.draw(self.st.integers(0, 99)) >= round((1 - p) * 100)


# ------------------------------------------------------------------------------- builder


class Builder:
    """Nodes, initializers and io of one graph, with fresh names."""

    def __init__(self, rng: np.random.Generator, dtype: np.dtype) -> None:
        self.rng, self.dtype = rng, np.dtype(dtype)
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.feeds: dict[str, np.ndarray] = {}
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, array, base: str = "c", dtype=None) -> str:
        name = self.name(base)
        array = np.asarray(array)
        if dtype is not None or array.dtype.kind == "f":
            array = array.astype(dtype or self.dtype)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def weight(self, shape, base: str = "W", scale: float | None = None) -> str:
        fan_in = shape[0] if len(shape) == 2 else int(np.prod(shape[1:]))
        std = scale if scale is not None else 1.0 / math.sqrt(max(fan_in, 1))
        return self.const(self.rng.standard_normal(shape) * std, base)

    def op(self, op_type: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(
            helper.make_node(op_type, list(inputs), outs, name=self.name(f"n{op_type}"), **attrs)
        )
        return outs[0] if n_out == 1 else outs

    def numpy(self, name: str) -> np.ndarray:
        """An initializer's array."""
        return next(numpy_helper.to_array(i) for i in self.inits if i.name == name)

    def input(self, shape, dtype=None, base: str = "x", feed=None) -> str:
        dtype = np.dtype(dtype or self.dtype)
        name = self.name(base)
        elem = ONNX_TYPE.get(dtype) or helper.np_dtype_to_tensor_dtype(dtype)
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        self.feeds[name] = (
            feed if feed is not None else self.rng.standard_normal(shape).astype(dtype)
        )
        return name

    def output(self, name: str) -> None:
        if name not in [o.name for o in self.outputs]:
            self.outputs.append(helper.make_tensor_value_info(name, ONNX_TYPE[self.dtype], None))

    def model(self, opset: int) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "fuzz", self.inputs, self.outputs, self.inits)
        model = helper.make_model(
            graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION
        )
        inferred = {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.output}
        for out in model.graph.output:  # the checker wants output shapes: as inference finds them
            out.CopyFrom(inferred[out.name])
        onnx.checker.check_model(model)
        return model


@dataclass
class Case:
    family: str
    model: onnx.ModelProto
    feeds: dict[str, np.ndarray]
    notes: list[str] = field(default_factory=list)
    # what preln-to-rmsnorm takes an explicit recentring to cost: half the transformers at 1, so
    # the small graphs here still exercise recentrings the real cost would not pay for
    recentring_cost: int | None = None


# --------------------------------------------------------------------------- transformers


def _reduce_mean(b: Builder, x: str, axes: list[int], as_input: bool, keepdims: int = 1) -> str:
    if as_input:
        return b.op("ReduceMean", [x, b.const(np.array(axes, np.int64), "axes")], keepdims=keepdims)
    return b.op("ReduceMean", [x], axes=axes, keepdims=keepdims)


def layer_norm(
    c, b: Builder, x: str, d: int, opset: int, rank: int, kind: str = "layernorm"
) -> str:
    """A LayerNorm (or RMSNorm) over the last axis, as an op or in a decomposed form."""
    eps = c.pick([1e-6, 1e-5, 1e-3, 0.1])
    gamma = 1 + 0.3 * b.rng.standard_normal(d)
    beta = 0.3 * b.rng.standard_normal(d)
    use_op = c.coin(0.5) and (opset >= 17 if kind == "layernorm" else opset >= 23)
    if use_op:
        if kind == "layernorm":
            inputs = [x, b.const(gamma, "gamma")] + ([b.const(beta, "beta")] if c.coin(0.8) else [])
            return b.op("LayerNormalization", inputs, axis=c.pick([-1, rank - 1]), epsilon=eps)
        return b.op("RMSNormalization", [x, b.const(gamma, "gamma")], axis=-1, epsilon=eps)
    axis_list = [-1] if c.coin(0.7) else [rank - 1]
    as_input = opset >= 18
    cast = b.dtype == np.float16 and c.coin(0.6)
    src = b.op("Cast", [x], to=TensorProto.FLOAT) if cast else x
    cdt = np.float32 if cast else b.dtype
    centred = src
    if kind == "layernorm":
        centred = b.op("Sub", [src, _reduce_mean(b, src, axis_list, as_input)])
    square = (
        b.op("Pow", [centred, b.const(np.array(2.0), "two", cdt)])
        if c.coin()
        else b.op("Mul", [centred, centred])
    )
    var = _reduce_mean(b, square, axis_list, as_input)
    std = b.op("Sqrt", [b.op("Add", [var, b.const(np.array(eps), "eps", cdt)])])
    division = c.pick(["div", "reciprocal", "one_over"])
    if division == "div":
        y = b.op("Div", [centred, std])
    elif division == "reciprocal":
        y = b.op("Mul", [centred, b.op("Reciprocal", [std])])
    else:
        y = b.op("Mul", [centred, b.op("Div", [b.const(np.array(1.0), "one", cdt), std])])
    if cast:
        y = b.op("Cast", [y], to=ONNX_TYPE[b.dtype])
    if c.coin(0.8):
        y = b.op("Mul", [y, b.const(gamma, "gamma")])
    if kind == "layernorm" and c.coin(0.8):
        y = b.op("Add", [y, b.const(beta, "beta")])
    return y


def _linear(c, b: Builder, h: str, k: int, n: int, rank2: bool, bias: bool | None = None) -> str:
    """h @ W (+ b), as MatMul or (on a 2-D stream) Gemm with or without transB."""
    bias = c.coin(0.7) if bias is None else bias
    if rank2 and c.coin(0.5):
        trans_b = c.coin()
        w = b.weight((n, k) if trans_b else (k, n))
        inputs = [h, w] + ([b.const(0.2 * b.rng.standard_normal(n), "bias")] if bias else [])
        attrs = {"transB": 1} if trans_b else {}
        if c.coin(0.2):
            attrs.update(alpha=c.pick([0.5, 2.0]), beta=c.pick([0.5, 1.5]))
        return b.op("Gemm", inputs, **attrs)
    y = b.op("MatMul", [h, b.weight((k, n))])
    if bias:
        bias_c = b.const(0.2 * b.rng.standard_normal(n), "bias")
        y = b.op("Add", [y, bias_c] if c.coin() else [bias_c, y])
    return y


def _branch(c, b: Builder, h: str, d: int, rank2: bool) -> str:
    f = c.integer(1, 2 * d)
    kind = c.pick(["mlp", "mlp", "attention", "linear"])
    if kind == "linear":
        return _linear(c, b, h, d, d, rank2)
    if kind == "attention" and not rank2:
        q, k, v = (b.op("MatMul", [h, b.weight((d, d))]) for _ in range(3))
        scores = b.op("MatMul", [q, b.op("Transpose", [k], perm=[0, 2, 1])])
        probs = b.op(
            "Softmax",
            [b.op("Mul", [scores, b.const(np.array(1 / math.sqrt(d)), "scale")])],
            axis=-1,
        )
        return _linear(c, b, b.op("MatMul", [probs, v]), d, d, rank2)
    mid = _linear(c, b, h, d, f, rank2)
    act = c.pick(["Relu", "Tanh", "Sigmoid", None])
    if act:
        mid = b.op(act, [mid])
    return _linear(c, b, mid, f, d, rank2)


EXTRAS = (
    "hidden_output",
    "extra_reader",
    "branch_reader",
    "inner_reader",
    "two_axis_ln",
    "rms_in_stream",
    "post_ln",
    "nonlinear_writer",
    "gather_hidden",
    "shared_weight",
    "hidden_concat",
    "pos_slice",
    "pos_slice_hidden",
    "reshape_carrier",
    "transpose_carrier",
    "pool_all",
    "embedding_ln",
    "peri_ln",
    "mix_ln",
    "patch_merge",
    "ln_stats",
    "split_carrier",
    "pad_carrier",
)


def _modulated(b: Builder, h: str, cond: str, d: int) -> str:
    """DiT's adaLN modulation of a norm output: h * (1 + c W_s) + c W_t, c a conditioning
    input (one vector per batch row, broadcast over tokens)."""
    scale = b.op("Add", [b.op("MatMul", [cond, b.weight((d, d))]), b.const(np.ones(d), "one")])
    return b.op("Add", [b.op("Mul", [h, scale]), b.op("MatMul", [cond, b.weight((d, d))])])


def _embedding(
    c, b: Builder, start: str, shape: tuple, d: int, rank2: bool, extras: set, notes: list
):
    """The initial stream value; returns it and the embedding table (or None)."""
    batch, tokens = (1, shape[0]) if rank2 else shape[:2]
    table = None
    if start == "ids":
        vocab = c.integer(3, 12)
        ids = b.input(
            shape[:-1], np.int64, "ids", b.rng.integers(0, vocab, shape[:-1]).astype(np.int64)
        )
        table = b.const(b.rng.standard_normal((vocab, d)), "table")
        x = b.op("Gather", [table, ids])
        if c.coin(0.3):
            x = b.op("Mul", [x, b.const(np.array(math.sqrt(d)), "embscale")])
            notes.append("embscale")
    elif start == "features":
        k = c.integer(1, 6)
        x = _linear(c, b, b.input(shape[:-1] + (k,)), k, d, rank2)
    elif start == "patch":
        p, groups = c.integer(1, 2), c.pick([1, 1, 2]) if d % 2 == 0 else 1
        ch = groups * c.integer(1, 2)
        img = b.input((batch, ch, p * tokens, p))
        bias = [b.const(b.rng.standard_normal(d) * 0.1, "cb")] if c.coin() else []
        conv = b.op(
            "Conv",
            [img, b.weight((d, ch // groups, p, p)), *bias],
            kernel_shape=[p, p],
            strides=[p, p],
            group=groups,
        )
        flat = b.op("Reshape", [conv, b.const(np.array([batch, d, tokens], np.int64), "shape")])
        x = b.op("Transpose", [flat], perm=[0, 2, 1])
        notes.append(f"patch groups={groups}")
    else:
        return b.input(shape, base="stream"), None
    if c.coin(0.5):
        pos = b.rng.standard_normal(shape[-2:] if c.coin() or rank2 else (1,) + shape[-2:])
        if "pos_slice" in extras:  # a longer table, sliced to the tokens
            table_pos = b.const(
                np.concatenate([pos.reshape(-1, d), b.rng.standard_normal((2, d))]), "pos_table"
            )
            pos_value = b.op(
                "Slice",
                [
                    table_pos,
                    b.const(np.array([0]), "starts", np.int64),
                    b.const(np.array([tokens]), "ends", np.int64),
                    b.const(np.array([0]), "axes", np.int64),
                ],
            )
        elif (
            "pos_slice_hidden" in extras
        ):  # sliced on the hidden axis: centring the table would be wrong
            wide = b.const(
                np.concatenate([pos.reshape(-1, d), b.rng.standard_normal((tokens, 3))], axis=1),
                "pos_wide",
            )
            pos_value = b.op(
                "Slice",
                [
                    wide,
                    b.const(np.array([0]), "starts", np.int64),
                    b.const(np.array([d]), "ends", np.int64),
                    b.const(np.array([1]), "axes", np.int64),
                ],
            )
        else:
            pos_value = b.const(pos, "pos")
        x = b.op("Add", [x, pos_value] if c.coin() else [pos_value, x])
        notes.append("pos")
    if not rank2 and c.coin(0.2):
        cls = b.op(
            "Expand",
            [
                b.const(b.rng.standard_normal((1, 1, d)), "cls"),
                b.const(np.array([batch, 1, d], np.int64), "cls_shape"),
            ],
        )
        x = b.op("Concat", [cls, x], axis=1)
        notes.append("cls")
    return x, table


def transformer(c, adaln: bool = False) -> Case:
    """A random Pre-LN transformer; `adaln`: DiT's adaLN in every block (a conditioning input
    modulates each norm output and gates each branch; asked for, not drawn, so that every seed
    keeps its graph)."""
    dtype = c.pick([np.float32, np.float32, np.float32, np.float16])
    b = Builder(np.random.default_rng(c.integer(0, 2**31 - 1)), dtype)
    notes: list[str] = []
    d, tokens, batch = c.integer(2, 12), c.integer(1, 5), c.integer(1, 2)
    opset = min(c.pick([14, 17, 17, 18, 23]), supported_opset())  # 22 at pyproject's floors
    rank2 = c.coin(0.2)
    shape = (tokens, d) if rank2 else (batch, tokens, d)
    start = c.pick(
        ["ids", "ids", "features", "patch", "stream_input"]
        if not rank2
        else ["ids", "features", "stream_input"]
    )
    extras = {e for e in EXTRAS if c.coin(0.05)} | ({"adaln"} if adaln else set())
    notes.append(f"start={start} d={d} rank2={rank2} opset={opset} dtype={np.dtype(dtype)}")
    notes.append("extras=" + ",".join(sorted(extras)))
    x, table = _embedding(c, b, start, shape, d, rank2, extras, notes)
    if "cls" in notes:
        tokens += 1
        shape = (batch, tokens, d)
    if "embedding_ln" in extras:  # the stream starts at a LayerNorm's output
        x = layer_norm(c, b, x, d, opset, len(shape))
    side: list[tuple[str, int]] = []  # (value, width) computed from stream readers; added into y
    cond = b.input((1, d) if rank2 else (batch, 1, d), base="cond") if "adaln" in extras else None
    layers = c.integer(1, 3) if c.coin(0.9) else 0
    shared_w = None
    for i in range(layers):
        parallel = c.coin(0.25)
        norm_kind = "rmsnorm" if "rms_in_stream" in extras and i == 0 else "layernorm"
        branches = []
        for _ in range(2 if parallel else 1):
            if "two_axis_ln" in extras and i == 0 and not rank2:
                h = layer_norm_two_axes(c, b, x, tokens, d, opset)
            else:
                h = layer_norm(c, b, x, d, opset, len(shape), norm_kind)
            if cond is not None:  # DiT's adaLN: h * (1 + scale(c)) + shift(c), the branch gated
                h = _modulated(b, h, cond, d)
            br = _branch(c, b, h, d, rank2)
            if cond is not None:
                br = b.op("Mul", [br, b.op("MatMul", [cond, b.weight((d, d))])])
            if "shared_weight" in extras:
                if shared_w is None:
                    shared_w = b.weight((d, d))
                br = b.op("MatMul", [br, shared_w])
            if "inner_reader" in extras and i == 0:  # a value the centring changes, read elsewhere
                side.append((br, d))
                br = b.op("Add", [br, b.const(0.2 * b.rng.standard_normal(d), "bias")])
            if c.coin(0.25):
                g_shape = c.pick([(d,), (1,), (1, 1, d) if not rank2 else (1, d)])
                g = b.const(0.1 + b.rng.random(g_shape), "layerscale")
                br = b.op("Mul", [br, g] if c.coin() else [g, br])
                notes.append("layerscale")
            if "nonlinear_writer" in extras and i == 0:
                br = b.op("Relu", [br])
            if "peri_ln" in extras:  # Peri-LN: the branch output is normalized too
                br = layer_norm(c, b, br, d, opset, len(shape))
            if "branch_reader" in extras and i == 0:
                side.append((br, d))
            branches.append(br)
        total = branches[0] if len(branches) == 1 else b.op("Add", branches)
        x = b.op("Add", [x, total] if c.coin() else [total, x])
        if "post_ln" in extras and i == layers - 1 or "mix_ln" in extras and i == 0:
            x = layer_norm(c, b, x, d, opset, len(shape))
        if "ln_stats" in extras and i == 0 and opset >= 17:  # a LayerNorm whose Mean is read
            normed, mean = b.op(
                "LayerNormalization",
                [x, b.const(np.ones(d), "g"), b.const(np.zeros(d), "b")],
                2,
                axis=-1,
            )
            side += [
                (normed, d),
                (b.op("Cast", [mean], to=ONNX_TYPE[b.dtype]), 1),
            ]  # Mean is float32
        if "patch_merge" in extras and i == 0 and not rank2 and tokens >= 2 and tokens % 2 == 0:
            # Swin's patch merging: strided token slices joined on the hidden axis, LN, reduction
            pieces = [
                b.op(
                    "Slice",
                    [
                        x,
                        b.const(np.array([k]), "starts", np.int64),
                        b.const(np.array([tokens]), "ends", np.int64),
                        b.const(np.array([1]), "axes", np.int64),
                        b.const(np.array([2]), "steps", np.int64),
                    ],
                )
                for k in (0, 1)
            ]
            merged = layer_norm(c, b, b.op("Concat", pieces, axis=-1), 2 * d, opset, 3)
            x = _linear(c, b, merged, 2 * d, d, rank2)
            tokens //= 2
            shape = (batch, tokens, d)
            notes.append("patch merged")
        if "split_carrier" in extras and not rank2 and tokens >= 2:
            parts = b.op(
                "Split", [x, b.const(np.array([1, tokens - 1]), "split", np.int64)], 2, axis=1
            )
            x = b.op("Concat", list(parts), axis=1)
        if "pad_carrier" in extras and not rank2:
            padded = b.op("Pad", [x, b.const(np.array([0, 1, 0, 0, 0, 0]), "pads", np.int64)])
            x = b.op(
                "Slice",
                [
                    padded,
                    b.const(np.array([1]), "starts", np.int64),
                    b.const(np.array([tokens + 1]), "ends", np.int64),
                    b.const(np.array([1]), "axes", np.int64),
                ],
            )
        if "hidden_output" in extras and i == 0:
            b.output(x)
        if "extra_reader" in extras and i == 0:
            side.append((b.op(c.pick(["Relu", "Sigmoid"]), [x]), d))
        if "gather_hidden" in extras and i == 0:
            side.append(
                (
                    b.op(
                        "Gather", [x, b.const(np.array([0], np.int64), "idx")], axis=len(shape) - 1
                    ),
                    1,
                )
            )
        if "hidden_concat" in extras and i == 0:
            x = b.op("MatMul", [b.op("Concat", [x, x], axis=-1), b.weight((2 * d, d))])
        if "reshape_carrier" in extras and not rank2:
            x = b.op(
                "Reshape",
                [
                    b.op("Reshape", [x, b.const(np.array([-1, d]), "flat", np.int64)]),
                    b.const(np.array(shape), "back", np.int64),
                ],
            )
        if "transpose_carrier" in extras and not rank2:
            x = b.op("Transpose", [b.op("Transpose", [x], perm=[1, 0, 2])], perm=[1, 0, 2])
    pool = c.pick(["none", "none", "mean", "first"]) if not rank2 else "none"
    if pool == "mean":
        x = _reduce_mean(b, x, [1, 2] if "pool_all" in extras else [1], opset >= 18, keepdims=0)
    elif pool == "first":
        x = b.op("Gather", [x, b.const(np.array(0, np.int64), "first")], axis=1)
    if pool == "mean" and "pool_all" in extras:
        x = b.op(
            "Expand",
            [
                b.op("Unsqueeze", [x, b.const(np.array([1]), "ax", np.int64)])
                if opset >= 13
                else x,
                b.const(np.array([batch, d]), "to", np.int64),
            ],
        )
    if c.coin(0.9):
        x = layer_norm(c, b, x, d, opset, 2 if rank2 or pool != "none" else 3)
    outputs = c.integer(1, 6)
    if table is not None and pool == "none" and c.coin(0.3):
        y = b.op("MatMul", [x, b.op("Transpose", [table], perm=[1, 0])])
        outputs = int(numpy_helper.to_array(next(t for t in b.inits if t.name == table)).shape[0])
        notes.append("tied")
    else:
        y = _linear(c, b, x, d, outputs, rank2 and pool == "none")
    for value, width in side:  # what the extra readers computed reaches the output
        if pool != "none":
            value = _reduce_mean(b, value, [1], opset >= 18, keepdims=0)
        elif "patch merged" in notes and not rank2:  # computed before the tokens were halved
            value = _reduce_mean(b, value, [1], opset >= 18, keepdims=1)
        y = b.op("Add", [y, b.op("MatMul", [value, b.weight((width, outputs))])])
    b.output(y)
    from normopt.rewriter.stream_plan import RECENTRING_COST

    cost = c.pick([1, RECENTRING_COST])
    notes.append(f"recentring_cost={cost}")
    model = b.model(opset)
    if c.coin(0.4):
        model = _runnable(ort_fused(model, c, notes), model, b.feeds, notes)
    fused = any(n.startswith("ort_fused") for n in notes)
    if not fused and dtype == np.float32 and c.coin(0.15):  # (the converter and Skip norms
        model = _runnable(fp16_compute(model, c, notes), model, b.feeds, notes)  # clash)
    return Case("transformer", model, b.feeds, notes, cost)


def _runnable(made: onnx.ModelProto, before: onnx.ModelProto, feeds, notes) -> onnx.ModelProto:
    """`made` where onnxruntime runs it, else `before`: a transform of a tool outside normopt may
    produce what onnxruntime rejects (the float16 converter next to a SkipLayerNormalization)."""
    try:
        ort_run(made, feeds)
    except Exception:
        notes.append("transform dropped: onnxruntime rejects its result")
        return before
    return made


def fp16_compute(model: onnx.ModelProto, c, notes: list) -> onnx.ModelProto:
    """The usual mixed-precision recipe: onnxruntime's float16 converter with the inputs and
    outputs kept in float32 (and, by a coin, LayerNormalization kept in float32 too)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    keep = ["LayerNormalization"] if c.coin() else []
    notes.append("fp16_compute" + ("(LayerNormalization kept)" if keep else ""))
    copy = onnx.ModelProto.FromString(model.SerializeToString())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns of constants it clamps to float16's range
        return convert_float_to_float16(copy, keep_io_types=True, op_block_list=keep)


def ort_fused(model: onnx.ModelProto, c, notes: list) -> onnx.ModelProto:
    """What onnxruntime's transformers optimizer does to a Pre-LN graph: a LayerNormalization
    (last axis, 1-D scale and bias) reading `Add(a, b)` of two same-shaped rank-3 values becomes
    com.microsoft SkipLayerNormalization(a, b, scale, bias[, residual bias]), a constant bias
    Add on `a` read only there joining as its residual bias; the sum stays its output 3 where
    anything else reads it. Each candidate is fused or not by a coin."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        v.name: [
            d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim
        ]
        for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    }
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = list(model.graph.node)
    producer = {o: n for n in nodes for o in n.output}
    reads = collections.Counter(i for n in nodes for i in n.input)
    outputs = {o.name for o in model.graph.output}
    fused = 0
    for ln in [n for n in nodes if n.op_type == "LayerNormalization"]:
        add = producer.get(ln.input[0])
        axis = next((a.i for a in ln.attribute if a.name == "axis"), -1)
        if add is None or add.op_type != "Add" or len(ln.input) < 3 or len(ln.output) > 1:
            continue
        a, b = add.input
        shape = shapes.get(a)
        if (
            axis not in (-1, 2)
            or shape is None
            or len(shape) != 3
            or None in shape
            or shapes.get(b) != shape
            or any(inits.get(v) is None or inits[v].shape != (shape[2],) for v in ln.input[1:3])
            or not c.coin(0.7)
        ):
            continue
        inputs = [a, b, *ln.input[1:3]]
        bias_add = producer.get(a)
        if (
            bias_add is not None
            and bias_add.op_type == "Add"
            and reads[a] == 1
            and a not in outputs
            and inits.get(bias_add.input[1]) is not None
            and inits[bias_add.input[1]].shape == (shape[2],)
            and c.coin()
        ):
            inputs = [bias_add.input[0], b, *ln.input[1:3], bias_add.input[1]]
            nodes.remove(bias_add)
        eps = next((a.f for a in ln.attribute if a.name == "epsilon"), 1e-5)
        total = add.output[0]
        keep_sum = reads[total] > 1 or total in outputs
        skip = helper.make_node(
            "SkipLayerNormalization",
            inputs,
            [ln.output[0], "", "", total] if keep_sum else [ln.output[0]],
            domain="com.microsoft",
            epsilon=eps,
        )
        nodes[nodes.index(ln)] = skip
        nodes.remove(add)
        producer.update({total: skip, ln.output[0]: skip})  # a second norm of the sum stays
        fused += 1
    if not fused:
        return model
    notes.append(f"ort_fused={fused}")
    fused_model = onnx.ModelProto.FromString(model.SerializeToString())
    del fused_model.graph.node[:]
    fused_model.graph.node.extend(_sorted(nodes, [i.name for i in model.graph.input], inits))
    fused_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return fused_model


def _sorted(nodes, inputs, inits) -> list:
    """`nodes` in a topological order (a fused node takes the place of the norm it replaces,
    which may come before its residual bias Add's inputs are computed)."""
    ready, done, pending = set(inputs) | set(inits) | {""}, [], list(nodes)
    while pending:
        for node in pending:
            if all(i in ready for i in node.input):
                done.append(node)
                ready.update(node.output)
                pending.remove(node)
                break
        else:
            raise AssertionError("a cycle in a fused graph")
    return done


def layer_norm_two_axes(c, b: Builder, x: str, tokens: int, d: int, opset: int) -> str:
    """A LayerNorm over the last two axes (tokens and hidden): centring the stream per token
    changes what it sees, so preln-to-rmsnorm must refuse it. Gamma/beta [T, D] or [D]."""
    shape = (tokens, d) if c.coin() else (d,)
    if opset >= 17 and c.coin():
        # the same numbers, stored [T, D]: onnxruntime before 1.22 broadcasts no scale here
        gamma = np.broadcast_to(1 + 0.3 * b.rng.standard_normal(shape), (tokens, d))
        beta = np.broadcast_to(0.3 * b.rng.standard_normal(shape), (tokens, d))
        return b.op(
            "LayerNormalization", [x, b.const(gamma, "gamma"), b.const(beta, "beta")], axis=-2
        )
    centred = b.op("Sub", [x, _reduce_mean(b, x, [-2, -1], opset >= 18)])
    var = _reduce_mean(b, b.op("Mul", [centred, centred]), [-2, -1], opset >= 18)
    y = b.op("Div", [centred, b.op("Sqrt", [b.op("Add", [var, b.const(np.array(1e-5), "eps")])])])
    y = b.op("Mul", [y, b.const(1 + 0.3 * b.rng.standard_normal(shape), "gamma")])
    return b.op("Add", [y, b.const(0.3 * b.rng.standard_normal(shape), "beta")])


# --------------------------------------------------------------------------------- CNNs


def _divisors(n: int) -> list[int]:
    return [g for g in range(1, n + 1) if n % g == 0]


def _batchnorm(b: Builder, x: str, ch: int, shift: bool = True) -> str:
    gamma, var = b.rng.uniform(0.5, 1.5, ch), b.rng.uniform(0.5, 1.5, ch)
    mean = b.rng.standard_normal(ch) * 0.5 if shift else np.zeros(ch)
    beta = b.rng.standard_normal(ch) * 0.5 if shift else np.zeros(ch)
    return b.op(
        "BatchNormalization",
        [
            x,
            *(
                b.const(v, n)
                for v, n in ((gamma, "bn_g"), (beta, "bn_b"), (mean, "bn_m"), (var, "bn_v"))
            ),
        ],
        epsilon=b.rng.choice([1e-5, 1e-3]),
    )


def _affine_chain(c, b: Builder, x: str, ch: int, rank: int, axis_from_end: int) -> str:
    """Per-channel constant Mul/Add/Sub/Div steps, any order, constant-first too."""
    for _ in range(c.integer(2, 3)):
        op = c.pick(["Mul", "Add", "Sub", "Div"])
        layout = c.pick(["channel", "channel", "scalar"])
        if layout == "scalar":
            k = np.array(b.rng.uniform(0.5, 1.5))
        else:
            shape = [1] * (axis_from_end - 1)
            k = b.rng.uniform(0.5, 1.5, [ch] + shape)
            if c.coin(0.3):
                k = k.reshape((1,) * (rank - k.ndim) + k.shape)
        k_name = b.const(k, "k")
        x = b.op(op, [k_name, x] if c.coin(0.3) else [x, k_name])
    return x


def _conv(
    c, b: Builder, x: str, cin: int, hw: tuple[int, int]
) -> tuple[str, int, str, tuple[int, int]]:
    """A Conv or ConvTranspose with random groups, kernel, pads, strides, dilations, bias.
    Returns the output, its channels, the op, and its spatial size (always >= 1)."""
    transpose = c.coin(0.2)
    groups = c.pick(_divisors(cin))
    cout = groups * c.integer(1, 3)
    k = c.integer(1, 3)
    pads = [c.integer(0, 1) for _ in range(4)]  # begin h, begin w, end h, end w
    stride = c.integer(1, 2)
    dilation = 1 if transpose else c.integer(1, 2)
    bias = [b.const(0.2 * b.rng.standard_normal(cout), "cb")] if c.coin(0.6) else []
    if transpose:
        out = tuple(stride * (n - 1) + k - pads[i] - pads[i + 2] for i, n in enumerate(hw))
        if min(out) < 1:
            pads = [0] * 4
            out = tuple(stride * (n - 1) + k for n in hw)
        w = b.weight((cin, cout // groups, k, k))
        y = b.op(
            "ConvTranspose",
            [x, w, *bias],
            group=groups,
            kernel_shape=[k, k],
            pads=pads,
            strides=[stride, stride],
        )
        return y, cout, "ConvTranspose", out
    span = dilation * (k - 1) + 1
    if any(n + pads[i] + pads[i + 2] < span for i, n in enumerate(hw)):
        pads, dilation, span = [k - 1] * 4, 1, k
    out = tuple((n + pads[i] + pads[i + 2] - span) // stride + 1 for i, n in enumerate(hw))
    w = b.weight((cout, cin // groups, k, k))
    y = b.op(
        "Conv",
        [x, w, *bias],
        group=groups,
        kernel_shape=[k, k],
        pads=pads,
        strides=[stride, stride],
        dilations=[dilation, dilation],
    )
    return y, cout, "Conv", out


def _parallel(c, b: Builder, x: str, ch: int, notes: list) -> str:
    """Parallel branches of x summed (RepVGG, ACNet): Convs (some followed by a BN) with centred
    pads, with an identity or BN(x) branch, by Adds or a Sum; now and then one branch's window
    shifted (merge-branches must refuse it). Keeps the channels and the spatial size."""
    groups = c.pick(_divisors(ch))
    k = c.pick([1, 3, 3, 2])  # 2: an even kernel, dilated 2 (its taps straddle the centre)
    dilation = c.integer(1, 2) if k == 3 else 2 if k == 2 else 1
    branches = []
    for shape in c.pick([[(k, k), (1, 1)], [(k, k), (1, k), (k, 1)], [(k, k)]]):
        pads = [dilation * (shape[0] - 1) // 2, dilation * (shape[1] - 1) // 2] * 2
        if pads[2] >= 1 and c.coin(0.1):
            pads = [pads[0] + 1, pads[1], pads[2] - 1, pads[3]]
            notes.append("shifted branch window")
        bias = [b.const(0.2 * b.rng.standard_normal(ch), "cb")] if c.coin(0.5) else []
        y = b.op(
            "Conv",
            [x, b.weight((ch, ch // groups, *shape)), *bias],
            group=groups,
            kernel_shape=list(shape),
            pads=pads,
            dilations=[dilation, dilation],
        )
        branches.append(_batchnorm(b, y, ch) if c.coin(0.5) else y)
    if k == 3 and c.coin(0.3):
        branches.append(_sequential(c, b, x, ch, groups, dilation, notes))
    extra = c.pick(["none", "identity", "bn"])
    if extra == "bn" or (extra == "none" and len(branches) == 1):
        branches.append(_batchnorm(b, x, ch))
    elif extra == "identity":
        branches.append(x)
    notes.append(f"parallel branches ({len(branches)}, k={k}, groups={groups})")
    # what merge-branches must take (a zero) or refuse (one branch summed twice, a branch
    # broadcast from [N, C, 1, 1])
    edge = c.pick(["none"] * 5 + ["zero", "duplicate", "broadcast"])
    if edge == "zero":
        branches.insert(c.integer(0, len(branches)), b.const(np.array(0.0), "zero"))
    elif edge == "duplicate":
        branches.append(branches[c.integer(0, len(branches) - 1)])
    elif edge == "broadcast":
        pooled = b.op("GlobalAveragePool", [x])
        branches.append(
            b.op(
                "Conv",
                [pooled, b.weight((ch, ch // groups, 1, 1))],
                group=groups,
                kernel_shape=[1, 1],
            )
        )
    if edge != "none":
        notes.append(f"sum edge: {edge}")
    if c.coin(0.3):
        return b.op("Sum", branches)
    out = branches[0]
    for branch in branches[1:]:
        out = b.op("Add", [out, branch])
    return out


def _sequential(c, b: Builder, x: str, ch: int, groups: int, dilation: int, notes: list) -> str:
    """A Diverse Branch Block branch: 1x1 Conv -> pad -> 3x3 Conv or 3x3 average pool (-> BN).
    The pad: DBB's pad(y - v) + v with v the 1x1's bias (exact; now and then a wrong v, which
    merge-branches must refuse), or the 3x3's own zero pads (exact only without a bias)."""
    bias = 0.2 * b.rng.standard_normal(ch) if c.coin(0.6) else None
    y = b.op(
        "Conv",
        [
            x,
            b.weight((ch, ch // groups, 1, 1)),
            *([b.const(bias, "cb")] if bias is not None else []),
        ],
        group=groups,
        kernel_shape=[1, 1],
    )
    pool = c.coin(0.4)
    p = 1 if pool else dilation
    own = [p] * 4
    if c.coin(0.7):
        v = np.zeros(ch) if bias is None else bias
        if c.coin(0.1):
            v = v + 0.5
            notes.append("wrong pad value")
        shift = b.const(v.reshape(1, ch, 1, 1), "pv")
        padded = b.op(
            "Pad",
            [
                b.op("Sub", [y, shift]),
                b.const(np.array([0, 0, p, p, 0, 0, p, p], np.int64), "pads"),
            ],
        )
        y, own = b.op("Add", [padded, shift]), [0] * 4
    if pool:
        y = b.op("AveragePool", [y], kernel_shape=[3, 3], pads=own, count_include_pad=1)
    else:
        y = b.op(
            "Conv",
            [y, b.weight((ch, ch // groups, 3, 3))],
            group=groups,
            kernel_shape=[3, 3],
            pads=own,
            dilations=[dilation, dilation],
        )
    notes.append(
        f"sequential branch (1x1 -> {'pool' if pool else 'conv'}, bias={bias is not None}, "
        f"explicit pad={own == [0] * 4})"
    )
    return _batchnorm(b, y, ch) if c.coin(0.5) else y


def _evonorm(c, b: Builder, x: str, ch: int, batch: int, hw, opset: int, notes: list) -> str:
    """timm's EvoNorm2d (a random variant, both exporters' statistic forms, statistics in
    float32 for a float16 graph as timm computes them), then its affine (usually)."""
    variant = c.pick(["S0", "S0a", "S1", "S2", "B0", "B1", "B2"])
    instance = variant.startswith("B")
    groups = 1 if instance else c.pick(_divisors(ch))
    rms, keep0 = variant in ("S2", "B1", "B2"), c.coin()
    dtype = b.dtype
    t = b.op("Cast", [x], to=TensorProto.FLOAT) if dtype != np.float32 else x
    shape = (batch, ch, *hw) if instance else (batch, groups, ch // groups, *hw)
    t = t if instance else b.op("Reshape", [t, b.const(np.array(shape), "grouped", np.int64)])
    axes = list(range(2, len(shape)))
    d = t if rms else b.op("Sub", [t, _reduce_mean(b, t, axes, opset >= 18)])
    sq = b.op("Mul", [d, d]) if c.coin() else b.op("Pow", [d, b.const(2.0, "two", np.float32)])
    var = _reduce_mean(b, sq, axes, opset >= 18, keepdims=0 if keep0 else 1)
    if keep0:
        kept = np.array(shape[:2] + (1,) * len(axes))
        var = b.op("Reshape", [var, b.const(kept, "kept", np.int64)])
    eps = b.const(c.pick([1e-3, 1e-5]), "eps", np.float32)
    s = b.op("Sqrt", [b.op("Add", [var, eps])])
    s = b.op("Cast", [s], to=ONNX_TYPE[dtype]) if dtype != np.float32 else s
    s = b.op("Expand", [s, b.const(np.array(shape), "spread", np.int64)])
    if not instance:
        s = b.op("Reshape", [s, b.const(np.array((batch, ch, *hw)), "back", np.int64)])
    v = b.const(b.rng.uniform(0.5, 1.5, (1, ch, 1, 1)), "v")
    if instance:
        left = b.const(np.sqrt(b.rng.uniform(0.5, 1.5, (1, ch, 1, 1)) + 1e-3), "left")
        if c.coin():
            left = b.op("Expand", [left, b.op("Shape", [x])])
        elif c.coin():
            left = b.const(np.broadcast_to(b.numpy(left), (batch, ch, *hw)), "left_full")
        one = b.const(1.0, "one")
        right = {
            "B0": lambda: b.op("Add", [b.op("Mul", [x, v]), s]),
            "B1": lambda: b.op("Mul", [b.op("Add", [x, one]), s]),
            "B2": lambda: b.op("Sub", [s, x]),
        }[variant]()
        y = b.op("Div", [x, b.op("Max", [left, right] if c.coin() else [right, left])])
    else:
        arg = b.op("Mul", [x, v]) if variant == "S0" else x
        num = x if variant == "S0a" else b.op("Mul", [x, b.op("Sigmoid", [arg])])
        y = b.op("Div", [num, s])
    notes.append(f"evonorm {variant} groups={groups} keepdims0={keep0}")
    if c.coin(0.9):
        y = b.op("Mul", [y, b.const(b.rng.uniform(0.5, 1.5, (1, ch, 1, 1)), "gamma")])
        if c.coin(0.8):
            y = b.op("Add", [y, b.const(b.rng.standard_normal((1, ch, 1, 1)) * 0.5, "beta")])
    return y


def cnn(c, evonorm: bool = False) -> Case:
    """A random CNN (images), token or feature model with BatchNorms, affine chains, RepBNs;
    `evonorm`: images only, with EvoNorms among the norms (asked for, not drawn, so the seeds
    of the other graphs keep their graphs)."""
    dtype = c.pick([np.float32, np.float32, np.float32, np.float16])
    b = Builder(np.random.default_rng(c.integer(0, 2**31 - 1)), dtype)
    notes: list[str] = []
    layout = "image" if evonorm else c.pick(["image", "image", "tokens", "features"])
    opset = c.pick([14, 17, 18]) if evonorm else None  # (drawn last where there is none)
    batch, ch = c.integer(1, 2), c.integer(1, 6)
    notes.append(f"layout={layout} dtype={np.dtype(dtype)}")
    if layout == "image":
        hw = (c.integer(3, 6), c.integer(3, 6))
        x = b.input((batch, ch, *hw))
        shared = None
        for _ in range(c.integer(1, 3)):
            if c.coin(0.25):
                x = _parallel(c, b, x, ch, notes)
            if c.coin(0.8):
                if c.coin(0.1) and shared is not None and shared[1] == ch:
                    x = b.op("Conv", [x, shared[0]], kernel_shape=[1, 1])
                    notes.append("shared conv weight")
                else:
                    x, ch, op, hw = _conv(c, b, x, ch, hw)
                    notes.append(op)
                    if op == "Conv" and c.coin(0.2):
                        shared = (b.weight((ch, ch, 1, 1)), ch)
                if c.coin(0.15):
                    x = b.op(
                        "Add", [x, b.const(0.2 * b.rng.standard_normal((1, ch, 1, 1)), "sep_bias")]
                    )
                    notes.append("separate bias Add")
            for _ in range(c.integer(0, 2)):
                kind = c.pick(["bn", "bn", "affine", "relu"] + ["evonorm"] * (2 * evonorm))
                if kind == "evonorm":
                    x = _evonorm(c, b, x, ch, batch, hw, opset, notes)
                elif kind == "bn":
                    x = _batchnorm(b, x, ch, shift=c.coin(0.8))
                elif kind == "affine":
                    x = _affine_chain(c, b, x, ch, 4, 3)
                else:
                    x = b.op("Relu", [x])
                notes.append(kind)
                if c.coin(0.08):
                    b.output(x)
                    notes.append("norm output is a graph output")
        if c.coin(0.5):
            x = b.op("Flatten", [b.op("GlobalAveragePool", [x])])
            y = _linear(c, b, x, ch, c.integer(1, 4), rank2=True)
        else:
            y = _conv(c, b, x, ch, hw)[0]
    else:
        tokens = c.integer(1, 4)
        rank2 = layout == "features"
        shape = (tokens, ch) if rank2 else (batch, tokens, ch)
        x = b.input(shape)
        for _ in range(c.integer(1, 3)):
            if c.coin(0.8):
                n = c.integer(1, 6)
                x, ch = _linear(c, b, x, ch, n, rank2), n
            for _ in range(c.integer(0, 2)):
                kind = c.pick(["bn", "affine", "repbn", "relu"])
                if kind in ("bn", "repbn"):
                    if rank2:
                        x = _batchnorm(b, x, ch)
                    else:  # BN1d on tokens; SLAB's RepBN adds alpha * x inside the transposes
                        t = b.op("Transpose", [x], perm=[0, 2, 1])
                        normed = _batchnorm(b, t, ch)
                        if kind == "repbn":
                            again = t if c.coin() else b.op("Transpose", [x], perm=[0, 2, 1])
                            alpha = b.const(np.array(b.rng.uniform(0.2, 1.5)), "alpha")
                            normed = b.op(
                                "Add",
                                [
                                    normed,
                                    b.op("Mul", [again, alpha] if c.coin() else [alpha, again]),
                                ],
                            )
                        x = b.op("Transpose", [normed], perm=[0, 2, 1])
                elif kind == "affine":
                    x = _affine_chain(c, b, x, ch, 2 if rank2 else 3, 1)
                else:
                    x = b.op("Relu", [x])
                notes.append(kind)
                if c.coin(0.08):
                    b.output(x)
            if not rank2 and c.coin(0.2):
                x = b.op("Gather", [x, b.const(np.array(0, np.int64), "first")], axis=1)
                rank2 = True
        y = _linear(c, b, x, ch, c.integer(1, 4), rank2)
    b.output(y)
    opset = opset or c.pick([14, 17, 18])
    return Case("evonorm" if evonorm else "cnn", b.model(opset), b.feeds, notes)


def graph(c) -> Case:
    return transformer(c) if c.coin() else cnn(c)


# ------------------------------------------------------------------------------------ judge


def widened(model: onnx.ModelProto, dtype=np.float64) -> onnx.ModelProto:
    """The same graph computing in `dtype` (initializers, Constants, Casts, io types)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    target = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE} - {target}

    def widen(t: onnx.TensorProto) -> None:
        if t.data_type in floats:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))

    for t in m.graph.initializer:
        widen(t)
    for node in m.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                widen(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i in floats:
                attr.i = target
    for v in [*m.graph.input, *m.graph.output, *m.graph.value_info]:
        if v.type.tensor_type.elem_type in floats:
            v.type.tensor_type.elem_type = target
    return m


def perturbed(model: onnx.ModelProto, seed: int) -> onnx.ModelProto:
    """The model with every float weight moved by up to one ulp of its dtype (two unit
    roundoffs: a smaller move would round back to the same fp16 weight): what rounding the
    weights (as any fold must) can do to the outputs shows the graph's own sensitivity (a
    near-zero x in `c / x` amplifies it without bound)."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto.FromString(model.SerializeToString())
    for t in m.graph.initializer:
        array = numpy_helper.to_array(t)
        if array.dtype in UNIT_ROUNDOFF:
            moved = array.astype(np.float64) * (
                1 + 2 * UNIT_ROUNDOFF[array.dtype] * rng.uniform(-1, 1, array.shape)
            )
            t.CopyFrom(numpy_helper.from_array(moved.astype(array.dtype), t.name))
    return m


def _moved_feeds(feeds: dict, seed: int) -> dict:
    """Float inputs moved by up to one ulp of their dtype, as `perturbed` moves the weights."""
    rng = np.random.default_rng(seed)
    return {
        k: (
            v.astype(np.float64) * (1 + 2 * UNIT_ROUNDOFF[v.dtype] * rng.uniform(-1, 1, v.shape))
        ).astype(v.dtype)
        if v.dtype in UNIT_ROUNDOFF
        else v
        for k, v in feeds.items()
    }


def _wide_feeds(feeds: dict, dtype) -> dict:
    return {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in feeds.items()}


def reference64(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The model in float64 through onnx's reference evaluator."""
    from onnx.reference import ReferenceEvaluator

    session = ReferenceEvaluator(widened(model))
    names = [o.name for o in model.graph.output]
    return dict(zip(names, session.run(names, _wide_feeds(feeds, np.float64))))


def reference32(model: onnx.ModelProto, feeds: dict) -> dict[str, np.ndarray]:
    """The model in float32 through onnxruntime, where onnx's evaluator cannot run it."""
    return ort_run(widened(model, np.float32), _wide_feeds(feeds, np.float32))


@dataclass
class Verdict:
    applied: list[str]  # passes that changed the model
    wrong: list[str] = field(default_factory=list)  # outputs that differ
    crash: str | None = None  # what raised or came out invalid (exit 4 class)
    silent: list[str] = field(default_factory=list)  # passes that changed nothing and said nothing
    not_idempotent: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.wrong or self.crash or self.silent or self.not_idempotent)


def pipeline_choice(c, evonorm: bool = False):
    """A pipeline to judge a graph by: the default one, each of its passes alone, or one of a few
    combinations; `evonorm`: simplify-evonorm alone and before fold-affine-norms too (asked
    for: the other graphs' seeds keep their pipelines)."""
    from normopt.passes.base import Options
    from normopt.passes.pipeline import DEFAULT_PIPELINE

    names = c.pick(
        [list(DEFAULT_PIPELINE)] * 3
        + [[n] for n in DEFAULT_PIPELINE if n != "simplify-evonorm"]
        + [["simplify-evonorm"], ["simplify-evonorm", "fold-affine-norms"]] * evonorm
        + [
            ["convbn-tune"],
            ["canonicalize-norms", "fold-norm-affine"],
            ["preln-to-rmsnorm", "preln-to-crmsnorm"],
            ["preln-to-rmsnorm", "rotate-stream", "canonicalize-norms"],
            ["preln-to-rmsnorm", "rotate-stream{kind=random seed=3}"],
        ]
    )
    return names, Options(
        target=c.pick(["onnx", "ort", "tensorrt"]),
        allow_hidden_state_change=c.coin(0.3),
        tune_params=c.pick(["constants", "inputs", "inputs:all"]),
        trt_version=c.pick(["10.9", "11.4"]),
    )


SENSITIVITY_SAMPLES = 8


def _lowered(model: onnx.ModelProto) -> onnx.ModelProto:
    """--target tensorrt: normopt's plugin nodes as their float64 references (what they compute
    by their spec; the kernels are held to it by tests/plugins), so onnxruntime runs the graph."""
    import onnx_ir as ir

    from normopt.lowering import lower

    ir_model = ir.serde.deserialize_model(onnx.ModelProto.FromString(model.SerializeToString()))
    return ir.serde.serialize_model(ir_model) if lower(ir_model) else model


def priced(names, cost: int | None) -> list[str]:
    """The pass names with preln-to-rmsnorm's recentring priced at `cost` (None: as is), in the
    pipeline string's settings form."""
    return [
        f"{n}{{recentring_cost={cost}}}" if n == "preln-to-rmsnorm" and cost is not None else n
        for n in names
    ]


def judge(case: Case, names, options) -> Verdict:
    """Run the pipeline on the case without normopt's own check, and judge it."""
    import onnx_ir as ir

    from normopt.passes.pipeline import run_pipeline
    from normopt.rewriter import ort_ops

    ort_ops.register()  # the checker below sees onnxruntime's contrib norms

    original = ort_run(case.model, case.feeds)
    try:  # the output must pass the checker as strictly as the original does
        onnx.checker.check_model(case.model, full_check=True)
        full_check = True
    except onnx.checker.ValidationError:
        full_check = False
    try:
        reference = reference64(case.model, case.feeds)
        evaluate = reference64
    except Exception:  # onnx's evaluator lacks a case (grouped ConvTranspose): ORT in float32
        evaluate = reference32
        reference = evaluate(case.model, case.feeds)
    try:
        names = priced(names, case.recentring_cost)
        model = ir.serde.deserialize_model(
            onnx.ModelProto.FromString(case.model.SerializeToString())
        )
        results = run_pipeline(model, names, options)
        rewritten = ir.serde.serialize_model(model)
        onnx.checker.check_model(rewritten, full_check=full_check)
        got = ort_run(_lowered(rewritten), case.feeds)
        again = run_pipeline(ir.serde.deserialize_model(rewritten), names, options)
    except Exception:
        return Verdict([], crash=traceback.format_exc(limit=6))
    verdict = Verdict([r.name for r in results if r.modified])
    verdict.silent = [r.name for r in results if not r.modified and not r.refusals]
    verdict.not_idempotent = [r.name for r in again if r.modified]
    changed = {o for r in results for o in r.changed_outputs}
    computes_fp16 = compute_of(case.model.graph) != np.float32  # as normopt's gate reads it
    moved: list[dict] = []  # the original with its weights moved by one ulp: evaluated on demand
    for name, ref in reference.items():
        if name in changed:
            continue
        if name not in got or got[name].shape != original[name].shape:
            verdict.wrong.append(f"{name}: missing or reshaped")
            continue
        a, g, ref = (
            original[name].astype(np.float64),
            got[name].astype(np.float64),
            ref.astype(np.float64),
        )
        # Where the reference itself is not finite (the original divides by zero), IEEE NaN/Inf
        # propagation is not invariant under the reassociation every fold makes (inf - inf is
        # NaN in two Convs, -inf through their composed kernel): nothing is defined there.
        defined = np.isfinite(ref)
        if not np.array_equal(np.isfinite(a)[defined], np.isfinite(g)[defined]):
            if not _finiteness_moves(case, name, defined, np.isfinite(a)):
                verdict.wrong.append(f"{name}: NaN/Inf in other places than the original's")
            continue
        finite = np.isfinite(a) & np.isfinite(ref)
        if not finite.any():
            continue
        # a graph computing in float16 behind float32 outputs is held to float16's tolerance
        tolerance = TOLERANCE[np.dtype(np.float16 if computes_fp16 else original[name].dtype)]
        scale = float(np.abs(ref[finite]).max())
        err = float(np.abs(g - ref)[finite].max())
        own = float(np.abs(a - ref)[finite].max())
        allowed = max(tolerance * max(scale, 1e-3), OWN_NOISE_FACTOR * own)
        if (
            err > allowed and not moved
        ):  # before calling it wrong: how sensitive is the graph itself?
            # in float64, and in float32 with the inputs moved by an ulp too: a LayerNorm of equal
            # entries (x - mean(x) exactly 0 in the original's float32 run, or one ulp) amplifies
            # float32 rounding by 1/sqrt(eps)
            moved = [
                evaluate(perturbed(case.model, seed), case.feeds)
                for seed in range(SENSITIVITY_SAMPLES)
            ]
            moved += [
                reference32(perturbed(case.model, seed), _moved_feeds(case.feeds, seed))
                for seed in range(4 * SENSITIVITY_SAMPLES)
            ]  # cheap; an exact cancellation breaks rarely
        for m in moved:
            spread = np.abs(m[name].astype(np.float64) - ref)[finite]
            own = max(own, float(spread[np.isfinite(spread)].max(initial=0.0)))
        allowed = max(allowed, OWN_NOISE_FACTOR * own)
        if not np.isfinite(err) or err > allowed:
            verdict.wrong.append(
                f"{name}: error {err:.3g} > allowed {allowed:.3g} (scale {scale:.3g}, original's "
                f"own {own:.3g})"
            )
    return verdict


def _finiteness_moves(case: Case, name: str, defined, finite) -> bool:
    """Does the original itself, its weights and inputs moved by one ulp of their dtype, put
    NaN/Inf elsewhere (where the float64 reference is finite)? Then a rewrite that does is
    rounding too: a float16 value at the edge of its range overflows one way or the other
    (found: `c / x` of a folded affine's output, 2.2e6 in float64, Inf in float16)."""
    for seed in range(SENSITIVITY_SAMPLES):
        moved = ort_run(perturbed(case.model, seed), _moved_feeds(case.feeds, seed))[name]
        if not np.array_equal(np.isfinite(moved)[defined], finite[defined]):
            return True
    return False
