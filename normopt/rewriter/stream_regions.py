"""Components and regions of preln-to-rmsnorm's stream analysis (normopt.rewriter.stream_plan
explains both): which values a recentring reaches through merges, which must keep their
numbers, and the regions recentred on their own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx_ir as ir

from normopt.rewriter import axis_rules
from normopt.rewriter.graph import (
    constant_shape,
    folded_value,
    is_op,
    rank,
    readers,
)
from normopt.rewriter.norm_match import NormMatch, is_skip, skip_bias_index, skip_sum


# What an explicit recentring costs, in what converting one LayerNorm saves. Measured (ORT 1.32
# CPU, 2 threads, ops timed in a chain): save / recentring 0.9 at [2, 16, 64], 0.14 at
# [1, 128, 768], 0.41 at [8, 512, 128], 0.93 at [8, 512, 768]; Peri-LN (9 norms, 4 recentrings,
# 2 norms a region) measured 1.02x slower with one recentring worth one conversion.
@dataclass
class Component:
    """Values linked by merges (see `merge_inputs`): recentring a value changes every value it
    flows into through one, and a merge's output is recentred by its writers only if all its
    data inputs are. `norms`: the LayerNorms over the hidden axis reading its values;
    `blockers`: values whose numbers must not change (a reader would see it), with why."""

    values: list[ir.Value] = field(default_factory=list)
    merges: list[ir.Node] = field(default_factory=list)
    norms: list[NormMatch] = field(default_factory=list)
    blockers: dict[ir.Value, str] = field(default_factory=dict)


@dataclass
class Region:
    """The part of a component that is recentred: `values` change; `starts` are recentred by
    an explicit `x - ReduceMean(x)` (their own numbers stay, their readers read the recentred
    ones) because a merge input of theirs must keep its numbers; `merges` are those whose
    output changes (their constants are centred)."""

    values: list[ir.Value]
    norms: list[NormMatch]
    merges: list[ir.Node]
    starts: dict[ir.Value, str]  # -> why its inputs keep their numbers

    def changed_outputs(self) -> list[str]:
        return [v.name for v in self.values if v.is_graph_output() and v not in self.starts]

    def sources(self) -> list[ir.Value]:
        """Values whose writers are centred (or recentred explicitly when they cannot be)."""
        merges, starts = set(self.merges), set(self.starts)
        return [v for v in self.values if merged_from(v, merges) is None and v not in starts]


def _hidden_size(value: ir.Value) -> int | None:
    """The static size of a value's last axis, or None."""
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None


def merge_inputs(node: ir.Node | None) -> list[ir.Value] | None:
    """The data inputs through which `node` carries a recentring on to its output unchanged in
    kind (x - mean(x) at every position, along the hidden axis, the last), or None: Add/Sub
    of values with the same hidden size (and constants, centred with them); a fused Skip norm's
    input + skip (+ its constant bias: the sum, its output 3, `merge_outputs`); Concat along
    another axis; ops that keep every token's hidden vector whole (Cast, Reshape keeping the
    hidden size, token-axis Gather/Slice/Transpose/Expand/Pad/Split, mean pooling over tokens)."""
    rule = axis_rules.rule(node)
    skip = is_skip(node)
    if node is None or not (skip or is_op(node, "Add", "Sub", "Concat") or (rule and rule.stream)):
        return None
    added = node.inputs[:2] if skip else node.inputs
    data = [v for v in added if v is not None and constant_shape(v) is None]
    out = node.outputs[0]
    if skip or is_op(node, "Add", "Sub"):
        hidden = _hidden_size(out)
        if len(added) != 2 or hidden is None or any(_hidden_size(v) != hidden for v in data):
            return None
        return data or None
    if is_op(node, "Concat"):
        r = rank(out)
        if r is None or node.attributes.get_int("axis", 0) % r == r - 1:
            return None  # pieces recentred apart are not the whole recentred
        return data or None
    source = node.inputs[0] if node.inputs else None
    if (
        source is None
        or source not in data
        or source in node.inputs[1:]
        or not axis_rules.keeps_last(node)
    ):
        return None
    return [source]


def merge_outputs(node: ir.Node) -> list[ir.Value]:
    """The values a merge carries its inputs' recentring to: a Skip norm's sum where something
    reads it (none otherwise: its normalized output is no merge output), else its outputs."""
    if is_skip(node):
        total = skip_sum(node)
        return [] if total is None else [total]
    return list(node.outputs)


def merge_constants(node: ir.Node) -> list[int]:
    """The constant inputs a merge adds into its output (centred with the region): Add/Sub/
    Concat's constants; a Skip norm's constant input or skip and its residual bias."""
    if is_skip(node):
        bias = skip_bias_index(node)
        has_bias = len(node.inputs) > bias and node.inputs[bias] is not None
        added = [0, 1, bias] if has_bias else [0, 1]
    elif is_op(node, "Add", "Sub", "Concat"):
        added = list(range(len(node.inputs)))
    else:
        return []
    return [i for i in added if folded_value(node.inputs[i]) is not None]


def merged_from(value: ir.Value, merges: set[ir.Node]) -> list[ir.Value] | None:
    """The inputs of the merge among `merges` whose output `value` is, or None."""
    producer = value.producer()
    if producer not in merges or value not in merge_outputs(producer):
        return None
    return merge_inputs(producer)


def component(
    seed: ir.Value,
    seen: set[ir.Value],
    norm_of: dict[ir.Node, NormMatch],
    allow_hidden: bool,
    norm_problem: Callable[[NormMatch], str | None],
) -> Component:
    """The component holding `seed`: values linked by merges, the LayerNorms over their hidden
    axis reading them, and the values whose readers block a recentring (with why)."""
    comp, queue, merges, norms = Component(), [seed], set(), set()

    def block(value: ir.Value, why: str) -> None:
        comp.blockers.setdefault(value, why)

    while queue:
        value = queue.pop()
        if value in seen:
            continue
        seen.add(value)
        comp.values.append(value)
        if value.is_graph_output() and not allow_hidden:
            block(
                value,
                f"'{value.name}' is a graph output: it would change (pass "
                "--allow-hidden-state-change to accept that)",
            )
        producer = value.producer()
        inputs = merge_inputs(producer)
        if inputs is not None and value in merge_outputs(producer):
            if producer not in merges:
                merges.add(producer)
                comp.merges.append(producer)
            queue.extend(inputs)
        for node in readers(value, numbers_only=True):  # shape/dtype-only readers see no change
            match = norm_of.get(node)
            if match is not None and value in match.reads():
                problem = norm_problem(match)
                for read in match.reads() if problem else ():  # a Skip norm reads their sum
                    block(read, problem)
                if not problem and id(match) not in norms:
                    norms.add(id(match))
                    comp.norms.append(match)
                if not is_skip(node):
                    continue
            inputs = merge_inputs(node)
            if inputs is not None and value in inputs:
                if node not in merges:
                    merges.add(node)
                    comp.merges.append(node)
                queue.extend(merge_outputs(node) + inputs)
                continue
            block(value, _blocked_by(node, value))
    return comp


def _blocked_by(node: ir.Node, value: ir.Value) -> str:
    if is_op(node, "Concat"):
        return (
            f"Concat {node.name} joins '{value.name}' with other pieces along the hidden axis: "
            "recentred apart, the pieces would shift by different amounts, which a norm over "
            "the whole sees"
        )
    return (
        f"{node.op_type} {node.name} reads '{value.name}' and would see the recentred values "
        "(not shift-invariant)"
    )


def regions(comp: Component) -> tuple[list[Region], dict[ir.Value, str]]:
    """The parts of `comp` that can be recentred, and the values that must keep their
    numbers (with why). A blocked value keeps its numbers, and so does everything flowing
    into it; a merge fed by such a value is recentred explicitly at its output, which in
    turn fixes all of its inputs. What is left falls apart into regions along its merges."""
    merges = set(comp.merges)
    frozen, starts = _frozen(comp, merges)
    groups = _groups([v for v in comp.values if v not in frozen], merges, frozen, starts)
    found = []
    for group in groups:
        members = set(group)
        found.append(
            Region(
                values=group,
                norms=[m for m in comp.norms if all(v in members for v in m.reads())],
                merges=[
                    n
                    for n in comp.merges
                    if any(o in members and o not in starts for o in merge_outputs(n))
                ],
                starts={v: why for v, why in starts.items() if v in members},
            )
        )
    return found, frozen


def _frozen(
    comp: Component, merges: set[ir.Node]
) -> tuple[dict[ir.Value, str], dict[ir.Value, str]]:
    """The values that keep their numbers (a blocked value and all that flows into it), and
    the merge outputs recentred explicitly because an input of theirs keeps its numbers."""
    frozen: dict[ir.Value, str] = {}
    closed: set[ir.Value] = set()

    def freeze(value: ir.Value, why: str) -> None:  # it, and all that flows into it
        stack = [value]
        while stack:
            v = stack.pop()
            frozen.setdefault(v, why)
            if v not in closed:
                closed.add(v)
                stack.extend(merged_from(v, merges) or [])

    for value, why in comp.blockers.items():
        freeze(value, why)
    starts: dict[ir.Value, str] = {}
    changed = True
    while changed:
        changed = False
        for value in comp.values:
            inputs = merged_from(value, merges)
            if value in frozen or value in starts or inputs is None:
                continue
            kept = next((v for v in inputs if v in frozen), None)
            if kept is not None:  # its inputs keep their numbers: recentre it explicitly
                starts[value] = (
                    f"it is computed from '{kept.name}', which must keep its numbers: "
                    f"{frozen[kept]}"
                )
                for v in inputs:
                    freeze(v, frozen[kept])
                changed = True
    return frozen, starts


def _groups(
    free: list[ir.Value], merges: set[ir.Node], frozen: dict, starts: dict
) -> list[list[ir.Value]]:
    """The free values linked by merges whose output and inputs all change."""
    region_of: dict[ir.Value, int] = {}
    groups: list[list[ir.Value]] = []
    for value in free:
        if value in region_of:
            continue
        group, stack = [], [value]
        region_of[value] = len(groups)
        while stack:
            v = stack.pop()
            group.append(v)
            linked = []
            if v not in starts:
                linked += merged_from(v, merges) or []
            for node in readers(v, numbers_only=True):
                if node in merges and v in merge_inputs(node):  # its output, and the inputs
                    linked += [o for o in merge_outputs(node) if o not in starts]
                    linked += merge_inputs(node)  # added with v (a Skip norm may output none)
            for other in linked:
                if other not in frozen and other not in region_of:
                    region_of[other] = len(groups)
                    stack.append(other)
        groups.append(group)
    return groups
