"""Graph queries and the few edits every pass needs (onnx-ir values, nodes, initializers).

Queries never edit. The edit helpers here are the shared building blocks: copy-on-write of
initializers (so editing one user's weight never changes another's) and fresh names.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Ops that forward their first input's values unchanged (up to dtype for Cast).
_PASS_THROUGH = {"Identity", "Cast"}



def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes reading `value`, in first-use order (subgraph nodes included)."""
    return list(dict.fromkeys(use.node for use in value.uses()))


def _reads_metadata_only(use: ir.Usage) -> bool:
    """Shape and Size read a value's shape, CastLike's second input its dtype: never its numbers."""
    return use.node.op_type in ("Shape", "Size") or (use.node.op_type == "CastLike" and use.idx == 1)


def value_readers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes reading `value`'s numbers. Readers of its shape or dtype only are left
    out: rewrites that change the numbers keep those, so such readers never block one."""
    return list(dict.fromkeys(u.node for u in value.uses() if not _reads_metadata_only(u)))


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
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type in _PASS_THROUGH and node.inputs:
        source = constant_value(node.inputs[0])
        if source is None or node.op_type == "Identity":
            return source
        target = ir.DataType(node.attributes["to"].as_int())
        try:
            return source.astype(target.numpy())
        except (TypeError, ValueError, NotImplementedError):
            return None
    if node.op_type == "Constant":
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    return None


_ELEMENTWISE = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Pow": np.power,
}


def _static_shape(value: ir.Value) -> np.ndarray | None:
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return np.array(list(shape), np.int64)


def _fold_node(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Evaluate one node on constant inputs (None where an input is not constant)."""
    op, attrs = node.op_type, node.attributes
    if op in _ELEMENTWISE and args and all(a is not None for a in args):
        with np.errstate(all="ignore"):
            return np.asarray(_ELEMENTWISE[op](*args), dtype=args[0].dtype)
    if op == "Shape":  # needs only the input's static shape, not its values
        shape = _static_shape(node.inputs[0])
        return None if shape is None else shape[attrs.get_int("start", 0):attrs.get_int("end", len(shape)) or None]
    if any(a is None for a in args[:1]):
        return None
    if op == "CastLike":
        target = args[1] if args[1] is not None else None
        dtype = target.dtype if target is not None else (node.inputs[1].dtype.numpy() if node.inputs[1].dtype else None)
        return None if dtype is None else args[0].astype(dtype)
    if op == "Expand" and args[1] is not None:
        return np.broadcast_to(args[0], np.broadcast_shapes(args[0].shape, tuple(args[1]))).copy()
    if op == "Reshape" and args[1] is not None:
        shape = [int(d) for d in args[1]]
        if not attrs.get_int("allowzero", 0):  # 0 copies the input's dim unless allowzero
            shape = [args[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return args[0].reshape(shape)
    if op in ("Unsqueeze", "Squeeze"):
        axes = attrs.get_ints("axes") if "axes" in attrs else (tuple(args[1]) if len(args) > 1 and args[1] is not None else None)
        if op == "Unsqueeze":
            return None if axes is None else np.expand_dims(args[0], tuple(a if a >= 0 else a + args[0].ndim + len(axes) for a in axes))
        return np.squeeze(args[0], axis=None if axes is None else tuple(axes))
    if op == "Transpose":
        perm = attrs.get_ints("perm") if "perm" in attrs else None
        return np.transpose(args[0], perm)
    if op == "Concat" and all(a is not None for a in args):
        return np.concatenate(args, axis=attrs.get_int("axis", 0))
    return None


_FOLDABLE = set(_ELEMENTWISE) | {"Shape", "CastLike", "Expand", "Reshape", "Unsqueeze", "Squeeze", "Concat",
                                 "Transpose"}


def folded_value(value: ir.Value | None, depth: int = 8) -> np.ndarray | None:
    """Like `constant_value`, but also evaluates the small constant subgraphs exporters leave
    unfolded: elementwise math (`sqrt(running_var + eps)`), a Linear's `Transpose(W)`, and the
    shape arithmetic dynamo uses for a conv bias (`Expand(CastLike(0, x), Shape(W)[0:1])`).
    Analysis only: nothing is written back to the graph."""
    direct = constant_value(value)
    if direct is not None or value is None or depth == 0:
        return direct
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
        return None
    if node.op_type == "Shape":
        return _fold_node(node, [])
    return _fold_node(node, [folded_value(v, depth - 1) if v is not None else None for v in node.inputs])


def annotate_shapes(model: ir.Model) -> None:
    """Fill in value shapes and dtypes with onnx shape inference (TorchScript exports record
    few). Reads no weights (onnx-ir hands the C++ inference a copy without large tensors);
    on failure the model is left as it was. Metadata only: passes use it to know ranks and
    normalized sizes; a wrong shape could only make a rewrite refuse or fail verification."""
    from onnx_ir.passes.common import ShapeInferencePass

    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)


def rank(value: ir.Value) -> int | None:
    if value.shape is not None:
        return len(value.shape)
    array = constant_value(value)
    return None if array is None else array.ndim


def _fresh(taken: set[str], base: str) -> str:
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used anywhere in `graph` (inputs, initializers, node outputs)."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken.update(out.name for node in graph.all_nodes() for out in node.outputs)
    return _fresh(taken, base)


def unique_node_name(graph: ir.Graph, base: str) -> str:
    """A node name used by no node of `graph` (onnxruntime rejects duplicates)."""
    return _fresh({node.name for node in graph.all_nodes()}, base)


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register `array` as a new initializer named after `base` (made unique)."""
    value = ir.Value(name=unique_name(graph, base), const_value=ir.tensor(array))
    value.const_value.name = value.name
    graph.register_initializer(value)
    return value


def set_constant_input(node: ir.Node, index: int, array: np.ndarray, base: str) -> None:
    """Make `node.inputs[index]` hold `array`: an initializer private to this input is edited
    (copy-on-write, so other readers keep theirs); anything else (a Constant node, a computed
    constant, a missing optional input) is replaced by a new initializer."""
    value = node.inputs[index] if index < len(node.inputs) else None
    if value is not None and value.is_initializer():
        value = private_initializer(node, index)
        value.const_value = ir.tensor(array, name=value.name)
        return
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new_initializer(node.graph, base, array))


def take_over(old: ir.Value, new: ir.Value) -> None:
    """Every reader of `old` (graph outputs included) reads `new`, which takes `old`'s name, so
    the model's output names and the names users refer to stay."""
    graph = old.graph or new.graph
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    old.name = unique_name(graph, f"{name}.replaced")
    new.name = name


def private_initializer(node: ir.Node, index: int) -> ir.Value:
    """The initializer feeding `node.inputs[index]`, made private to that input (copy-on-write).

    If anything else reads the initializer (another node, another input of this node, a graph
    output), a new initializer holding the same tensor takes its place at this one input, so
    the caller can replace its `const_value` without changing any other user. The tensor data is
    shared, not copied: replacing `const_value` is what diverges them.
    """
    value = node.inputs[index]
    if value is None or not value.is_initializer():
        raise ValueError(f"input {index} of node '{node.name}' is not an initializer")
    if len(value.uses()) == 1 and not value.is_graph_output():
        return value
    graph = value.graph
    assert graph is not None
    copy = ir.Value(
        name=unique_name(graph, f"{value.name}__{node.name or node.op_type}"),
        shape=value.shape,
        type=value.type,
        const_value=value.const_value,
    )
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)
    return copy
