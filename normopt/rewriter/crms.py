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

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter import numerics
from normopt.rewriter.graph import (
    constant_shape,
    constant_value,
    folded_value,
    forwards,
    int_list,
    is_op,
    rank,
    readers,
    sole_reader,
    static_shape,
)
from normopt.rewriter.norms import NormMatch
from normopt.rewriter.stream import StreamAnalysis
from normopt.rewriter.stream_plan import Refuse, hidden_through

# a row sums to 0 within this fraction of its absolute sum: its entries were centred in float64,
# then each rounded to the dtype (at most half an ulp: 2^-24, 2^-11 of its size), with margin
CENTRED = {np.dtype(np.float32): 1e-4, np.dtype(np.float16): 1e-3}


@dataclass
class Cut:
    node: ir.Node
    index: int  # the input holding the constant
    new: np.ndarray  # its values once cut (a table's first d-1 columns, a shape's d -> d-1)


@dataclass
class Reader:
    node: ir.Node  # MatMul / Gemm reading a norm's output as input 0
    trans_b: bool  # a Gemm's weight is [out, d]

    def weight(self, current: np.ndarray, gamma: np.ndarray) -> np.ndarray:
        """W' from the weight as it is now (a writer's cut may have cut its columns) and the
        norm's gamma, in float64, rounded once: g_i W[i] - g_{d-1} W[d-1] (i < d-1)."""
        w = (current.T if self.trans_b else current).astype(np.float64) * gamma[:, None]
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
    affines: dict[int, Affine] = field(
        default_factory=dict
    )  # id(norm) -> its gamma and beta, folded into its readers
    # values between writers and the stream, norms and readers, with their hidden axis (None: last)
    carried: list[tuple[ir.Value, int | None]] = field(default_factory=list)
    shapes: list[ir.Value] = field(
        default_factory=list
    )  # computed Reshape targets with a piece cut
    carriers: list[ir.Node] = field(default_factory=list)  # Reshapes between a norm and its readers
    reshapes: set[ir.Node] = field(default_factory=set)  # every Reshape carrying a cut value
    slices: list[ir.Value] = field(
        default_factory=list
    )  # explicit recentrings: a Slice to d-1 after each
    # float16: each norm outputs the whole d-vector [y', -sum(y')] (computed in float32) and its
    # readers keep their weights: folding W[:d-1] - W[d-1] would round every fp16 weight again
    # (measured: 1.1x to 4.6x the fp16 model's error against float32 on the corpus)
    whole: bool = False
    shape_reads: list[tuple[ir.Node, int]] = field(
        default_factory=list
    )  # Shape nodes reading a cut value (and its hidden axis): d restored there
    own_shapes: set[ir.Node] = field(
        default_factory=set
    )  # ... except those building that value's own Reshape target
    expands: list[tuple[ir.Node, int]] = field(
        default_factory=list
    )  # Expands whose computed shape gets 1 at this entry
    exposed: list[ir.Value] = field(
        default_factory=list
    )  # stream values that are graph outputs, output whole: x' and -sum(x')
    exposed_norms: dict[int, list[ir.Value]] = field(
        default_factory=dict
    )  # id(norm) -> its graph outputs (its own, a Reshape's), output whole
    follows: list[tuple[ir.Value, int, ir.Node]] = field(
        default_factory=list
    )  # (value, axis, Shape): a target entry read from a value that must be cut there

    def describe(self) -> str:
        return (
            f"a stream of width {self.d} -> {self.d - 1}: {len(self.norms)} norm(s), "
            f"{len(self.cuts)} constant(s) cut"
        )


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
    node, r = value.producer(), rank(value)
    if node is None:
        raise Refuse(f"'{value.name}' (written into the stream) is a graph input")
    if r is None:
        raise Refuse(f"the rank of '{value.name}' (written into the stream) is unknown")
    hidden = r - 1 if hidden is None else hidden
    last, op = hidden == r - 1, node.op_type
    if last and _recentring(
        node
    ):  # x - mean(x): zero-mean by construction; a Slice after it cuts it
        plan.slices.append(value)
        return
    if is_op(node, "Add", "Concat"):
        if op == "Concat" and node.attributes.get_int("axis", 0) % r == hidden:
            raise Refuse(f"Concat {node.name} joins pieces along the hidden axis")
        done = set()
        for i, v in enumerate(node.inputs):
            if constant_shape(v) is not None:
                _constant(node, i, hidden - r, plan, f"the constant '{v.name}' of {op} {node.name}")
            elif v not in done:
                done.add(v)
                rv = rank(v)
                if rv is None or rv < r - hidden:
                    raise Refuse(
                        f"'{v.name}' is added along the whole hidden axis of '{value.name}' (or "
                        "its rank is unknown)"
                    )
                _through(v, node, rv - (r - hidden), plan)
        return
    weight = constant_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if op == "MatMul" and last and weight is not None and len(weight) == 2:
        _constant(node, 1, -1, plan, f"the weight of {node.name}")
        return
    if op == "Gemm" and last and weight is not None:
        _constant(
            node,
            1,
            -2 if node.attributes.get_int("transB", 0) else -1,
            plan,
            f"the weight of {node.name}",
        )
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _constant(node, 2, -1, plan, f"the bias of {node.name}")
        return
    if op == "Conv" and hidden == 1 and weight is not None:  # output channels
        if node.attributes.get_int("group", 1) != 1:
            raise Refuse(
                f"grouped Conv {node.name} writes into the stream: cutting a channel changes its "
                "groups"
            )
        _constant(node, 1, -len(weight), plan, f"the weight of {node.name}")
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            _constant(node, 2, -1, plan, f"the bias of {node.name}")
        return
    if (
        op == "Gather"
        and last
        and node.attributes.get_int("axis", 0) == 0
        and constant_shape(node.inputs[0])
    ):
        _constant(node, 0, -1, plan, f"the table of {node.name}")
        return
    if (
        op == "Mul"
        and [
            constant_shape(v) is not None and folded_value(v).size == 1 for v in node.inputs
        ].count(True)
        == 1
    ):
        scaled = next(
            v for v in node.inputs if constant_shape(v) is None
        )  # a scalar scale commutes with the cut
        _through(
            scaled, node, hidden - r + rank(scaled) if rank(scaled) is not None else None, plan
        )
        return
    if op in ("Cast", "Identity", "Expand", "Slice", "Transpose", "Reshape"):
        axis = hidden_through(node, hidden)
        if op == "Reshape":
            _reshape(node, hidden, axis, plan)
        if op == "Expand":
            _expand(node, hidden, plan)
        if constant_shape(node.inputs[0]) is not None:
            _constant(
                node,
                0,
                axis - rank(node.inputs[0]),
                plan,
                f"the constant '{node.inputs[0].name}' of {node.name}",
            )
        else:
            _through(node.inputs[0], node, axis, plan)
        return
    raise Refuse(f"{op} {node.name} writes into the stream: not a cut CRMS can make")


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
    return (
        axes is not None
        and len(axes) == 1
        and (axes[0] == -1 or (r is not None and axes[0] == len(r) - 1))
        and mean.attributes.get_int("keepdims", 1) == 1
    )


def _entry(
    node: ir.Node, entry: int, out_hidden: int, in_hidden: int, d: int, what: str
) -> int | None:
    """What a Reshape target's entry at the hidden axis becomes once cut (None: it follows the
    cut by itself: -1 infers d-1, 0 copies the input's d-1), or Refuse."""
    if entry == -1 or (
        entry == 0 and out_hidden == in_hidden and not node.attributes.get_int("allowzero", 0)
    ):
        return None
    if entry != d:
        raise Refuse(f"{what} gives the hidden axis {entry} entries, not its size {d}")
    return entry - 1


def _reshape(node: ir.Node, out_hidden: int, in_hidden: int, plan: CRMSPlan) -> None:
    """A Reshape carrying the hidden axis (in_hidden -> out_hidden): its target's entry there
    must follow the cut: a constant d becomes d-1 (the target, or the constant piece of the
    Concat that builds it), -1 and 0 follow by themselves, and so does an entry read from the
    input's own shape at its hidden axis (TorchScript's `x.view(-1, x.size(-1))`)."""
    plan.reshapes.add(node)
    target = folded_value(node.inputs[1])
    if target is not None:
        if target.ndim != 1 or target.size <= out_hidden:
            raise Refuse(f"Reshape {node.name}'s target does not reach the hidden axis")
        new = _entry(
            node,
            int(target[out_hidden]),
            out_hidden,
            in_hidden,
            plan.d,
            f"Reshape {node.name}'s target",
        )
        if new is not None:
            plan.cuts.append(
                Cut(
                    node,
                    1,
                    np.concatenate([target[:out_hidden], [new], target[out_hidden + 1 :]]).astype(
                        target.dtype
                    ),
                )
            )
        return
    concat, offset = node.inputs[1].producer(), 0
    if not is_op(concat, "Concat"):
        raise Refuse(
            f"Reshape {node.name}'s target shape is computed: its hidden size is not a constant to "
            "cut"
        )
    for index, piece in enumerate(concat.inputs):  # noqa: B007 (both read after the loop)
        size = static_shape(piece)
        if size is None or len(size) != 1:
            raise Refuse(f"Reshape {node.name}'s target is built from pieces of unknown length")
        if offset + size[0] > out_hidden:
            break
        offset += size[0]
    k = out_hidden - offset
    array = folded_value(piece)
    if array is not None:
        new = _entry(
            node, int(array[k]), out_hidden, in_hidden, plan.d, f"Reshape {node.name}'s target"
        )
        if new is not None:
            plan.cuts.append(
                Cut(
                    concat,
                    index,
                    np.concatenate([array[:k], [new], array[k + 1 :]]).astype(array.dtype),
                )
            )
            plan.shapes.append(node.inputs[1])
        return
    shape = _own_dim(piece, k, node.inputs[0], in_hidden, concat, plan)
    if shape is None:
        raise Refuse(
            f"Reshape {node.name}'s target shape is computed: its hidden size is not a constant to "
            "cut"
        )
    plan.own_shapes.add(shape)


def _own_dim(
    piece: ir.Value, k: int, x: ir.Value, hidden: int, concat: ir.Node, plan: CRMSPlan
) -> ir.Node | None:
    """The Shape node when entry k of `piece` is x's size along its hidden axis, read by a
    chain used only to build this target (Shape(x) sliced or gathered, a one-entry piece
    squeezed and unsqueezed on the way: TorchScript's `x.size(-1)`); that size is cut with x,
    as it must be."""
    node, chain = piece.producer(), []
    while is_op(node, "Unsqueeze", "Squeeze"):
        chain.append(node)
        node = node.inputs[0].producer()
    if is_op(node, "Gather") and node.attributes.get_int("axis", 0) == 0:
        index = folded_value(node.inputs[1])
        at = None if index is None or index.size != 1 else int(index.reshape(-1)[0])
    elif is_op(node, "Slice"):
        starts, steps = folded_value(node.inputs[1]), int_list(node, "", 4)
        at = (
            None
            if starts is None or starts.size != 1 or steps not in (None, [1])
            else int(starts[0]) + k
        )
    else:
        return None
    chain.append(node)
    shape = node.inputs[0].producer()
    if (
        at is None
        or not is_op(shape, "Shape")
        or shape.attributes.get_int("start", 0) != 0
        or "end" in shape.attributes
    ):
        return None
    for link, reader in zip([shape, *reversed(chain)], [*reversed(chain), concat]):
        if readers(link.outputs[0]) != [reader] or link.outputs[0].is_graph_output():
            return None
    y, r = shape.inputs[0], rank(shape.inputs[0])
    if r is None or (y is x and at % r != hidden):
        return None
    if (
        y is not x
    ):  # another value's size (GPT-2 keeps the embeddings' x.size(-1)): it must be cut there too
        plan.follows.append((y, at % r, shape))
    return shape


def _expand(node: ir.Node, out_hidden: int, plan: CRMSPlan) -> None:
    """Expand(x, s): s's entry at the hidden axis is 1 or d (x has d there); once x has d-1 it
    must be 1: a constant entry d is cut to 1, a computed one is set to 1 in the graph."""
    size = static_shape(node.inputs[1])
    out_rank = rank(node.outputs[0])
    if size is None or out_rank is None:
        raise Refuse(f"Expand {node.name}'s shape has an unknown length")
    k = out_hidden - (out_rank - size[0])
    if k < 0:
        return
    target = folded_value(node.inputs[1])
    if target is None:
        plan.expands.append((node, k))
    elif int(target[k]) != 1:
        plan.cuts.append(
            Cut(node, 1, np.concatenate([target[:k], [1], target[k + 1 :]]).astype(target.dtype))
        )


def _shape_readers(value: ir.Value, hidden: int | None, plan: CRMSPlan) -> None:
    """Shape nodes reading `value`, which is cut: their entry at the hidden axis gets d back
    (TorchScript's `b, n, d = x.shape` must keep computing with d), unless the shape only
    builds the target of value's own Reshape (CRMSPlan.own_shapes). Size would need numel:
    refused."""
    for node in readers(value):
        if is_op(node, "Size"):
            raise Refuse(f"Size {node.name} reads '{value.name}', which is cut")
        if is_op(node, "Shape"):
            if value.shape is None:
                raise Refuse(f"Shape {node.name} reads '{value.name}', whose rank is unknown")
            plan.shape_reads.append((node, len(value.shape) - 1 if hidden is None else hidden))


def _through(value: ir.Value, reader: ir.Node, hidden: int | None, plan: CRMSPlan) -> None:
    if sole_reader(value, numbers_only=True) is not reader:
        raise Refuse(
            f"'{value.name}' is read elsewhere too: cutting it would change what that reads"
        )
    _shape_readers(value, hidden, plan)
    plan.carried.append((value, hidden))
    _writer(value, hidden, plan)


def _norm(match: NormMatch, plan: CRMSPlan) -> None:
    where = match.where()
    if match.kind != "rmsnorm":
        raise Refuse(
            f"the {match.kind} at {where} reads the stream (only RMSNorms become CRMSNorm)"
        )
    if match.axis not in (-1, None):
        raise Refuse(f"the RMSNorm at {where} normalizes more than the last axis")
    if match.input.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        raise Refuse(
            f"the RMSNorm at {where} reads {match.input.dtype}: CRMSNorm is built for float32 and "
            "float16"
        )
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
    if plan.whole and _shown(match.output):
        raise Refuse(
            f"the RMSNorm at {where} is (or is reshaped into) a graph output: in float16 its "
            "implied last entry, minus the sum "
            "of the others, carries all their rounding errors (CLIP's pooled output: 2.4x the fp16 "
            "model's "
            "error against float32)"
        )
    if plan.whole:  # the norm outputs [y', -sum(y')] * gamma: its readers stay as they are
        plan.affines[id(match)] = Affine(gamma, None, None)
        plan.readers[id(match)], plan.exposed_norms[id(match)] = [], []
        plan.norms.append(match)
        return
    plan.affines[id(match)] = Affine(gamma, beta, add)
    shown = plan.exposed_norms.setdefault(id(match), [])
    found = []
    for node in _through_carriers(out, plan, shown):
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
                f"{node.op_type} {node.name} reads the RMSNorm at {where}: only MatMul / Gemm with "
                "a "
                "constant weight can take its last entry"
            )
        trans_b = is_op(node, "Gemm") and bool(node.attributes.get_int("transB", 0))
        if (w.shape[1] if trans_b else w.shape[0]) != plan.d:
            raise Refuse(
                f"{node.op_type} {node.name}'s weight does not have the hidden size on its input "
                "axis"
            )
        found.append(Reader(node, trans_b))
    plan.norms.append(match)
    plan.readers[id(match)] = found


def _through_carriers(value: ir.Value, plan: CRMSPlan, shown: list[ir.Value]) -> list[ir.Node]:
    """The nodes reading `value`, through Reshapes that keep the hidden axis last (dynamo's
    view(-1, d) before a Gemm), whose targets are then cut too."""
    out = []
    if value.is_graph_output():  # y = [y', -sum(y')] (y is zero-mean as x is), then gamma and beta
        shown.append(value)
    _shape_readers(value, None, plan)
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
        _reshape(node, len(b) - 1, len(a) - 1, plan)
        return True
    return _selects_tokens(node, value)


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


def _selects_tokens(node: ir.Node, value: ir.Value) -> bool:
    """Gather / Slice along axes other than the last of `value`: each output hidden vector is a
    whole input one (a pooled token), still cut."""
    r = rank(value)
    if r is None or node.inputs[0] is not value:
        return False
    if is_op(node, "Gather"):
        return node.attributes.get_int("axis", 0) % r != r - 1
    if is_op(node, "Slice"):
        axes = (
            int_list(node, "", 3) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        )
        return axes is not None and all(a % r != r - 1 for a in axes)
    return False


def plan_stream(
    analysis: StreamAnalysis, found: list[NormMatch], allow_hidden_state_change: bool = False
) -> CRMSPlan | str:
    """The CRMS plan of the graph's residual stream (`found`: the graph's norms), or why there is
    none."""
    if analysis.architecture != "pre-rmsnorm":
        first = " (run preln-to-rmsnorm first)" if analysis.architecture == "pre-ln" else ""
        return f"the stream is {analysis.architecture}, not Pre-RMSNorm{first}"
    stream = list(
        dict.fromkeys([*analysis.initial, *(r.node.outputs[0] for r in analysis.residual_adds)])
    )
    shape = stream[0].shape
    d = shape[-1] if shape is not None and len(shape) else None
    if not isinstance(d, int) or d < 2:
        return "the stream's hidden size is not static"
    plan = CRMSPlan(d, stream)
    adds = {r.node for r in analysis.residual_adds}
    try:
        norms = {n.nodes[0]: n for r in analysis.residual_adds for n in r.pre} | {
            n.nodes[0]: n for n in analysis.final_norms
        }
        members = {node for n in norms.values() for node in n.nodes}
        pending = list(stream)
        # the stream, and what carries it on whole (OPT's reshape to (-1, d), CLIP's pooled token)
        while pending:
            value = pending.pop()
            if value.is_graph_output():
                if not allow_hidden_state_change:
                    raise Refuse(
                        f"the stream value '{value.name}' is a graph output "
                        "(--allow-hidden-state-change "
                        "outputs it whole: its d-1 entries and minus their sum)"
                    )
                plan.exposed.append(value)
            _shape_readers(value, None, plan)
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
                    raise Refuse(
                        f"{node.op_type} {node.name} reads the stream value '{value.name}'"
                    )
                plan.carried.append((node.outputs[0], None))
                pending.append(node.outputs[0])
        plan.whole = any(m.input.dtype != ir.DataType.FLOAT for m in norms.values())
        if plan.whole and plan.exposed:
            raise Refuse(
                f"the stream value '{plan.exposed[0].name}' is a graph output: in float16 its "
                "implied last "
                "entry, minus the sum of the others, carries all their rounding errors"
            )
        for value in analysis.initial:
            _writer(value, None, plan)
        for r in analysis.residual_adds:
            if sole_reader(r.branch, numbers_only=True) is not r.node:
                raise Refuse(f"the branch output '{r.branch.name}' is read elsewhere too")
            _shape_readers(r.branch, None, plan)
            plan.carried.append((r.branch, None))
            _writer(r.branch, None, plan)
        for match in norms.values():
            _norm(match, plan)
        cut = {
            v: len(v.shape) - 1 if axis is None else axis
            for v, axis in [*((v, None) for v in stream), *plan.carried]
            if v.shape is not None
        }
        for value, axis, shape in plan.follows:
            if cut.get(value) != axis:
                raise Refuse(
                    f"{shape.op_type} {shape.name} reads the size of '{value.name}', which is not "
                    "cut, into "
                    "a Reshape target of a cut value"
                )
        for value in plan.shapes:
            for node in readers(value):
                if node not in plan.reshapes:
                    raise Refuse(
                        f"the shape '{value.name}' is read by {node.op_type} {node.name} too, "
                        "which keeps d"
                    )
    except Refuse as exc:
        return str(exc)
    return plan
