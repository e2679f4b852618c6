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
     / Cast / Reshape keeping the hidden axis last / Add of writers whose constant's last axis is the
     hidden axis, read only on its way into the stream, or an explicit recentring
     x - ReduceMean(x) (zero-mean by construction: a Slice to d-1 follows it); and zero-mean: each constant's rows sum to 0 along the hidden axis (to float32
     rounding: 1e-4 of the row's absolute sum), as preln-to-rmsnorm's centring leaves them;
  3. every norm is an RMSNorm over the last axis alone, float32, with a constant gamma (or
     none), its output read only by MatMul / Gemm with a constant weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import constant_value, folded_value, is_op, readers, sole_reader
from normopt.rewriter.norms import NormMatch
from normopt.rewriter.stream import StreamAnalysis

CENTRED = 1e-4  # a row sums to 0 within this fraction of its absolute sum


@dataclass
class Cut:
    node: ir.Node
    index: int  # the input holding the constant
    new: np.ndarray  # its values once cut (a table's first d-1 columns, a shape's d -> d-1)


@dataclass
class Reader:
    node: ir.Node  # MatMul / Gemm reading a norm's output as input 0
    trans_b: bool  # a Gemm's weight is [out, d]

    def weight(self, current: np.ndarray) -> np.ndarray:
        """W' from the weight as it is now (a writer's cut may have cut its columns, the norm's
        gamma been folded into its rows): W[:d-1] - W[d-1]."""
        w = (current.T if self.trans_b else current).astype(np.float64)
        w = w[:-1] - w[-1]
        return w.T if self.trans_b else w


@dataclass
class Affine:
    gamma: np.ndarray  # [d]
    beta: np.ndarray | None  # [d], the constant of a bias Add after the norm
    add: ir.Node | None  # that Add


@dataclass
class CRMSPlan:
    d: int
    stream: list[ir.Value]
    cuts: list[Cut] = field(default_factory=list)
    norms: list[NormMatch] = field(default_factory=list)
    readers: dict[int, list[Reader]] = field(default_factory=dict)  # id(norm) -> its readers
    affines: dict[int, Affine] = field(default_factory=dict)  # id(norm) -> its gamma and beta, folded into its readers
    carried: list[ir.Value] = field(default_factory=list)  # values between writers and the stream, norms and readers
    shapes: list[ir.Value] = field(default_factory=list)  # computed Reshape targets whose last piece is cut
    carriers: list[ir.Node] = field(default_factory=list)  # Reshapes between a norm and its readers
    reshapes: set[ir.Node] = field(default_factory=set)  # every Reshape whose target is cut
    slices: list[ir.Value] = field(default_factory=list)  # explicit recentrings: a Slice to d-1 after each
    shape_reads: list[ir.Node] = field(default_factory=list)  # Shape nodes reading a cut value: their d restored

    def describe(self) -> str:
        return f"a stream of width {self.d} -> {self.d - 1}: {len(self.norms)} norm(s), {len(self.cuts)} constant(s) cut"


class Refuse(Exception):
    pass


def _centred(array: np.ndarray, what: str) -> None:
    a = array.astype(np.float64)
    if np.any(np.abs(a.sum(-1)) > CENTRED * np.abs(a).sum(-1) + 1e-30):
        raise Refuse(f"{what} does not sum to 0 along the hidden axis: the stream is not zero-mean "
                     "(run preln-to-rmsnorm first)")


def _writer(value: ir.Value, d: int, plan: CRMSPlan) -> None:
    """Plan the cuts that make `value` (added into the stream) d-1 wide, or Refuse."""
    node = value.producer()
    if node is None:
        raise Refuse(f"'{value.name}' (written into the stream) is a graph input")
    if is_op(node, "Add"):
        for i, v in enumerate(node.inputs):
            array = constant_value(v)
            if array is not None:
                if array.shape[-1:] != (d,):
                    raise Refuse(f"Add {node.name} adds a constant of shape {list(array.shape)}, not one "
                                 "value per hidden entry")
                _centred(array, f"the constant '{v.name}' added by {node.name}")
                plan.cuts.append(Cut(node, i, array[..., :-1]))
            else:
                _through(v, node, d, plan)
        return
    if is_op(node, "MatMul") and constant_value(node.inputs[1]) is not None:
        w = constant_value(node.inputs[1])
        if w.ndim != 2:
            raise Refuse(f"MatMul {node.name} has a {w.ndim}-D weight")
        _centred(w, f"the weight of {node.name}")
        plan.cuts.append(Cut(node, 1, w[..., :-1]))
        return
    if is_op(node, "Gemm") and constant_value(node.inputs[1]) is not None:
        w = constant_value(node.inputs[1])
        trans_b = node.attributes.get_int("transB", 0)
        _centred(w.T if trans_b else w, f"the weight of {node.name}")
        if trans_b:
            raise Refuse(f"Gemm {node.name} has transB=1: its hidden axis is the weight's first")
        plan.cuts.append(Cut(node, 1, w[..., :-1]))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            c = constant_value(node.inputs[2])
            if c is None or c.shape[-1:] != (d,):
                raise Refuse(f"Gemm {node.name}'s bias is not a constant with one value per hidden entry")
            _centred(c, f"the bias of {node.name}")
            plan.cuts.append(Cut(node, 2, c[..., :-1]))
        return
    if is_op(node, "Gather") and constant_value(node.inputs[0]) is not None and node.attributes.get_int("axis", 0) == 0:
        table = constant_value(node.inputs[0])
        _centred(table, f"the table of {node.name}")
        plan.cuts.append(Cut(node, 0, table[..., :-1]))
        return
    if is_op(node, "Slice") and constant_value(node.inputs[0]) is not None:
        table = constant_value(node.inputs[0])
        axes = folded_value(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if axes is None or any(int(a) % table.ndim == table.ndim - 1 for a in axes.reshape(-1)):
            raise Refuse(f"Slice {node.name} may slice the hidden axis")
        _centred(table, f"the table sliced by {node.name}")
        plan.cuts.append(Cut(node, 0, table[..., :-1]))
        return
    if _recentring(node):  # x - mean(x): zero-mean by construction; a Slice after it cuts it
        plan.slices.append(value)
        return
    if is_op(node, "Cast", "Identity"):  # elementwise: the cut commutes with it
        _through(node.inputs[0], node, d, plan)
        return
    if is_op(node, "Reshape"):  # dynamo's view(B, T, d) of a Gemm's [B*T, d]
        _reshape_cut(node, d, plan)
        _through(node.inputs[0], node, d, plan)
        return
    if is_op(node, "Mul"):
        consts = [constant_value(v) for v in node.inputs]
        if sum(c is not None for c in consts) == 1 and next(c for c in consts if c is not None).size == 1:
            _through(next(v for v, c in zip(node.inputs, consts) if c is None), node, d, plan)
            return
    raise Refuse(f"{node.op_type} {node.name} writes into the stream: not a cut CRMS can make")


def _recentring(node: ir.Node) -> bool:
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
    return axes is not None and len(axes) == 1 and (axes[0] == -1 or (r is not None and axes[0] == len(r) - 1)) \
        and mean.attributes.get_int("keepdims", 1) == 1


def _reshape_cut(node: ir.Node, d: int, plan: CRMSPlan) -> None:
    """A Reshape keeping the hidden axis last, of size d: its target's last entry becomes d-1
    (a constant target, or the constant last piece of a Concat that builds it)."""
    source = node.inputs[0].shape
    if source is None or not len(source) or source[-1] != d:
        raise Refuse(f"Reshape {node.name} does not keep the hidden axis last")
    plan.reshapes.add(node)
    target = constant_value(node.inputs[1])
    if target is not None:
        if int(target[-1]) != d:
            raise Refuse(f"Reshape {node.name} does not keep the hidden axis last")
        plan.cuts.append(Cut(node, 1, np.concatenate([target[:-1], [d - 1]]).astype(target.dtype)))
        return
    concat = node.inputs[1].producer()
    piece = constant_value(concat.inputs[-1]) if is_op(concat, "Concat") else None
    if piece is None or piece.reshape(-1).tolist() != [d]:
        raise Refuse(f"Reshape {node.name}'s target shape is computed: its hidden size is not a constant to cut")
    plan.cuts.append(Cut(concat, len(concat.inputs) - 1, np.array([d - 1], piece.dtype)))
    plan.shapes.append(node.inputs[1])


def _shape_readers(value: ir.Value, plan: CRMSPlan) -> None:
    """Shape nodes reading `value`, which is cut: their last entry gets d back (TorchScript's
    `b, n, d = x.shape` must keep computing with d). Size would need numel: refused."""
    for node in readers(value):
        if is_op(node, "Size"):
            raise Refuse(f"Size {node.name} reads '{value.name}', which is cut")
        if is_op(node, "Shape"):
            if value.shape is None:
                raise Refuse(f"Shape {node.name} reads '{value.name}', whose rank is unknown")
            plan.shape_reads.append(node)


def _through(value: ir.Value, reader: ir.Node, d: int, plan: CRMSPlan) -> None:
    if sole_reader(value, numbers_only=True) is not reader:
        raise Refuse(f"'{value.name}' is read elsewhere too: cutting it would change what that reads")
    _shape_readers(value, plan)
    plan.carried.append(value)
    _writer(value, d, plan)


def _norm(match: NormMatch, plan: CRMSPlan) -> None:
    where = match.where()
    if match.kind != "rmsnorm":
        raise Refuse(f"the {match.kind} at {where} reads the stream (only RMSNorms become CRMSNorm)")
    if match.axis not in (-1, None):
        raise Refuse(f"the RMSNorm at {where} normalizes more than the last axis")
    if match.compute_dtype not in (None, "FLOAT") or (match.input.dtype not in (None, ir.DataType.FLOAT)):
        raise Refuse(f"the RMSNorm at {where} is not float32 (fp16 CRMSNorm is not built yet)")
    gamma = np.ones(plan.d) if match.scale is None else folded_value(match.scale)
    if gamma is None or gamma.size not in (1, plan.d):
        raise Refuse(f"the RMSNorm at {where} has no constant per-entry scale")
    gamma = np.broadcast_to(gamma.astype(np.float64).reshape(-1), (plan.d,))
    out, beta, add = match.output, None, sole_reader(match.output, numbers_only=True)
    consts = [constant_value(v) for v in add.inputs] if is_op(add, "Add") else []
    if sum(c is not None for c in consts) == 1:  # the LayerNorm's beta, left as an Add
        beta = next(c for c in consts if c is not None)
        if beta.size not in (1, plan.d) or beta.ndim > 1 and any(d != 1 for d in beta.shape[:-1]):
            raise Refuse(f"Add {add.name} after the RMSNorm at {where} adds no per-entry constant")
        beta = np.broadcast_to(beta.astype(np.float64).reshape(-1), (plan.d,))
        out = add.outputs[0]
    else:
        add = None
    if out.is_graph_output():
        raise Refuse(f"the RMSNorm at {where} is a graph output")
    plan.affines[id(match)] = Affine(gamma, beta, add)
    found = []
    for node in _through_carriers(out, plan):
        w = folded_value(node.inputs[1]) if is_op(node, "MatMul", "Gemm") and len(node.inputs) > 1 else None
        if w is None or node.inputs[0].producer() not in (out.producer(), *plan.carriers) or w.ndim != 2 or (
                is_op(node, "Gemm") and node.attributes.get_int("transA", 0)):
            raise Refuse(f"{node.op_type} {node.name} reads the RMSNorm at {where}: only MatMul / Gemm with a "
                         "constant weight can take its last entry")
        trans_b = is_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
        if (w.shape[1] if trans_b else w.shape[0]) != plan.d:
            raise Refuse(f"{node.op_type} {node.name}'s weight does not have the hidden size on its input axis")
        found.append(Reader(node, trans_b))
    plan.norms.append(match)
    plan.readers[id(match)] = found


def _through_carriers(value: ir.Value, plan: CRMSPlan) -> list[ir.Node]:
    """The nodes reading `value`, through Reshapes that keep the hidden axis last (dynamo's
    view(-1, d) before a Gemm), whose targets are then cut too."""
    out = []
    _shape_readers(value, plan)
    for node in readers(value, numbers_only=True):
        if is_op(node, "Reshape") and not node.outputs[0].is_graph_output():
            _reshape_cut(node, plan.d, plan)
            plan.carriers.append(node)
            plan.carried.append(node.outputs[0])
            _shape_readers(node.outputs[0], plan)
            out += readers(node.outputs[0], numbers_only=True)
        else:
            out.append(node)
    return out


def plan_stream(analysis: StreamAnalysis, graph: ir.Graph) -> CRMSPlan | str:
    """The CRMS plan of the graph's residual stream, or why there is none."""
    if analysis.architecture != "pre-rmsnorm":
        return f"the stream is {analysis.architecture}, not Pre-RMSNorm (run preln-to-rmsnorm first)"
    stream = list(dict.fromkeys([*analysis.initial, *(r.node.outputs[0] for r in analysis.residual_adds)]))
    shape = stream[0].shape
    d = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(d, int) or d < 2:
        return "the stream's hidden size is not static"
    plan = CRMSPlan(d, stream)
    adds = {r.node for r in analysis.residual_adds}
    try:
        norms = {n.nodes[0]: n for r in analysis.residual_adds for n in r.pre} | {
            n.nodes[0]: n for n in analysis.final_norms}
        members = {node for n in norms.values() for node in n.nodes}
        for value in stream:
            if value.is_graph_output():
                raise Refuse(f"the stream value '{value.name}' is a graph output")
            _shape_readers(value, plan)
            for node in readers(value, numbers_only=True):
                if node not in adds and node not in members:
                    raise Refuse(f"{node.op_type} {node.name} reads the stream value '{value.name}'")
        for value in analysis.initial:
            _writer(value, d, plan)
        for r in analysis.residual_adds:
            if sole_reader(r.branch, numbers_only=True) is not r.node:
                raise Refuse(f"the branch output '{r.branch.name}' is read elsewhere too")
            _shape_readers(r.branch, plan)
            plan.carried.append(r.branch)
            _writer(r.branch, d, plan)
        for match in norms.values():
            _norm(match, plan)
        for value in plan.shapes:
            for node in readers(value):
                if node not in plan.reshapes:
                    raise Refuse(f"the shape '{value.name}' is read by {node.op_type} {node.name} too, which keeps d")
    except Refuse as exc:
        return str(exc)
    return plan
