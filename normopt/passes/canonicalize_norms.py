"""`canonicalize-norms`: replace decomposed LayerNorm / RMSNorm by the fused op the target runs.

Before: x -> ReduceMean -> Sub -> Pow -> ReduceMean -> Add(eps) -> Sqrt -> Div -> Mul(g) -> Add(b)
        (and every other decomposed form `rewriter.norms` matches, Cast wrappers included)
After:  x -> LayerNormalization(axis, epsilon, stash_type=1)(x, g, b)   (opset >= 17, or
                                              --target ort: onnxruntime's contrib op below 17)
        x -> RMSNormalization(x, g)                 (RMSNorm, --target onnx, opset >= 23; --target
                                                     tensorrt also needs TensorRT >= 10.15)
        x -> normopt::NormoptRMSNorm(x, g)          (RMSNorm, --target tensorrt otherwise: the
        plugin)
        x -> SimplifiedLayerNormalization(x, g)     (RMSNorm, --target ort)
Conditions:
  1. the match is exact (see rewriter.norms: private intermediates, same trailing axes,
     keepdims, epsilon inside the square root, scale/bias broadcast along normalized axes);
  2. the op exists: LayerNormalization needs opset >= 17 (any opset for --target ort),
     RMSNormalization opset >= 23 (SimplifiedLayerNormalization: any opset, --target ort);
  3. the normalized dims are static (the fused op's scale has their shape; a missing scale
     becomes ones, a missing bias stays absent);
  4. only what is computed in the compute dtype joins the fused op: an input Cast stays in
     front of it; a scale or bias applied after a Cast to another dtype stays after it.
Formula: LN(x) = (x - mean) / sqrt(var + eps) * g + b and RMSNorm(x) = x / sqrt(mean(x^2) +
eps) * g, the same expressions the decomposed graph computes; stash_type=1 keeps the
statistics in float32 as the exporters' Cast wrappers did.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan, Refusal
from normopt.plugins.spec import DOMAIN, NATIVE_RMSNORM, RMS_NORM, target_version
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_value, default_opset, permuted_around
from normopt.rewriter.norms import NormMatch, find_norms


@dataclass
class Fusion:
    match: NormMatch
    op: str
    domain: str
    replaced: ir.Value  # the value the fused op's output takes over
    span: list[ir.Node]  # nodes the fused op replaces
    scale: ir.Value | np.ndarray  # the model's own initializer when it fits, else a new array
    bias: ir.Value | np.ndarray | None

    def describe(self) -> str:
        return f"{self.match.kind} at {self.match.where()} -> {self.op}"

    def group(self) -> str:
        """Fusions alike for speed: the same op, in the same layout (between Transposes: the
        layout changes an exporter wrote around a channels-first norm)."""
        between = permuted_around(self.match.input, self.replaced) is not None
        return f"{self.match.kind} -> {self.op}" + (" between Transposes" if between else "")


def _fused_op(kind: str, opset: int, target: str, native_rms: bool = True) -> tuple[str, str] | str:
    """(op, domain) or the reason there is none. `native_rms`: --target tensorrt's TensorRT
    imports RMSNormalization (>= 10.15); otherwise its RMSNorm is normopt's plugin."""
    if kind == "layernorm":
        if (
            opset >= 17 or target == "ort"
        ):  # onnxruntime runs its contrib LayerNormalization at any opset
            return "LayerNormalization", ""
        return (
            f"opset {opset} has no LayerNormalization (needs >= 17); --target ort emits "
            "onnxruntime's LayerNormalization, which it runs at any opset"
        )
    if target == "ort":
        return "SimplifiedLayerNormalization", ""
    if target == "tensorrt" and not (opset >= 23 and native_rms):
        return RMS_NORM.op_type, DOMAIN
    if opset >= 23:
        return "RMSNormalization", ""
    return (
        f"opset {opset} has no RMSNormalization (needs >= 23); --target ort emits "
        "onnxruntime's SimplifiedLayerNormalization instead"
    )


def _normalized_shape(match: NormMatch) -> tuple[int, ...] | None:
    k = match.normalized_axes
    for shape in (match.core_input.shape, match.input.shape):  # an input Cast keeps the shape
        if shape is not None and len(shape) >= k and all(isinstance(d, int) for d in shape[-k:]):
            return tuple(shape[-k:])
    for value in (match.scale, match.bias):
        array = constant_value(value)
        if array is not None and array.ndim >= k and all(d > 1 for d in array.shape[-k:]):
            return tuple(array.shape[-k:])
    return None


def _absorbed_epilogue(match: NormMatch):
    """Walk from the core output through the epilogue; stop at a Cast that changes dtype.
    Returns the last absorbed value, the absorbed scale and bias, and the epilogue nodes left
    in place (they go on reading that value, which the fused op's output takes over)."""
    members = set(match.nodes)
    value, scale, bias = match.core_output, None, None
    while True:
        node = next((u.node for u in value.uses() if u.node in members), None)
        if node is None:
            return value, scale, bias, []
        if (
            node.op_type == "Cast"
            and str(ir.DataType(node.attributes.get_int("to"))) != match.compute_dtype
        ):
            break
        if node.op_type == "Mul":
            scale = match.scale
        elif node.op_type == "Add":
            bias = match.bias
        value = node.outputs[0]
    kept, cursor = [], node
    while cursor is not None and cursor in members:
        kept.append(cursor)
        cursor = next((u.node for u in cursor.outputs[0].uses() if u.node in members), None)
    return value, scale, bias, kept


def _plan_one(match: NormMatch, opset: int, target: str, native_rms: bool) -> Fusion | str:
    op = _fused_op(match.kind, opset, target, native_rms)
    if isinstance(op, str):
        return op
    shape = _normalized_shape(match)
    if shape is None:
        return f"the size of the last {match.normalized_axes} axis/axes is not static"
    replaced, scale_value, bias_value, kept = _absorbed_epilogue(match)
    dtype = ir.DataType[match.compute_dtype].numpy()
    scale = _parameter(scale_value, shape, dtype)
    scale = np.ones(shape, dtype) if scale is None else scale
    input_cast = match.core_input.producer()
    span = [n for n in match.nodes if n not in kept and n is not input_cast]
    return Fusion(match, *op, replaced, span, scale, _parameter(bias_value, shape, dtype))


def _parameter(
    value: ir.Value | None, shape: tuple[int, ...], dtype
) -> ir.Value | np.ndarray | None:
    """The initializer itself when it already has the normalized shape and compute dtype (its
    name survives, for refit by name), else its values broadcast and cast."""
    array = constant_value(value)
    if array is None:
        return None
    if value.is_initializer() and array.shape == shape and array.dtype == dtype:
        return value
    return np.broadcast_to(array, shape).astype(dtype)


def _apply_one(edit: Editor, fusion: Fusion) -> Change:
    m = fusion.match
    name = m.nodes[0].name or m.kind
    change = Change(
        "fused",
        f"decomposed {m.kind} -> {fusion.op}",
        tuple(n.name for n in fusion.span),
        (fusion.replaced.name,),
    )

    def initializer(param, suffix):
        return param if isinstance(param, ir.Value) else edit.initializer(f"{name}.{suffix}", param)

    # the core input as it is now: an earlier fusion may have replaced the value it reads
    inputs = [m.current_core_input(), initializer(fusion.scale, "scale")]
    if fusion.bias is not None:
        inputs.append(initializer(fusion.bias, "bias"))
    attributes = (
        RMS_NORM.attributes(m.epsilon)
        if fusion.domain == DOMAIN
        else {"axis": m.axis, "epsilon": float(m.epsilon), "stash_type": 1}
    )
    node = edit.node(
        fusion.op,
        inputs,
        attributes,
        domain=fusion.domain,
        name=f"{name}.{fusion.op}",
        like=fusion.replaced,
    )
    edit.graph.insert_after(fusion.span[-1], node)
    edit.take_over(fusion.replaced, node.outputs[0])
    edit.graph.remove(fusion.span, safe=True)
    return change


@dataclass(frozen=True)
class CanonicalizeSettings:
    """`skip_sites`: sites (named in a result's `units`) to leave as they are, because the
    speed guard measured their rewrite slower."""

    skip_sites: frozenset[str] = frozenset()


class CanonicalizeNorms(Pass[Fusion]):
    Settings = CanonicalizeSettings

    name = "canonicalize-norms"
    summary = "replace decomposed LayerNorm/RMSNorm by the fused op the target supports"

    def plan(self, model: ir.Model) -> Plan[Fusion]:
        opset = default_opset(model)
        native_rms = (
            self.options.target != "tensorrt"
            or target_version(self.options.trt_version) >= NATIVE_RMSNORM
        )
        plan = Plan()
        for match in find_norms(model.graph):
            if match.kind not in ("layernorm", "rmsnorm") or match.form != "decomposed":
                continue
            if match.where() in self.settings.skip_sites:
                plan.refusals.append(
                    Refusal(
                        f"{match.kind} at {match.where()}",
                        "left decomposed: the speed guard measured the fused op slower here",
                        settled=True,
                    )
                )
                continue
            result = _plan_one(match, opset, self.options.target, native_rms)
            if isinstance(result, str):  # no other pass changes the opset or the target
                settled = isinstance(
                    _fused_op(match.kind, opset, self.options.target, native_rms), str
                )
                plan.refusals.append(
                    Refusal(f"{match.kind} at {match.where()}", result, settled=settled)
                )
            else:
                plan.actions.append(result)
                plan.units.setdefault(result.group(), []).append(match.where())
        if not plan.actions and not plan.refusals:
            plan.idle = "no decomposed LayerNorm or RMSNorm"
        return plan

    def apply(self, model: ir.Model, plan: Plan[Fusion]) -> list[Change]:
        edit = Editor(model.graph)
        if any(fusion.domain == DOMAIN for fusion in plan.actions):
            model.opset_imports.setdefault(DOMAIN, 1)
        return [_apply_one(edit, fusion) for fusion in plan.actions]
