"""The stages of a summed branch (structural re-parameterization), matched from its output
back to where it starts: Conv, per-channel affine, AveragePool, constant Pad (DBB's pad(y - v)
+ v too). Analysis only: `merge-branches` composes them into one Conv and edits the graph."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx_ir as ir

from normopt.rewriter import numerics
from normopt.rewriter.graph import folded_value, is_op, readers
from normopt.rewriter.linear_fold import norm_affine
from normopt.rewriter.norms import NormMatch

DEEP = 32  # constant subgraphs as deep as a kernel computed in forward (DEConv's)


@dataclass
class Stage:
    op: str  # conv | affine | pad | pool
    input: ir.Value
    nodes: list[ir.Node]
    weight: np.ndarray | None = None  # conv: [C_out, C_in/G, k..]
    bias: np.ndarray | None = None  # conv: per output channel; affine: c; pad: the value
    scale: np.ndarray | None = None  # affine: a
    kernel: list[int] | None = None  # pool: its window
    pads: list[int] | None = None
    strides: list[int] | None = None
    dilations: list[int] | None = None
    group: int = 1


def only_reader(value: ir.Value, dead: set[ir.Node]) -> ir.Node | None:
    """The one live node reading `value` (dead readers, which cleanup removes, do not count)."""
    if value.is_graph_output():
        return None
    live = [r for r in readers(value) if r not in dead]
    return live[0] if len(live) == 1 else None


def deep_constant(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None else folded_value(value, DEEP)


def _conv_stage(node: ir.Node) -> Stage | str:
    weight = deep_constant(node.inputs[1])
    bias = (
        deep_constant(node.inputs[2])
        if len(node.inputs) > 2 and node.inputs[2] is not None
        else None
    )
    if weight is None or (len(node.inputs) > 2 and node.inputs[2] is not None and bias is None):
        return f"Conv {node.name} has no constant weight or bias"
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"Conv {node.name} pads by auto_pad, not explicitly"
    rank = weight.ndim - 2
    bias = np.zeros(weight.shape[0]) if bias is None else bias
    return Stage(
        "conv",
        node.inputs[0],
        [node],
        weight,
        bias,
        pads=list(node.attributes.get_ints("pads", [0] * 2 * rank)),
        strides=list(node.attributes.get_ints("strides", [1] * rank)),
        dilations=list(node.attributes.get_ints("dilations", [1] * rank)),
        group=node.attributes.get_int("group", 1),
    )


def _pool_stage(node: ir.Node) -> Stage | str:
    kernel = list(node.attributes.get_ints("kernel_shape"))
    rank = len(kernel)
    pads = list(node.attributes.get_ints("pads", [0] * 2 * rank))
    if node.attributes.get_string("auto_pad", "NOTSET") != "NOTSET":
        return f"AveragePool {node.name} pads by auto_pad, not explicitly"
    if node.attributes.get_int("ceil_mode", 0):
        return f"AveragePool {node.name} rounds its output size up (ceil_mode=1): not a convolution"
    if any(pads) and not node.attributes.get_int("count_include_pad", 0):
        return (
            f"AveragePool {node.name} leaves its padding out of the count (count_include_pad=0): "
            "not a convolution"
        )
    if any(d != 1 for d in node.attributes.get_ints("dilations", [1] * rank)):
        return f"AveragePool {node.name} is dilated"
    return Stage(
        "pool",
        node.inputs[0],
        [node],
        kernel=kernel,
        pads=pads,
        strides=list(node.attributes.get_ints("strides", [1] * rank)),
    )


def _zero_pad(node: ir.Node | None) -> tuple[list[int], float, int] | None:
    """(pads over the spatial axes, value, rank) of a constant-mode Pad of constant amounts."""
    if not is_op(node, "Pad") or node.attributes.get_string("mode", "constant") != "constant":
        return None
    given = (
        list(node.attributes.get_ints("pads"))
        if "pads" in node.attributes
        else deep_constant(node.inputs[1])
    )
    pads = None if given is None else [int(p) for p in np.reshape(given, -1)]
    value = node.attributes.get_float("value", 0.0) if "value" in node.attributes else None
    if value is None:
        given = (
            deep_constant(node.inputs[2])
            if len(node.inputs) > 2 and node.inputs[2] is not None
            else np.zeros(())
        )
        value = None if given is None or given.size != 1 else float(given.reshape(()))
    axes = len(node.inputs) > 3 and node.inputs[3] is not None
    if pads is None or value is None or axes or min(pads) < 0:
        return None
    rank = len(pads) // 2
    if any(pads[i] or pads[rank + i] for i in range(min(2, rank))):
        return None  # pads batch or channels
    return pads[2:rank] + pads[rank + 2 :], value, rank


def _pad_stage(value: ir.Value, dead: set[ir.Node]) -> Stage | None:
    """Pad(y, v), or pad(y - v) + v (per-channel v: DBB's BN-and-pad written without slicing)."""
    node = value.producer()
    plain = _zero_pad(node)
    if plain is not None:
        return Stage("pad", node.inputs[0], [node], bias=np.array(plain[1]), pads=plain[0])
    if not is_op(node, "Add"):
        return None
    for i in (0, 1):
        padded, shift = node.inputs[i], deep_constant(node.inputs[1 - i])
        pad = padded.producer()
        zero = _zero_pad(pad)
        if shift is None or zero is None or zero[1] != 0 or only_reader(padded, dead) is not node:
            continue
        sub = pad.inputs[0].producer()
        values = _per_channel(shift, zero[2])
        if (
            is_op(sub, "Sub")
            and only_reader(pad.inputs[0], dead) is pad
            and deep_constant(sub.inputs[1]) is not None
            and np.array_equal(deep_constant(sub.inputs[1]), shift)
            and values is not None
        ):
            return Stage("pad", sub.inputs[0], [sub, pad, node], bias=values, pads=zero[0])
    return None


def _per_channel(array: np.ndarray, rank: int) -> np.ndarray | None:
    """The per-channel values of a constant broadcast over a rank-`rank` NC.. tensor (a scalar,
    [C, 1, ..] or [1, C, 1, ..]); None for anything else (a [C] broadcasts over the last axis)."""
    if array.size == 1:
        return array.reshape(())
    if array.ndim > rank:
        return None
    shape = (1,) * (rank - array.ndim) + array.shape
    return array.reshape(-1) if shape[0] == 1 and all(d == 1 for d in shape[2:]) else None


def stage_of(
    value: ir.Value, affines: dict[ir.Value, NormMatch], dead: set[ir.Node], graph: ir.Graph
) -> Stage | str | None:
    node = value.producer()
    if node is None or node.graph is not graph:
        return None
    if is_op(node, "Conv"):
        return _conv_stage(node)
    if is_op(node, "AveragePool"):
        return _pool_stage(node)
    pad = _pad_stage(value, dead)
    if pad is not None:
        return pad
    if value in affines:
        match = affines[value]
        a, c = norm_affine(match)
        if match.axis != 1 and not (value.shape is not None and match.axis == 1 - len(value.shape)):
            return f"the affine '{value.name}' is not per channel over axis 1"
        return Stage("affine", match.input, list(match.nodes), bias=c, scale=a)
    return None


def walk(
    leaf: ir.Value, affines, dead: set[ir.Node], graph: ir.Graph
) -> tuple[ir.Value, list[Stage | str]]:
    """The stages from the operand `leaf` down to where its chain starts (a value read by more
    than the next stage, or not made by a stage); returned bottom-up with that source."""
    stages: list[Stage | str] = []
    value = leaf
    while True:
        stage = stage_of(value, affines, dead, graph)
        if stage is None:
            break
        stages.append(stage)
        if isinstance(
            stage, str
        ):  # a stage that cannot merge: where it reads is where to report it
            value = value.producer().inputs[0]
            break
        value = stage.input
        if only_reader(value, dead) is None:
            break
    return value, stages[::-1]


@dataclass
class Branch:
    """One operand of the sum as a convolution of x: W * x + b with these attributes."""

    name: str  # for messages: "Conv <name>" or the operand's value name
    weight: np.ndarray  # float64 [C_out, C_in/group, k..]
    bias: np.ndarray
    pads: list[int]
    strides: list[int]
    dilations: list[int] | None  # None: a 1x1 kernel, any dilation
    group: int
    per_channel: bool  # identity / affine / pool of x only: takes the Convs' groups
    nodes: list[ir.Node] = field(default_factory=list)
    pending: tuple[list[int], np.ndarray] | None = None  # an explicit pad not yet read by a Conv

    @property
    def kernel(self) -> list[int]:
        return list(self.weight.shape[2:])


# ----------------------------------------------------------------------- composition


def same_array(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to float32 rounding (16 ulps of the larger magnitude)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    return bool(
        np.all(
            np.abs(a - b)
            <= 16 * np.finfo(np.float32).eps * np.maximum(np.abs(a).max(initial=0), 1e-30)
        )
    )


def pointwise(branch: Branch) -> bool:
    return (
        all(k == 1 for k in branch.kernel)
        and all(s == 1 for s in branch.strides)
        and not any(branch.pads)
    )


def compose(below: Branch, upper: Stage, label: str) -> Branch | str:
    """The branch `below`, then the Conv / pool `upper` (reading `below.pending`'s pad if any)."""
    channels = below.weight.shape[0]
    if upper.op == "pool":
        weight, bias = (
            numerics.per_channel_kernel(np.ones(channels), upper.kernel),
            np.zeros(channels),
        )
        group, dilations = channels, [1] * len(upper.kernel)
    else:
        weight, bias, group, dilations = upper.weight, upper.bias, upper.group, upper.dilations
    if weight.shape[1] * group != channels:
        return f"{label} reads {channels} channels, its kernel {weight.shape[1] * group}"
    pads, fill = list(upper.pads), 0.0
    if below.pending is not None:
        if any(pads):
            return f"{label} pads the input another Pad already padded"
        pads, fill = below.pending
    one = all(k == 1 for k in weight.shape[2:]) and all(s == 1 for s in upper.strides)
    if not pointwise(below) and not (one and not any(pads)):
        return (
            f"{label} reads a {below.kernel} Conv's output: one of two Convs in sequence must be "
            "1x1"
        )
    if any(pads) and not same_array(fill, below.bias):
        return (
            f"{label} pads with {show(fill)} where the stages before it give {show(below.bias)} "
            "for a zero input: "
            "the merged Conv would pad with that"
        )
    if pointwise(below):
        attrs = dict(
            pads=pads,
            strides=list(upper.strides),
            dilations=None if all(k == 1 for k in weight.shape[2:]) else list(dilations),
        )
    else:
        attrs = dict(pads=below.pads, strides=below.strides, dilations=below.dilations)
    w, b, g = numerics.compose_kernels(weight, bias, group, below.weight, below.bias, below.group)
    return replace(
        below,
        weight=w,
        bias=b,
        group=g,
        per_channel=below.per_channel and upper.op == "pool",
        nodes=below.nodes + upper.nodes,
        pending=None,
        name=label if upper.op == "conv" else below.name,
        **attrs,
    )


def show(values) -> str:
    v = np.asarray(values, np.float64).reshape(-1)
    return f"{v[0]:.4g}" if v.size == 1 or np.all(v == v[0]) else f"[{v[0]:.4g}, {v[1]:.4g}, ...]"


def identity_branch(name: str, channels: int, rank: int) -> Branch:
    return Branch(
        name,
        numerics.per_channel_kernel(np.ones(channels), [1] * rank),
        np.zeros(channels),
        [0] * 2 * rank,
        [1] * rank,
        None,
        channels,
        True,
    )


def as_branch(leaf: ir.Value, stages: list[Stage], channels: int, rank: int) -> Branch | str:
    """The stages (bottom-up, reading x: `channels` channels, `rank` spatial axes) as one
    convolution of x."""
    branch = identity_branch(leaf.name, channels, rank)
    for stage in stages:
        if stage.op in ("conv", "pool"):
            composed = compose(
                branch,
                stage,
                f"Conv {stage.nodes[0].name}"
                if stage.op == "conv"
                else f"AveragePool {stage.nodes[0].name}",
            )
            if isinstance(composed, str):
                return composed
            branch = composed
        elif stage.op == "affine":
            if {np.size(stage.scale), np.size(stage.bias)} - {1, branch.bias.size}:
                return (
                    f"the affine '{stage.nodes[-1].outputs[0].name}' has not one value per channel"
                )
            a = np.broadcast_to(np.asarray(stage.scale, np.float64).reshape(-1), branch.bias.shape)
            c = np.broadcast_to(np.asarray(stage.bias, np.float64).reshape(-1), branch.bias.shape)
            pending = (
                None if branch.pending is None else (branch.pending[0], a * branch.pending[1] + c)
            )
            branch = replace(
                branch,
                weight=numerics.scale_along(branch.weight, a, 0),
                bias=a * branch.bias + c,
                nodes=branch.nodes + stage.nodes,
                pending=pending,
            )
        else:  # pad
            if branch.pending is not None:
                return f"'{leaf.name}' is padded twice"
            fill = np.broadcast_to(
                np.asarray(stage.bias, np.float64).reshape(-1), branch.bias.shape
            )
            branch = replace(branch, pending=(stage.pads, fill), nodes=branch.nodes + stage.nodes)
    if branch.pending is not None:
        return f"'{leaf.name}' ends in a Pad"
    return branch
