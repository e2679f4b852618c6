"""`normopt build --fp16 / --bf16`: the graph in the engine's precision, before TensorRT parses it.

A strongly typed network (every TensorRT 11 network; normopt asks 10.x for one) computes in the
ONNX graph's own types: the builder flags of weakly typed networks do not apply. So the
precision is the graph's: onnxruntime's float16 converter (`onnxruntime.transformers.float16`,
inputs and outputs kept float32, its op blocklist kept in float32) lowers it, and then the
`tensorrt-norms` pass keeps every LayerNormalization's reduction in float32 (normopt's plugins
accumulate in float32 themselves). bfloat16: the float16 graph retyped (value types, Cast
targets, float16 initializers and Constant tensors rounded to bfloat16 again from the float32
originals, so the range is bfloat16's and not float16's clamp). TensorRT-free: tested on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from normopt.errors import BadInput

PRECISIONS = ("fp16", "bf16")


def convert(src: Path, dst: Path, precision: str, trt_version: str | None = None) -> dict:
    """Write `src` in `precision` to `dst`; returns what changed (counts)."""
    if precision not in PRECISIONS:
        raise BadInput(f"precision must be one of {', '.join(PRECISIONS)}, not '{precision}'")
    from onnxruntime.transformers.float16 import convert_float_to_float16

    original = onnx.load(str(src))
    floats = {
        i.name: numpy_helper.to_array(i)
        for i in original.graph.initializer
        if precision == "bf16" and i.data_type == TensorProto.FLOAT
    }  # bf16 only: they are rounded again
    model = convert_float_to_float16(
        original, keep_io_types=True, disable_shape_infer=True
    )  # in place
    if precision == "bf16":
        _retype(model, floats)
    return {"precision": precision, "norms_in_fp32": _norms_in_fp32(model, dst, trt_version)}


def _norms_in_fp32(model: onnx.ModelProto, dst: Path, trt_version: str | None) -> int:
    """tensorrt-norms on the lowered graph (fp16/bf16 LayerNormalization in float32), then save."""
    import onnx_ir as ir

    from normopt import files
    from normopt.passes.base import Options
    from normopt.passes.pipeline import run_pipeline
    from normopt.rewriter import io

    lowered = ir.serde.deserialize_model(model)
    results = run_pipeline(
        lowered, ["tensorrt-norms"], Options(target="tensorrt", trt_version=trt_version)
    )
    files.save(lowered, dst, external_data=io.initializer_bytes(lowered) > io.EMBEDDED_LIMIT_BYTES)
    return sum(
        1 for r in results if r.name == "tensorrt-norms" for c in r.changes if c.kind == "cast"
    )


def _retype(model: onnx.ModelProto, floats: dict[str, np.ndarray]) -> None:
    """Every float16 in the graph becomes bfloat16: initializers (from their float32 values where
    the converter kept the name), Constant tensors, Cast targets, value types."""
    import ml_dtypes

    def bf16(array: np.ndarray, name: str) -> TensorProto:
        return numpy_helper.from_array(
            np.asarray(array, np.float32).astype(ml_dtypes.bfloat16), name
        )

    graph = model.graph
    for i, init in enumerate(graph.initializer):
        if init.data_type == TensorProto.FLOAT16:
            source = floats.get(init.name, numpy_helper.to_array(init).astype(np.float32))
            graph.initializer[i].CopyFrom(bf16(source, init.name))
    for node in graph.node:
        for attr in node.attribute:
            if attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                attr.t.CopyFrom(bf16(numpy_helper.to_array(attr.t), attr.t.name))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16
