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


_FOLDABLE = {
    "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
    "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Pow": np.power,
}


def folded_value(value: ir.Value | None, depth: int = 6) -> np.ndarray | None:
    """Like `constant_value`, but also evaluates small elementwise subgraphs of constants
    (Add/Sub/Mul/Div/Sqrt/Reciprocal/Neg/Pow), e.g. the `sqrt(running_var + eps)` an exporter
    leaves unfolded. Analysis only: nothing is written back to the graph."""
    direct = constant_value(value)
    if direct is not None or value is None or depth == 0:
        return direct
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _FOLDABLE:
        return None
    args = [folded_value(v, depth - 1) for v in node.inputs]
    if not args or any(a is None for a in args):
        return None
    with np.errstate(all="ignore"):
        result = _FOLDABLE[node.op_type](*args)
    return np.asarray(result, dtype=args[0].dtype)


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not used anywhere in `graph` (inputs, initializers, node outputs)."""
    taken = {v.name for v in graph.inputs} | set(graph.initializers)
    taken.update(out.name for node in graph.all_nodes() for out in node.outputs)
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


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
