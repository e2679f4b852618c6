"""Shape annotation for the analysis, taken back before the model is written.

TorchScript exports record few value shapes, and the passes need ranks and normalized sizes.
`annotated(model)` fills in the types and shapes onnx shape inference finds (reading no
weights: the inference sees the graph with its large tensors as typed inputs), only where the model
has none, and on exit takes back every annotation no pass has changed since: what normopt
writes differs from IN only where a pass changed something (no value_info added, which would
also change what onnxruntime's optimizer fuses).

Only missing information is filled in (a missing type whole, a missing shape, symbolic dims
inference knows as numbers), never overwritten: a sequence-typed value stays a sequence
(merging a bare element dtype into it would turn it into a tensor).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx
import onnx_ir as ir

from normopt.rewriter import ort_ops
from normopt.rewriter.io import structure_proto
from normopt.timings import step


def _values(model: ir.Model) -> Iterator[ir.Value]:
    for graph in model.graphs():
        yield from graph.inputs
        yield from graph.initializers.values()
        for node in graph:
            yield from node.outputs


def _infer(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx's shape inference; for a graph with onnxruntime's com.microsoft ops (which onnx
    cannot see through: SkipLayerNormalization, FastGelu, Attention, ...), onnxruntime's own
    symbolic shape inference, which knows them."""
    if any(n.domain == "com.microsoft" for n in proto.graph.node):
        try:
            return _symbolic(proto)
        except Exception:  # it refuses some graphs; onnx's inference still helps there
            pass
    ort_ops.register()  # onnxruntime's contrib norms infer too
    return onnx.shape_inference.infer_shapes(
        proto, check_type=False, strict_mode=False, data_prop=True
    )


def _inferred(model: ir.Model) -> dict[str, ir.Value]:
    """Values of the inferred model by name, per graph in `model.graphs()` order."""
    try:
        inferred = ir.serde.deserialize_model(_infer(structure_proto(model)))
    except Exception:  # inference is a help, never a requirement: without it passes refuse more
        return {}
    found: dict[str, ir.Value] = {}
    for graph in inferred.graphs():
        found.update(ir.convenience.create_value_mapping(graph))
    return found


def _symbolic(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's symbolic shape inference, its steps as `SymbolicShapeInference.infer_shapes`
    takes them, but keeping what it found where it finds not everything: that function then
    saves the model to `sym_shape_infer_temp.onnx` in the working directory (a file in the
    user's folder) and raises. (The same steps in onnxruntime 1.21 to 1.32.)"""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, ...
    inference._preprocess(proto)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def _refined(shape: ir.Shape | None, inferred: ir.Shape) -> ir.Shape | None:
    """`inferred` where there is no shape; else the shape with each symbolic dim that
    inference knows as a number replaced by it (a model's own numbers are kept)."""
    if shape is None:
        return inferred
    if len(shape) != len(inferred):
        return shape
    dims = [
        i if not isinstance(d, int) and isinstance(i, int) else d for d, i in zip(shape, inferred)
    ]
    return shape if dims == list(shape) else ir.Shape(dims)


@contextlib.contextmanager
def annotated(model: ir.Model) -> Iterator[None]:
    """Within the block, values carry inferred types and shapes where the model had none."""
    before = {v: (v.type, v.shape) for v in _values(model)}
    outputs = {v for g in model.graphs() for v in g.outputs}
    with step("shape annotation"):
        inferred = _inferred(model)
    added: dict[ir.Value, tuple] = {}
    for value, (vtype, shape) in before.items():
        other = inferred.get(value.name) if value.name else None
        if other is not None and vtype is None and other.type is not None:
            value.type = other.type
        if other is not None and other.shape is not None and isinstance(value.type, ir.TensorType):
            value.shape = _refined(shape, other.shape)
        if (value.type, value.shape) != (vtype, shape):
            added[value] = (value.type, value.shape)
    try:
        yield
    finally:
        for value, annotation in added.items():
            # unless a pass has changed it since, or it became a graph output (which must be typed)
            if (value.type, value.shape) == annotation and (
                not value.is_graph_output() or value in outputs
            ):
                value.type, value.shape = before[value]
        # A value a pass created has the shape the annotation gave the value it replaces (or
        # none): it keeps only the shape IN gave that value, if any. (onnxruntime fuses more
        # where shapes are known, not always for the better: BERT's Add + LayerNorm became its
        # slower SkipLayerNormalization on CPU.)
        described = {v.name: before[v][1] for v in before if v.name}
        for value in _values(model):
            if value not in before and not value.is_graph_output() and not value.is_initializer():
                value.shape = described.get(value.name)
