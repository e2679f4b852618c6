"""`preln-to-crmsnorm`: a zero-mean Pre-RMSNorm stream carried in d-1 coordinates, its norms
CRMSNorms (Jiang et al. 2023, Sec. 3.2; the plan: rewriter.crms; docs/rewrites.md, section 9).

Before: x (width d, zero-mean: preln-to-rmsnorm ran first) -> RMSNorm(x) * g -> y W
After:  x' = x[:d-1] (every writer's constant cut to its first d-1 hidden entries) ->
        y' = x' / sqrt((sum x'^2 + (sum x')^2) / d + eps) -> y' W',
        W'[i] = g_i W[i] - g_{d-1} W[d-1]  (i < d-1)
--target tensorrt: float32 CRMSNorms are normopt's NormoptCRMSNorm plugin nodes (float16 ones,
which output the whole d-vector, stay decomposed; TensorRT fuses those ops itself).
Conditions: rewriter.crms (a Pre-RMSNorm stream read only by its residual Adds and norms, no
graph output; writers that are constants, MatMul / Gemm / Gather / token-axis Slice / scalar Mul /
Add, each constant zero-mean along the hidden axis; float32 RMSNorms over the last axis whose
outputs only MatMul / Gemm with constant weights read). Not in the default pipeline: on ORT CPU
the d-1 width rarely pays (run it with preln-to-rmsnorm before it, and measure).
Formula: x zero-mean, so x_{d-1} = -sum(x'): sum x^2 = sum x'^2 + (sum x')^2, and
y W = y' W[:d-1] + y_{d-1} W[d-1] = y' (W[:d-1] - W[d-1]) (gamma folded into W first).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.plugins.spec import CRMS_NORM, DOMAIN
from normopt.rewriter.crms import CRMSPlan, plan_stream
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import default_opset, folded_value
from normopt.rewriter.linear_fold import Fold, bias_add_after, fold_weights
from normopt.rewriter.norms import NormMatch, find_norms
from normopt.rewriter.stream import analyze


def _narrow(value: ir.Value, d: int, axis: int | None = None) -> None:
    shape = value.shape
    if shape is None or not len(shape):
        return
    dims = list(shape)
    axis = len(dims) - 1 if axis is None else axis
    if dims[axis] == d:
        dims[axis] = d - 1
        value.shape = ir.Shape(dims)


def _crms_norm(
    edit: Editor, match: NormMatch, d: int, opset: int, whole: np.ndarray | None = None
) -> ir.Value:
    """y' = x' / sqrt((sum x'^2 + (sum x')^2) / d + eps), inserted after the norm's last node;
    computed in float32 (an fp16 x' is cast there and back). `whole` (the norm's gamma): the
    output is the d-vector [y', -sum(y')] * gamma instead."""
    name = f"{match.nodes[0].name or 'rmsnorm'}.crms"
    x, nodes = match.input, []
    if x.dtype != ir.DataType.FLOAT:
        nodes.append(edit.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}.to_float"))
        x = nodes[-1].outputs[0]
    nodes += edit.rms_core(x, float(match.epsilon), np.float32, opset, name=name, width=d)
    if whole is not None:
        y = nodes[-1].outputs[0]
        nodes.append(edit.reduce("ReduceSum", y, [-1], opset, name=f"{name}.sum_out"))
        nodes.append(edit.node("Neg", [nodes[-1].outputs[0]], name=f"{name}.last"))
        nodes.append(
            edit.node("Concat", [y, nodes[-1].outputs[0]], {"axis": -1}, name=f"{name}.whole")
        )
    # an fp16 norm may output float32 (its Cast back left out); where the output is untyped
    # (a value a pass made), the scale multiplied into it has its dtype
    scale = match.scale.dtype if match.scale is not None else None
    out = match.output.dtype or scale or match.input.dtype
    if out != ir.DataType.FLOAT:
        nodes.append(edit.node("Cast", [nodes[-1].outputs[0]], {"to": out}, name=f"{name}.back"))
    if whole is not None and np.any(whole != 1):
        g = edit.initializer(f"{name}.gamma", whole.astype(out.numpy()))
        nodes.append(edit.node("Mul", [nodes[-1].outputs[0], g], name=f"{name}.scale"))
    edit.graph.insert_after(match.nodes[-1], nodes)
    return nodes[-1].outputs[0]


def _crms_plugin(edit: Editor, match: NormMatch, d: int) -> ir.Value:
    """--target tensorrt: y' = NormoptCRMSNorm(x', ones) (its kernel computes in float32; gamma
    is in the readers), inserted after the norm's last node."""
    name = f"{match.nodes[0].name or 'rmsnorm'}.crms"
    ones = edit.initializer(f"{name}.weight", np.ones(d - 1, match.input.dtype.numpy()))
    node = edit.node(
        CRMS_NORM.op_type,
        [match.input, ones],
        CRMS_NORM.attributes(float(match.epsilon)),
        domain=DOMAIN,
        name=f"{name}.plugin",
    )
    edit.graph.insert_after(match.nodes[-1], node)
    return node.outputs[0]


def _restore_width(edit: Editor, shape: ir.Node, d: int, axis: int) -> None:
    """Shape(x') -> Shape(x') + one-hot(axis) where its range holds the hidden axis: d again."""
    rank = len(shape.inputs[0].shape)
    start = shape.attributes.get_int("start", 0)
    end = shape.attributes.get_int("end", rank)
    start, end = (start + rank if start < 0 else start), min(end + rank if end < 0 else end, rank)
    if not start <= axis < end:
        return
    out = shape.outputs[0]
    uses = list(out.uses())
    one = np.zeros(end - start, np.int64)
    one[axis - start] = 1
    fixed = edit.node(
        "Add",
        [out, edit.initializer(f"{shape.name}.crms_width", one)],
        name=f"{shape.name}.crms_d",
        like=out,
    )
    edit.graph.insert_after(shape, fixed)
    for use in uses:
        use.node.replace_input_with(use.idx, fixed.outputs[0])
    if out.is_graph_output():
        edit.take_over(out, fixed.outputs[0])


def _expose(
    edit: Editor,
    x: ir.Value,
    d: int,
    opset: int,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> None:
    """The graph output slot of the cut `x` (zero-mean) reads [x', -sum(x')] (* gamma + beta):
    the d-vector the original output held; x's readers keep reading x'."""
    name = x.name
    total = edit.reduce("ReduceSum", x, [-1], opset, name=f"{name}.crms_sum")
    neg = edit.node("Neg", [total.outputs[0]], name=f"{name}.crms_last", like=total.outputs[0])
    whole = edit.node(
        "Concat", [x, neg.outputs[0]], {"axis": -1}, name=f"{name}.crms_whole", like=x
    )
    nodes = [total, neg, whole]
    for op, vector in (("Mul", gamma), ("Add", beta)):
        if vector is not None and np.any(vector != (1 if op == "Mul" else 0)):
            nodes.append(
                edit.node(
                    op,
                    [
                        nodes[-1].outputs[0],
                        edit.initializer(
                            f"{name}.crms_{op.lower()}", vector.astype(x.dtype.numpy())
                        ),
                    ],
                    name=f"{name}.crms_{op.lower()}",
                    like=x,
                )
            )
    edit.graph.insert_after(x.producer(), nodes)
    out = nodes[-1].outputs[0]
    readers = [(u.node, u.idx) for u in x.uses()]
    edit.take_over(x, out)  # the output slot and name; every reader reads x' again
    for node, idx in readers:
        node.replace_input_with(idx, x)
    out.shape = ir.Shape([*list(x.shape)[:-1], d]) if x.shape is not None else None


def _slice_recentred(edit: Editor, value: ir.Value, d: int) -> None:
    """Its readers read the first d-1 entries of the recentred `value` = x - mean(x)."""
    uses = list(value.uses())
    starts, ends, axes = (
        edit.initializer(f"{value.name}.crms_{k}", np.array([v], np.int64))
        for k, v in (("start", 0), ("end", d - 1), ("axis", -1))
    )
    cut = edit.node(
        "Slice", [value, starts, ends, axes], name=f"{value.name}.crms_slice", like=value
    )
    edit.graph.insert_after(value.producer(), cut)
    for use in uses:
        use.node.replace_input_with(use.idx, cut.outputs[0])
    _narrow(cut.outputs[0], d)


def _expand_to_one(edit: Editor, node: ir.Node, k: int) -> None:
    """Expand(x, s) -> Expand(x, s * (1 - e_k) + e_k): entry k of its shape becomes 1."""
    s = node.inputs[1]
    n = s.shape[0]
    mask, one = np.ones(n, np.int64), np.zeros(n, np.int64)
    mask[k], one[k] = 0, 1
    kept = edit.node(
        "Mul",
        [s, edit.initializer(f"{node.name}.crms_mask", mask)],
        name=f"{node.name}.crms_mask",
        like=s,
    )
    fixed = edit.node(
        "Add",
        [kept.outputs[0], edit.initializer(f"{node.name}.crms_one", one)],
        name=f"{node.name}.crms_shape",
        like=s,
    )
    edit.graph.insert_before(node, [kept, fixed])
    node.replace_input_with(1, fixed.outputs[0])


class PreLNToCRMSNorm(Pass[CRMSPlan]):
    name = "preln-to-crmsnorm"
    summary = (
        "carry a zero-mean Pre-RMSNorm stream in d-1 coordinates; its RMSNorms become CRMSNorms"
    )

    def plan(self, model: ir.Model) -> Plan[CRMSPlan]:
        norms = find_norms(model.graph)
        if not any(m.kind == "rmsnorm" for m in norms):
            return Plan(idle="no RMSNorm (run preln-to-rmsnorm first)")
        plan = Plan()
        outcome = plan_stream(
            analyze(model.graph, norms), norms, self.options.allow_hidden_state_change
        )
        plan.decide("residual stream", outcome)
        if isinstance(outcome, CRMSPlan):
            plan.stats["width"] = outcome.d
        return plan

    def apply(self, model: ir.Model, plan: Plan[CRMSPlan]) -> list[Change]:
        edit, opset = Editor(model.graph), default_opset(model)
        plugin = self.options.target == "tensorrt"
        changes = []
        for crms in plan.actions:
            changes += _apply(edit, crms, opset, plugin and not crms.whole)
        if any(n.domain == DOMAIN for n in model.graph):
            model.opset_imports.setdefault(DOMAIN, 1)
        return changes


def _apply(edit: Editor, crms: CRMSPlan, opset: int, plugin: bool) -> list[Change]:
    d = crms.d
    changes = [
        Change(
            "cut",
            "writer constant(s) to d-1 hidden entries",
            (cut.node.name,),
            (cut.node.inputs[cut.index].name,),
        )
        for cut in crms.cuts
    ]
    for cut in crms.cuts:
        name = cut.node.inputs[cut.index].name or cut.node.name
        edit.set_constant_input(cut.node, cut.index, np.ascontiguousarray(cut.new), f"{name}.crms")
    for match in crms.norms:
        changes += _convert(edit, crms, match, opset, plugin)
    for value, axis in [*((v, None) for v in crms.stream), *crms.carried]:
        if value not in crms.slices:
            _narrow(value, d, axis)
    for value in crms.exposed:
        if value.is_graph_output():  # a stream value (a norm's output is its CRMSNorm's now)
            _expose(edit, value, d, opset)
            changes.append(Change("restored", RESTORED, (), (value.name,)))
    for shape, axis in dict.fromkeys(crms.shape_reads):  # what reads a cut value's shape sees d
        if shape not in crms.own_shapes:
            _restore_width(edit, shape, d, axis)
    for node, k in crms.expands:
        _expand_to_one(edit, node, k)
    for value in crms.slices:  # after an explicit recentring: its first d-1 entries
        what = "recentred value(s) sliced to d-1 hidden entries"
        changes.append(Change("cut", what, (value.producer().name,), (value.name,)))
        _slice_recentred(edit, value, d)
    return changes


RESTORED = "graph output(s) to width d: x' and -sum(x')"


def _convert(
    edit: Editor, crms: CRMSPlan, match: NormMatch, opset: int, plugin: bool
) -> list[Change]:
    """One RMSNorm to a CRMSNorm: output whole (`crms.whole`), or d-1 wide with gamma (and a
    beta Add) folded into its readers' weights; its graph outputs restored to width d."""
    d, affine = crms.d, crms.affines[id(match)]
    nodes, outputs = tuple(n.name for n in match.nodes), (match.output.name,)
    if crms.whole:
        what = "RMSNorm(s) to CRMSNorm (width d-1, output whole: [y', -sum(y')])"
        y = _crms_norm(edit, match, d, opset, whole=affine.gamma)
        y.type, y.shape = match.output.type, match.output.shape
        edit.take_over(match.output, y)
        edit.graph.remove(list(reversed(match.nodes)), safe=True)
        return [Change("converted", what, nodes, outputs)]
    if plugin and match.output.dtype in (None, ir.DataType.FLOAT):  # it outputs its input's type
        what = f"RMSNorm(s) to {CRMS_NORM.op_type} (width d-1, TensorRT plugin)"
        y = _crms_plugin(edit, match, d)
    else:
        what = "RMSNorm(s) to CRMSNorm (width d-1)"
        y = _crms_norm(edit, match, d, opset)
    changes = [Change("converted", what, nodes, outputs)]
    for reader in crms.readers[id(match)]:  # after the cuts: a branch's last MatMul is both
        _fold_into_reader(edit, reader, affine, d)
    last = affine.add.outputs[0] if affine.add is not None else match.output
    y.type, y.shape = last.type, last.shape
    edit.take_over(last, y)
    _narrow(y, d)
    for value in crms.exposed_norms[id(match)]:  # the original output, gamma and beta included
        value = y if value is last else value
        _expose(edit, value, d, opset, affine.gamma, affine.beta)
        changes.append(Change("restored", RESTORED, (), (value.name,)))
    edit.graph.remove(
        [*([affine.add] if affine.add is not None else []), *reversed(match.nodes)], safe=True
    )
    return changes


def _fold_into_reader(edit: Editor, reader, affine, d: int) -> None:
    """beta into the reader's bias first (b + beta W), then gamma and the cut into its weight
    (rounded once)."""
    if affine.beta is not None:
        bias_add = bias_add_after(reader.node)
        fold = Fold(np.ones(d), affine.beta, "following", reader.node, bias_add)
        fold_weights(edit, fold)
    current = folded_value(reader.node.inputs[1])  # a tied head's Transpose(table) too
    w = reader.weight(current, affine.gamma).astype(current.dtype)
    name = f"{reader.node.name}.crms_weight"
    edit.set_constant_input(reader.node, 1, np.ascontiguousarray(w), name)
