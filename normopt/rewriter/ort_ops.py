"""Schemas for the onnxruntime contrib norm ops normopt emits in the default domain.

onnxruntime registers `SimplifiedLayerNormalization` (RMSNorm) and, below opset 17,
`LayerNormalization` as contrib ops in the ONNX domain, where onnx.checker knows neither and
rejects the model. Registering their schemas (as ORT defines them, since version 1) lets the
checker validate models for `--target ort` and lets normopt load models onnxruntime's own
optimizer wrote. ONNX's LayerNormalization (since 17) still governs opsets >= 17.
"""

from __future__ import annotations

import onnx
from onnx.defs import OpSchema

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
_OPTIONAL = OpSchema.FormalParameterOption.Optional


def _schema(
    name: str, doc: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str, bool]]
) -> OpSchema:
    def params(spec):
        return [
            OpSchema.FormalParameter(
                n, t, param_option=_OPTIONAL if optional else OpSchema.FormalParameterOption.Single
            )
            for n, t, optional in spec
        ]

    return OpSchema(
        name,
        "",
        1,
        doc=f"onnxruntime contrib op: {doc}",
        inputs=params(inputs),
        outputs=params(outputs),
        type_constraints=[
            ("T", _FLOATS, "input"),
            ("U", ["tensor(float)", "tensor(double)", "tensor(bfloat16)"], "statistics"),
            ("V", _FLOATS, "output and parameters"),
        ],
        attributes=[
            OpSchema.Attribute(
                "axis", onnx.helper.make_attribute("axis", -1), "first normalized axis"
            ),
            OpSchema.Attribute(
                "epsilon", onnx.helper.make_attribute("epsilon", 1e-5), "inside the square root"
            ),
            OpSchema.Attribute(
                "stash_type", onnx.helper.make_attribute("stash_type", 1), "statistics precision"
            ),
        ],
    )


SCHEMAS = [
    _schema(
        "SimplifiedLayerNormalization",
        "RMSNorm, X / sqrt(mean(X^2) + epsilon) * scale",
        [("X", "T", False), ("scale", "V", False)],
        [("Y", "V", False), ("inv_std_var", "U", True)],
    ),
    _schema(
        "LayerNormalization",
        "LayerNorm below opset 17, (X - mean) / sqrt(var + epsilon) * Scale + B",
        [("X", "T", False), ("Scale", "V", False), ("B", "V", True)],
        [("Y", "V", False), ("Mean", "U", True), ("InvStdDev", "U", True)],
    ),
]


def register() -> None:
    """Idempotent: registers each schema once per process (onnx's schema registry is the
    process's). Called where onnx checks or infers a graph normopt made (io.check_structure,
    shapes.annotated); tests and the fuzzer that call onnx.checker themselves call it too."""
    for schema in SCHEMAS:
        if not onnx.defs.has(schema.name, 1, ""):  # a schema valid at opset 1 is ours
            onnx.defs.register_schema(schema)
