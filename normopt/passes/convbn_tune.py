"""`convbn-tune`: ConvBN "Tune mode" (You et al., ICLR 2024). A linear op followed by a
BatchNormalization becomes the linear op alone, whose weight and bias are computed in the
graph, on every run, from the original, still-named parameters: one Conv at run time, and the
parameters stay there to refit, fine-tune or recalibrate (`normopt recalibrate`).

Before: Conv|ConvTranspose|Gemm|MatMul[+Add b] -> BatchNormalization(gamma, beta, mean, var)
        (also Transpose -> BatchNormalization -> Transpose: a token BN on [B, N, C])
After:  s  = gamma / Sqrt(var + eps)
        W' = W * s                      along the weight's output-channel axis
        b' = (b - mean) * s + beta      (beta - mean * s without a bias; Gemm: b = beta_attr*C)
        and the linear op reads W', b' (a MatMul without a bias gets an Add). W, b, gamma,
        beta, mean and var keep their names and values. In float16/bfloat16 models the weight
        math runs in float32 (Casts) and W', b' are cast back to the weight's dtype.
        `--tune-params inputs`: gamma, beta, mean and var also become graph inputs whose
        initializers are their defaults (`inputs:all`: W and b too), so a runtime can feed them.
Conditions:
  1. the BN is in inference mode and is not SLAB's RepBN (BN(x) + alpha*x is no ConvBN block);
  2. the linear op and the BN are as for fold-affine-norms' fold into the preceding op: the
     linear op's output (or its bias Add's) is read only by the BN and is no graph output, its
     weight is constant, its output-channel axis is the BN's channel axis with as many
     channels; a ConvTranspose only with group 1;
  3. with --tune-params inputs, every parameter that becomes an input is an initializer;
  4. one BatchNorm per op: in Conv -> BN -> BN the second stays (a second run changes nothing).
Formula: BN(W x + b) = s * (W x + b - mean) + beta = (W * s) x + (b - mean) * s + beta, the
deploy fold's formula (rewriter.numerics.batchnorm_affine) computed by the graph instead.
Each block is recorded in the model's metadata (normopt.rewriter.tune_record: the linear op, W,
b, the BN's parameters and epsilon, by name), so `normopt recalibrate` finds the BatchNorms again.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter import tune_record
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_shape
from normopt.rewriter.linear_fold import Fold, bias_of, bias_slot, plan_preceding
from normopt.rewriter.norms import NormMatch, match_batchnorm
from normopt.rewriter.tune_record import TuneRecord

WIDE = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)  # computed in float32


@dataclass
class TuneBlock:
    match: NormMatch
    fold: Fold  # the linear op (and bias Add) the BN follows; `a`, `c` unused here
    channels: int

    @property
    def bn(self) -> ir.Node:
        return next(n for n in self.match.nodes if n.op_type == "BatchNormalization")

    def describe(self) -> str:
        return (
            f"batchnorm {self.bn.name} into {self.fold.linear.op_type} {self.fold.linear.name}, "
            "computed in the graph"
        )


def _channels(bn: ir.Node) -> int | None:
    for value in bn.inputs[1:5]:
        shape = constant_shape(value) or (tuple(value.shape) if value.shape is not None else None)
        if shape is not None and len(shape) == 1 and isinstance(shape[0], int):
            return shape[0]
    return None


def _plan_one(bn: ir.Node, tune_params: str, tuned: dict[str, str]) -> TuneBlock | str:
    match = match_batchnorm(bn, constant=False)
    if match is None:
        return "it runs in training mode or lacks its statistics"
    if "repbn_alpha" in match.detail:
        return (
            "it is SLAB's RepBN (BN(x) + alpha*x), not a ConvBN block: fold-affine-norms folds it"
        )
    channels = _channels(bn)
    if channels is None:
        return "the number of channels of its parameters is unknown"
    fold = plan_preceding(match, np.ones(channels), np.zeros(channels))
    if isinstance(fold, str):
        return fold
    linear = fold.linear
    if linear.name in tuned:  # Conv -> BN -> BN: the second one stays a BatchNorm
        return (
            f"{linear.op_type} {linear.name} already computes its weight from BatchNorm "
            f"'{tuned[linear.name]}' "
            "(one BatchNorm per op in tune mode; this one stays, recalibrate updates it too)"
        )
    if linear.op_type == "ConvTranspose" and linear.attributes.get_int("group", 1) != 1:
        return f"ConvTranspose {linear.name} has groups (only group 1 is tuned)"
    if tune_params != "constants":
        wanted = list(bn.inputs[1:5]) + (
            _weight_and_bias(fold) if tune_params == "inputs:all" else []
        )
        computed = [
            v.name
            for v in wanted
            if v is not None and not v.is_initializer() and not v.is_graph_input()
        ]
        if computed:
            return (
                f"{', '.join(computed)} not initializers: they cannot become graph inputs "
                f"(--tune-params {tune_params})"
            )
    return TuneBlock(match, fold, channels)


def _weight_and_bias(fold: Fold) -> list[ir.Value]:
    bias = bias_of(fold)
    return [fold.linear.inputs[1], *([bias] if bias is not None else [])]


def _scale_shape(linear: ir.Node, weight_rank: int, channels: int) -> list[int] | None:
    """How s is shaped to scale the weight's output channels (None: as it is, the last axis)."""
    op = linear.op_type
    if op == "Conv":
        return [channels] + [1] * (weight_rank - 1)
    if op == "ConvTranspose":
        return [1, channels] + [1] * (weight_rank - 2)
    if op == "Gemm" and linear.attributes.get_int("transB", 0):
        return [channels, 1]
    return None  # Gemm (transB=0) and MatMul: output channels are the weight's last axis


class _Builder:
    """The weight subgraph of one block: nodes in order, inserted before the linear op."""

    def __init__(self, edit: Editor, base: str, compute: ir.DataType) -> None:
        self.edit, self.base, self.compute, self.nodes = edit, base, compute, []

    def op(self, op: str, inputs: list, suffix: str, **attributes) -> ir.Value:
        node = self.edit.node(op, inputs, attributes, name=f"{self.base}.{suffix}")
        self.nodes.append(node)
        return node.outputs[0]

    def wide(self, value: ir.Value, suffix: str) -> ir.Value:
        """`value` in the compute dtype."""
        if value.dtype == self.compute:
            return value
        return self.op("Cast", [value], f"{suffix}_float32", to=self.compute)

    def back(self, value: ir.Value, dtype: ir.DataType, suffix: str) -> ir.Value:
        return value if dtype == self.compute else self.op("Cast", [value], suffix, to=dtype)

    def constant(self, array: np.ndarray, suffix: str) -> ir.Value:
        return self.edit.initializer(f"{self.base}.{suffix}", array)


def _apply_one(edit: Editor, block: TuneBlock) -> tuple[Change, TuneRecord]:
    bn, fold, linear = block.bn, block.fold, block.fold.linear
    gamma, beta, mean, var = bn.inputs[1:5]
    weight, old_bias = linear.inputs[1], bias_of(fold)
    for node in (bn, linear, fold.bias_add):  # the record finds them by name
        if node is not None and not node.name:
            node.name = edit.node_name(node.op_type)
    dtype = weight.dtype or ir.DataType.FLOAT
    change = Change(
        "tuned",
        f"batchnorm into {linear.op_type}, its weight computed in the graph",
        tuple(n.name for n in block.match.nodes) + (linear.name,),
        tuple(v.name for v in (*_weight_and_bias(fold), gamma, beta, mean, var)),
    )
    g = _Builder(edit, bn.name or "batchnorm", ir.DataType.FLOAT if dtype in WIDE else dtype)
    s, new_weight = _tuned_weight(g, block, dtype)
    bias_dtype = (old_bias if old_bias is not None else weight).dtype or dtype
    new_bias = _tuned_bias(g, block, s, bias_dtype)
    edit.graph.insert_before(linear, g.nodes)
    linear.replace_input_with(1, new_weight)
    gemm_beta = linear.attributes.get_float("beta", 1.0) if linear.op_type == "Gemm" else None
    if linear.op_type == "Gemm":
        linear.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is inside the bias now
    bias_add = _set_bias(edit, fold, new_bias, g.base)
    m = block.match
    edit.take_over(m.output, m.current_input())
    edit.graph.remove(m.nodes, safe=True)
    record = TuneRecord(
        bn.name,
        linear.name,
        linear.op_type,
        weight.name,
        old_bias.name if old_bias is not None else None,
        gemm_beta,
        bias_add,
        gamma.name,
        beta.name,
        mean.name,
        var.name,
        float(block.match.epsilon),
    )
    return change, record


def _tuned_weight(g: _Builder, block: TuneBlock, dtype: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """s = gamma / sqrt(var + eps) and W * s (s shaped along W's output channels)."""
    gamma, _, _, var = block.bn.inputs[1:5]
    linear = block.fold.linear
    weight = linear.inputs[1]
    eps = g.constant(np.array(block.match.epsilon, g.compute.numpy()), "epsilon")
    gamma_w = g.wide(gamma, "gamma")  # (the nodes in the order the graph lists them)
    var_eps = g.op("Add", [g.wide(var, "var"), eps], "var_eps")
    s = g.op("Div", [gamma_w, g.op("Sqrt", [var_eps], "std")], "scale")
    shape = _scale_shape(linear, len(constant_shape(weight)), block.channels)
    if shape is not None:
        to = g.constant(np.array(shape, np.int64), "scale_shape")
        s_w = g.op("Reshape", [s, to], "scale_for_weight")
    else:
        s_w = s
    weighted = g.op("Mul", [g.wide(weight, "weight"), s_w], "weight_fp")
    return s, g.back(weighted, dtype, "weight")


def _tuned_bias(g: _Builder, block: TuneBlock, s: ir.Value, dtype: ir.DataType) -> ir.Value:
    """(b * gemm_beta - mean) * s + beta (b = 0 where the op had no bias)."""
    linear, old_bias = block.fold.linear, bias_of(block.fold)
    beta, mean = block.bn.inputs[2], block.bn.inputs[3]
    gemm_beta = linear.attributes.get_float("beta", 1.0) if linear.op_type == "Gemm" else 1.0
    biased = None
    if old_bias is not None and gemm_beta != 1.0:
        factor = g.constant(np.array(gemm_beta, g.compute.numpy()), "gemm_beta")
        biased = g.op("Mul", [g.wide(old_bias, "bias"), factor], "bias_times_beta")
    elif old_bias is not None:
        biased = g.wide(old_bias, "bias")
    mean_w = g.wide(mean, "mean")
    if biased is not None:
        centred = g.op("Sub", [biased, mean_w], "bias_minus_mean")
    else:
        centred = g.op("Neg", [mean_w], "minus_mean")
    shifted = g.op("Mul", [centred, s], "shift")
    return g.back(g.op("Add", [shifted, g.wide(beta, "beta")], "bias_fp"), dtype, "bias")


def _set_bias(edit: Editor, fold: Fold, new_bias: ir.Value, base: str) -> str | None:
    """Put the new bias where the op's bias was; a MatMul without a bias Add gets one. Returns
    the MatMul's bias Add node name (None for Conv/Gemm)."""
    linear = fold.linear
    node, index = bias_slot(fold)
    if node is None:
        out = linear.outputs[0]
        add = edit.node("Add", [out, new_bias], name=f"{base}.bias_add", like=out)
        edit.graph.insert_after(linear, add)
        edit.take_over(out, add.outputs[0])
        add.replace_input_with(0, out)
        return add.name
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, new_bias)
    return fold.bias_add.name if fold.bias_add is not None else None


class ConvBNTune(Pass[TuneBlock]):
    name = "convbn-tune"
    summary = (
        "Conv/Gemm/MatMul -> BatchNorm as one op whose weight the graph computes from the named BN "
        "parameters"
    )

    def plan(self, model: ir.Model) -> Plan[TuneBlock]:
        plan = Plan()  # (a linear op's output is read by its BN alone: no two blocks share an op)
        tuned = {r.node: r.bn for r in tune_record.read(model)}
        for node in model.graph:
            if node.op_type == "BatchNormalization":
                plan.decide(
                    f"batchnorm {node.name}", _plan_one(node, self.options.tune_params, tuned)
                )
        if not plan.actions and not plan.refusals:
            plan.idle = "no BatchNormalization"
        return plan

    def apply(self, model: ir.Model, plan: Plan[TuneBlock]) -> list[Change]:
        edit = Editor(model.graph)
        blocks: list[TuneBlock] = plan.actions
        params = [
            v
            for b in blocks
            for v in (
                *b.bn.inputs[1:5],
                *(_weight_and_bias(b.fold) if self.options.tune_params == "inputs:all" else []),
            )
        ]
        applied = [_apply_one(edit, b) for b in blocks]
        changes = [change for change, _ in applied]
        tune_record.write(model, tune_record.read(model) + [record for _, record in applied])
        if self.options.tune_params != "constants":
            inputs = set(model.graph.inputs)
            for value in dict.fromkeys(params):
                if value not in inputs and value.is_initializer():
                    model.graph.inputs.append(value)
                    changes.append(
                        Change(
                            "exposed",
                            "parameter(s) as graph inputs with their initializers as defaults",
                            (),
                            (value.name,),
                        )
                    )
        return changes
