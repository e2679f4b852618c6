"""Hand-built LayerNorm / RMSNorm decompositions with every variation the matcher must handle,
and the mutations it must refuse (they compute something else)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper

from tests.helpers import const, make_model, tensor


@dataclass(frozen=True)
class Variant:
    kind: str = "layernorm"  # layernorm | rmsnorm
    square: str = "pow"  # pow | mul
    division: str = "div"  # div | reciprocal | one_over
    axes_as_input: bool = False  # opset 18 form (axes an input) vs opset 17 (attribute)
    k: int = 1  # normalize over the last k axes
    scale: str = "vector"  # none | vector | bad (varies along a non-normalized axis)
    bias: bool = True
    cast: bool = False  # fp16 in/out, fp32 compute
    eps: float = 1e-5
    # mutations: none | eps_outside | keepdims0 | other_mean | extra_use | nonlast_axis |
    # positive_axes
    mutation: str = "none"

    @property
    def opset(self) -> int:
        return 18 if self.axes_as_input else 17

    @property
    def shape(self) -> tuple[int, ...]:
        # keepdims=0 only broadcasts back (wrongly) when the trailing dims are all equal
        return (4, 4, 4, 4) if self.mutation == "keepdims0" else (2, 3, 4, 8)

    @property
    def exact(self) -> bool:
        """Whether the graph really is a norm of the kind (mutations that keep it one are exact)."""
        return self.mutation in ("none", "positive_axes")


def build(v: Variant, seed: int = 0):
    """The model and the arrays it was built from."""
    rng = np.random.default_rng(seed)
    shape = v.shape
    nodes, inits = [], []
    io_type = TensorProto.FLOAT16 if v.cast else TensorProto.FLOAT
    x = "x"
    if v.cast:
        nodes.append(helper.make_node("Cast", ["x"], ["xc"], to=TensorProto.FLOAT, name="cast_in"))
        x = "xc"
    rank = len(shape)
    axes = list(range(-v.k, 0))
    if v.mutation == "nonlast_axis":
        axes = [1]
    if v.mutation == "positive_axes":
        axes = [a + rank for a in axes]
    keepdims = 0 if v.mutation == "keepdims0" else 1

    def reduce_mean(inp, out, name):
        if v.axes_as_input:
            inits.append(const(f"{name}_axes", np.array(axes, np.int64)))
            return helper.make_node(
                "ReduceMean", [inp, f"{name}_axes"], [out], keepdims=keepdims, name=name
            )
        return helper.make_node("ReduceMean", [inp], [out], axes=axes, keepdims=keepdims, name=name)

    if v.kind == "layernorm":
        mean_of = "y_other" if v.mutation == "other_mean" else x
        nodes.append(reduce_mean(mean_of, "mean", "mean"))
        nodes.append(helper.make_node("Sub", [x, "mean"], ["d"], name="sub"))
        centred = "d"
    else:
        centred = x
    if v.square == "pow":
        inits.append(const("two", np.float32(2.0)))
        nodes.append(helper.make_node("Pow", [centred, "two"], ["sq"], name="square"))
    else:
        nodes.append(helper.make_node("Mul", [centred, centred], ["sq"], name="square"))
    nodes.append(reduce_mean("sq", "var", "var"))
    inits.append(const("eps", np.float32(v.eps)))
    if v.mutation == "eps_outside":
        nodes += [
            helper.make_node("Sqrt", ["var"], ["std0"], name="sqrt"),
            helper.make_node("Add", ["std0", "eps"], ["std"], name="add_eps"),
        ]
    else:
        nodes += [
            helper.make_node("Add", ["var", "eps"], ["var_eps"], name="add_eps"),
            helper.make_node("Sqrt", ["var_eps"], ["std"], name="sqrt"),
        ]
    if v.division == "div":
        nodes.append(helper.make_node("Div", [centred, "std"], ["normed"], name="div"))
    else:
        if v.division == "reciprocal":
            nodes.append(helper.make_node("Reciprocal", ["std"], ["inv"], name="inv"))
        else:
            inits.append(const("one", np.float32(1.0)))
            nodes.append(helper.make_node("Div", ["one", "std"], ["inv"], name="inv"))
        nodes.append(helper.make_node("Mul", [centred, "inv"], ["normed"], name="mul_inv"))
    y = "normed"
    arrays = {}
    if v.scale != "none":
        param_shape = shape[-v.k :] if v.scale == "vector" else (shape[1], 1, 1)
        arrays["scale"] = (1 + 0.3 * rng.standard_normal(param_shape)).astype(np.float32)
        inits.append(const("gamma", arrays["scale"]))
        nodes.append(helper.make_node("Mul", [y, "gamma"], ["scaled"], name="scale"))
        y = "scaled"
    if v.bias and v.kind == "layernorm":
        arrays["bias"] = (0.2 * rng.standard_normal(shape[-v.k :])).astype(np.float32)
        inits.append(const("beta", arrays["bias"]))
        nodes.append(helper.make_node("Add", [y, "beta"], ["shifted"], name="bias"))
        y = "shifted"
    if v.cast:
        nodes.append(
            helper.make_node("Cast", [y], ["out"], to=TensorProto.FLOAT16, name="cast_out")
        )
    else:
        nodes.append(helper.make_node("Identity", [y], ["out"], name="out"))
    inputs = [tensor("x", io_type, shape)]
    outputs = [tensor("out", io_type, shape)]
    if v.mutation == "other_mean":
        inputs.append(tensor("y_other", TensorProto.FLOAT, shape))
    if v.mutation == "extra_use":
        outputs.append(tensor(centred if v.kind == "layernorm" else "sq", TensorProto.FLOAT, shape))
    model = make_model(nodes, inputs, outputs, inits, opset=v.opset)
    return model, arrays


def reference(
    v: Variant, x: np.ndarray, scale: np.ndarray | None, bias: np.ndarray | None, eps: float, k: int
) -> np.ndarray:
    """The norm in float64, from the parameters a match reports."""
    x = x.astype(np.float64)
    axes = tuple(range(-k, 0))
    if v.kind == "layernorm":
        x = x - x.mean(axis=axes, keepdims=True)
    y = x / np.sqrt((x * x).mean(axis=axes, keepdims=True) + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y
