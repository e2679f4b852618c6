"""The stages of a summed branch (structural re-parameterization), matched from its output
back to where it starts: Conv, per-channel affine, AveragePool, constant Pad (DBB's pad(y - v)
+ v too). Analysis only: `merge-branches` composes them into one Conv and edits the graph."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

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
