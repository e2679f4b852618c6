"""The graph edits every pass is built from, with fresh names and copy-on-write weights.

A pass creates one `Editor` for the graph it edits. The editor knows every name in use (value
and node names, collected once, so each fresh name costs O(1), not a scan of the graph) and
names every node and value it creates: nothing is left to onnx-ir's automatic `val_N` names,
which can collide with an exporter's own. Initializers are copied on write, so editing one
user's weight never changes another's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import subgraphs


class Editor:
    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self._values: set[str] = set()
        self._nodes: set[str] = set()
        self._next: dict[str, int] = {}  # per base name: the next suffix to try
        for g in (graph, *(s for n in graph.all_nodes() for s in subgraphs(n))):
            self._values.update(
                v.name for v in (*g.inputs, *g.outputs, *g.initializers.values()) if v.name
            )
        for node in graph.all_nodes():
            self._values.update(o.name for o in node.outputs if o.name)
            if node.name:
                self._nodes.add(node.name)

    def value_name(self, base: str) -> str:
        return self._fresh(self._values, base)

    def node_name(self, base: str) -> str:
        return self._fresh(self._nodes, base)

    def _fresh(self, taken: set[str], base: str) -> str:
        """`base`, else `base_k` for the first free k, resuming where the last search for this
        base stopped: each name is O(1) however often a base is asked for."""
        key = f"{id(taken)}:{base}"
        name, i = base, self._next.get(key, 0)
        if i:
            name = f"{base}_{i}"
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        self._next[key] = i + 1
        taken.add(name)
        return name

    # ------------------------------------------------------------------------ new things

    def node(
        self,
        op: str,
        inputs: Sequence[ir.Value | None],
        attributes: dict | None = None,
        *,
        name: str,
        domain: str = "",
        like: ir.Value | None = None,
    ) -> ir.Node:
        """A new node (not yet inserted) named after `name`, its output too; `like` gives the
        output's type and shape."""
        node = ir.node(op, list(inputs), attributes or {}, domain=domain, name=self.node_name(name))
        out = node.outputs[0]
        out.name = self.value_name(name)
        if like is not None:
            out.type, out.shape = like.type, like.shape
        return node

    def reduce_mean(self, x: ir.Value, axes: list[int], opset: int, *, name: str) -> ir.Node:
        return self.reduce("ReduceMean", x, axes, opset, name=name)

    def reduce(self, op: str, x: ir.Value, axes: list[int], opset: int, *, name: str) -> ir.Node:
        """ReduceMean / ReduceSum(x) over `axes`, keepdims=1: the axes are an input from opset
        18 (ReduceSum: 13), an attribute before."""
        if opset >= (13 if op == "ReduceSum" else 18):
            return self.node(
                op,
                [x, self.initializer(f"{name}.axes", np.array(axes, np.int64))],
                {"keepdims": 1},
                name=name,
            )
        return self.node(op, [x], {"keepdims": 1, "axes": axes}, name=name)

    def rms_core(
        self,
        x: ir.Value,
        eps: float,
        dtype,
        opset: int,
        *,
        name: str,
        width: float | ir.Value | None = None,
    ) -> list[ir.Node]:
        """x / Sqrt(mean(x^2) + eps) over the last axis, computed in `dtype` (x's; the constants
        are made in it), the form onnxruntime fuses into its RMSNorm. With `width` (CRMSNorm: x
        holds the first d-1 entries of a zero-mean vector, width = d, a number or a value of
        `dtype`) the mean of squares is (ReduceSum(x^2) + ReduceSum(x)^2) / width. The nodes in
        order (not inserted); the last one's output is the normalized x."""
        nodes = [
            self.node(
                "Pow",
                [x, self.initializer(f"{name}.two", np.array(2, dtype))],
                name=f"{name}.square",
            )
        ]
        if width is None:
            nodes.append(
                self.reduce_mean(nodes[-1].outputs[0], [-1], opset, name=f"{name}.mean_square")
            )
        else:
            total = self.reduce("ReduceSum", x, [-1], opset, name=f"{name}.sum")
            nodes += [
                self.reduce(
                    "ReduceSum", nodes[-1].outputs[0], [-1], opset, name=f"{name}.sum_square"
                ),
                total,
            ]
            nodes.append(
                self.node("Mul", [total.outputs[0], total.outputs[0]], name=f"{name}.square_of_sum")
            )
            nodes.append(
                self.node(
                    "Add", [nodes[-3].outputs[0], nodes[-1].outputs[0]], name=f"{name}.sum_squares"
                )
            )
            d = (
                width
                if isinstance(width, ir.Value)
                else self.initializer(f"{name}.width", np.array(width, dtype))
            )
            nodes.append(self.node("Div", [nodes[-1].outputs[0], d], name=f"{name}.mean_square"))
        nodes.append(
            self.node(
                "Add",
                [nodes[-1].outputs[0], self.initializer(f"{name}.eps", np.array(eps, dtype))],
                name=f"{name}.add_eps",
            )
        )
        nodes.append(self.node("Sqrt", [nodes[-1].outputs[0]], name=f"{name}.rms"))
        nodes.append(self.node("Div", [x, nodes[-1].outputs[0]], name=f"{name}.normalize"))
        return nodes

    def initializer(self, base: str, array: np.ndarray | ir.TensorProtocol) -> ir.Value:
        """Register `array` (or a tensor: a StreamedTensor) as a new initializer named after
        `base`."""
        name = self.value_name(base)
        value = ir.Value(name=name, const_value=_tensor(array, name))
        self.graph.register_initializer(value)
        return value

    # ------------------------------------------------------------------------ changes

    def private_initializer(self, node: ir.Node, index: int) -> ir.Value:
        """The initializer feeding `node.inputs[index]`, made private to that input.

        If anything else reads it (another node, another input of this node, a graph output),
        a new initializer holding the same tensor takes its place at this one input, so the
        caller can replace its `const_value` without changing any other user. The tensor data
        is shared, not copied: replacing `const_value` is what diverges them.
        """
        value = node.inputs[index]
        if value is None or not value.is_initializer():
            raise ValueError(f"input {index} of node '{node.name}' is not an initializer")
        if len(value.uses()) == 1 and not value.is_graph_output() and not value.is_graph_input():
            return value
        name = self.value_name(f"{value.name}__{node.name or node.op_type}")
        copy = ir.Value(
            name=name, shape=value.shape, type=value.type, const_value=value.const_value
        )
        self.graph.register_initializer(copy)
        node.replace_input_with(index, copy)
        return copy

    def set_constant_input(
        self, node: ir.Node, index: int, array: np.ndarray | ir.TensorProtocol, base: str
    ) -> None:
        """Make `node.inputs[index]` hold `array` (or a tensor): an initializer private to this
        input is edited (copy-on-write); anything else (a Constant node, a computed constant, a
        missing optional input) is replaced by a new initializer."""
        value = node.inputs[index] if index < len(node.inputs) else None
        if value is not None and value.is_initializer() and not value.is_graph_input():
            value = self.private_initializer(node, index)
            value.const_value = _tensor(array, value.name)
            value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype
            return
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, self.initializer(base, array))

    def take_over(self, old: ir.Value, new: ir.Value) -> None:
        """Every reader of `old` (graph outputs included) reads `new`, which takes `old`'s
        name, so the model's output names and the names users refer to stay."""
        name = old.name
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        old.name = self.value_name(f"{name}.replaced")
        new.name = name
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape

    def add_after(self, node: ir.Node, op: str, constant: np.ndarray, base: str) -> ir.Node:
        """Insert `node.output (op) constant` after `node`; every former reader of the output
        (graph outputs included) reads the result instead."""
        out = node.outputs[0]
        new = self.node(op, [out, self.initializer(f"{base}.value", constant)], name=base, like=out)
        self.graph.insert_after(node, new)
        self.take_over(out, new.outputs[0])  # readers and graph outputs now read the result ...
        new.replace_input_with(0, out)  # ... which reads the node's own output
        return new


def _tensor(array: np.ndarray | ir.TensorProtocol, name: str) -> ir.TensorProtocol:
    """`array` as a named IR tensor (a tensor as it is)."""
    if isinstance(array, ir.TensorProtocol):
        array.name = name
        return array
    return ir.Tensor(np.asarray(array), name=name)
