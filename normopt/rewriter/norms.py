"""Find every normalization in a graph: LayerNorm, RMSNorm, BatchNorm and per-channel affines.

Analysis only: returns `NormMatch`es and never edits. A match must compute exactly what its
kind says, or there is no match. So every intermediate value of a decomposed pattern must be
read only inside the pattern (and be no graph output), the reductions must run over the same
trailing axes with keepdims, the mean subtracted must be the mean of the same tensor, epsilon
must sit inside the square root, and a scale or bias joins the match only if it broadcasts
along the normalized axes alone.

Decomposed forms (x may come through a Cast, the "compute precision" wrapper):
  LayerNorm  d = x - ReduceMean(x); v = ReduceMean(d*d | d^2); y = d / Sqrt(v + eps)
             (or d * Reciprocal(Sqrt(.)), or d * (1 / Sqrt(.))), then [* scale] [+ bias]
  RMSNorm    v = ReduceMean(x*x | x^2); y = x / Sqrt(v + eps) (same three division forms),
             then [* scale]
  A Cast back to the input dtype may follow the core, before or after scale and bias, when the
  input came through a Cast (the two halves of a compute-dtype wrapper).
Ops: LayerNormalization, RMSNormalization (opset 23), ORT's SimplifiedLayerNormalization,
com.microsoft Skip(Simplified)LayerNormalization, BatchNormalization (also between two
Transposes, and SLAB's RepBN `BN(x) + alpha*x`), and chains of two or more per-channel
constant Mul/Add/Sub/Div with a Mul or Div among them (Unified Norm, PowerNorm's affine).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import (
    ONNX_DOMAINS,
    constant_value,
    folded_value,
    is_op,
    rank,
    readers,
    sole_reader,
)


@dataclass
class NormMatch:
    kind: str  # layernorm | rmsnorm | batchnorm | affine
    form: str  # op | decomposed
    input: ir.Value  # the normalized tensor, outside any Cast wrapper
    output: ir.Value  # the last value of the pattern
    nodes: list[ir.Node]  # every node of the pattern, in graph order
    axis: int | None  # LN/RMS: first normalized axis (negative); BN/affine: channel axis
    epsilon: float | None = None
    scale: ir.Value | None = None
    bias: ir.Value | None = None
    compute_dtype: str | None = None  # dtype the statistics are computed in
    detail: dict = field(default_factory=dict)
    # Decomposed LN/RMSNorm: the value the core reads (after an input Cast) and the normalized
    # value before any scale, bias or output Cast.
    core_input: ir.Value | None = None
    core_output: ir.Value | None = None
    # Where the pattern reads `input`: (node, input index). Edits made since the match may have
    # replaced the value; the entry node always reads the current one.
    entry: tuple[ir.Node, int] | None = None
    # Decomposed LN/RMSNorm: the core's first node (reads core_input); LN: the ReduceMean and
    # the Sub that compute x - mean(x).
    anchor: ir.Node | None = None
    centring: tuple[ir.Node, ir.Node] | None = None

    def current_input(self) -> ir.Value:
        node, index = self.entry
        return node.inputs[index]

    def current_core_input(self) -> ir.Value:
        return self.anchor.inputs[0] if self.anchor is not None else self.current_input()

    @property
    def normalized_axes(self) -> int:
        """How many trailing axes an LN/RMSNorm normalizes over."""
        return -self.axis if self.axis is not None else 0

    @property
    def dtype(self) -> str | None:
        """The input's dtype; exports often leave it off intermediate values, and then the
        parameters (always typed, and in the input's dtype in every exporter) tell."""
        for value in (self.input, self.scale, self.bias):
            if value is not None and value.dtype is not None:
                return str(value.dtype)
        return self.compute_dtype

    def where(self) -> str:
        return self.nodes[0].name or f"{self.nodes[0].op_type} reading {self.input.name}"

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "form": self.form,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "scale": self.scale is not None,
            "bias": self.bias is not None,
            "input": self.input.name,
            "output": self.output.name,
            "nodes": [n.name for n in self.nodes],
            **self.detail,
        }


# ----------------------------------------------------------------------------- small queries


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node that reads `value` once."""
    a, b = (list(node.inputs) + [None, None])[:2]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def _scalar(value: ir.Value | None) -> float | None:
    array = constant_value(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def _reduce_axes(node: ir.Node) -> tuple[int, ...] | None:
    """The axes of a ReduceMean with keepdims=1, or None when it is not such a reduction."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if "axes" in node.attributes:
        axes = node.attributes.get_ints("axes")
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_value(node.inputs[1])
        axes = None if array is None else tuple(int(a) for a in array.reshape(-1))
    else:
        axes = None
    return tuple(axes) if axes else None


def _trailing(axes: tuple[int, ...], rank: int | None) -> int | None:
    """-k when `axes` are exactly the last k axes (any sign convention), else None."""
    if rank is not None:
        axes = tuple(a + rank if a < 0 else a for a in axes)
        if sorted(axes) == list(range(rank - len(axes), rank)):
            return -len(axes)
        return None
    if all(a < 0 for a in axes) and sorted(axes) == list(range(-len(axes), 0)):
        return -len(axes)
    return None


def _squares(node: ir.Node, x: ir.Value) -> bool:
    """Pow(x, 2) or Mul(x, x)."""
    if is_op(node, "Pow") and node.inputs[0] is x:
        return _scalar(node.inputs[1]) == 2.0
    return is_op(node, "Mul") and node.inputs[0] is x and node.inputs[1] is x


def _broadcasts_over_last(array: np.ndarray, k: int) -> bool:
    """A scale/bias that varies only along the last k axes (leading dims all 1)."""
    return array.ndim <= k or all(d == 1 for d in array.shape[: array.ndim - k])


# ------------------------------------------------------------------ LayerNorm / RMSNorm, decomposed


def _rsqrt_tail(
    var: ir.Value, numerator: ir.Value
) -> tuple[float, str, list[ir.Node], ir.Value] | None:
    """var -> Add(eps) -> Sqrt -> numerator / sqrt (three forms). Returns epsilon, its dtype
    (the dtype the statistics are computed in), the nodes, and the normalized value."""
    add = sole_reader(var)
    if not is_op(add, "Add"):
        return None
    eps_array = constant_value(_other(add, var))
    sqrt = sole_reader(add.outputs[0])
    if (
        eps_array is None
        or eps_array.size != 1
        or eps_array.reshape(()) < 0
        or not is_op(sqrt, "Sqrt")
    ):
        return None
    eps, compute = float(eps_array.reshape(())), str(ir.DataType.from_numpy(eps_array.dtype))
    s = sqrt.outputs[0]
    nodes = [add, sqrt]
    div = sole_reader(s)
    if is_op(div, "Div") and div.inputs[1] is s and div.inputs[0] is numerator:
        return eps, compute, [*nodes, div], div.outputs[0]
    if is_op(div, "Reciprocal") or (
        is_op(div, "Div") and div.inputs[1] is s and _scalar(div.inputs[0]) == 1.0
    ):
        inv = div.outputs[0]
        mul = sole_reader(inv)
        if is_op(mul, "Mul") and _other(mul, inv) is numerator:
            return eps, compute, [*nodes, div, mul], mul.outputs[0]
    return None


def _input_cast(
    x: ir.Value, pattern_readers: int, claimed: set[ir.Node]
) -> tuple[ir.Value, list[ir.Node]]:
    """Look through a Cast feeding the pattern (read by nothing else): the compute-dtype
    wrapper, unless an earlier match ends with it (a norm's output Cast feeding the next norm
    belongs to the first; the second then reads the Cast's output)."""
    node = x.producer()
    if (
        is_op(node, "Cast")
        and node not in claimed
        and not x.is_graph_output()
        and len(readers(x)) == pattern_readers
    ):
        return node.inputs[0], [node]
    return x, []


def _dtype(value: ir.Value) -> ir.DataType | None:
    """A value's dtype: recorded, or the target of the Cast that makes it."""
    node = value.producer()
    if value.dtype is None and is_op(node, "Cast"):
        return ir.DataType(node.attributes.get_int("to"))
    return value.dtype


def _epilogue(
    y: ir.Value, k: int, with_bias: bool, cast_back: ir.DataType | bool
) -> tuple[ir.Value, list[ir.Node], ir.Value | None, ir.Value | None, ir.Node | None]:
    """After the core: [Cast] [Mul scale] [Cast] [Add bias] [Cast], each at most once,
    each the sole reader of the value before it. Returns output, nodes, scale, bias, out_cast.
    A Cast joins only when it casts back to the norm's input dtype (`cast_back`; True: any,
    the dtype is unknown but the input came through a Cast; False: none): a Cast to another
    dtype is the next op's business (the input Cast of the next norm, say)."""
    nodes, scale, bias, cast = [], None, None, None
    while True:
        node = sole_reader(y)
        if node is None:
            break
        if is_op(node, "Cast") and cast is None:
            if not cast_back or (
                cast_back is not True and node.attributes.get_int("to") != cast_back
            ):
                break
            cast = node
        elif is_op(node, "Mul") and scale is None and bias is None:
            other = _other(node, y)
            array = constant_value(other)
            if array is None or not _broadcasts_over_last(array, k):
                break
            scale = other
        elif is_op(node, "Add") and with_bias and bias is None:
            other = _other(node, y)
            array = constant_value(other)
            if array is None or not _broadcasts_over_last(array, k):
                break
            bias = other
        else:
            break
        nodes.append(node)
        y = node.outputs[0]
    return y, nodes, scale, bias, cast


def _decomposed(
    kind: str,
    first: ir.Node,
    x: ir.Value,
    axes,
    core: list[ir.Node],
    y: ir.Value,
    eps: float,
    compute: str,
    pattern_readers: int,
    claimed: set[ir.Node],
    centring=None,
) -> NormMatch | None:
    source, cast_in = _input_cast(x, pattern_readers, claimed)
    k = _trailing(axes, rank(x) if rank(x) is not None else rank(source))  # a Cast keeps rank
    if k is None:
        return None
    back = _dtype(source) or bool(cast_in)
    output, tail, scale, bias, cast_out = _epilogue(
        y, -k, with_bias=kind == "layernorm", cast_back=back
    )
    detail = {"output_cast": cast_out is not None} if cast_in or cast_out else {}
    return NormMatch(
        kind,
        "decomposed",
        source,
        output,
        [*cast_in, first, *core, *tail],
        k,
        eps,
        scale,
        bias,
        compute,
        detail,
        core_input=x,
        core_output=y,
        entry=(cast_in[0] if cast_in else first, 0),
        anchor=first,
        centring=centring,
    )


def _match_layernorm(mean_node: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """Anchored at the first ReduceMean (the mean of x)."""
    x, axes = mean_node.inputs[0], _reduce_axes(mean_node)
    sub = sole_reader(mean_node.outputs[0])
    if (
        axes is None
        or not is_op(sub, "Sub")
        or sub.inputs[0] is not x
        or sub.inputs[1] is not mean_node.outputs[0]
    ):
        return None
    d = sub.outputs[0]
    d_readers = readers(d)
    if d.is_graph_output() or len(d_readers) != 2:
        return None
    for square in d_readers:
        if not _squares(square, d):
            continue
        var_node = sole_reader(square.outputs[0])
        if (
            not is_op(var_node, "ReduceMean")
            or _reduce_axes(var_node) != axes
            or var_node.inputs[0] is not square.outputs[0]
        ):
            return None
        tail = _rsqrt_tail(var_node.outputs[0], d)
        if tail is None:
            return None
        eps, compute, nodes, y = tail  # d has two readers: the square and the division found
        return _decomposed(
            "layernorm",
            mean_node,
            x,
            axes,
            [sub, square, var_node, *nodes],
            y,
            eps,
            compute,
            pattern_readers=2,
            claimed=claimed,
            centring=(mean_node, sub),
        )
    return None


def _match_rmsnorm(square: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """Anchored at the square of x (Pow 2 or Mul(x, x))."""
    x = square.inputs[0]
    if x is None or not _squares(square, x):
        return None
    var_node = sole_reader(square.outputs[0])
    if not is_op(var_node, "ReduceMean") or var_node.inputs[0] is not square.outputs[0]:
        return None
    axes = _reduce_axes(var_node)
    tail = _rsqrt_tail(var_node.outputs[0], x) if axes else None
    if tail is None:
        return None
    eps, compute, nodes, y = tail
    return _decomposed(
        "rmsnorm",
        square,
        x,
        axes,
        [var_node, *nodes],
        y,
        eps,
        compute,
        pattern_readers=2,
        claimed=claimed,
    )


# ------------------------------------------------------------------------------ fused ops


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return float(attr.as_float()) if attr is not None else default


def _match_op(node: ir.Node) -> NormMatch | None:
    r = rank(node.inputs[0]) if node.inputs else None
    if is_op(node, "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization"):
        kind = "layernorm" if node.op_type == "LayerNormalization" else "rmsnorm"
        axis = node.attributes.get_int("axis", -1)
        if axis >= 0:
            if r is None:
                return None
            axis -= r
        stash = node.attributes.get_int("stash_type", 1)
        compute = "FLOAT" if stash == 1 else str(node.inputs[0].dtype)
        return NormMatch(
            kind,
            "op",
            node.inputs[0],
            node.outputs[0],
            [node],
            axis,
            _float_attr(node, "epsilon", 1e-5),
            node.inputs[1],
            node.inputs[2] if len(node.inputs) > 2 else None,
            compute,
            entry=(node, 0),
        )
    if node.domain == "com.microsoft" and node.op_type in (
        "SkipLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    ):
        kind = "layernorm" if node.op_type == "SkipLayerNormalization" else "rmsnorm"
        bias = node.inputs[3] if kind == "layernorm" and len(node.inputs) > 3 else None
        return NormMatch(
            kind,
            "op",
            node.inputs[0],
            node.outputs[0],
            [node],
            -1,
            _float_attr(node, "epsilon", 1e-12),
            node.inputs[2],
            bias,
            "FLOAT",
            {"fused_residual_add": True},
            entry=(node, 0),
        )
    if is_op(node, "BatchNormalization"):
        return match_batchnorm(node)
    return None


def _same_source(a: ir.Value | None, b: ir.Value | None) -> bool:
    """The same value, or two Transposes with one perm of the same value."""
    if a is None or b is None:
        return False
    if a is b:
        return True
    pa, pb = a.producer(), b.producer()
    return (
        is_op(pa, "Transpose")
        and is_op(pb, "Transpose")
        and pa.inputs[0] is pb.inputs[0]
        and pa.attributes.get_ints("perm") == pb.attributes.get_ints("perm")
    )


def match_batchnorm(bn: ir.Node, constant: bool = True) -> NormMatch | None:
    """An inference-mode BatchNormalization (with the Transposes around a token BN, and SLAB's
    RepBN `BN(x) + alpha*x`) as a match; with `constant` only where its parameters are
    constants (an affine to fold), else also where they are graph inputs or computed."""
    if bn.attributes.get_int("training_mode", 0) != 0 or len(bn.inputs) < 5:
        return None
    if constant and any(folded_value(v) is None for v in bn.inputs[1:5]):
        return None  # statistics or affine not constant: not an inference-time affine
    x, y, nodes, detail, axis, entry = bn.inputs[0], bn.outputs[0], [bn], {}, 1, (bn, 0)
    add = sole_reader(y)
    if is_op(add, "Add"):  # RepBN: BN(x) + alpha * x, scalar alpha
        mul = _other(add, y).producer() if _other(add, y) is not None else None
        if is_op(mul, "Mul") and sole_reader(mul.outputs[0]) is add:
            for i in (0, 1):
                alpha = _scalar(mul.inputs[1 - i])
                if alpha is not None and _same_source(mul.inputs[i], x):
                    extra = [mul.inputs[i].producer()] if mul.inputs[i] is not x else []
                    nodes += [n for n in extra if n is not None] + [mul, add]
                    y, detail = add.outputs[0], {"repbn_alpha": alpha}
                    break
    transpose_in = x.producer()
    transpose_out = sole_reader(y)
    if (
        is_op(transpose_in, "Transpose")
        and is_op(transpose_out, "Transpose")
        and set(readers(x)) <= set(nodes)
        and not x.is_graph_output()
    ):
        perm = list(transpose_in.attributes.get_ints("perm"))
        back = list(transpose_out.attributes.get_ints("perm"))
        if [perm[i] for i in back] == list(range(len(perm))):
            axis = perm[1] - len(perm)
            nodes = [transpose_in, *nodes, transpose_out]
            x, y, entry = transpose_in.inputs[0], transpose_out.outputs[0], (transpose_in, 0)
            detail["transposed"] = True
    return NormMatch(
        "batchnorm",
        "op",
        x,
        y,
        nodes,
        axis,
        _float_attr(bn, "epsilon", 1e-5),
        bn.inputs[1],
        bn.inputs[2],
        _dtype_name(bn.inputs[1]),
        detail,
        entry=entry,
    )


def _dtype_name(value: ir.Value) -> str | None:
    """A parameter's dtype: its constant's, else its declared one."""
    array = folded_value(value)
    if array is not None:
        return str(ir.DataType.from_numpy(array.dtype))
    return None if value.dtype is None else str(value.dtype)


# -------------------------------------------------------------------------- affine chains


def _channel_axis(array: np.ndarray) -> int | None:
    """The one (negative) axis along which a per-channel constant varies; None for scalars."""
    varying = [i - array.ndim for i, d in enumerate(array.shape) if d != 1]
    return varying[0] if len(varying) == 1 else None


def _affine_step(node: ir.Node | None) -> tuple[ir.Value, int] | None:
    """(x, channel axis) when `node` computes x (op) c with c a per-channel constant."""
    if not is_op(node, "Mul", "Add", "Sub", "Div") or len(node.inputs) != 2:
        return None
    constants = [folded_value(v) for v in node.inputs]
    if (constants[0] is None) == (constants[1] is None):
        return None  # both or neither constant
    i = 0 if constants[0] is None else 1
    if i == 1 and node.op_type in ("Sub", "Div"):
        return None  # c - x and c / x are not affine steps of this form
    axis = _channel_axis(constants[1 - i])
    return None if axis is None else (node.inputs[i], axis)


def _match_affine_chain(node: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """A maximal chain of two or more same-axis per-channel constant steps starting at `node`,
    with a Mul or Div among them (a lone bias Add or a lone LayerScale Mul is no norm)."""
    first = _affine_step(node)
    if first is None:
        return None
    x, axis = first
    prev = x.producer()
    if (
        prev not in claimed
        and sole_reader(x) is node
        and (_affine_step(prev) or (None, None))[1] == axis
    ):
        return None  # `node` continues a chain that starts earlier
    chain, y, step = [], x, node
    while step is not None and step not in claimed and _affine_step(step) == (y, axis):
        chain.append(step)
        y = step.outputs[0]
        step = sole_reader(y)
    if len(chain) < 2 or not any(n.op_type in ("Mul", "Div") for n in chain):
        return None
    compute = str(ir.DataType.from_numpy(folded_value(_other(chain[0], x)).dtype))
    return NormMatch(
        "affine",
        "decomposed",
        x,
        y,
        chain,
        axis,
        compute_dtype=compute,
        detail={"ops": [n.op_type for n in chain]},
        entry=(chain[0], list(chain[0].inputs).index(x)),
    )


# --------------------------------------------------------------------------------- entry


def find_norms(graph: ir.Graph) -> list[NormMatch]:
    """Every norm in `graph` (top level), in graph order; no node belongs to two matches."""
    matches: list[NormMatch] = []
    claimed: set[ir.Node] = set()

    def take(match: NormMatch | None) -> None:
        if match is not None and not claimed.intersection(match.nodes):
            matches.append(match)
            claimed.update(match.nodes)

    for node in graph:
        if node.domain in ONNX_DOMAINS + ("com.microsoft",):
            take(_match_op(node))
            if node.op_type == "ReduceMean":
                take(_match_layernorm(node, claimed))
    for node in graph:
        if node.op_type in ("Pow", "Mul") and node not in claimed:
            take(_match_rmsnorm(node, claimed))
    for node in graph:
        if node not in claimed and node.op_type in ("Mul", "Add", "Sub", "Div"):
            take(_match_affine_chain(node, claimed))
    order = {node: i for i, node in enumerate(graph)}
    for match in matches:
        match.nodes.sort(key=lambda n: order.get(n, -1))
    matches.sort(key=lambda m: order.get(m.nodes[0], -1))
    return matches
