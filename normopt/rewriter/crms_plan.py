"""What a Pre-CRMSNorm plan holds (normopt.rewriter.crms makes it, preln-to-crmsnorm carries it
out): the cuts, the norms and their readers, the values carried at width d-1."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.norms import NormMatch

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
