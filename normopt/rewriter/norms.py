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
constant Mul/Add/Sub/Div with a Mul or Div among them (Unified Norm, PowerNorm's affine), and
EvoNorm B0/B1/B2/S0/S0a/S1/S2 (normopt.rewriter.norms_evo has their forms).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import (
    ONNX_DOMAINS,
    folded_value,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norm_match import (
    NormMatch,
    other_input,
    scalar,
)
from normopt.rewriter.norms_decomposed import match_layernorm, match_rmsnorm
from normopt.rewriter.norms_evo import match_evonorm

# ------------------------------------------------------------------------------ fused ops

# The fused norm ops (what `_match_op` and match_batchnorm read; profiling counts them as norms)
NORM_OPS = {
    "LayerNormalization",
    "SimplifiedLayerNormalization",
    "RMSNormalization",
    "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "BatchNormalization",
}


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
        mul = other_input(add, y).producer() if other_input(add, y) is not None else None
        if is_op(mul, "Mul") and sole_reader(mul.outputs[0]) is add:
            for i in (0, 1):
                alpha = scalar(mul.inputs[1 - i])
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
    compute = str(ir.DataType.from_numpy(folded_value(other_input(chain[0], x)).dtype))
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
                take(match_layernorm(node, claimed))
            elif node.op_type == "Div":
                take(match_evonorm(node, claimed))
    for node in graph:
        if node.op_type in ("Pow", "Mul") and node not in claimed:
            take(match_rmsnorm(node, claimed))
    for node in graph:
        if node not in claimed and node.op_type in ("Mul", "Add", "Sub", "Div"):
            take(_match_affine_chain(node, claimed))
    order = {node: i for i, node in enumerate(graph)}
    for match in matches:
        match.nodes.sort(key=lambda n: order.get(n, -1))
    matches.sort(key=lambda m: order.get(m.nodes[0], -1))
    return matches
