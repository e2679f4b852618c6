"""Pre-CRMSNorm planning (Jiang et al. 2023, Sec. 3.2; docs/rewrites.md, section 9): on a
residual stream that is zero-mean, every vector's last coordinate is minus the sum of the
others, so the stream can carry d-1 coordinates. Analysis only: what to cut, what to fold,
or why not; `preln-to-crmsnorm` edits.

A plan holds, for one stream:
  - cuts: every constant whose last axis writes the stream's hidden axis (a writer's weight
    columns and bias, an embedding table, a positional table), cut to its first d-1 entries;
  - norms: every RMSNorm reading a stream value, which becomes CRMSNorm
    x / sqrt((sum x^2 + (sum x)^2) / d + eps) over the d-1 entries (the original d);
  - readers: every linear op reading a norm's output (gamma folded in):
    W'[i] = g_i W[i] - g_{d-1} W[d-1] for i < d-1.
Conditions (each refusal says which failed):
  1. the stream is Pre-RMSNorm (rewriter.stream): residual Adds, each branch read through an
     RMSNorm; its values are read only by the residual Adds and the norms (no graph output);
  2. every writer is a constant, or a MatMul / Gemm / Gather / Slice (token axes) / scalar Mul
     / Cast / Reshape keeping the hidden axis last / Add of writers whose constant's last axis is
     the
     hidden axis, read only on its way into the stream, or an explicit recentring
     x - ReduceMean(x) (zero-mean by construction: a Slice to d-1 follows it); and zero-mean: each
     constant's rows sum to 0 along the hidden axis (to float32
     rounding: 1e-4 of the row's absolute sum), as preln-to-rmsnorm's centring leaves them;
  3. every norm is an RMSNorm over the last axis alone, of float32 or float16 (CRMSNorm
     computes in float32; in float16 it outputs the whole [y', -sum(y')] and its readers keep
     their weights: conditions on readers below are float32's), with a constant gamma (or
     none), its output read only by MatMul / Gemm with a constant weight.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.rewriter import axis_rules, numerics, writers
from normopt.rewriter.crms_plan import CENTRED, Affine, CRMSPlan, Cut, Reader
from normopt.rewriter.crms_targets import expand, reshape, shape_readers
from normopt.rewriter.graph import (
    Refuse,
    constant_shape,
    constant_value,
    folded_value,
    forwards,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norm_match import NormMatch, is_skip, scale_and_shift
from normopt.rewriter.stream import StreamAnalysis


def _centred(array: np.ndarray, what: str) -> None:
    a = array.astype(np.float64)
    if np.any(
        np.abs(a.sum(-1))
        > CENTRED.get(array.dtype, CENTRED[np.dtype(np.float32)]) * np.abs(a).sum(-1) + 1e-30
    ):
        raise Refuse(
            f"{what} does not sum to 0 along the hidden axis: the stream is not zero-mean "
            "(preln-to-rmsnorm makes a Pre-LN stream zero-mean; a model trained with RMSNorm is "
            "not)"
        )


def _constant(node: ir.Node, index: int, axis: int, plan: CRMSPlan, what: str) -> None:
    """A constant input written into the stream, `axis` (negative) its hidden axis: zero-mean
    along it and cut to its first d-1 entries; broadcast along it (size 1, or no such axis), it
    adds the same to every entry and must be 0."""
    array = folded_value(node.inputs[index])
    if array is None:
        raise Refuse(f"{what} is not a constant")
    if array.ndim < -axis or array.shape[axis] == 1:
        if np.any(array != 0):
            raise Refuse(f"{what} adds the same to every hidden entry: the stream is not zero-mean")
        return
    if array.shape[axis] != plan.d:
        raise Refuse(f"{what} has {array.shape[axis]} entries along the hidden axis, not {plan.d}")
    _centred(np.moveaxis(array, axis, -1), what)
    if (
        array.dtype != np.float32 and array.dtype.kind == "f"
    ):  # its sum is only 0 to float16's rounding:
        array = numerics.center(
            array, axis, array.dtype, diffuse=True
        )  # the implied entry would carry it
    plan.cuts.append(Cut(node, index, np.take(array, np.arange(plan.d - 1), axis=axis)))


def _writer(value: ir.Value, hidden: int | None, plan: CRMSPlan) -> None:
    """Plan the cuts that make `value` (added into the stream) d-1 wide along its `hidden` axis
    (non-negative; None: the last), or Refuse."""
    writers.walk(value, hidden, _Cutting(plan))


class _Cutting:
    """The writer walk's leaves for preln-to-crmsnorm: constants cut to d-1 entries along the
    hidden axis (normopt.rewriter.writers); an explicit recentring is sliced after it."""

    combines = ("Add", "Concat")
    where = " (written into the stream)"
    through_scalars = True

    def __init__(self, plan: CRMSPlan) -> None:
        self.plan = plan

    def special(self, node: ir.Node, value: ir.Value, hidden: int, depth: int) -> bool:
        r = rank(value)
        if hidden == r - 1 and recentring(node):  # zero-mean by construction: a Slice cuts it
            self.plan.slices.append(value)
            return True
        return False

    def constant(self, node: ir.Node, index: int, axis: int, what: str) -> None:
        _constant(node, index, axis, self.plan, what)

    def recurse(self, node: ir.Node, value: ir.Value, hidden: int | None, depth: int) -> None:
        _through(value, node, hidden, self.plan)

    def moved(self, node: ir.Node, out_hidden: int, in_hidden: int) -> None:
        if is_op(node, "Reshape"):
            reshape(node, out_hidden, in_hidden, self.plan)
        if is_op(node, "Expand"):
            expand(node, out_hidden, self.plan)


def recentring(node: ir.Node) -> bool:
    """Sub(x, ReduceMean(x) over the last axis): an explicit recentring (preln-to-rmsnorm's)."""
    if not is_op(node, "Sub"):
        return False
    mean = node.inputs[1].producer()
    if not is_op(mean, "ReduceMean") or mean.inputs[0] is not node.inputs[0]:
        return False
    axes = mean.attributes.get_ints("axes", None)
    if axes is None and len(mean.inputs) > 1 and mean.inputs[1] is not None:
        found = constant_value(mean.inputs[1])
        axes = None if found is None else [int(a) for a in found.reshape(-1)]
    r = node.inputs[0].shape
    return (
        axes is not None
        and len(axes) == 1
        and (axes[0] == -1 or (r is not None and axes[0] == len(r) - 1))
        and mean.attributes.get_int("keepdims", 1) == 1
    )


def _through(value: ir.Value, reader: ir.Node, hidden: int | None, plan: CRMSPlan) -> None:
    if sole_reader(value, numbers_only=True) is not reader:
        raise Refuse(
            f"'{value.name}' is read elsewhere too: cutting it would change what that reads"
        )
    shape_readers(value, hidden, plan)
    plan.carried.append((value, hidden))
    _writer(value, hidden, plan)


def _norm(match: NormMatch, plan: CRMSPlan) -> None:
    where = match.where()
    if match.kind != "rmsnorm":
        raise Refuse(
            f"the {match.kind} at {where} reads the stream (only RMSNorms become CRMSNorm)"
        )
    if is_skip(match.nodes[0]):  # it normalizes input + skip, not the value cut
        raise Refuse(f"the RMSNorm at {where} is fused with a residual Add (onnxruntime's)")
    if match.axis not in (-1, None):
        raise Refuse(f"the RMSNorm at {where} normalizes more than the last axis")
    if match.input.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise Refuse(
            f"the RMSNorm at {where} reads {match.input.dtype}: CRMSNorm is built for float32 and "
            "float16"
        )
    gamma, beta, add = scale_and_shift(match, plan.d)
    out = match.output if add is None else add.outputs[0]
    if plan.whole and _shown(match.output):
        raise Refuse(
            f"the RMSNorm at {where} is (or is reshaped into) a graph output: in float16 its "
            "implied last entry, minus the sum of the others, carries all their rounding errors "
            "(CLIP's pooled output: 2.4x the fp16 model's error against float32)"
        )
    if plan.whole:  # the norm outputs [y', -sum(y')] * gamma: its readers stay as they are
        plan.affines[id(match)] = Affine(gamma, None, None)
        plan.readers[id(match)], plan.exposed_norms[id(match)] = [], []
        plan.norms.append(match)
        return
    plan.affines[id(match)] = Affine(gamma, beta, add)
    shown = plan.exposed_norms.setdefault(id(match), [])
    found = [_reader(node, out, plan, where) for node in _through_carriers(out, plan, shown)]
    plan.norms.append(match)
    plan.readers[id(match)] = found


def _reader(node: ir.Node, out: ir.Value, plan: CRMSPlan, where: str) -> Reader:
    """A linear reader of a norm's output `out` (directly or through carriers) that takes its
    last entry into its weight: MatMul / Gemm with a constant [d, n] weight (or transB)."""
    w = (
        folded_value(node.inputs[1])
        if is_op(node, "MatMul", "Gemm") and len(node.inputs) > 1
        else None
    )
    if (
        w is None
        or node.inputs[0].producer() not in (out.producer(), *plan.carriers)
        or w.ndim != 2
        or (is_op(node, "Gemm") and node.attributes.get_int("transA", 0))
    ):
        raise Refuse(
            f"{node.op_type} {node.name} reads the RMSNorm at {where}: only MatMul / Gemm with a "
            "constant weight can take its last entry"
        )
    trans_b = is_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
    if (w.shape[1] if trans_b else w.shape[0]) != plan.d:
        raise Refuse(
            f"{node.op_type} {node.name}'s weight does not have the hidden size on its input axis"
        )
    return Reader(node, trans_b)


def _through_carriers(value: ir.Value, plan: CRMSPlan, shown: list[ir.Value]) -> list[ir.Node]:
    """The nodes reading `value`, through Reshapes that keep the hidden axis last (dynamo's
    view(-1, d) before a Gemm), whose targets are then cut too."""
    out = []
    if value.is_graph_output():  # y = [y', -sum(y')] (y is zero-mean as x is), then gamma and beta
        shown.append(value)
    shape_readers(value, None, plan)
    for node in readers(value, numbers_only=True):
        if _carries(node, value, plan):
            plan.carriers.append(node)
            plan.carried.append((node.outputs[0], None))
            out += _through_carriers(node.outputs[0], plan, shown)
        else:
            out.append(node)
    return out


def _carries(node: ir.Node, value: ir.Value, plan: CRMSPlan) -> bool:
    """Does `node` carry the cut `value` on with the hidden axis last and whole: a Reshape that
    keeps it last (its target then follows the cut), or a Gather / Slice of tokens?"""
    if node.inputs[0] is not value:
        return False
    if is_op(node, "Reshape"):
        a, b = value.shape, node.outputs[0].shape
        if a is None or b is None or not len(b) or b[-1] != plan.d:
            raise Refuse(f"Reshape {node.name} does not keep the hidden axis last")
        reshape(node, len(b) - 1, len(a) - 1, plan)
        return True
    # a Gather / Slice of tokens: each output hidden vector is a whole input one, still cut
    rule = axis_rules.rule(node)
    return rule is not None and rule.cut and axis_rules.keeps_last(node)


def _shown(value: ir.Value) -> bool:
    """Is `value`, or what passes its entries on (graph.forwards) or a constant affine of it (a
    norm's beta), a graph output?"""

    def passes_on(node: ir.Node) -> bool:
        if is_op(node, "Add", "Mul", "Sub", "Div"):
            return any(constant_shape(v) is not None for v in node.inputs)
        return forwards(node, "value", "reshape", "move") and node.inputs[0] is value

    return value.is_graph_output() or any(
        _shown(n.outputs[0]) for n in readers(value, numbers_only=True) if passes_on(n)
    )


def plan_stream(
    analysis: StreamAnalysis, found: list[NormMatch], allow_hidden_state_change: bool = False
) -> CRMSPlan | str:
    """The CRMS plan of the graph's residual stream (`found`: the graph's norms), or why there is
    none."""
    if analysis.architecture != "pre-rmsnorm":
        first = " (run preln-to-rmsnorm first)" if analysis.architecture == "pre-ln" else ""
        return f"the stream is {analysis.architecture}, not Pre-RMSNorm{first}"
    fused = next((r.node for r in analysis.residual_adds if is_skip(r.node)), None)
    if fused is not None:
        return (
            f"{fused.op_type} {fused.name} (onnxruntime's fused residual Add + norm) writes the "
            "stream: CRMS cuts only plain Adds and norms"
        )
    stream = list(
        dict.fromkeys([*analysis.initial, *(r.node.outputs[0] for r in analysis.residual_adds)])
    )
    shape = stream[0].shape
    d = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(d, int) or d < 2:
        return "the stream's hidden size is not static"
    plan = CRMSPlan(d, stream)
    try:
        norms = _readers(analysis, found, plan, allow_hidden_state_change)
        plan.whole = any(m.input.dtype != ir.DataType.FLOAT for m in norms.values())
        if plan.whole and plan.exposed:
            raise Refuse(
                f"the stream value '{plan.exposed[0].name}' is a graph output: in float16 its "
                "implied last entry, minus the sum of the others, carries all their rounding "
                "errors"
            )
        for value in analysis.initial:
            _writer(value, None, plan)
        for r in analysis.residual_adds:
            if sole_reader(r.branch, numbers_only=True) is not r.node:
                raise Refuse(f"the branch output '{r.branch.name}' is read elsewhere too")
            shape_readers(r.branch, None, plan)
            plan.carried.append((r.branch, None))
            _writer(r.branch, None, plan)
        for match in norms.values():
            _norm(match, plan)
        _check_shapes(plan, stream)
    except Refuse as exc:
        return str(exc)
    return plan


def _readers(
    analysis: StreamAnalysis, found: list[NormMatch], plan: CRMSPlan, allow_hidden: bool
) -> dict[ir.Node, NormMatch]:
    """Walk the stream and what carries it on whole (OPT's reshape to (-1, d), CLIP's pooled
    token): every reader is a residual Add, a norm, or a carrier. Returns the norms by their
    first node."""
    adds = {r.node for r in analysis.residual_adds}
    norms = {n.nodes[0]: n for r in analysis.residual_adds for n in r.pre} | {
        n.nodes[0]: n for n in analysis.final_norms
    }
    members = {node for n in norms.values() for node in n.nodes}
    pending = list(plan.stream)
    while pending:
        value = pending.pop()
        if value.is_graph_output():
            if not allow_hidden:
                raise Refuse(
                    f"the stream value '{value.name}' is a graph output "
                    "(--allow-hidden-state-change outputs it whole: its d-1 entries and minus "
                    "their sum)"
                )
            plan.exposed.append(value)
        shape_readers(value, None, plan)
        for node in readers(value, numbers_only=True):
            if node in adds or node in members:
                continue
            match = next((m for m in found if m.input is value and node in m.nodes), None)
            if (
                match is not None
            ):  # a norm of a carried value (CLIP's post-norm of the pooled token)
                norms[match.nodes[0]] = match
                members.update(match.nodes)
                continue
            if not _carries(node, value, plan):
                raise Refuse(f"{node.op_type} {node.name} reads the stream value '{value.name}'")
            plan.carried.append((node.outputs[0], None))
            pending.append(node.outputs[0])
    return norms


def _check_shapes(plan: CRMSPlan, stream: list[ir.Value]) -> None:
    """A size read into a cut Reshape target must come from a cut value, and a shape that
    builds one must build nothing else."""
    cut = {
        v: len(v.shape) - 1 if axis is None else axis
        for v, axis in [*((v, None) for v in stream), *plan.carried]
        if v.shape is not None
    }
    for value, axis, shape in plan.follows:
        if cut.get(value) != axis:
            raise Refuse(
                f"{shape.op_type} {shape.name} reads the size of '{value.name}', which is not "
                "cut, into a Reshape target of a cut value"
            )
    for value in plan.shapes:
        for node in readers(value):
            if node not in plan.reshapes:
                raise Refuse(
                    f"the shape '{value.name}' is read by {node.op_type} {node.name} too, "
                    "which keeps d"
                )
