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
Each block is recorded in the model's metadata (RECORDS_KEY: the linear op, W, b, the BN's
parameters and epsilon, by name), so `normopt recalibrate` finds the BatchNorms again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import constant_shape
from normopt.rewriter.linear_fold import Fold, bias_of, bias_slot, plan_preceding
from normopt.rewriter.norms import NormMatch, match_batchnorm

WIDE = (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)  # computed in float32
RECORDS_KEY = "normopt.convbn_tune"  # model metadata: a JSON list, one record per tuned block


def tune_records(model: ir.Model) -> list[dict]:
    """The blocks convbn-tune recorded: {bn, node, op, weight, bias (None: the op had none),
    gemm_beta, bias_add (a MatMul's bias Add node), gamma, beta, mean, var, epsilon}."""
    return json.loads(model.metadata_props.get(RECORDS_KEY, "[]"))


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


def _apply_one(edit: Editor, block: TuneBlock) -> tuple[Change, dict]:
    bn, fold, linear = block.bn, block.fold, block.fold.linear
    gamma, beta, mean, var = bn.inputs[1:5]
    weight = linear.inputs[1]
    for node in (linear, fold.bias_add):  # the record finds them by name
        if node is not None and not node.name:
            node.name = edit.node_name(node.op_type)
    dtype = weight.dtype or ir.DataType.FLOAT
    compute = ir.DataType.FLOAT if dtype in WIDE else dtype
    change = Change(
        "tuned",
        f"batchnorm into {linear.op_type}, its weight computed in the graph",
        tuple(n.name for n in block.match.nodes) + (linear.name,),
        tuple(v.name for v in (*_weight_and_bias(fold), gamma, beta, mean, var)),
    )
    g = _Builder(edit, bn.name or "batchnorm", compute)
    eps = g.constant(np.array(block.match.epsilon, compute.numpy()), "epsilon")
    s = g.op(
        "Div",
        [
            g.wide(gamma, "gamma"),
            g.op("Sqrt", [g.op("Add", [g.wide(var, "var"), eps], "var_eps")], "std"),
        ],
        "scale",
    )
    shape = _scale_shape(linear, len(constant_shape(weight)), block.channels)
    s_w = (
        s
        if shape is None
        else g.op(
            "Reshape", [s, g.constant(np.array(shape, np.int64), "scale_shape")], "scale_for_weight"
        )
    )
    new_weight = g.back(g.op("Mul", [g.wide(weight, "weight"), s_w], "weight_fp"), dtype, "weight")
    old_bias = bias_of(fold)
    record = {
        "bn": bn.name,
        "node": linear.name,
        "op": linear.op_type,
        "weight": weight.name,
        "bias": old_bias.name if old_bias is not None else None,
        "gemm_beta": linear.attributes.get_float("beta", 1.0) if linear.op_type == "Gemm" else None,
        "bias_add": fold.bias_add.name if fold.bias_add is not None else None,
        "gamma": gamma.name,
        "beta": beta.name,
        "mean": mean.name,
        "var": var.name,
        "epsilon": float(block.match.epsilon),
    }
    if (
        linear.op_type == "Gemm"
        and old_bias is not None
        and linear.attributes.get_float("beta", 1.0) != 1.0
    ):
        factor = g.constant(
            np.array(linear.attributes.get_float("beta", 1.0), compute.numpy()), "gemm_beta"
        )
        biased = g.op("Mul", [g.wide(old_bias, "bias"), factor], "bias_times_beta")
    else:
        biased = g.wide(old_bias, "bias") if old_bias is not None else None
    mean_w = g.wide(mean, "mean")
    shifted = g.op(
        "Mul",
        [
            g.op("Sub", [biased, mean_w], "bias_minus_mean")
            if biased is not None
            else g.op("Neg", [mean_w], "minus_mean"),
            s,
        ],
        "shift",
    )
    bias_dtype = (old_bias if old_bias is not None else weight).dtype or dtype
    new_bias = g.back(g.op("Add", [shifted, g.wide(beta, "beta")], "bias_fp"), bias_dtype, "bias")
    edit.graph.insert_before(linear, g.nodes)
    linear.replace_input_with(1, new_weight)
    if linear.op_type == "Gemm":
        linear.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is inside the bias now
    node, index = bias_slot(fold)
    if node is None:  # a MatMul without a bias Add gets one
        out = linear.outputs[0]
        add = edit.node("Add", [out, new_bias], name=f"{g.base}.bias_add", like=out)
        record["bias_add"] = add.name
        edit.graph.insert_after(linear, add)
        edit.take_over(out, add.outputs[0])
        add.replace_input_with(0, out)
    else:
        if index >= len(node.inputs):
            node.resize_inputs(index + 1)
        node.replace_input_with(index, new_bias)
    m = block.match
    edit.take_over(m.output, m.current_input())
    edit.graph.remove(m.nodes, safe=True)
    return change, record


class ConvBNTune(Pass):
    name = "convbn-tune"
    summary = (
        "Conv/Gemm/MatMul -> BatchNorm as one op whose weight the graph computes from the named BN "
        "parameters"
    )

    def plan(self, model: ir.Model) -> Plan:
        plan = Plan()  # (a linear op's output is read by its BN alone: no two blocks share an op)
        tuned = {r["node"]: r["bn"] for r in tune_records(model)}
        for node in model.graph:
            if node.op_type == "BatchNormalization":
                plan.decide(
                    f"batchnorm {node.name}", _plan_one(node, self.options.tune_params, tuned)
                )
        if not plan.actions and not plan.refusals:
            plan.idle = "no BatchNormalization"
        return plan

    def apply(self, model: ir.Model, plan: Plan) -> list[Change]:
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
        records = tune_records(model) + [record for _, record in applied]
        model.metadata_props[RECORDS_KEY] = json.dumps(records)
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
