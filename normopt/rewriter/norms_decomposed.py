"""Decomposed LayerNorm and RMSNorm (normopt.rewriter.norms has the forms): matched from their
ReduceMean / squaring node, with an optional Cast wrapper, scale and bias."""

from __future__ import annotations

import onnx_ir as ir

from normopt.rewriter.graph import (
    constant_value,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norm_match import (
    NormMatch,
    broadcasts_over_last,
    other_input,
    reduce_axes,
    scalar,
    squares,
    trailing,
)


def _rsqrt_tail(
    var: ir.Value, numerator: ir.Value
) -> tuple[float, str, list[ir.Node], ir.Value] | None:
    """var -> Add(eps) -> Sqrt -> numerator / sqrt (three forms). Returns epsilon, its dtype
    (the dtype the statistics are computed in), the nodes, and the normalized value."""
    add = sole_reader(var)
    if not is_op(add, "Add"):
        return None
    eps_array = constant_value(other_input(add, var))
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
        is_op(div, "Div") and div.inputs[1] is s and scalar(div.inputs[0]) == 1.0
    ):
        inv = div.outputs[0]
        mul = sole_reader(inv)
        if is_op(mul, "Mul") and other_input(mul, inv) is numerator:
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
            other = other_input(node, y)
            array = constant_value(other)
            if array is None or not broadcasts_over_last(array, k):
                break
            scale = other
        elif is_op(node, "Add") and with_bias and bias is None:
            other = other_input(node, y)
            array = constant_value(other)
            if array is None or not broadcasts_over_last(array, k):
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
    k = trailing(axes, rank(x) if rank(x) is not None else rank(source))  # a Cast keeps rank
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


def match_layernorm(mean_node: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """Anchored at the first ReduceMean (the mean of x)."""
    x, axes = mean_node.inputs[0], reduce_axes(mean_node)
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
        if not squares(square, d):
            continue
        var_node = sole_reader(square.outputs[0])
        if (
            not is_op(var_node, "ReduceMean")
            or reduce_axes(var_node) != axes
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


def match_rmsnorm(square: ir.Node, claimed: set[ir.Node]) -> NormMatch | None:
    """Anchored at the square of x (Pow 2 or Mul(x, x))."""
    x = square.inputs[0]
    if x is None or not squares(square, x):
        return None
    var_node = sole_reader(square.outputs[0])
    if not is_op(var_node, "ReduceMean") or var_node.inputs[0] is not square.outputs[0]:
        return None
    axes = reduce_axes(var_node)
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
