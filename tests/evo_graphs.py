"""Hand-built EvoNorms (every variant, both exporters' statistic forms) and the mutations that
make them something else, with a float64 reference of timm's formulas."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import helper

from tests.helpers import const, make_model, tensor

B, C, H, W = 2, 8, 4, 4


@dataclass(frozen=True)
class Evo:
    variant: str = "S0"  # S0 | S0a (no activation) | S1 | S2 | B0 | B1 | B2
    groups: int = 2
    keepdims0: bool = False  # dynamo's form: ReduceMean keepdims=0, then a Reshape back
    spread_var: bool = False  # with keepdims0: the variance spread to x's shape before + eps
    # B: the running-variance branch Expand(left, Shape(x)) | spread (a constant of x's shape,
    # as dynamo folds it) | plain ([1, C, 1, 1])
    left: str = "expand"
    follow: str = "conv1x1"  # conv1x1 | conv3x3 (zero-padded) | add (a residual Add)
    batch: int | str = B  # a name: the batch is symbolic
    act: str = "silu"  # S1/S2's activation: silu (x * Sigmoid(x)) | an op (Relu, HardSwish, ...)
    # none | eps_outside | other_x | leak | axes | v_per_w | left_input | left_varies
    mutation: str = "none"

    @property
    def instance(self) -> bool:
        return self.variant.startswith("B")


def build(e: Evo, seed: int = 0):
    """The model (x [B, C, H, W] -> y) and its parameters by name."""
    rng = np.random.default_rng(seed)
    p = {
        "v": rng.uniform(0.5, 1.5, (1, C, 1, 1)),
        "gamma": rng.uniform(0.5, 1.5, (1, C, 1, 1)),
        "beta": rng.standard_normal((1, C, 1, 1)),
        "left": np.sqrt(rng.uniform(0.5, 1.5, (1, C, 1, 1)) + 1e-3),
        "w": rng.standard_normal((C, C, 3, 3) if e.follow == "conv3x3" else (C, C, 1, 1)) / 3,
    }
    if e.mutation == "v_per_w":
        p["v"] = rng.uniform(0.5, 1.5, (1, 1, 1, W))
    if e.mutation == "left_varies":
        p["left"] = rng.uniform(0.5, 1.5, (B, C, H, W))
    nodes, inits, outputs = [], [], [tensor("y", shape=(e.batch, C, H, W))]
    inputs = [tensor("x", shape=(e.batch, C, H, W))]
    for name, array in p.items():
        inits.append(const(name, array.astype(np.float32)))

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    stat_of = node("Relu", ["x"], "x_relu") if e.mutation == "other_x" else "x"
    stat = _statistic(e, node, inits, stat_of)
    if e.mutation == "leak":
        outputs.append(tensor("sqrt", shape=(e.batch, e.groups, 1, 1, 1)))
    if e.instance:
        right = {
            "B0": lambda: node("Add", [node("Mul", ["x", "v"], "xv"), stat], "right"),
            "B1": lambda: node("Mul", [node("Add", ["x", _one(inits)], "x1"), stat], "right"),
            "B2": lambda: node("Sub", [stat, "x"], "right"),
        }[e.variant]()
        den = node("Max", [_left(e, node, inits), right], "den")
        num = "x"
    else:
        den = stat
        num = {
            "S0": lambda: node(
                "Mul", ["x", node("Sigmoid", [node("Mul", ["x", "v"], "xv")], "s")], "num"
            ),
            "S0a": lambda: "x",
        }.get(e.variant, lambda: _activation(e, node))()
    y = node("Add", [node("Mul", [node("Div", [num, den], "q"), "gamma"], "qg"), "beta"], "evo")
    if e.follow == "add":
        node("Add", [y, "x"], "y")
    else:
        pads = [1, 1, 1, 1] if e.follow == "conv3x3" else [0, 0, 0, 0]
        node("Conv", [y, "w"], "y", pads=pads)
    return make_model(nodes, inputs, outputs, inits, opset=17), p


def _activation(e: Evo, node) -> str:
    if e.act == "silu":
        return node("Mul", ["x", node("Sigmoid", ["x"], "s")], "num")
    return node(e.act, ["x"], "num")


def _one(inits) -> str:
    inits.append(const("one", np.float32(1.0)))
    return "one"


def _left(e: Evo, node, inits) -> str:
    if e.mutation == "left_input":
        return node("Sqrt", ["x"], "left_sqrt")
    if e.left == "spread" or e.mutation == "left_varies":
        if e.mutation != "left_varies":
            inits.append(const("left_full", np.broadcast_to(_array(inits, "left"), (B, C, H, W))))
            return "left_full"
        return "left"
    if e.left == "plain":
        return "left"
    return node("Expand", ["left", node("Shape", ["x"], "x_shape")], "left_spread")


def _array(inits, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(i) for i in inits if i.name == name)


def _statistic(e: Evo, node, inits, x: str) -> str:
    """[Reshape to groups] -> std or rms -> Add eps -> Sqrt -> Expand -> [Reshape back]."""
    groups = not e.instance
    grouped_shape = [0, e.groups, C // e.groups, H, W]  # 0: copy the batch
    axes = [2, 3, 4] if groups else [2, 3]
    if e.mutation == "axes":
        axes = axes[1:]
    inits.append(const("axes", np.array(axes, np.int64)))
    t = x
    if groups:
        inits.append(const("grouped", np.array(grouped_shape, np.int64)))
        t = node("Reshape", [x, "grouped"], "t")
    rms = e.variant in ("S2", "B1", "B2")
    if not rms:
        d = node("Sub", [t, node("ReduceMean", [t], "mean", axes=axes)], "d")
    else:
        d = t
    sq = node("Mul", [d, d], "sq")
    inits.append(const("eps", np.float32(1e-3 if e.variant in ("B0", "S0a") else 1e-5)))
    if e.keepdims0:
        kept = [0, e.groups if groups else C] + [1] * len(axes)  # 0: copy the batch
        inits.append(const("kept", np.array(kept, np.int64)))
        var = node("ReduceMean", [sq], "var0", axes=axes, keepdims=0)
        var = node("Reshape", [var, "kept"], "var")
        if e.spread_var:  # Add(spread, eps): its other operand is no x-shaped value
            var = node("Expand", [var, node("Shape", [x], "x_shape3")], "var_spread")
    else:
        var = node("ReduceMean", [sq], "var", axes=axes)
    if e.mutation == "eps_outside":
        s = node("Add", [node("Sqrt", [var], "sqrt"), "eps"], "with_eps")
    else:
        s = node("Sqrt", [node("Add", [var, "eps"], "var_eps")], "sqrt")
    if groups:
        inits.append(const("back", np.array([0, C, H, W], np.int64)))
        spread = node("Expand", [s, node("Shape", [t], "t_shape")], "spread")
        return node("Reshape", [spread, "back"], "stat")
    return node("Expand", [s, node("Shape", [x], "x_shape2")], "stat")


def reference(e: Evo, p: dict, x: np.ndarray) -> np.ndarray:
    """timm's EvoNorm2d<variant> (float64), then the following op."""
    x = x.astype(np.float64)
    eps = 1e-3 if e.variant in ("B0", "S0a") else 1e-5
    if e.instance:
        mean = x.mean((2, 3), keepdims=True)
        std = np.sqrt(((x - mean) ** 2).mean((2, 3), keepdims=True) + eps)
        rms = np.sqrt((x * x).mean((2, 3), keepdims=True) + eps)
        right = {"B0": x * p["v"] + std, "B1": (x + 1) * rms, "B2": rms - x}[e.variant]
        y = x / np.maximum(p["left"], right)
    else:
        g = x.reshape(x.shape[0], e.groups, -1)
        if e.variant == "S2":
            s = np.sqrt((g * g).mean(-1, keepdims=True) + eps)
        else:
            s = np.sqrt(g.var(-1, keepdims=True) + eps)
        s = np.broadcast_to(s, g.shape).reshape(x.shape)
        sig = 1 / (1 + np.exp(-x * (p["v"] if e.variant == "S0" else 1)))
        num = x if e.variant == "S0a" else x * sig
        if e.variant in ("S1", "S2") and e.act != "silu":
            num = {"Relu": np.maximum(x, 0), "HardSwish": x * np.clip(x / 6 + 0.5, 0, 1)}[e.act]
        y = num / s
    y = y * p["gamma"] + p["beta"]
    if e.follow == "add":
        return y + x
    w = p["w"]
    if w.shape[-1] == 1:
        return np.einsum("oc,bchw->bohw", w[:, :, 0, 0], y)
    padded = np.pad(y, ((0, 0), (0, 0), (1, 1), (1, 1)))
    out = np.zeros_like(y)
    for i in range(3):
        for j in range(3):
            out += np.einsum("oc,bchw->bohw", w[:, :, i, j], padded[:, :, i : i + H, j : j + W])
    return out


def build_tf(variant: str, data_format: str, seed: int = 0, grouped=None):
    """EvoNorm S0 or B0 as the authors' TensorFlow code writes it, as tf2onnx exports it:
    tf.nn.moments (ReduceMean, SquaredDifference = Sub + Mul, ReduceMean), group_std in NHWC
    (`channels_first` transposes there and back), instance_std broadcast without an Expand,
    `v * x`, parameters shaped for the layout; then `* gamma + beta` and a MatMul over the
    channels (NHWC) or a 1x1 Conv (NCHW). `grouped`: another target for the group Reshape."""
    rng = np.random.default_rng(seed)
    last = data_format == "channels_last"
    shape = (B, H, W, C) if last else (B, C, H, W)
    pshape = (1, 1, 1, C) if last else (1, C, 1, 1)
    groups = 2
    p = {
        "v": rng.uniform(0.5, 1.5, pshape),
        "gamma": rng.uniform(0.5, 1.5, pshape),
        "beta": rng.standard_normal(pshape),
        "moving_variance": rng.uniform(0.5, 1.5, pshape),
        "w": rng.standard_normal((C, C)) / 3 if last else rng.standard_normal((C, C, 1, 1)) / 3,
    }
    nodes, inits = [], [const(k, v.astype(np.float32)) for k, v in p.items()]
    inits += [const("eps", np.float32(1e-5))]

    def node(op, ins, out, **attrs):
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    def moments(t, axes, tag):
        mean = node("ReduceMean", [t], f"{tag}_mean", axes=axes)
        d = node("Sub", [t, mean], f"{tag}_d")
        var = node("ReduceMean", [node("Mul", [d, d], f"{tag}_sq")], f"{tag}_var", axes=axes)
        return node("Sqrt", [node("Add", [var, "eps"], f"{tag}_var_eps")], f"{tag}_std")

    if variant == "S0":
        t = "x" if last else node("Transpose", ["x"], "to_nhwc", perm=[0, 2, 3, 1])
        target = grouped or [B, H, W, groups, C // groups]
        inits.append(const("grouped", np.array(target, np.int64)))
        inits.append(const("nhwc", np.array([B, H, W, C], np.int64)))
        std = moments(node("Reshape", [t, "grouped"], "g"), [1, 2, 4], "group")
        std = node("Expand", [std, "grouped"], "spread")  # (broadcast_to(std, x.shape))
        std = node("Reshape", [std, "nhwc"], "std")
        std = std if last else node("Transpose", [std], "to_nchw", perm=[0, 3, 1, 2])
        sig = node("Sigmoid", [node("Mul", ["v", "x"], "vx")], "sig")
        q = node("Div", [node("Mul", ["x", sig], "num"), std], "q")
    else:
        std = moments("x", [1, 2] if last else [2, 3], "inst")
        left = node("Sqrt", [node("Add", ["moving_variance", "eps"], "mv_eps")], "left")
        right = node("Add", [node("Mul", ["v", "x"], "vx"), std], "right")
        q = node("Div", ["x", node("Max", [left, right], "den")], "q")
    y = node("Add", [node("Mul", [q, "gamma"], "qg"), "beta"], "evo")
    if last:
        node("MatMul", [y, "w"], "y")
    else:
        node("Conv", [y, "w"], "y")
    model = make_model(nodes, [tensor("x", shape=shape)], [tensor("y", shape=shape)], inits)
    return model, p


def reference_tf(variant: str, data_format: str, p: dict, x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    last = data_format == "channels_last"
    if variant == "S0":
        t = x if last else x.transpose(0, 2, 3, 1)
        g = t.reshape(B, H, W, 2, C // 2)
        std = np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-5)
        std = np.broadcast_to(std, g.shape).reshape(B, H, W, C)
        std = std if last else std.transpose(0, 3, 1, 2)
        q = x / (1 + np.exp(-p["v"] * x)) / std
    else:
        axes = (1, 2) if last else (2, 3)
        std = np.sqrt(x.var(axes, keepdims=True) + 1e-5)
        q = x / np.maximum(np.sqrt(p["moving_variance"] + 1e-5), p["v"] * x + std)
    y = q * p["gamma"] + p["beta"]
    if last:
        return y @ p["w"]
    return np.einsum("oc,bchw->bohw", p["w"][:, :, 0, 0], y)
