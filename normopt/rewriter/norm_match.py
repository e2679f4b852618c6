"""A normalization found in a graph (`NormMatch`, what normopt.rewriter.norms returns) and the
small queries its matchers share."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.graph import (
    Refuse,
    constant_value,
    folded_value,
    is_op,
    sole_reader,
)


@dataclass
class NormMatch:
    kind: str  # layernorm | rmsnorm | batchnorm | affine | evonorm
    form: str  # op | decomposed
    input: ir.Value  # the normalized tensor, outside any Cast wrapper
    output: ir.Value  # the last value of the pattern
    nodes: list[ir.Node]  # every node of the pattern, in graph order
    axis: int | None  # LN/RMS: first normalized axis (negative); BN/affine/EvoNorm: channel axis
    epsilon: float | None = None
    scale: ir.Value | None = None
    bias: ir.Value | None = None
    compute_dtype: str | None = None  # dtype the statistics are computed in
    detail: dict = field(default_factory=dict)
    # Decomposed LN/RMSNorm: the value the core reads (after an input Cast) and the normalized
    # value before any scale, bias or output Cast.
    core_input: ir.Value | None = None
    core_output: ir.Value | None = None
    # Where the pattern reads `input`: (node, input index). Edits made since the match may have
    # replaced the value; the entry node always reads the current one.
    entry: tuple[ir.Node, int] | None = None
    # Decomposed LN/RMSNorm: the core's first node (reads core_input); LN: the ReduceMean and
    # the Sub that compute x - mean(x).
    anchor: ir.Node | None = None
    centring: tuple[ir.Node, ir.Node] | None = None

    def current_input(self) -> ir.Value:
        node, index = self.entry
        return node.inputs[index]

    def current_core_input(self) -> ir.Value:
        return self.anchor.inputs[0] if self.anchor is not None else self.current_input()

    @property
    def normalized_axes(self) -> int:
        """How many trailing axes an LN/RMSNorm normalizes over."""
        return -self.axis if self.axis is not None else 0

    @property
    def dtype(self) -> str | None:
        """The input's dtype; exports often leave it off intermediate values, and then the
        parameters (always typed, and in the input's dtype in every exporter) tell."""
        for value in (self.input, self.scale, self.bias):
            if value is not None and value.dtype is not None:
                return str(value.dtype)
        return self.compute_dtype

    def reads(self) -> tuple[ir.Value, ...]:
        """The values whose sum the norm normalizes: a fused Skip norm's input and skip (with
        its constant residual bias), any other norm its input alone."""
        if is_skip(self.nodes[0]):
            return tuple(self.nodes[0].inputs[:2])
        return (self.input,)

    def where(self) -> str:
        return self.nodes[0].name or f"{self.nodes[0].op_type} reading {self.input.name}"

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "form": self.form,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "dtype": self.dtype,
            "compute_dtype": self.compute_dtype,
            "scale": self.scale is not None,
            "bias": self.bias is not None,
            "input": self.input.name,
            "output": self.output.name,
            "nodes": [n.name for n in self.nodes],
            **self.detail,
        }


# ----------------------------------------------------------------------------- small queries

# onnxruntime's fused residual add + norm: y = norm(input + skip + bias) [* gamma + beta], with
# the sum itself as the optional output 3
SKIP_OPS = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")


def is_skip(node: ir.Node | None) -> bool:
    """`node` is one of onnxruntime's fused residual-add norms (com.microsoft)."""
    return node is not None and node.domain == "com.microsoft" and node.op_type in SKIP_OPS


def skip_bias_index(node: ir.Node) -> int:
    """Where a Skip norm takes its residual bias: after gamma and beta (SkipLayerNormalization)
    or after gamma (SkipSimplifiedLayerNormalization)."""
    return 4 if node.op_type == "SkipLayerNormalization" else 3


def skip_sum(node: ir.Node) -> ir.Value | None:
    """A Skip norm's output 3 (input + skip + bias) where something reads it, else None."""
    if len(node.outputs) < 4:
        return None
    total = node.outputs[3]
    return total if total.uses() or total.is_graph_output() else None


def scale_and_shift(
    match: NormMatch, d: int
) -> tuple[np.ndarray, np.ndarray | None, ir.Node | None]:
    """An RMSNorm's per-entry scale (float64 [d]; ones without one) and the constant Add that
    alone reads its output (a LayerNorm's beta, left as an Add: float64 [d] and the Add; None,
    None without one), which a pass folds into the norm's readers; Refuse where either is not a
    constant per hidden entry."""
    where = match.where()
    gamma = np.ones(d) if match.scale is None else folded_value(match.scale)
    if gamma is None or gamma.size not in (1, d):
        raise Refuse(
            f"the RMSNorm at {where} has no constant per-entry scale (it cannot be folded into "
            "its readers)"
        )
    gamma = np.broadcast_to(gamma.astype(np.float64).reshape(-1), (d,))
    add = sole_reader(match.output, numbers_only=True)
    consts = [constant_value(v) for v in add.inputs] if is_op(add, "Add") else []
    if sum(c is not None for c in consts) != 1:
        return gamma, None, None
    beta = next(c for c in consts if c is not None)
    if beta.size not in (1, d) or beta.ndim > 1 and any(n != 1 for n in beta.shape[:-1]):
        raise Refuse(f"Add {add.name} after the RMSNorm at {where} adds no per-entry constant")
    return gamma, np.broadcast_to(beta.astype(np.float64).reshape(-1), (d,)), add


def other_input(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node that reads `value` once."""
    a, b = (list(node.inputs) + [None, None])[:2]
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def scalar(value: ir.Value | None) -> float | None:
    array = constant_value(value)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))


def reduce_axes(node: ir.Node) -> tuple[int, ...] | None:
    """The axes of a ReduceMean with keepdims=1, or None when it is not such a reduction."""
    if node.attributes.get_int("keepdims", 1) != 1:
        return None
    if "axes" in node.attributes:
        axes = node.attributes.get_ints("axes")
    elif len(node.inputs) > 1 and node.inputs[1] is not None:
        array = constant_value(node.inputs[1])
        axes = None if array is None else tuple(int(a) for a in array.reshape(-1))
    else:
        axes = None
    return tuple(axes) if axes else None


def trailing(axes: tuple[int, ...], rank: int | None) -> int | None:
    """-k when `axes` are exactly the last k axes (any sign convention), else None."""
    if rank is not None:
        axes = tuple(a + rank if a < 0 else a for a in axes)
        if sorted(axes) == list(range(rank - len(axes), rank)):
            return -len(axes)
        return None
    if all(a < 0 for a in axes) and sorted(axes) == list(range(-len(axes), 0)):
        return -len(axes)
    return None


def squares(node: ir.Node, x: ir.Value) -> bool:
    """Pow(x, 2) or Mul(x, x)."""
    if is_op(node, "Pow") and node.inputs[0] is x:
        return scalar(node.inputs[1]) == 2.0
    return is_op(node, "Mul") and node.inputs[0] is x and node.inputs[1] is x


def broadcasts_over_last(array: np.ndarray, k: int) -> bool:
    """A scale/bias that varies only along the last k axes (leading dims all 1)."""
    return array.ndim <= k or all(d == 1 for d in array.shape[: array.ndim - k])
