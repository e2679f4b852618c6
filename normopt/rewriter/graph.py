"""Graph queries: who reads a value, what constant it holds, its rank, the op vocabulary.

Queries only; nothing here edits a graph (edits are in `rewriter.edit`). One vocabulary for
every walk through a graph: `LINEAR_OPS` (ops with a weight normopt can rewrite), `FORWARDS`
(ops that pass a value's elements on, by how), and one reader helper with named variants.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import numpy as np
import onnx_ir as ir

from normopt.rewriter.fold_ops import cast, fold_indexing

ONNX_DOMAINS = ("", "ai.onnx")


# Linear ops whose constant weight (input 1) and bias a rewrite can edit.
class Refuse(Exception):
    """A precondition failed: the message is the reason a user reads (the core's one way of
    refusing; a pass turns it into a Refusal)."""


LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})

# How an op passes its first input's elements on:
#   value    the same numbers (Cast: in another dtype)
#   reshape  the same elements in the same row-major order, another shape
#   move     elements selected, repeated or reordered along axes
FORWARDS = {
    "Identity": "value",
    "Cast": "value",
    "Reshape": "reshape",
    "Flatten": "reshape",
    "Squeeze": "reshape",
    "Unsqueeze": "reshape",
    "Transpose": "move",
    "Gather": "move",
    "Slice": "move",
    "Concat": "move",
    "Expand": "move",
    "Tile": "move",
    "Split": "move",
    "Pad": "move",
}


def is_op(node: ir.Node | None, *ops: str) -> bool:
    """`node` is one of `ops` of the default ONNX domain."""
    return node is not None and node.domain in ONNX_DOMAINS and node.op_type in ops


def forwards(node: ir.Node | None, *kinds: str) -> bool:
    """`node` passes its first input's elements on in one of the `kinds` of `FORWARDS`."""
    return node is not None and node.domain in ONNX_DOMAINS and FORWARDS.get(node.op_type) in kinds


# ------------------------------------------------------------------------------- readers


def _reads_metadata_only(use: ir.Usage) -> bool:
    """Shape and Size read a value's shape, CastLike's second input its dtype: never its numbers."""
    return is_op(use.node, "Shape", "Size") or (is_op(use.node, "CastLike") and use.idx == 1)


def readers(value: ir.Value, *, numbers_only: bool = False) -> list[ir.Node]:
    """Distinct nodes reading `value`, in first-use order (subgraph nodes included).
    `numbers_only` leaves out the readers of its shape or dtype alone: a rewrite that changes
    the numbers but keeps shape and dtype keeps what those see, so they never block one."""
    return list(
        dict.fromkeys(
            u.node for u in value.uses() if not (numbers_only and _reads_metadata_only(u))
        )
    )


def dim_list(shape: ir.Shape | None) -> list[int | str | None] | None:
    """A shape as a list: numbers, dim names, None for an unnamed dim; None when unknown."""
    return None if shape is None else [d if isinstance(d, int) else d.value for d in shape]


def dims_text(dims: list[int | str | None] | None) -> str:
    """`[batch, 8]`; `?` for an unknown shape or an unnamed dim."""
    return (
        "?" if dims is None else "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"
    )


NCHW_TO_NHWC, NHWC_TO_NCHW = (0, 2, 3, 1), (0, 3, 1, 2)


def permuted_around(
    entry: ir.Value, exit_: ir.Value
) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(perm in, perm out) when `entry` is written by a Transpose and `exit_` is read only by
    Transposes of one perm (an exporter's layout change around an op: timm's LayerNorm2d
    permutes NCHW to NHWC and back), else None."""
    producer, after = entry.producer(), [u.node for u in exit_.uses()]
    if (
        not is_op(producer, "Transpose")
        or not after
        or exit_.is_graph_output()
        or not all(is_op(n, "Transpose") for n in after)
    ):
        return None
    perms = {tuple(n.attributes.get_ints("perm", ())) for n in after}
    return (
        (tuple(producer.attributes.get_ints("perm", ())), perms.pop()) if len(perms) == 1 else None
    )


def dead_nodes(graph: ir.Graph) -> list[ir.Node]:
    """Nodes none of whose outputs reaches a graph output, found in one reverse sweep."""
    outputs = set(graph.outputs)
    dead: set[ir.Node] = set()
    for node in reversed(list(graph)):
        if all(
            out not in outputs and all(use.node in dead for use in out.uses())
            for out in node.outputs
        ):
            dead.add(node)
    return [n for n in graph if n in dead]


def sole_reader(value: ir.Value, *, numbers_only: bool = False) -> ir.Node | None:
    """The one node reading `value` when nothing else does and it is no graph output."""
    if value.is_graph_output():
        return None
    found = readers(value, numbers_only=numbers_only)
    return found[0] if len(found) == 1 else None


# ----------------------------------------------------------------------------- constants


def constant_value(value: ir.Value | None) -> np.ndarray | None:
    """The constant array `value` always holds, or None.

    Sees initializers, Constant nodes, and Identity/Cast applied to either. A graph input that
    is also an initializer (IR < 4 style) is not constant: the caller may override it.
    """
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    node = value.producer()
    if forwards(node, "value") and node.inputs:
        source = constant_value(node.inputs[0])
        if source is None or node.op_type == "Identity":
            return source
        return cast(source, ir.DataType(node.attributes["to"].as_int()))
    if is_op(node, "Constant") and len(node.attributes) == 1:
        return _constant_attribute(next(iter(node.attributes.values())))
    return None


def constant_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of the constant `value` holds (as `folded_value` sees constants), or None when
    it is not constant. An initializer's shape is read without reading its data (a copy of
    the weight, for an embedded model)."""
    if value is not None and value.const_value is not None and not value.is_graph_input():
        return tuple(value.const_value.shape)
    array = folded_value(value)
    return None if array is None else array.shape


def _constant_attribute(attr: ir.Attr) -> np.ndarray | None:
    """A Constant node's value (read without touching the node: onnx-ir's get_const_tensor
    renames the attribute's tensor, an edit a query must not make)."""
    if attr.is_ref():
        return None
    if attr.name == "value":
        return attr.as_tensor().numpy()
    kinds = {
        "value_float": np.float32,
        "value_floats": np.float32,
        "value_int": np.int64,
        "value_ints": np.int64,
    }
    return np.array(attr.value, dtype=kinds[attr.name]) if attr.name in kinds else None


_ELEMENTWISE = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "Div": np.divide,
    "Sqrt": np.sqrt,
    "Reciprocal": np.reciprocal,
    "Neg": np.negative,
    "Pow": np.power,
    "Max": lambda *a: functools.reduce(np.maximum, a),
    "Min": lambda *a: functools.reduce(np.minimum, a),
    "Identity": np.asarray,
}


def static_shape(value: ir.Value) -> tuple[int, ...] | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(shape)


def _fold_node(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Evaluate one node on constant inputs (None where an input is not constant)."""
    op, attrs = node.op_type, node.attributes
    if op in _ELEMENTWISE and args and all(a is not None for a in args):
        with np.errstate(all="ignore"):
            return np.asarray(_ELEMENTWISE[op](*args), dtype=args[0].dtype)
    if op == "Shape":  # needs only the input's static shape, not its values
        array = constant_value(node.inputs[0])
        shape = static_shape(node.inputs[0]) if array is None else array.shape
        if shape is None:
            return None
        # start and end clamp as Python slices do; end=0 is empty (not "to the end")
        return np.array(shape, np.int64)[
            attrs.get_int("start", 0) : attrs.get_int("end", len(shape))
        ]
    if any(a is None for a in args[:1]):
        return None
    if op == "CastLike":
        target = args[1] if args[1] is not None else None
        dtype = target.dtype if target is not None else node.inputs[1].dtype
        return cast(args[0], dtype)
    if op == "Expand" and args[1] is not None:
        return np.broadcast_to(args[0], np.broadcast_shapes(args[0].shape, tuple(args[1]))).copy()
    if op == "Reshape" and args[1] is not None:
        shape = [int(d) for d in args[1]]
        if not attrs.get_int("allowzero", 0):  # 0 copies the input's dim unless allowzero
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return args[0].reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = (
            attrs.get_ints("axes")
            if "axes" in attrs
            else (tuple(args[1]) if len(args) > 1 and args[1] is not None else None)
        )
        if op == "Unsqueeze":
            return (
                None
                if axes is None
                else np.expand_dims(
                    args[0], tuple(a if a >= 0 else a + args[0].ndim + len(axes) for a in axes)
                )
            )
        return np.squeeze(args[0], axis=None if axes is None else tuple(axes))
    if op == "Transpose":
        perm = attrs.get_ints("perm") if "perm" in attrs else None
        return np.transpose(args[0], perm)
    if op == "Concat" and all(a is not None for a in args):
        return np.concatenate(args, axis=attrs.get_int("axis", 0))
    return fold_indexing(node, args)


_FOLDABLE = set(_ELEMENTWISE) | {
    "Shape",
    "CastLike",
    "Expand",
    "Reshape",
    "Unsqueeze",
    "Squeeze",
    "Concat",
    "Transpose",
    "Cast",
    "ConstantOfShape",
    "Gather",
    "GatherND",
    "Slice",
    "ReduceSum",
}


# folded_value's answers while the graph is frozen (per thread and context, not per process)
_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("normopt_fold", default=None)


@contextlib.contextmanager
def frozen_graph() -> Iterator[None]:
    """Within the block the graph is not edited, so `folded_value` may remember its answers
    (analysis asks the same values again and again: every Mul and Add of a norm search)."""
    outer = _MEMO.get()
    token = _MEMO.set({} if outer is None else outer)
    try:
        yield
    finally:
        _MEMO.reset(token)


def folded_value(value: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """Like `constant_value`, but also evaluates the small constant subgraphs exporters leave
    unfolded: elementwise math (`sqrt(running_var + eps)`), a Linear's `Transpose(W)`, and the
    shape arithmetic dynamo uses for a conv bias (`Expand(CastLike(0, x), Shape(W)[0:1])`).
    Analysis only: nothing is written back to the graph."""
    memo = _MEMO.get()
    if memo is not None and value is not None:
        key = (
            id(value),
            depth,
        )  # by depth too: a shallower search may give up where a deeper one folds
        hit = memo.get(key)
        if hit is not None and hit[0] is value:
            return hit[1]
        result = _folded(value, depth)
        memo[key] = (value, result)
        return result
    return _folded(value, depth)


def _folded(value: ir.Value | None, depth: int) -> np.ndarray | None:
    direct = constant_value(value)
    if direct is not None or value is None or depth == 0:
        return direct
    node = value.producer()
    if node is None or node.domain not in ONNX_DOMAINS or node.op_type not in _FOLDABLE:
        return None
    if node.op_type == "Shape":
        return _fold_node(node, [])
    if not all(_may_be_constant(v, depth - 1) for v in _value_inputs(node)):
        return None  # before computing any: a big weight's value is not read for nothing
    args: list[np.ndarray | None] = []
    for i, v in enumerate(node.inputs):  # stop at the first input that is not constant
        args.append(folded_value(v, depth - 1) if v is not None else None)
        if args[-1] is None and not (node.op_type == "CastLike" and i == 1):
            return None
    return _fold_node(node, args)


def _value_inputs(node: ir.Node) -> list[ir.Value | None]:
    """The inputs whose numbers a fold needs (CastLike's second gives only its dtype)."""
    return [v for i, v in enumerate(node.inputs) if not (node.op_type == "CastLike" and i == 1)]


def _may_be_constant(value: ir.Value | None, depth: int) -> bool:
    """False where `folded_value(value, depth)` is None by the graph's structure alone (a graph
    input, a missing input, an op it does not fold), found without computing any value."""
    if value is None or value.is_graph_input():
        return False
    if value.const_value is not None:
        return True
    node = value.producer()
    if node is None:
        return False
    if is_op(node, "Constant"):
        return True
    if forwards(node, "value") and node.inputs and _may_be_constant(node.inputs[0], depth):
        return True
    if depth == 0 or node.domain not in ONNX_DOMAINS or node.op_type not in _FOLDABLE:
        return False
    return node.op_type == "Shape" or all(
        _may_be_constant(v, depth - 1) for v in _value_inputs(node)
    )


# --------------------------------------------------------------------------- shapes, ops


def rank(value: ir.Value | None) -> int | None:
    """The number of axes of `value`, from its shape or, for a constant, its array."""
    if value is None:
        return None
    if value.shape is not None:
        return len(value.shape)
    array = constant_value(value)
    return None if array is None else array.ndim


def int_list(node: ir.Node, attribute: str, input_index: int) -> list[int] | None:
    """An int list given as an attribute (older opsets) or as a constant input (newer)."""
    if attribute in node.attributes:
        return [int(a) for a in node.attributes.get_ints(attribute)]
    if input_index < len(node.inputs) and node.inputs[input_index] is not None:
        array = folded_value(node.inputs[input_index])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    return None


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held by a node's attributes (If/Loop/Scan bodies)."""
    found: list[ir.Graph] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            found.append(attr.as_graph())
        elif attr.type == ir.AttributeType.GRAPHS:
            found.extend(attr.as_graphs())
    return found


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Node counts by op type (`domain::op` outside the default domain), subgraphs included."""
    counts: dict[str, int] = {}
    for node in model.graph.all_nodes():
        key = node.op_type if node.domain in ONNX_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def default_opset(model: ir.Model) -> int:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))


def is_sorted(graph: ir.Graph) -> bool:
    """Whether every node of `graph` comes after the producers of its inputs."""
    seen: set[ir.Value] = set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        for value in node.inputs:
            if value is not None and value.producer() is not None and value not in seen:
                if value.producer().graph is graph:
                    return False
        seen.update(node.outputs)
    return True
