"""`rotate-stream`: rotate a Pre-RMSNorm residual stream by an orthogonal Q, exactly (QuaRot,
Ashkboos et al. 2024; SliceGPT's computational invariance; docs/rewrites.md, section 10). The
stream's outlier channels (and the norms' outlier gammas) are spread over all d channels, so
8-bit and 4-bit quantizers see no outliers; the float model computes the same function.

Before: x0 = e W_e    x_{i+1} = x_i + f_i(RMSNorm(x_i) * g_i W_i) W_o    y = RMSNorm(x_n) g W_h
After:  x0' = e (W_e Q)    x'_{i+1} = x'_i + f_i(RMSNorm(x'_i) (Q^T diag(g_i) W_i)) (W_o Q)
        y = RMSNorm(x'_n) (Q^T diag(g) W_h): x'_i = x_i Q, as RMSNorm(x Q) = RMSNorm(x) Q
Q (rewriter.numerics.Rotation): a randomized Hadamard matrix (`kind=hadamard`, the default; a
Paley factor where d is not a power of two: 768 = 12 x 64, else a random orthogonal factor) or
a random orthogonal one (`kind=random`), from `seed`; the report names it. Weights are rotated
in float64 and rounded once (a norm's gamma and beta go to its readers in the same rounding).
Where a writer is no constant (an explicit recentring, a graph input) an x Q MatMul is
inserted after it; a stream value or norm output the graph outputs gets x Q^T (and the norm's
gamma and beta) there. Conditions: rewriter.rotation. Not in the default pipeline (`rewrite
--rotate` runs it after preln-to-rmsnorm); a rotated model is marked (metadata
`normopt.rotation`) and not rotated again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.errors import BadInput
from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter import numerics, streamed
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_shape, constant_value, folded_value
from normopt.rewriter.linear_fold import Fold, bias_add_after, fold_weights
from normopt.rewriter.norms import find_norms
from normopt.rewriter.rotation import NormAffine, RotationPlan, plan_rotation, reader_axis
from normopt.rewriter.stream import analyze

MARK = "normopt.rotation"
KINDS = ("hadamard", "random")


@dataclass(frozen=True)
class RotateSettings:
    """`kind`: hadamard | random; `seed`: the random signs' (or matrix's) seed."""

    kind: str = "hadamard"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise BadInput(f"rotate-stream: kind is hadamard or random, not '{self.kind}'")


class RotateStream(Pass[RotationPlan]):
    Settings = RotateSettings

    name = "rotate-stream"
    summary = "rotate a Pre-RMSNorm residual stream by an orthogonal matrix (quantization-ready)"

    def plan(self, model: ir.Model) -> Plan[RotationPlan]:
        if MARK in model.metadata_props:
            return Plan(idle=f"the stream is rotated already ({model.metadata_props[MARK]})")
        norms = find_norms(model.graph)
        if not any(m.kind == "rmsnorm" for m in norms):
            return Plan(idle="no RMSNorm (run preln-to-rmsnorm first)")
        plan = Plan()
        outcome = plan_rotation(analyze(model.graph, norms), norms)
        plan.decide("residual stream", outcome)
        if isinstance(outcome, RotationPlan):
            plan.stats = {
                "width": outcome.d,
                "norms": len(outcome.norms),
                "writer_constants": len(outcome.writers),
                "reader_weights": outcome.reader_count(),
                "online": len(outcome.online),
                "unrotated_outputs": len(outcome.outputs),
            }
        return plan

    def apply(self, model: ir.Model, plan: Plan[RotationPlan]) -> list[Change]:
        edit, rotation = Editor(model.graph), plan.actions[0]
        q = numerics.Rotation(rotation.d, self.settings.kind, self.settings.seed)
        changes = [Change("rotated", f"residual stream(s) by Q = {q.describe()}")]
        matrix = q.matrix() if rotation.outputs or rotation.online else None
        for value, norm in rotation.outputs:  # first: a beta Add's output is still there
            _unrotate(edit, value, matrix.T, norm)
            changes.append(Change("restored", UNROTATED, (), (value.name,)))
        changes += _writers(edit, rotation, q)
        for norm in rotation.norms:
            changes += _readers(edit, norm, q)
        for value, why in rotation.online.items():
            _online(edit, value, matrix)
            changes.append(Change("rotated", ONLINE, (), (value.name,), why))
        model.metadata_props[MARK] = json.dumps(
            {"kind": q.kind, "seed": q.seed, "d": q.d, "q": q.describe()}
        )
        return changes


ONLINE = "value(s) no constant writes, with an inserted x Q"
UNROTATED = "graph output(s) un-rotated: x Q^T"


def _writers(edit: Editor, rotation: RotationPlan, q: numerics.Rotation) -> list[Change]:
    """Every writer constant rotated along its hidden axis: C <- C Q (a constant broadcast
    along it first spread to d entries)."""
    changes = []
    for (node, index), axis in rotation.writers.items():
        shape = constant_shape(node.inputs[index])
        if len(shape) < -axis or shape[axis] == 1:  # spread to d entries (a small constant)
            array = folded_value(node.inputs[index])
            array = array.reshape((1,) * (-axis - array.ndim) + array.shape)
            array = np.broadcast_to(
                array, (*array.shape[:axis], rotation.d, *array.shape[axis:][1:])
            )
            new = numerics.rotate(array, axis, q)
        else:
            new = _rotated(node.inputs[index], axis, q)
        name = f"{node.inputs[index].name or node.name}.rotated"
        edit.set_constant_input(node, index, new, name)
        what = "writer constant(s) along the hidden axis: W Q"
        changes.append(Change("rotated", what, (node.name,), (node.inputs[index].name,)))
    return changes


def _readers(edit: Editor, affine: NormAffine, q: numerics.Rotation) -> list[Change]:
    """The norm's beta into its readers' biases (b + beta W), its gamma and Q^T into their
    weights (Q^T diag(g) W, rounded once); the norm left with scale 1 and no beta Add."""
    match, changes = affine.match, []
    for node in affine.readers:
        if affine.beta is not None:
            fold = Fold(np.ones(q.d), affine.beta, "following", node, bias_add_after(node))
            fold_weights(edit, fold)
        axis = reader_axis(node, node.inputs[0], q.d)
        w = _rotated(node.inputs[1], axis, q, affine.gamma)
        edit.set_constant_input(node, 1, w, f"{node.name}.rotated_weight")
        what = "reader weight(s) on their input axis: Q^T diag(g) W"
        changes.append(Change("rotated", what, (node.name,), (node.inputs[1].name,)))
    if affine.gamma is not None:  # the scale leaves the norm: ones in its place
        node = next(n for n in match.nodes if match.scale in n.inputs)
        index = list(node.inputs).index(match.scale)
        ones = np.ones(folded_value(match.scale).shape, folded_value(match.scale).dtype)
        edit.set_constant_input(node, index, ones, f"{match.scale.name}.folded")
        changes.append(Change("folded", FOLDED, tuple(n.name for n in match.nodes), ()))
    if affine.add is not None:
        out = affine.add.outputs[0]
        data = next(v for v in affine.add.inputs if constant_value(v) is None)
        edit.take_over(out, data) if out.is_graph_output() else out.replace_all_uses_with(data)
        edit.graph.remove(affine.add, safe=True)
    return changes


FOLDED = "RMSNorm scale(s) (and beta) into their readers"


def _rotated(value: ir.Value, axis: int, q: numerics.Rotation, scale=None):
    """The constant `value` rotated along `axis` (streamed.rotated): an initializer's tensor is
    read when the result is saved (memory-mapped, or a pass's own streamed value); a computed
    constant (a tied head's Transpose of its table) now."""
    tensor = value.const_value if value.is_initializer() else None
    if tensor is None:
        array = folded_value(value)
        return streamed.rotated(lambda: array, array.shape, array.dtype, axis, q, scale)
    shape, dtype = tuple(int(n) for n in tensor.shape), tensor.dtype.numpy()
    return streamed.rotated(tensor.numpy, shape, dtype, axis, q, scale)


def _product(edit: Editor, value: ir.Value, m: np.ndarray, name: str) -> list[ir.Node]:
    """Nodes computing value @ m, in float32 for a 16-bit value (Cast in, Cast back: a float16
    Q would round every entry, and the products in float16 lose what a recentring left)."""
    dtype = value.dtype if value.dtype is not None else ir.DataType.FLOAT
    wide = dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    nodes, x = [], value
    if wide:
        nodes.append(edit.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}.to_float"))
        x = nodes[-1].outputs[0]
    matrix = edit.initializer(name, m.astype(np.float32 if wide else dtype.numpy()))
    nodes.append(edit.node("MatMul", [x, matrix], name=name, like=None if wide else value))
    if wide:
        nodes.append(edit.node("Cast", [nodes[-1].outputs[0]], {"to": dtype}, name=f"{name}.back"))
    nodes[-1].outputs[0].type, nodes[-1].outputs[0].shape = value.type, value.shape
    return nodes


def _online(edit: Editor, value: ir.Value, q: np.ndarray) -> None:
    """Insert y = value @ Q and make every reader of `value` read y."""
    uses = list(value.uses())
    nodes = _product(edit, value, q, f"{value.name or 'stream'}.rotation")
    if value.producer() is None:  # a graph input
        edit.graph.insert_before(next(iter(edit.graph)), nodes)
    else:
        edit.graph.insert_after(value.producer(), nodes)
    for use in uses:
        use.node.replace_input_with(use.idx, nodes[-1].outputs[0])


def _unrotate(edit: Editor, value: ir.Value, qt: np.ndarray, affine: NormAffine | None) -> None:
    """The graph output slot of the rotated `value` reads value @ Q^T (* gamma + beta: a norm's
    output, whose affine went to its readers); its readers keep reading `value`."""
    dtype = value.dtype.numpy() if value.dtype is not None else np.float32
    base = value.name
    nodes = _product(edit, value, qt, f"{base}.unrotation")
    for op, vector in (("Mul", affine and affine.gamma), ("Add", affine and affine.beta)):
        if vector is not None:
            constant = edit.initializer(f"{base}.{op.lower()}", vector.astype(dtype))
            nodes.append(
                edit.node(op, [nodes[-1].outputs[0], constant], name=f"{base}.{op.lower()}",
                          like=value)
            )  # fmt: skip
    edit.graph.insert_after(value.producer(), nodes)
    out = nodes[-1].outputs[0]
    readers = [(u.node, u.idx) for u in value.uses() if u.node is not nodes[0]]
    edit.take_over(value, out)  # the output slot and its name; every reader reads value again
    for node, idx in readers:
        node.replace_input_with(idx, value)
    nodes[0].replace_input_with(0, value)
