"""`tensorrt-norms`: a `--target tensorrt` graph's norms as the TensorRT it targets imports them
(`--trt-version`, default the installed one, else the newest known; normopt.plugins.spec).

Before / After (canonicalize-norms, which runs first, already made decomposed norms fused ops,
and decomposed RMSNorms normopt's plugin where TensorRT has no RMSNormalization):
  RMSNormalization (TensorRT < 10.15 cannot import it), onnxruntime's
  SimplifiedLayerNormalization (no TensorRT imports it)  ->  NormoptRMSNorm(x, scale)
  s = a + b read by a NormoptRMSNorm (a residual Add and the next block's norm)
                                                         ->  NormoptAddRMSNorm(a, b, scale) -> (s,
                                                         y)
  LayerNormalization on float16/bfloat16                 ->  Cast(float32) -> LayerNormalization
                                                             -> Cast back
Why the Casts: TensorRT 10's strongly typed networks and every TensorRT 11 network compute a
norm in its input type (stash_type is ignored there), and the squares of large fp16
activations overflow ("LayerNorm after self-attention in FP16 may cause overflow"); the
plugins accumulate in float32 themselves, and RMSNormalization is imported with explicit fp32
casts.
Conditions: a norm over the last axis alone whose size is static; the plugin's scale has that
size (a missing one becomes ones); the fused Add has two inputs of one shape (no broadcasting:
the plugin adds row by row), neither constant. The plugin nodes carry every attribute
TensorRT's parser reads (spec.PluginSpec.attributes). Verification lowers them to their
float64 reference (normopt.lowering), so the check stays on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.plugins.spec import ADD_RMS_NORM, DOMAIN, NATIVE_RMSNORM, RMS_NORM, target_version
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_value, is_op, rank

LOW_PRECISION = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class ToPlugin:
    """An RMSNorm TensorRT cannot import natively -> NormoptRMSNorm."""

    node: ir.Node

    def describe(self) -> str:
        return f"{self.node.op_type} {self.node.name} -> NormoptRMSNorm"


@dataclass(frozen=True)
class InFloat32:
    """An fp16/bf16 LayerNormalization computed in float32 (Casts around it)."""

    node: ir.Node

    def describe(self) -> str:
        return f"{self.node.op_type} {self.node.name} computed in float32"


@dataclass(frozen=True)
class Fuse:
    """A residual Add + NormoptRMSNorm (now or planned) -> NormoptAddRMSNorm."""

    node: ir.Node
    add: ir.Node

    def describe(self) -> str:
        return f"{self.node.op_type} {self.node.name} and Add {self.add.name} -> NormoptAddRMSNorm"


TensorRTAction = ToPlugin | InFloat32 | Fuse


def _last_axis_only(node: ir.Node) -> str | None:
    axis, r = node.attributes.get_int("axis", -1), rank(node.inputs[0])
    if axis != -1 and (r is None or axis != r - 1):
        return f"{node.op_type} {node.name} normalizes from axis {axis}, not the last axis alone"
    shape = node.inputs[0].shape
    if shape is None or not isinstance(shape[-1], int):
        return f"{node.op_type} {node.name}: the size of the normalized axis is not static"
    return None


def _fusable(node: ir.Node) -> ir.Node | None:
    """The residual Add a NormoptRMSNorm reads, where one plugin can do both."""
    add = node.inputs[0].producer()
    if not is_op(add, "Add") or add.graph is not node.graph or len(add.inputs) != 2:
        return None
    a, b = add.inputs
    if constant_value(a) is not None or constant_value(b) is not None:
        return None
    if a.shape is None or b.shape is None or list(a.shape) != list(b.shape) or a.dtype != b.dtype:
        return None  # the plugin adds row by row: equal shapes, nothing broadcast
    return add


class TensorRTNorms(Pass[TensorRTAction]):
    name = "tensorrt-norms"
    summary = (
        "--target tensorrt: RMSNorms TensorRT cannot import as normopt's plugins, residual Add + "
        "RMSNorm fused, fp16 norms in fp32"
    )

    def plan(self, model: ir.Model) -> Plan[TensorRTAction]:
        if self.options.target != "tensorrt":
            return Plan(idle="the target is not tensorrt")
        native_rms = target_version(self.options.trt_version) >= NATIVE_RMSNORM
        plan, fused = Plan(), set()
        for node in model.graph:
            if is_op(node, "SimplifiedLayerNormalization") or (
                is_op(node, "RMSNormalization") and not native_rms
            ):
                plan.decide(f"{node.op_type} {node.name}", _last_axis_only(node) or ToPlugin(node))
            elif is_op(node, "LayerNormalization") and node.inputs[0].dtype in LOW_PRECISION:
                extra = any(o.uses() or o.is_graph_output() for o in node.outputs[1:])
                plan.decide(
                    f"{node.op_type} {node.name}",
                    f"LayerNormalization {node.name}: its Mean/InvStdDev outputs "
                    "are read (they would become float32)"
                    if extra
                    else InFloat32(node),
                )
        planned = {a.node for a in plan.actions if isinstance(a, ToPlugin)}
        for node in model.graph:  # plugins now and those this plan makes
            if (node.domain == DOMAIN and node.op_type == RMS_NORM.op_type) or node in planned:
                add = _fusable(node)
                if add is not None and add not in fused:
                    fused.add(add)
                    plan.actions.append(Fuse(node, add))
        if not plan.actions and not plan.refusals:
            plan.idle = "no norm TensorRT needs otherwise"
        return plan

    def apply(self, model: ir.Model, plan: Plan[TensorRTAction]) -> list[Change]:
        edit = Editor(model.graph)
        model.opset_imports.setdefault(DOMAIN, 1)
        plugins: dict[ir.Node, ir.Node] = {}  # a norm -> the plugin that replaced it
        changes = []
        for action in plan.actions:
            if isinstance(action, ToPlugin):
                plugins[action.node] = _to_plugin(edit, action.node)
                changes.append(
                    Change(
                        "converted",
                        f"{action.node.op_type}(s) to NormoptRMSNorm",
                        (action.node.name,),
                        (plugins[action.node].outputs[0].name,),
                    )
                )
            elif isinstance(action, InFloat32):
                _in_fp32(edit, action.node)
                changes.append(
                    Change(
                        "cast",
                        "fp16/bf16 LayerNorm(s) computed in float32",
                        (action.node.name,),
                        (action.node.outputs[0].name,),
                    )
                )
            else:
                norm = plugins.get(action.node, action.node)
                changes.append(
                    Change(
                        "fused",
                        "residual Add(s) + RMSNorm into NormoptAddRMSNorm",
                        (action.add.name, norm.name),
                        (action.add.outputs[0].name,),
                    )
                )
                _fuse(edit, norm, action.add)
        return changes


def _scale(edit: Editor, node: ir.Node) -> ir.Value:
    scale = node.inputs[1] if len(node.inputs) > 1 else None
    if scale is not None:
        return scale
    width = node.inputs[0].shape[-1]
    return edit.initializer(f"{node.name}.scale", np.ones(width, node.inputs[0].dtype.numpy()))


def _to_plugin(edit: Editor, node: ir.Node) -> ir.Node:
    eps = node.attributes.get_float("epsilon", 1e-5)
    plugin = edit.node(
        RMS_NORM.op_type,
        [node.inputs[0], _scale(edit, node)],
        RMS_NORM.attributes(eps),
        domain=DOMAIN,
        name=f"{node.name}.plugin",
        like=node.outputs[0],
    )
    edit.graph.insert_after(node, plugin)
    edit.take_over(node.outputs[0], plugin.outputs[0])
    edit.graph.remove(node, safe=True)
    return plugin


def _fuse(edit: Editor, norm: ir.Node, add: ir.Node) -> None:
    eps = norm.attributes.get_float("epsilon")
    fused = ir.node(
        ADD_RMS_NORM.op_type,
        [add.inputs[0], add.inputs[1], norm.inputs[1]],
        ADD_RMS_NORM.attributes(eps),
        domain=DOMAIN,
        name=edit.node_name(f"{norm.name}.add"),
        num_outputs=2,
    )
    total, y = fused.outputs
    total.name, y.name = edit.value_name(f"{add.name}.sum"), edit.value_name(f"{norm.name}.y")
    edit.graph.insert_after(norm, fused)
    edit.take_over(norm.outputs[0], y)
    edit.take_over(add.outputs[0], total)
    edit.graph.remove([norm, add], safe=True)


def _in_fp32(edit: Editor, node: ir.Node) -> None:
    """Cast the input, scale and bias to float32 before the norm, its output back after."""
    dtype, out = node.inputs[0].dtype, node.outputs[0]
    casts = []
    for i, value in enumerate(node.inputs):
        if value is None:
            continue
        cast = edit.node("Cast", [value], {"to": ir.DataType.FLOAT}, name=f"{node.name}.fp32_{i}")
        cast.outputs[0].type, cast.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), value.shape
        casts.append(cast)
        node.replace_input_with(i, cast.outputs[0])
    edit.graph.insert_before(node, casts)
    uses = list(out.uses())  # before the Cast back reads it too
    back = edit.node("Cast", [out], {"to": dtype}, name=f"{node.name}.back", like=out)
    edit.graph.insert_after(node, back)
    for use in uses:
        use.node.replace_input_with(use.idx, back.outputs[0])
    if out.is_graph_output():  # the output keeps its name and dtype
        outputs = edit.graph.outputs
        outputs[outputs.index(out)] = back.outputs[0]
        name = out.name
        out.name = edit.value_name(f"{name}.fp32")
        back.outputs[0].name = name
    out.type = ir.TensorType(ir.DataType.FLOAT)
    node.attributes["stash_type"] = ir.AttrInt64("stash_type", 1)
