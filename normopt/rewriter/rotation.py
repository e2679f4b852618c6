"""Planning an exact rotation of a Pre-RMSNorm residual stream (QuaRot / SliceGPT's
computational invariance; docs/rewrites.md, section 10). Analysis only; `rotate-stream` edits.

For an orthogonal Q (Q Q^T = I), RMSNorm(x Q) = RMSNorm(x) Q: the norm over the hidden axis
alone sees the same sum of squares. So the stream can carry x Q instead of x:
  - writers: every constant that writes the stream along its hidden axis is rotated there
    (W <- W Q for a MatMul's weight and bias, an embedding or positional table, a Conv's
    output channels); a value that cannot be (an explicit recentring, a graph input) is
    followed by an inserted x Q (a MatMul: "online");
  - norms: their gamma (and beta) leave them for their readers (a per-entry scale does not
    commute with Q): y W = RMSNorm(x Q) (Q^T diag(g) W) + beta W;
  - readers: every linear op reading a norm's output takes Q^T on its input axis;
  - graph outputs: a stream value or a norm output the graph outputs is un-rotated there
    (x Q Q^T = x; a norm's gamma and beta re-applied after).
Conditions (each refusal says which failed):
  1. the stream is Pre-RMSNorm (rewriter.stream), with no fused residual Add + norm;
  2. every stream value is read only by its residual Adds, its norms, and ops carrying its
     hidden vectors whole and last (a Reshape to (-1, d), a Cast, a token Gather / Slice);
     each branch output only by its residual Add;
  3. every writer is a linear op with constant weights, a constant, a token-axis shape op, a
     scalar Mul, an Add / Sub / Concat (on another axis) of writers, each of whose values has
     no other reader; or a recentring or a graph input (rotated online);
  4. every norm reading the stream is an RMSNorm over the last axis alone, with a constant
     scale (or none), whose output (and a beta Add after it) reaches through carriers only
     MatMul / Gemm reading it as data with a constant weight, or graph outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter import axis_rules, writers
from normopt.rewriter.crms import recentring
from normopt.rewriter.graph import (
    Refuse,
    constant_shape,
    folded_value,
    is_op,
    rank,
    readers,
    sole_reader,
)
from normopt.rewriter.norm_match import NormMatch, is_skip, scale_and_shift, skip_bias_index
from normopt.rewriter.stream import StreamAnalysis, total


@dataclass
class NormAffine:
    """A stream norm, its gamma (None: 1) and beta with the Add holding it (both folded into its
    readers), and those readers."""

    match: NormMatch
    gamma: np.ndarray | None
    beta: np.ndarray | None = None
    add: ir.Node | None = None
    readers: list[ir.Node] = field(default_factory=list)


@dataclass
class RotationPlan:
    d: int
    norms: list[NormAffine] = field(default_factory=list)
    # (node, input) -> the axis (negative) the constant writes the hidden axis along
    writers: dict[tuple[ir.Node, int], int] = field(default_factory=dict)
    # values followed by an inserted x Q, and why no constant writes them
    online: dict[ir.Value, str] = field(default_factory=dict)
    # graph outputs to un-rotate, with the norm whose gamma / beta they take back (None: stream)
    outputs: list[tuple[ir.Value, NormAffine | None]] = field(default_factory=list)

    def reader_count(self) -> int:
        return sum(len(n.readers) for n in self.norms)

    def describe(self) -> str:
        online = f", {len(self.online)} online" if self.online else ""
        return (
            f"a stream of width {self.d}: {len(self.writers)} writer constant(s){online}, "
            f"{len(self.norms)} norm(s), {self.reader_count()} reader weight(s), "
            f"{len(self.outputs)} output(s) un-rotated"
        )


def reader_axis(node: ir.Node, value: ir.Value, d: int) -> int | str:
    """The axis of a linear reader's constant weight that `value` (its data input, the hidden
    axis last) is contracted with, or why it cannot take Q^T there."""
    w = constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if not is_op(node, "MatMul", "Gemm") or node.inputs[0] is not value or w is None:
        return "only MatMul / Gemm reading it as data with a constant weight can take Q^T"
    if is_op(node, "Gemm") and node.attributes.get_int("transA", 0):
        return "a Gemm with transA"
    axis = -1 if is_op(node, "Gemm") and node.attributes.get_int("transB", 0) else -2
    if len(w) < 2 or w[axis] != d:
        return f"its weight does not have the hidden size {d} on its input axis"
    return axis


def _carries(node: ir.Node, value: ir.Value) -> bool:
    """Does `node` pass `value`'s hidden vectors (last axis) on whole and last (a Cast, a
    Reshape to (-1, d), a token Gather / Slice / Split / Transpose, zero Pad, pooling over
    tokens: the ops of axis_rules that carry a recentring or an affine, which as linear maps of
    each hidden vector commute with Q alike)?"""
    rule = axis_rules.rule(node)
    return (
        node.inputs[0] is value
        and rule is not None
        and (rule.carrier or rule.stream)  # ops keeping each hidden vector whole
        and axis_rules.keeps_last(node)
    )


class _Rotating:
    """The writer walk's leaves (normopt.rewriter.writers): constants rotated along the hidden
    axis; recentrings and graph inputs rotated online."""

    combines = ("Add", "Sub", "Concat")
    where = " (written into the stream)"
    through_scalars = True  # a scalar commutes with Q

    def __init__(self, plan: RotationPlan, rotated: set[ir.Value]) -> None:
        self.plan, self.rotated = plan, rotated

    def start(self, value: ir.Value, hidden: int | None, depth: int = 0) -> None:
        """Plan what writes `value`: its constants rotated where the writer walk reaches them
        all, else `value` itself rotated online (all or nothing: a walk that fails part-way
        leaves no constant planned)."""
        if value.producer() is None:
            self._online(value, hidden, "a graph input")
            return
        saved = dict(self.plan.writers), dict(self.plan.online)
        try:
            writers.walk(value, hidden, self, depth)
        except Refuse as exc:
            self.plan.writers, self.plan.online = saved
            self._online(value, hidden, str(exc))

    def _online(self, value: ir.Value, hidden: int | None, why: str) -> None:
        shape, r = value.shape, rank(value)
        if shape is None or r is None or hidden not in (None, r - 1) or shape[-1] != self.plan.d:
            raise Refuse(
                f"{why}; and '{value.name}' cannot be rotated online: its last axis is "
                "not the hidden one"
            )
        self.plan.online[value] = why

    def special(self, node: ir.Node, value: ir.Value, hidden: int, depth: int) -> bool:
        if recentring(node):  # x - mean(x) is no linear writer of its own: rotated after
            self._online(value, hidden, "an explicit recentring")
            return True
        return False

    def constant(self, node: ir.Node, index: int, axis: int, what: str) -> None:
        """Plan the rotation of a writer's constant from its shape and dtype (its data is read
        only for a small constant broadcast along the hidden axis: zeros stay as they are)."""
        value = node.inputs[index]
        shape = constant_shape(value)
        if shape is None:
            raise Refuse(f"{what} is not a constant")
        broadcast = len(shape) < -axis or shape[axis] == 1
        if broadcast and not np.any(folded_value(value)):
            return
        if not broadcast and shape[axis] != self.plan.d:
            raise Refuse(f"{what} has {shape[axis]} entries along the hidden axis")
        dtype = value.dtype.numpy() if value.dtype is not None else folded_value(value).dtype
        if np.dtype(dtype).kind != "f":
            raise Refuse(f"{what} is {dtype}, not floating point")
        self.plan.writers[(node, index)] = axis

    def recurse(self, node: ir.Node, value: ir.Value, hidden: int | None, depth: int) -> None:
        if value in self.rotated:  # the stream, carried on: rotated with it
            return
        if value.is_graph_output() or readers(value, numbers_only=True) != [node]:
            raise Refuse(
                f"'{value.name}' is read elsewhere too: rotating it would change what that reads"
            )
        self.start(value, hidden, depth + 1)

    def moved(self, node: ir.Node, out_hidden: int, in_hidden: int) -> None:
        pass  # shapes stay: nothing follows the rotation


def _norm(match: NormMatch, plan: RotationPlan) -> None:
    """Check a stream norm and plan its affine's move into its readers."""
    where = match.where()
    if match.kind != "rmsnorm":
        raise Refuse(
            f"the {match.kind} at {where} reads the stream: only an RMSNorm commutes "
            "with a rotation (preln-to-rmsnorm converts a Pre-LN stream's)"
        )
    if is_skip(match.nodes[0]) and any(
        v.uses() or v.is_graph_output() for v in match.nodes[0].outputs[1:3]
    ):
        raise Refuse(f"the fused RMSNorm at {where} outputs its statistics")
    if match.axis not in (-1, None):
        raise Refuse(f"the RMSNorm at {where} normalizes more than the last axis")
    gamma, beta, add = scale_and_shift(match, plan.d)
    norm = NormAffine(match, None if np.all(gamma == 1) else gamma, beta, add)
    norm.readers = _readers(match.output if add is None else add.outputs[0], norm, plan)
    plan.norms.append(norm)


def _readers(value: ir.Value, norm: NormAffine, plan: RotationPlan) -> list[ir.Node]:
    """The linear readers of a norm's output, through carriers; graph outputs noted."""
    if value.is_graph_output():
        plan.outputs.append((value, norm))
    found = []
    for node in readers(value, numbers_only=True):
        if _carries(node, value):
            for out in node.outputs:
                found += _readers(out, norm, plan) if out is not None else []
            continue
        axis = reader_axis(node, value, plan.d)
        if isinstance(axis, str):
            where = norm.match.where()
            raise Refuse(f"{node.op_type} {node.name} reads the RMSNorm at {where}: {axis}")
        found.append(node)
    return found


def plan_rotation(analysis: StreamAnalysis, found: list[NormMatch]) -> RotationPlan | str:
    """The rotation plan of the graph's residual stream (`found`: the graph's norms), or why
    there is none."""
    if analysis.architecture != "pre-rmsnorm":
        first = (
            ": LayerNorms read it (preln-to-rmsnorm converts them; where it did not, its "
            "refusals say why)"
            if analysis.architecture == "pre-ln"
            else ""
        )
        return f"the stream is {analysis.architecture}, not Pre-RMSNorm{first}"
    sums = [total(r.node) for r in analysis.residual_adds]  # a fused Skip norm's sum output
    stream = list(dict.fromkeys([*analysis.initial, *(v for v in sums if isinstance(v, ir.Value))]))
    shape = stream[0].shape
    d = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(d, int) or d < 2:
        return "the stream's hidden size is not static"
    plan = RotationPlan(d)
    try:
        rotated: set[ir.Value] = set()  # the stream and what carries it
        carried: set[ir.Value] = set()  # ... through a carrier from another stream value
        norms = _stream_readers(analysis, found, stream, plan, (rotated, carried))
        visitor = _Rotating(plan, rotated)
        for value in analysis.initial:  # its writers; none where the stream carries it there
            if value not in carried:  # (a stream passed through Transposes between blocks)
                visitor.start(value, None)
        for r in analysis.residual_adds:
            if sole_reader(r.branch, numbers_only=True) is not r.node:
                raise Refuse(f"the branch output '{r.branch.name}' is read elsewhere too")
            visitor.start(r.branch, None)
            if is_skip(r.node):  # its residual bias adds into the stream
                bias = skip_bias_index(r.node)
                if len(r.node.inputs) > bias and r.node.inputs[bias] is not None:
                    visitor.constant(r.node, bias, -1, f"the residual bias of {r.node.name}")
        for match in norms.values():
            _norm(match, plan)
        # an online rotation leaves the value itself as it was: its output slot needs nothing
        plan.outputs = [(v, m) for v, m in plan.outputs if v not in plan.online]
    except Refuse as exc:
        return str(exc)
    return plan


def _stream_readers(
    analysis: StreamAnalysis,
    found: list[NormMatch],
    stream: list[ir.Value],
    plan: RotationPlan,
    found_values: tuple[set[ir.Value], set[ir.Value]],
) -> dict[ir.Node, NormMatch]:
    """Walk the stream and what carries it on whole: every reader is a residual Add, a norm or
    a carrier; graph outputs noted; `found_values` get every value walked and those a carrier
    output. Returns the norms by their first node."""
    seen, carried = found_values
    adds = {r.node for r in analysis.residual_adds}
    norms = {n.nodes[0]: n for r in analysis.residual_adds for n in r.pre} | {
        n.nodes[0]: n for n in analysis.final_norms
    }
    members = {node for n in norms.values() for node in n.nodes}
    pending = list(stream)
    while pending:
        value = pending.pop()
        if value in seen:
            continue
        seen.add(value)
        if value.is_graph_output():
            plan.outputs.append((value, None))
        for node in readers(value, numbers_only=True):
            if node in adds or node in members:
                continue
            match = next((m for m in found if m.input is value and node in m.nodes), None)
            if match is not None:  # a norm of a carried value (CLIP's pooled token)
                norms[match.nodes[0]] = match
                members.update(match.nodes)
            elif _carries(node, value):
                outputs = [v for v in node.outputs if v is not None]
                carried.update(outputs)
                pending.extend(outputs)
            else:
                raise Refuse(f"{node.op_type} {node.name} reads the stream value '{value.name}'")
    return norms
