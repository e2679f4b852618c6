"""Schemas for the onnxruntime contrib ops normopt emits in the default domain.

onnxruntime registers `SimplifiedLayerNormalization` (RMSNorm) in the ONNX domain, where
onnx.checker knows no such op and rejects the model. Registering its schema (as ORT defines
it) lets the checker validate models for `--target ort`, and lets normopt load models that
onnxruntime's own optimizer produced.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]


def _simplified_layer_norm() -> OpSchema:
    return OpSchema(
        "SimplifiedLayerNormalization", "", 1,
        doc="onnxruntime contrib: RMSNorm, Y = X / sqrt(mean(X^2 over axes >= axis) + epsilon) * scale",
        inputs=[OpSchema.FormalParameter("X", "T"), OpSchema.FormalParameter("scale", "V")],
        outputs=[
            OpSchema.FormalParameter("Y", "V"),
            OpSchema.FormalParameter("inv_std_var", "U", param_option=OpSchema.FormalParameterOption.Optional),
        ],
        type_constraints=[("T", _FLOATS, "input"), ("U", ["tensor(float)", "tensor(double)"], "stash"),
                          ("V", _FLOATS, "output and scale")],
        attributes=[
            OpSchema.Attribute("axis", onnx.helper.make_attribute("axis", -1), "first normalized axis"),
            OpSchema.Attribute("epsilon", onnx.helper.make_attribute("epsilon", 1e-5), "added to the mean square"),
            OpSchema.Attribute("stash_type", onnx.helper.make_attribute("stash_type", 1), "compute precision"),
        ],
    )


def register() -> None:
    """Idempotent: registers each schema once per process."""
    if not onnx.defs.has("SimplifiedLayerNormalization", ""):
        onnx.defs.register_schema(_simplified_layer_norm())


register()
