"""Deciding, per LayerNorm, whether its input can be made zero-mean, and planning it
(analysis only: nothing is edited; docs/rewrites.md, section 1).

A recentring replaces a value x by x - mean(x) along its hidden axis (the last). A LayerNorm
over exactly that axis sees no change, and reads a zero-mean input: it is an RMSNorm. Every
other reader must be shown not to see the change:
  - Components. A merge (`merge_inputs`: Add/Sub, ops that keep each token's hidden vector
    whole, Concat along another axis) carries a recentring of its inputs on to its output, and
    its output is recentred exactly when all of its data inputs are. So the values linked by
    merges, starting from the LayerNorms' inputs, form components; every other reader of a
    component value blocks that value (a Concat along the hidden axis too: recentred apart,
    its pieces shift by different amounts, which a norm over the whole sees).
  - Regions. A blocked value keeps its numbers, and so does everything flowing into it; a merge
    whose output is not blocked but one of whose inputs is gets an explicit `x - ReduceMean(x)`
    after it (its own numbers stay; its readers read the recentred ones). What remains falls
    apart into regions, each recentred on its own.
  - Sources: the values of a region not written by a merge. Their writers are centred (a linear
    op's weight along its output axis and its bias, embedding tables, positional constants, a
    patch Conv; a LayerScale `Mul` is folded in first), each planned into a fresh
    `StreamRewrite` merged only when it succeeds; a writer that cannot be centred (an
    activation, a LayerNorm's affine output, a table shared with a tied head, a graph input)
    gets an explicit recentring instead.
  - Cost. An explicit recentring (a mean and a subtraction over the whole tensor) costs about
    as much as RECENTRING_COST conversions of a LayerNorm to an RMSNorm save (measured, ORT
    CPU: 1.1x to 7x by shape); a region is recentred only when it converts more LayerNorms
    than that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter import axis_rules, writers
from normopt.rewriter.graph import (
    Refuse,
    folded_value,
    is_op,
    rank,
    readers,
    static_shape,
)
from normopt.rewriter.linear_fold import bias_add_after, fold_problem
from normopt.rewriter.norm_match import NormMatch, is_skip
from normopt.rewriter.stream_regions import (
    Component,
    Region,
    component,
    merge_constants,
    regions,
)

# What an explicit recentring costs, in what converting one LayerNorm saves. Measured (ORT 1.32
# CPU, 2 threads, ops timed in a chain): save / recentring 0.9 at [2, 16, 64], 0.14 at
# [1, 128, 768], 0.41 at [8, 512, 128], 0.93 at [8, 512, 768]; Peri-LN (9 norms, 4 recentrings,
# 2 norms a region) measured 1.02x slower with one recentring worth one conversion.
RECENTRING_COST = 2


@dataclass
class Conversion:
    """A stream LayerNorm that becomes an RMSNorm. `beta_readers`: the linear ops (each with
    its bias Add, if any) that take the beta, or empty when the beta stays an Add."""

    match: NormMatch
    beta_readers: list[tuple[ir.Node, ir.Node | None]] = field(default_factory=list)


@dataclass
class StreamRewrite:
    conversions: list[Conversion] = field(default_factory=list)
    centred: dict[tuple[ir.Node, int], int | None] = field(
        default_factory=dict
    )  # (node, input) -> axis, None: zero
    scaled: dict[tuple[ir.Node, int], np.ndarray] = field(
        default_factory=dict
    )  # LayerScale folded in first
    layerscales: list[ir.Node] = field(default_factory=list)  # Muls removed once folded
    recentred: list[tuple[ir.Value, str]] = field(
        default_factory=list
    )  # explicit x - mean(x), and why
    kept: list[tuple[NormMatch, str]] = field(
        default_factory=list
    )  # LayerNorms left as they are, and why

    def merge(self, other: StreamRewrite) -> None:
        self.conversions += other.conversions
        self.centred.update(other.centred)
        self.scaled.update(other.scaled)
        self.layerscales += other.layerscales
        self.recentred += other.recentred
        self.kept += other.kept

    def describe(self) -> str:
        betas = sum(1 for c in self.conversions if c.beta_readers)
        parts = [
            f"convert {len(self.conversions)} LayerNorm(s) to RMSNorm",
            f"centre {len(self.centred)} writer weight(s)",
        ]
        if self.layerscales:
            parts.append(f"fold {len(self.layerscales)} LayerScale Mul(s) into their writers")
        if betas:
            parts.append(f"fold {betas} beta(s) into the linear ops reading them")
        parts += [f"recentre '{v.name}' explicitly ({why})" for v, why in self.recentred]
        return "; ".join(parts)


def _broadcasts_over_last(array: np.ndarray) -> bool:
    """A constant that varies along the last axis alone (a per-hidden vector or a scalar)."""
    return all(d == 1 for d in array.shape[:-1])


# ------------------------------------------------------------------------------ planner


def _has_bias(linear: ir.Node) -> bool:
    """A Gemm with its C input, or a MatMul with a constant bias Add right after it."""
    if is_op(linear, "Gemm"):
        return len(linear.inputs) > 2 and linear.inputs[2] is not None
    return bias_add_after(linear) is not None


class Planner:
    def __init__(
        self,
        norms: list[NormMatch],
        allow_hidden: bool,
        no_gain: Callable[[NormMatch], str | None] = lambda _m: None,
        recentring_cost: int | None = None,
    ) -> None:
        """`no_gain(norm)`: why converting that norm would not pay on the target (it then stays a
        LayerNorm, which a recentred input does not change, and buys no recentring);
        `recentring_cost`: an explicit recentring's price in conversions (None:
        RECENTRING_COST)."""
        self.allow_hidden = allow_hidden
        self.recentring_cost = RECENTRING_COST if recentring_cost is None else recentring_cost
        self.no_gain = no_gain
        self.norm_of = {n: m for m in norms if m.kind in ("layernorm", "rmsnorm") for n in m.nodes}

    regions = staticmethod(regions)

    def components(self, seeds: list[ir.Value]) -> list[Component]:
        """The components holding `seeds` (the inputs of the LayerNorms), each found once."""
        found: list[Component] = []
        seen: set[ir.Value] = set()
        for seed in seeds:
            if seed not in seen:
                found.append(
                    component(seed, seen, self.norm_of, self.allow_hidden, self.norm_problem)
                )
        return found

    def plan(self, region: Region) -> StreamRewrite | str:
        """A plan recentring the region and converting its LayerNorms, or why not: the
        explicit recentrings it needs cost more than converting its norms saves."""
        if not region.norms:
            return "no LayerNorm reads it"
        kept = {id(m): why for m in region.norms if (why := self.no_gain(m)) is not None}
        if len(kept) == len(region.norms):
            return next(iter(kept.values()))
        plan = StreamRewrite()
        # constants added into the region are centred with it (a converted Skip norm's too:
        # it normalizes input + skip + bias, all three in the region)
        fused = [m.nodes[0] for m in region.norms if is_skip(m.nodes[0])]
        try:
            for node in dict.fromkeys(region.merges + fused):
                for i in merge_constants(node):
                    _centre(plan, None, node, i, -1)
        except Refuse as exc:
            return str(exc)
        plan.recentred += list(region.starts.items())
        for source in region.sources():  # each in a plan of its own, merged only if it succeeds
            try:
                plan.merge(self.writer(source))
            except Refuse as exc:
                plan.recentred.append((source, str(exc)))
        gaining = [m for m in region.norms if id(m) not in kept]
        if self.recentring_cost * len(plan.recentred) >= len(gaining):
            why = "; ".join(f"'{v.name}': {reason}" for v, reason in plan.recentred[:2])
            return (
                f"{len(gaining)} LayerNorm(s) would need {len(plan.recentred)} explicit "
                "recentring(s), which cost more than converting them saves (a recentring costs "
                f"about {self.recentring_cost} conversions) ({why})"
            )
        plan.conversions = [Conversion(m, self._beta_readers(m)) for m in gaining]
        plan.kept = [(m, kept[id(m)]) for m in region.norms if id(m) in kept]
        return plan

    @staticmethod
    def norm_problem(match: NormMatch) -> str | None:
        """Why this norm cannot be converted (and sees a recentring of its input), or None."""
        where = match.where()
        if match.kind != "layernorm":
            return f"{match.kind} {where} is not shift-invariant (already an RMSNorm?)"
        node = match.nodes[0]
        if match.form == "op" and not (
            is_op(node, "LayerNormalization") or node.op_type == "SkipLayerNormalization"
        ):
            return f"{node.op_type} {where} is a fused op normopt does not convert"
        if match.axis != -1:
            return (
                f"LayerNorm {where} normalizes the last {match.normalized_axes} axes, not the "
                "hidden "
                "axis alone: it would see each token's own shift"
            )
        if match.form == "op" and any(o.uses() or o.is_graph_output() for o in node.outputs[1:3]):
            return f"{node.op_type} {where}'s Mean/InvStdDev outputs are read"
        return None

    @staticmethod
    def _beta_readers(match: NormMatch) -> list[tuple[ir.Node, ir.Node | None]]:
        """The linear ops that can take this norm's beta (y = z + beta; y W + b = z W + (b +
        beta W)), or [] when it stays an Add: it must be a constant per-hidden vector, and
        every reader of y (through Reshapes that keep the hidden size) a MatMul with a 2-D
        constant weight or a Gemm without transA, reading y as its data, and with a bias of
        its own. A reader without one would need a new Add as wide as its output (a tied LM
        head: 50257 wide, where the norm's Add is 768: GPT-2 124M 1.01x slower)."""
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
                if (
                    is_op(node, "Reshape")
                    and node.inputs[0] is value
                    and axis_rules.keeps_last(node)
                ):
                    stack.append(node.outputs[0])
                elif (
                    is_op(node, "MatMul", "Gemm")
                    and fold_problem(node, value, beta.size, input_side=True) is None
                    and _has_bias(node)
                ):
                    found.append((node, bias_add_after(node)))
                else:
                    return []
        return found

    # ----------------------------------------------------------------------------- writers
    def writer(self, value: ir.Value) -> StreamRewrite:
        """A fresh plan centring everything that writes `value` (a component's source, whose
        readers the component has checked) along its hidden axis."""
        plan = StreamRewrite()
        writers.walk(value, None, _Centring(plan, None))
        return plan


class _Centring:
    """The writer walk's leaves for preln-to-rmsnorm: constants centred along the hidden axis
    (normopt.rewriter.writers); `scale`: a LayerScale vector folded into the linear writers
    first."""

    combines = ("Add", "Sub", "Concat")
    where = ""
    through_scalars = False  # a scalar Mul is a LayerScale, folded into the writers

    def __init__(self, plan: StreamRewrite, scale: np.ndarray | None) -> None:
        self.plan, self.scale = plan, scale

    def special(self, node: ir.Node, value: ir.Value, hidden: int, depth: int) -> bool:
        last = hidden == rank(value) - 1
        return (
            is_op(node, "Mul")
            and last
            and self.scale is None
            and self._layerscale(node, value, depth)
        )

    def constant(self, node: ir.Node, index: int, axis: int, what: str) -> None:
        if is_op(node, "Gather") and index == 0:
            shared = node.inputs[0]
            if len(readers(shared)) > 1 or shared.is_graph_output():
                raise Refuse(f"embedding table '{shared.name}' is shared (tied LM head?)")
        _centre(self.plan, self.scale, node, index, axis)

    def recurse(self, node: ir.Node, value: ir.Value, hidden: int | None, depth: int) -> None:
        """Centre the writer of `value`, an input of `node`, which must be its only reader."""
        if value.is_graph_output() or readers(value, numbers_only=True) != [node]:
            raise Refuse(f"'{value.name}' is read by other nodes too (they would see the centring)")
        writers.walk(value, hidden, self, depth + 1)

    def moved(self, node: ir.Node, out_hidden: int, in_hidden: int) -> None:
        pass

    def _layerscale(self, node: ir.Node, value: ir.Value, depth: int) -> bool:
        """LayerScale `z * g` (g constant, a scalar or one entry per hidden channel, shaped so
        that the product has z's shape): fold g into z's writers, then drop the Mul."""
        constant = [folded_value(v) is not None for v in node.inputs]
        if constant.count(True) != 1 or value.is_graph_output():
            return False
        g = folded_value(node.inputs[constant.index(True)])
        z = node.inputs[constant.index(False)]
        z_shape, rz = static_shape(z), rank(z)
        if (
            rz is None
            or g.ndim > rz
            or not _broadcasts_over_last(g.reshape((1,) * (rz - g.ndim) + g.shape))
        ):
            return False
        if g.size > 1 and (z_shape is None or z_shape[-1] != g.size):
            return False
        _Centring(self.plan, g.astype(np.float64).reshape(-1)).recurse(node, z, None, depth)
        self.plan.layerscales.append(node)
        return True


def _centre(
    plan: StreamRewrite, scale: np.ndarray | None, node: ir.Node, index: int, axis: int
) -> None:
    """Plan centring of a constant input along `axis` (negative: counted from its end). A
    constant broadcast along the hidden axis adds the same to every hidden entry, a shift
    the recentring removes: centred, it is zero (axis None)."""
    array = folded_value(node.inputs[index])
    if array.ndim < -axis or array.shape[axis] == 1:
        if np.any(array != 0):
            plan.centred[(node, index)] = None
        return
    plan.centred[(node, index)] = axis
    if scale is not None:
        if scale.size not in (1, array.shape[axis]):
            raise Refuse(f"LayerScale of {scale.size} channels meets '{node.inputs[index].name}'")
        plan.scaled[(node, index)] = scale
