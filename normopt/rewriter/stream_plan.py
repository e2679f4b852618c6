"""Planning the recentring of a Pre-LN residual stream (analysis only: nothing is edited).

The stream becomes zero-mean along its hidden axis (the last) when its initial value and every
branch written into it are (docs/rewrites.md, section 1). `Planner` works out, without editing:
  - which norms read the stream and become RMSNorms (each must normalize the hidden axis alone:
    centring shifts every token by its own mean, which a norm over more axes would see), and
    whether each one's beta folds into the linear ops reading it;
  - which constants to centre so that a writer writes zero-mean values: the linear op's weight
    along its output axis and its bias, embedding tables, positional constants, a patch Conv;
    a LayerScale `Mul` on the way is folded into them first;
  - every value whose numbers the centring changes has no reader but the path to the stream
    (else that reader would see the change), and no stream value is read by anything that is
    not mean-blind or that does not carry zero-mean on.
Each writer is planned into a fresh `StreamRewrite` that the caller merges only when it
succeeds, so a refused writer leaves nothing of itself behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import folded_value, forwards, int_list, is_op, rank, readers, static_shape
from normopt.rewriter.linear_fold import bias_add_after, fold_problem
from normopt.rewriter.norms import NormMatch

MAX_DEPTH = 64


class Refuse(Exception):
    """A precondition failed: the message is the reason a user reads."""


@dataclass
class Conversion:
    """A stream LayerNorm that becomes an RMSNorm. `beta_readers`: the linear ops (each with
    its bias Add, if any) that take the beta, or empty when the beta stays an Add."""

    match: NormMatch
    beta_readers: list[tuple[ir.Node, ir.Node | None]] = field(default_factory=list)


@dataclass
class StreamRewrite:
    conversions: list[Conversion] = field(default_factory=list)
    centred: dict[tuple[ir.Node, int], int] = field(default_factory=dict)  # (node, input) -> axis
    scaled: dict[tuple[ir.Node, int], np.ndarray] = field(default_factory=dict)  # LayerScale folded in first
    layerscales: list[ir.Node] = field(default_factory=list)  # Muls removed once folded
    recentred: list[tuple[ir.Value, str]] = field(default_factory=list)  # explicit x - mean(x), and why

    def merge(self, other: StreamRewrite) -> None:
        self.conversions += other.conversions
        self.centred.update(other.centred)
        self.scaled.update(other.scaled)
        self.layerscales += other.layerscales
        self.recentred += other.recentred

    def describe(self) -> str:
        betas = sum(1 for c in self.conversions if c.beta_readers)
        parts = [f"convert {len(self.conversions)} LayerNorm(s) to RMSNorm",
                 f"centre {len(self.centred)} writer weight(s)"]
        if self.layerscales:
            parts.append(f"fold {len(self.layerscales)} LayerScale Mul(s) into their writers")
        if betas:
            parts.append(f"fold {betas} beta(s) into the linear ops reading them")
        parts += [f"recentre '{v.name}' explicitly ({why})" for v, why in self.recentred]
        return "; ".join(parts)


# --------------------------------------------------------------------------- hidden axis


def _sliced_axes(node: ir.Node) -> list[int] | None:
    """The axes a Slice slices (its `axes` input, by default the first len(starts))."""
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        return int_list(node, "", 3)
    starts = folded_value(node.inputs[1]) if len(node.inputs) > 1 else None
    return None if starts is None else list(range(starts.size))


def _hidden_through(node: ir.Node, out_axis: int) -> int:
    """The input axis that becomes `out_axis` (non-negative) of a shape-moving node's output,
    for ops that keep each output position's hidden vector a whole input hidden vector."""
    out_rank, in_rank = rank(node.outputs[0]), rank(node.inputs[0])
    if node.op_type in ("Cast", "Identity", "Expand", "Slice"):
        if out_rank is None or in_rank is None or out_rank != in_rank:
            raise Refuse(f"rank unknown around {node.op_type} {node.name}")
        if node.op_type == "Slice":
            axes = _sliced_axes(node)
            if axes is None or any(a % in_rank == out_axis for a in axes):
                raise Refuse(f"Slice {node.name} slices the hidden axis (or its axes are not constant)")
        return out_axis
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None) or tuple(reversed(range(out_rank or 0)))
        return perm[out_axis]
    if node.op_type in ("Reshape", "Flatten"):
        a, b = node.inputs[0].shape, node.outputs[0].shape
        if a is not None and b is not None and out_axis < len(a) and list(a[:out_axis + 1]) == list(b[:out_axis + 1]):
            return out_axis  # the prefix up to the hidden axis is untouched
        if a is not None and b is not None and out_axis == len(b) - 1 and a[-1] == b[-1] and isinstance(b[-1], int):
            return len(a) - 1  # the hidden size stays last
        raise Refuse(f"cannot tell where the hidden axis goes through {node.op_type} {node.name}")
    raise Refuse(f"unexpected {node.op_type}")


def keeps_hidden(node: ir.Node) -> bool:
    """Does `node` keep each token's hidden vector (the last axis) whole, so that a zero-mean
    stream stays zero-mean through it? Ops it does not know keep nothing."""
    r = rank(node.inputs[0])
    if is_op(node, "Cast", "Identity"):
        return True
    if r is None:
        return False
    last = r - 1
    if is_op(node, "Reshape"):
        a, b = node.inputs[0].shape, node.outputs[0].shape
        return a is not None and b is not None and isinstance(a[-1], int) and a[-1] == b[-1]
    if is_op(node, "Transpose"):
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == last
    if is_op(node, "Gather"):
        return node.attributes.get_int("axis", 0) % r != last
    if is_op(node, "Slice"):
        axes = _sliced_axes(node)
        return axes is not None and all(a % r != last for a in axes)
    if is_op(node, "Squeeze", "Unsqueeze", "ReduceMean"):
        axes = int_list(node, "axes", 1)
        if not axes:  # none given: every axis (ReduceMean, Squeeze of all 1-dims)
            return False
        out_r = r + len(axes) if node.op_type == "Unsqueeze" else r
        return all(a % out_r != out_r - 1 for a in axes)
    return False


def _broadcasts_over_last(array: np.ndarray) -> bool:
    """A constant that varies along the last axis alone (a per-hidden vector or a scalar)."""
    return all(d == 1 for d in array.shape[:-1])


# ------------------------------------------------------------------------------ planner


class Planner:
    def __init__(self, norms: list[NormMatch], allow_hidden: bool) -> None:
        self.allow_hidden = allow_hidden
        self.changed_outputs: list[str] = []
        self.norm_of = {n: m for m in norms if m.kind in ("layernorm", "rmsnorm") for n in m.nodes}

    # ------------------------------------------------------------------ readers of the stream
    def readers(self, starts: list[ir.Value], adds: set[ir.Node]) -> StreamRewrite:
        """Check every reader of every stream value (following carriers); the LayerNorms
        that read the stream become the plan's conversions."""
        plan, queue, seen, converted = StreamRewrite(), list(starts), set(), set()
        while queue:
            value = queue.pop()
            if value in seen:
                continue
            seen.add(value)
            if value.is_graph_output():
                if not self.allow_hidden:
                    raise Refuse(f"stream value '{value.name}' is a graph output: its hidden states would "
                                 "change (pass --allow-hidden-state-change to accept that)")
                self.changed_outputs.append(value.name)
            for node in readers(value, numbers_only=True):  # shape/dtype-only readers see no change
                if node in adds:
                    continue
                match = self.norm_of.get(node)
                if match is not None and match.input is value:
                    self._check_norm(match)
                    if id(match) not in converted:
                        converted.add(id(match))
                        plan.conversions.append(Conversion(match, self._beta_readers(match)))
                    continue
                if (forwards(node, "value", "reshape", "move") or is_op(node, "ReduceMean")) and \
                        node.inputs[0] is value and value not in node.inputs[1:] and keeps_hidden(node):
                    queue.extend(node.outputs[:1])
                    continue
                raise Refuse(f"{node.op_type} {node.name} reads stream value '{value.name}' and would see "
                             "the recentred values (not shift-invariant)")
        return plan

    @staticmethod
    def _check_norm(match: NormMatch) -> None:
        where = match.where()
        if match.kind != "layernorm":
            raise Refuse(f"{match.kind} {where} reads the stream (mixed norms)")
        if match.form == "op" and not is_op(match.nodes[0], "LayerNormalization"):
            raise Refuse(f"{match.nodes[0].op_type} {where} reads the stream (a fused op normopt does not convert)")
        if match.axis != -1:
            raise Refuse(f"LayerNorm {where} normalizes the last {match.normalized_axes} axes, not the hidden "
                         "axis alone: it would see each token's own shift")
        if match.form == "op" and any(o.uses() or o.is_graph_output() for o in match.nodes[0].outputs[1:]):
            raise Refuse(f"LayerNormalization {where}'s Mean/InvStdDev outputs are read")

    @staticmethod
    def _beta_readers(match: NormMatch) -> list[tuple[ir.Node, ir.Node | None]]:
        """The linear ops that can take this norm's beta (y = z + beta; y W + b = z W + (b +
        beta W)), or [] when it stays an Add: it must be a constant per-hidden vector, and
        every reader of y (through Reshapes that keep the hidden size) a MatMul with a 2-D
        constant weight or a Gemm without transA, reading y as its data."""
        beta = folded_value(match.bias)
        if beta is None or not _broadcasts_over_last(beta) or not np.any(beta != 0):
            return []
        if match.form == "op":
            y = match.output
        else:
            add = next((n for n in match.nodes if is_op(n, "Add") and match.bias in n.inputs), None)
            if add is None:
                return []
            y = add.outputs[0]
        found, stack = [], [y]
        while stack:
            value = stack.pop()
            if value.is_graph_output():
                return []
            for node in readers(value, numbers_only=True):
                if is_op(node, "Reshape") and node.inputs[0] is value and keeps_hidden(node):
                    stack.append(node.outputs[0])
                elif is_op(node, "MatMul", "Gemm") and fold_problem(node, value, beta.size, input_side=True) is None:
                    found.append((node, bias_add_after(node)))
                else:
                    return []
        return found

    # ----------------------------------------------------------------------------- writers
    def writer(self, value: ir.Value, reader: ir.Node | None = None) -> StreamRewrite:
        """A fresh plan centring everything that writes `value` (a branch output read by
        `reader`, its residual Add, or an initial stream value) along its hidden axis."""
        if reader is not None and (value.is_graph_output() or readers(value, numbers_only=True) != [reader]):
            raise Refuse(f"'{value.name}' is read by other nodes too (they would see the centring)")
        plan = StreamRewrite()
        self._centre_writer(plan, value, None, 0, None)
        return plan

    def _recurse(self, plan: StreamRewrite, node: ir.Node, value: ir.Value, hidden: int | None, depth: int,
                 scale: np.ndarray | None) -> None:
        """Centre the writer of `value`, an input of `node`, which must be its only reader."""
        if value.is_graph_output() or readers(value, numbers_only=True) != [node]:
            raise Refuse(f"'{value.name}' is read by other nodes too (they would see the centring)")
        self._centre_writer(plan, value, hidden, depth + 1, scale)

    def _centre_writer(self, plan: StreamRewrite, value: ir.Value, hidden: int | None, depth: int,
                       scale: np.ndarray | None) -> None:
        """Plan centring of what writes `value` along its (non-negative) `hidden` axis, the
        last when None. `scale`: a LayerScale vector folded into the linear writers first."""
        node = value.producer()
        r = rank(value)
        if node is None:
            raise Refuse(f"'{value.name}' is a graph input")
        if r is None:
            raise Refuse(f"the rank of '{value.name}' is unknown")
        if depth > MAX_DEPTH:
            raise Refuse(f"'{value.name}' is written by a chain too deep to follow")
        hidden = r - 1 if hidden is None else hidden
        op, last = node.op_type, hidden == r - 1
        if not is_op(node, op):
            raise Refuse(f"{node.domain}::{op} {node.name} writes '{value.name}'")
        if op in ("Add", "Sub", "Concat"):
            if op == "Concat" and node.attributes.get_int("axis", 0) % r == hidden:
                raise Refuse(f"Concat {node.name} joins pieces along the hidden axis")
            for i, v in enumerate(node.inputs):
                if folded_value(v) is not None:
                    self._centre(plan, scale, node, i, hidden - r)
                    continue
                rv = rank(v)
                if rv is None or rv < r - hidden:
                    raise Refuse(f"'{v.name}' is added along the whole hidden axis of '{value.name}' (or its rank is unknown)")
                self._recurse(plan, node, v, rv - (r - hidden), depth, scale)
            return
        weight = folded_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if op == "MatMul" and weight is not None and weight.ndim >= 2 and last:
            self._centre(plan, scale, node, 1, -1)
            return
        if op == "Gemm" and weight is not None and last:
            self._centre(plan, scale, node, 1, 0 if node.attributes.get_int("transB", 0) else -1)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._centre(plan, scale, node, 2, -1)
            return
        if op == "Conv" and weight is not None and hidden == 1:  # output channels
            if node.attributes.get_int("group", 1) != 1:
                raise Refuse(f"grouped Conv {node.name} writes '{value.name}': its output channels read different inputs")
            self._centre(plan, scale, node, 1, 0)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._centre(plan, scale, node, 2, -1)
            return
        table = folded_value(node.inputs[0]) if node.inputs else None
        if op == "Gather" and node.attributes.get_int("axis", 0) == 0 and table is not None and table.ndim >= 2 and last:
            shared = node.inputs[0]
            if len(readers(shared)) > 1 or shared.is_graph_output():
                raise Refuse(f"embedding table '{shared.name}' is shared (tied LM head?)")
            self._centre(plan, scale, node, 0, -1)
            return
        if op == "Mul" and last and scale is None and self._layerscale(plan, node, value, depth):
            return
        if op in ("Cast", "Identity", "Expand", "Slice", "Transpose", "Reshape", "Flatten"):
            axis = _hidden_through(node, hidden)
            if folded_value(node.inputs[0]) is not None:
                self._centre(plan, scale, node, 0, axis - rank(node.inputs[0]))
            else:
                self._recurse(plan, node, node.inputs[0], axis, depth, scale)
            return
        raise Refuse(f"{op} {node.name} writes '{value.name}' and is not a linear op with constant weights")

    def _layerscale(self, plan: StreamRewrite, node: ir.Node, value: ir.Value, depth: int) -> bool:
        """LayerScale `z * g` (g constant, a scalar or one entry per hidden channel, shaped so
        that the product has z's shape): fold g into z's writers, then drop the Mul."""
        constant = [folded_value(v) is not None for v in node.inputs]
        if constant.count(True) != 1 or value.is_graph_output():
            return False
        g = folded_value(node.inputs[constant.index(True)])
        z = node.inputs[constant.index(False)]
        z_shape, rz = static_shape(z), rank(z)
        if rz is None or g.ndim > rz or not _broadcasts_over_last(g.reshape((1,) * (rz - g.ndim) + g.shape)):
            return False
        if g.size > 1 and (z_shape is None or z_shape[-1] != g.size):
            return False
        self._recurse(plan, node, z, None, depth, g.astype(np.float64).reshape(-1))
        plan.layerscales.append(node)
        return True

    @staticmethod
    def _centre(plan: StreamRewrite, scale: np.ndarray | None, node: ir.Node, index: int, axis: int) -> None:
        """Plan centring of a constant input along `axis` (negative: counted from its end)."""
        array = folded_value(node.inputs[index])
        if array.ndim < -axis or array.shape[axis] == 1:  # broadcast along the hidden axis
            if np.all(array == 0):
                return
            raise Refuse(f"constant '{node.inputs[index].name}' is added along the whole hidden axis")
        plan.centred[(node, index)] = axis
        if scale is not None:
            if scale.size not in (1, array.shape[axis]):
                raise Refuse(f"LayerScale of {scale.size} channels meets '{node.inputs[index].name}'")
            plan.scaled[(node, index)] = scale
