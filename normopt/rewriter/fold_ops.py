"""Ops evaluated on constant arrays, as ONNX defines them: the casts numpy computes as ONNX does,
and the indexing ops (Cast, ConstantOfShape, Gather(ND), Slice, ReduceSum) of constant subgraphs
exporters leave unfolded (normopt.rewriter.graph.folded_value)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

# Casts numpy computes as ONNX does (IEEE rounding to nearest even, truncation to integers).
# Not the 8-bit and 4-bit floats: ONNX's Cast saturates (saturate=1) where ml_dtypes gives
# NaN/Inf (a fake-quant kernel computed through FLOAT8E4M3FN would fold wrong).
_CASTABLE = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.DOUBLE,
    ir.DataType.BOOL,
    *(getattr(ir.DataType, f"{k}INT{n}") for k in ("", "U") for n in (8, 16, 32, 64)),
}


def cast(array: np.ndarray, dtype: ir.DataType | np.dtype | None) -> np.ndarray | None:
    """`array` cast to `dtype` where numpy casts as ONNX does (both ends), else None."""
    try:
        target = dtype if isinstance(dtype, ir.DataType) else ir.DataType.from_numpy(dtype)
        source = ir.DataType.from_numpy(array.dtype)
    except (TypeError, ValueError):  # no ONNX dtype (None, strings)
        return None
    if target not in _CASTABLE or source not in _CASTABLE:
        return None
    return array.astype(target.numpy())


def fold_indexing(node: ir.Node, args: list[np.ndarray | None]) -> np.ndarray | None:
    """Cast, Slice, Gather(ND), ReduceSum on constants: the ops of kernels computed in forward
    (DEA-Net's difference convolutions take taps by index, slice and sum them)."""
    op, attrs, data = node.op_type, node.attributes, args[0]
    if op == "Cast":
        return cast(data, ir.DataType(attrs.get_int("to")))
    if op == "ConstantOfShape":
        fill = (
            attrs["value"].as_tensor().numpy().reshape(-1)
            if "value" in attrs
            else np.zeros(1, np.float32)
        )
        return np.full(tuple(int(d) for d in data), fill[0], dtype=fill.dtype)
    if op == "Gather" and args[1] is not None:
        return np.take(data, args[1].astype(np.int64), axis=attrs.get_int("axis", 0))
    if op == "GatherND" and args[1] is not None and attrs.get_int("batch_dims", 0) == 0:
        index = args[1].astype(np.int64)
        return data[tuple(np.moveaxis(index, -1, 0))]
    if op == "Slice" and all(a is not None for a in args):
        starts, ends = args[1], args[2]
        axes = args[3] if len(args) > 3 else np.arange(len(starts))
        steps = args[4] if len(args) > 4 else np.ones(len(starts), np.int64)
        index = [slice(None)] * data.ndim
        for start, end, axis, step in zip(starts, ends, axes, steps):
            index[int(axis)] = slice(int(start), int(end), int(step))  # numpy clamps as ONNX does
        return data[tuple(index)]
    if op == "ReduceSum" and all(a is not None for a in args):
        axes = tuple(attrs.get_ints("axes", ())) or (
            tuple(int(a) for a in args[1]) if len(args) > 1 else ()
        )
        if not axes and attrs.get_int("noop_with_empty_axes", 0):
            return data
        return np.sum(data, axis=axes or None, keepdims=bool(attrs.get_int("keepdims", 1))).astype(
            data.dtype
        )
    return None
