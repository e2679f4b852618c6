"""A `--target tensorrt` graph made runnable by onnxruntime on CPU, so `verify` and
`rewrite`'s check keep working for it.

`lower(model)` replaces every plugin node (normopt.plugins.spec) by standard ONNX ops computing
its spec in float64 (Cast to double, the statistics, Cast back to the input's dtype;
AddRMSNorm's sum rounded to its dtype first, as the kernel stores it): the check then tests
where the plugins were put and what they read, against the kernels' own contract, which the
kernel tests hold them to (the Triton kernels against normopt.plugins.reference).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.plugins.spec import ADD_RMS_NORM, CRMS_NORM, DOMAIN, PLUGINS
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import default_opset


def plugin_nodes(graph: ir.Graph) -> list[ir.Node]:
    return [n for n in graph.all_nodes() if n.domain == DOMAIN and n.op_type in PLUGINS]


def lower(model: ir.Model) -> int:
    """Replace every plugin node by its float64 reference in standard ONNX ops (for checking
    only: the result is what the plugins compute, slower). Returns how many were lowered."""
    nodes = plugin_nodes(model.graph)
    if not nodes:
        return 0
    edit, opset = Editor(model.graph), default_opset(model)
    for node in nodes:
        _lower_one(edit, node, opset)
    model.opset_imports.pop(DOMAIN, None)
    return len(nodes)


def _lower_one(edit: Editor, node: ir.Node, opset: int) -> None:
    spec, name = PLUGINS[node.op_type], node.name or node.op_type
    eps = node.attributes.get_float("epsilon")
    new: list[ir.Node] = []

    def add(op, inputs, attrs=None, suffix=""):
        made = edit.node(op, inputs, attrs, name=f"{name}.ref{suffix}")
        new.append(made)
        return made.outputs[0]

    def const(array, suffix):
        return edit.initializer(f"{name}.{suffix}", np.asarray(array))

    x, weight = node.inputs[0], node.inputs[-1]
    dtype = weight.dtype or x.dtype  # the weight has x's dtype, and is an initializer (typed)
    if dtype is None:
        raise ValueError(f"plugin node {name}: the dtype of its input is unknown")
    total = None
    if spec is ADD_RMS_NORM:  # the sum, in the storage dtype, is an output of its own
        total = add("Add", [x, node.inputs[1]], suffix=".sum")
        x = total
    xd = add("Cast", [x], {"to": ir.DataType.DOUBLE})
    width = None
    if spec is CRMS_NORM:  # the implicit d-th entry is -sum(x): d = n + 1
        n = add(
            "Cast",
            [add("Gather", [add("Shape", [x]), const(np.array([-1], np.int64), "ref.last")])],
            {"to": ir.DataType.DOUBLE},
        )
        width = add("Add", [n, const(np.float64(1), "ref.one")])
    new += edit.rms_core(xd, eps, np.float64, opset, name=f"{name}.ref", width=width)
    normalized = new[-1].outputs[0]
    y = add("Mul", [normalized, add("Cast", [weight], {"to": ir.DataType.DOUBLE})])
    y = add("Cast", [y], {"to": dtype})
    outs = [total, y] if spec is ADD_RMS_NORM else [y]
    edit.graph.insert_before(node, new)
    for old, value in zip(node.outputs, outs):
        value.type, value.shape = old.type, old.shape
        edit.take_over(old, value)
    edit.graph.remove(node, safe=True)
