"""EvoNorm (Liu et al. 2020, timm's EvoNorm2d*) as exporters write it: matched from its
division, analysis only.

Forms (x a 4-D NCHW tensor; statistics may run through a Cast to float32 and back; every
statistic is broadcast back with an Expand, a grouped one then reshaped to x's shape):
  group_std(x)   Reshape(x, [B, G, C/G, H, W]) -> d = t - ReduceMean(t) -> ReduceMean(d*d | d^2)
                 over every axis after the group axis -> [Reshape] -> Add eps -> Sqrt
  group_rms(x)   the same with ReduceMean(t*t | t^2)
  instance_std / instance_rms(x)   the same over the spatial axes of x itself (no Reshape)
  S0   x * Sigmoid(x * v) / group_std(x)          S0a without its activation: x / group_std(x)
  S1   act(x) / group_std(x)                      S2   act(x) / group_rms(x)  (act: SiLU, ...)
  B0   x / Max(left, x * v + instance_std(x))
  B1   x / Max(left, (x + 1) * instance_rms(x))
  B2   x / Max(left, instance_rms(x) - x)          left = sqrt(running_var + eps), a constant
then the trailing per-channel affine `* gamma [+ beta]` (constants along the channel axis).
An EvoNorm without its activation and statistics (apply_act=False S0/B*) is `x * gamma + beta`:
an affine chain, found by normopt.rewriter.norms. Every intermediate value must be read only
inside the pattern; the numerator and the statistics must read the same x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import (
    folded_value,
    int_list,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norm_match import NormMatch, other_input, scalar, squares

_TO_NHWC, _TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)  # Transpose perms
# Elementwise activations an S1/S2 applies to its numerator (SiLU is matched as x * Sigmoid(x))
_ACTIVATIONS = ("Relu", "LeakyRelu", "Elu", "Selu", "Gelu", "HardSwish", "Mish", "Tanh")


@dataclass
class _Stat:
    """A per-group or per-channel statistic of x, broadcast back to x's shape."""

    x: ir.Value
    kind: str  # std | rms
    groups: int | None  # None: per channel (instance statistics)
    eps: float
    compute: str
    channel_axis: int  # of x: 1 (NCHW, PyTorch) or 3 (NHWC, TensorFlow)
    nodes: list[ir.Node] = field(default_factory=list)


def _source(value: ir.Value | None) -> ir.Value | None:
    """`value`, or what a Cast (the float32 compute wrapper) makes it from."""
    node = value.producer() if value is not None else None
    return node.inputs[0] if is_op(node, "Cast") else value


def _cast_nodes(value: ir.Value) -> list[ir.Node]:
    node = value.producer()
    return [node] if is_op(node, "Cast") else []


def producer_of(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if is_op(node, *ops) else None


def _axes_of(node: ir.Node) -> tuple[int, ...] | None:
    """A reduction's axes (attribute, or constant input from opset 18), any keepdims."""
    axes = int_list(node, "axes", 1)
    return None if axes is None else tuple(axes)


def _reduced(value: ir.Value) -> tuple[ir.Node, list[ir.Node]] | None:
    """The ReduceMean making `value` (keepdims, or keepdims=0 then a Reshape back, which dynamo
    may follow with an Expand to the same shape)."""
    extra = []
    node = value.producer()
    if is_op(node, "Expand"):
        extra, node = [node], producer_of(node.inputs[0], "Reshape")
    if is_op(node, "Reshape"):
        extra, node = [*extra, node], producer_of(node.inputs[0], "ReduceMean")
        if node is None or node.attributes.get_int("keepdims", 1) != 0:
            return None
    elif not is_op(node, "ReduceMean") or node.attributes.get_int("keepdims", 1) != 1:
        return None
    return node, extra


def _layout(axes: tuple[int, ...] | None, rank: int) -> int | None:
    """The axis a statistic keeps besides the batch (the group axis of a grouped tensor, the
    channel axis of x itself), from the axes it averages over: every other axis. NCHW keeps 1
    ([B, G, C/G, H, W], [B, G, C*H*W/G] or [B, C, H, W]); NHWC, TensorFlow's layout, keeps 3
    ([B, H, W, G, C/G] or [B, H, W, C])."""
    if axes is None:
        return None
    kept = set(range(1, rank)) - {a + rank if a < 0 else a for a in axes}
    if len(kept) != 1 or len(axes) != rank - 2:
        return None
    (k,) = kept
    return k if k == 1 or k == 3 and rank in (4, 5) else None


def _grouped(t: ir.Value) -> tuple[ir.Value, list[int | None] | None, int, list[ir.Node]] | None:
    """(x, the group Reshape's target, rank of the grouped tensor, nodes) where t = [Cast]
    Reshape(x, [B, G, ...] or [B, H, W, G, C/G]), else (x, None, 4, [cast]) for a 4-D x read
    directly."""
    cast = _cast_nodes(t)
    inner = cast[0].inputs[0] if cast else t
    reshape = producer_of(inner, "Reshape")
    if reshape is None:
        return (inner, None, 4, cast) if rank(inner) in (4, None) else None
    dims = _shape_dims(reshape.inputs[1])
    if dims is None or len(dims) not in (3, 5):
        return None
    return reshape.inputs[0], dims, len(dims), [reshape, *cast]


def _shape_dims(shape: ir.Value) -> list[int | None] | None:
    """A Reshape's target, entry by entry where constant: a constant, or a Concat of
    one-entry pieces (the dynamic-batch form: Unsqueeze(Gather(Shape(x))) for B)."""
    array = folded_value(shape)
    if array is not None:
        return [int(d) for d in array.reshape(-1)] if array.ndim == 1 else None
    concat = producer_of(shape, "Concat")
    if concat is None:
        return None
    dims = []
    for piece in concat.inputs:
        part = folded_value(piece)
        if part is not None and part.size != 1:
            return None
        dims.append(None if part is None else int(part.reshape(())))
    return dims


def _statistic(value: ir.Value) -> _Stat | None:
    """`value` = [Reshape](Expand([Cast](Sqrt(Add(var | ms, eps))))) (an instance statistic
    may broadcast without its Expand: simplify-evonorm drops it), or that between the Transposes
    to NHWC and back."""
    node = value.producer()
    if _perm(node) == _TO_NCHW:
        return _transposed(node)
    nodes = []
    if is_op(node, "Reshape"):
        nodes.append(node)
        node = node.inputs[0].producer()
        if not is_op(node, "Expand"):
            return None
    if is_op(node, "Expand"):  # a per-channel statistic may broadcast without one
        nodes.append(node)
        sqrt_out = node.inputs[0]
    else:
        sqrt_out = value
    nodes += _cast_nodes(sqrt_out)
    sqrt = producer_of(_source(sqrt_out), "Sqrt")
    add = producer_of(sqrt.inputs[0], "Add") if sqrt is not None else None
    if add is None:
        return None
    eps_value = next((v for v in add.inputs if folded_value(v) is not None), None)
    eps_array = folded_value(eps_value)
    if eps_array is None or eps_array.size != 1 or float(eps_array.reshape(())) < 0:
        return None
    reduced = _reduced(other_input(add, eps_value))
    if reduced is None:
        return None
    var_node, extra = reduced
    nodes += [sqrt, add, var_node, *extra]
    square = var_node.inputs[0].producer()
    if square is None or not squares(square, square.inputs[0]):
        return None
    nodes.append(square)
    d = square.inputs[0]
    sub = producer_of(d, "Sub")
    mean = producer_of(sub.inputs[1], "ReduceMean") if sub is not None else None
    kind, t = "rms", d
    axes = _axes_of(var_node)
    if mean is not None and mean.inputs[0] is sub.inputs[0] and _axes_of(mean) == axes:
        kind, t = "std", sub.inputs[0]
        nodes += [sub, mean]
    grouped = _grouped(t)
    if grouped is None:
        return None
    x, dims, r, more = grouped
    k = _layout(axes, r)
    groups = None if dims is None or k is None else dims[k]
    if k is None or dims is not None and not _splits_channels(x, dims, k):
        return None
    eps, compute = float(eps_array.reshape(())), str(ir.DataType.from_numpy(eps_array.dtype))
    return _Stat(x, kind, groups, eps, compute, 1 if k == 1 else 3, [*nodes, *more])


def _splits_channels(x: ir.Value, dims: list[int | None], k: int) -> bool:
    """The grouped shape cuts x's channels into G groups of C/G (where C is known). NCHW: G at
    axis 1 and every later axis averaged is a contiguous run of C/G channels, whatever the rest
    of the target; NHWC: C/G must be the last axis (or -1, or not constant), else the groups
    would gather channels strided."""
    groups = dims[k]
    if not isinstance(groups, int) or groups <= 0:
        return False
    c = _channels(x, 1 if k == 1 else 3)
    if c is None:
        return k == 1 or dims[4] in (-1, None)
    return c % groups == 0 and (k == 1 or dims[4] in (c // groups, -1, None))


def _perm(node: ir.Node | None) -> tuple[int, ...] | None:
    """A Transpose's perm, else None."""
    return tuple(node.attributes.get_ints("perm", ())) if is_op(node, "Transpose") else None


def _channels(x: ir.Value, axis: int) -> int | None:
    """x's channel count, from its shape or (NHWC) from the NCHW tensor it transposes."""
    if x.shape is not None and len(x.shape) == 4 and isinstance(x.shape[axis], int):
        return x.shape[axis]
    node = x.producer()
    if axis == 3 and _perm(node) == _TO_NHWC:
        return _channels(node.inputs[0], 1)
    return None


def _transposed(back: ir.Node) -> _Stat | None:
    """An NHWC statistic of an NCHW x (the TensorFlow code's channels_first group_std):
    Transpose(x, [0, 2, 3, 1]) -> the statistic -> Transpose([0, 3, 1, 2])."""
    stat = _statistic(back.inputs[0])
    there = stat.x.producer() if stat is not None and stat.channel_axis == 3 else None
    if _perm(there) != _TO_NHWC:
        return None
    stat.x, stat.channel_axis = there.inputs[0], 1
    stat.nodes += [there, back]
    return stat


def same_tensor(a: ir.Value | None, b: ir.Value) -> bool:
    """`a` is x, or a Cast of x (a float32 Cast of a float32 x changes nothing)."""
    return a is b or _source(a) is b


def _numerator(num: ir.Value, x: ir.Value, axis: int) -> tuple[str, list[ir.Node]] | None:
    """The activation the numerator applies to x: none, swish(v) (x * Sigmoid(x * v)), silu
    (x * Sigmoid(x)), or an activation op; with its nodes."""
    if same_tensor(num, x):
        return "none", _cast_nodes(num) if num is not x else []
    node = num.producer()
    if is_op(node, *_ACTIVATIONS) and same_tensor(node.inputs[0], x):
        return node.op_type.lower(), [node]
    if not is_op(node, "Mul"):
        return None
    for i in (0, 1):
        sig = producer_of(node.inputs[1 - i], "Sigmoid")
        if sig is None or not same_tensor(node.inputs[i], x):
            continue
        arg = sig.inputs[0]
        if same_tensor(arg, x):
            return "silu", [node, sig]
        mul = producer_of(arg, "Mul")
        if mul is not None and any(same_tensor(v, x) for v in mul.inputs):
            other = next(v for v in mul.inputs if not same_tensor(v, x))
            if _per_channel(folded_value(other), axis):
                return "swish(v)", [node, sig, mul]
    return None


def _per_channel(array: np.ndarray | None, axis: int) -> bool:
    """A constant that varies along the channel axis (`axis`) of a rank-4 tensor at most."""
    if array is None or array.ndim > 4:
        return False
    shape = (1,) * (4 - array.ndim) + array.shape
    return all(d == 1 for i, d in enumerate(shape) if i != axis)


def spread_channels(array: np.ndarray, axis: int) -> np.ndarray | None:
    """The per-channel slice ([1, C, 1, 1] or [1, 1, 1, C]) of a 4-D constant equal along its
    other axes."""
    if array.ndim != 4:
        return None
    first = array[tuple(slice(None) if i == axis else slice(0, 1) for i in range(4))]
    return first.copy() if (array == first).all() else None


def _b_right(right: ir.Value) -> tuple[str, _Stat, list[ir.Node]] | None:
    """B0: x * v + instance_std(x); B1: (x + 1) * instance_rms(x); B2: instance_rms(x) - x."""
    node = right.producer()
    for i in (0, 1):
        if not is_op(node, "Add", "Mul", "Sub") or (node.op_type == "Sub" and i == 1):
            continue
        stat = _statistic(node.inputs[i])
        if stat is None or stat.groups is not None:
            continue
        other, x = node.inputs[1 - i], stat.x
        inner = other.producer()
        if node.op_type == "Sub" and stat.kind == "rms" and same_tensor(other, x):
            return "B2", stat, [node]
        if node.op_type == "Mul" and stat.kind == "rms" and is_op(inner, "Add"):
            if any(same_tensor(v, x) for v in inner.inputs) and any(
                scalar(v) == 1.0 for v in inner.inputs
            ):
                return "B1", stat, [node, inner]
        if node.op_type == "Add" and stat.kind == "std" and is_op(inner, "Mul"):
            v = next((v for v in inner.inputs if not same_tensor(v, x)), None)
            if any(same_tensor(u, x) for u in inner.inputs) and _per_channel(
                folded_value(v), stat.channel_axis
            ):
                return "B0", stat, [node, inner]
    return None


def _b_left(value: ir.Value, axis: int) -> list[ir.Node] | None:
    """sqrt(running_var + eps): a per-channel constant, folded by the exporter to a constant of
    any broadcast shape or expanded to x's shape (its Expand and Shape nodes returned)."""
    expand = producer_of(value, "Expand")
    if expand is not None and _per_channel(folded_value(expand.inputs[0]), axis):
        shape = producer_of(expand.inputs[1], "Shape")
        return [expand] + ([shape] if shape is not None else [])
    array = folded_value(value)
    if array is None or not (_per_channel(array, axis) or spread_channels(array, axis) is not None):
        return None
    return []


def _core(div: ir.Node) -> tuple[str, _Stat, str, list[ir.Node]] | None:
    """(variant, statistic, activation, nodes) of the EvoNorm whose division is `div`."""
    num, den = div.inputs[0], div.inputs[1]
    maximum = producer_of(_source(den), "Max")  # float16 models: computed in float32, Casts
    if maximum is not None and len(maximum.inputs) == 2:  # around it and its operands
        casts = [*_cast_nodes(den), *(c for v in maximum.inputs for c in _cast_nodes(v))]
        for i in (0, 1):
            right = _b_right(_source(maximum.inputs[i]))
            left = right and _b_left(_source(maximum.inputs[1 - i]), right[1].channel_axis)
            if right is None or left is None or not same_tensor(num, right[1].x):
                continue
            variant, stat, nodes = right
            core = [*left, maximum, *casts, *nodes, *_cast_nodes(num), div]
            return variant, stat, "none", core
        return None
    stat = _statistic(den)
    if stat is None or stat.groups is None:
        return None
    found = _numerator(num, stat.x, stat.channel_axis)
    if found is None:
        return None
    act, nodes = found
    if stat.kind == "rms":
        variant = "S2"
    else:
        variant = {"swish(v)": "S0", "none": "S0a"}.get(act, "S1")
    return variant, stat, act, [*nodes, div]


def _affine_tail(
    y: ir.Value, axis: int
) -> tuple[ir.Value, list[ir.Node], ir.Value | None, ir.Value | None]:
    """After the division: [Mul gamma] [Add beta], per-channel constants, each read alone."""
    nodes, scale, bias = [], None, None
    for op in ("Mul", "Add"):
        node = sole_reader(y)
        other = other_input(node, y) if is_op(node, op) else None
        if other is None or not _per_channel(folded_value(other), axis):
            continue
        nodes.append(node)
        scale, bias = (other, bias) if op == "Mul" else (scale, other)
        y = node.outputs[0]
    return y, nodes, scale, bias


def _closed(nodes: list[ir.Node], output: ir.Value, x: ir.Value) -> bool:
    """Every value the pattern makes, but its output, is read only inside it."""
    inside = set(nodes)
    for node in nodes:
        for value in node.outputs:
            if value is output or value is x:
                continue
            if value.is_graph_output() or not set(readers(value, numbers_only=True)) <= inside:
                return False
    return True


def match_evonorm(div: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """The EvoNorm whose division is `div`, with its trailing affine."""
    if not is_op(div, "Div") or len(div.inputs) != 2:
        return None
    core = _core(div)
    if core is None:
        return None
    variant, stat, act, nodes = core
    output, tail, scale, bias = _affine_tail(div.outputs[0], stat.channel_axis)
    nodes = list(dict.fromkeys([*nodes, *stat.nodes, *tail]))
    if claimed.intersection(nodes) or not _closed(nodes, output, stat.x):
        return None
    detail = {
        "variant": variant,
        "groups": stat.groups,
        "statistic": f"{'group' if stat.groups else 'instance'}_{stat.kind}",
        "activation": act,
        "layout": "NCHW" if stat.channel_axis == 1 else "NHWC",
    }
    entry = next(((n, i) for n in nodes for i, v in enumerate(n.inputs) if v is stat.x), (div, 0))
    return NormMatch(
        "evonorm",
        "decomposed",
        stat.x,
        output,
        nodes,
        stat.channel_axis - 4,
        stat.eps,
        scale,
        bias,
        stat.compute,
        detail,
        core_output=div.outputs[0],
        entry=entry,
    )


def trailing_affine(match: NormMatch) -> NormMatch | None:
    """An EvoNorm's trailing `* gamma + beta` as an affine match of its own (what
    fold-affine-norms folds into the following linear op), or None without one."""
    inside, nodes, y = set(match.nodes), [], match.core_output
    while (node := sole_reader(y)) in inside and node is not None:
        nodes.append(node)
        y = node.outputs[0]
    if not nodes:
        return None
    return NormMatch(
        "affine",
        "decomposed",
        match.core_output,
        match.output,
        nodes,
        match.axis,
        compute_dtype=match.compute_dtype,
        detail={"ops": [n.op_type for n in nodes], "of": f"evonorm {match.detail['variant']}"},
        entry=(nodes[0], list(nodes[0].inputs).index(match.core_output)),
    )
