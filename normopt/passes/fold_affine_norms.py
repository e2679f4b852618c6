"""`fold-affine-norms`: fold inference-time per-channel affines into an adjacent linear op.

Before: Conv|ConvTranspose|Gemm|MatMul[+Add b] -> y = a*x + c          (preceding)
        y = a*x + c -> [Gather|Slice|Squeeze on token axes] -> MatMul|Gemm|Conv   (following)
        where y = a*x + c is BatchNormalization (also between Transposes, and SLAB's RepBN
        BN(x) + alpha*x) or a chain of per-channel constant Mul/Add/Sub/Div (Unified Norm,
        PowerNorm's affine).
After:  the linear op alone, with folded weights (a new bias Add only where none existed and
        the folded bias is non-zero).
Conditions:
  1. a and c are constants (BN statistics, alpha, chain constants: folded through the small
     constant subgraphs exporters leave, e.g. dynamo's Expand-built zero conv bias);
  2. the value between the norm and the linear op has exactly one reader and is no graph
     output (preceding: the linear op's output; following: the norm's output);
  3. the channel axis maps onto the weight axis being scaled: output channels of a Conv (axis
     1) or of a MatMul/Gemm (last axis) before; the input channels after;
  4. into a following Conv only with all pads zero or c == 0 (zero padding would add the
     shift to border outputs only partly);
  5. weights shared with other nodes are copied, never edited in place.
Formulas: rewriter/affine_math.py (float64, cast back to each tensor's dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.rewriter import affine_math as am
from normopt.rewriter.graph import (consumers, folded_value, new_initializer, rank, set_constant_input, take_over,
                                    unique_node_name, value_readers)
from normopt.rewriter.norms import NormMatch, find_norms
from normopt.rewriter.pass_base import Pass, Plan, Refusal, register

LINEAR = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass
class Fold:
    match: NormMatch
    a: np.ndarray
    c: np.ndarray
    side: str  # preceding | following
    linear: ir.Node
    bias_add: ir.Node | None = None  # a constant bias Add right after the linear op

    def describe(self) -> str:
        return f"{self.match.kind} at {self.match.where()} into {self.side} {self.linear.op_type} {self.linear.name}"


def _affine(match: NormMatch) -> tuple[np.ndarray, np.ndarray]:
    if match.kind == "batchnorm":
        bn = next(n for n in match.nodes if n.op_type == "BatchNormalization")
        gamma, beta, mean, var = (folded_value(v) for v in bn.inputs[1:5])
        return am.batchnorm_affine(gamma, beta, mean, var, match.epsilon, match.detail.get("repbn_alpha", 0.0))
    steps, channels = [], 1
    for node in match.nodes:
        k = next(folded_value(v) for v in node.inputs if folded_value(v) is not None)
        steps.append((node.op_type, k))
        channels = max(channels, k.size)
    return am.chain_affine(steps, channels)


def _rank(match: NormMatch, linear: ir.Node | None) -> int | None:
    for value in (match.input, match.output):
        if rank(value) is not None:
            return rank(value)
    if linear is not None and linear.op_type in ("Conv", "ConvTranspose"):
        w = folded_value(linear.inputs[1])
        return None if w is None else w.ndim
    return None


def _channel_axis(match: NormMatch, rank: int | None) -> int | None:
    """The channel axis of the norm's input, non-negative."""
    if match.kind == "batchnorm" and not match.detail.get("transposed"):
        return 1
    return None if rank is None else rank + match.axis


def _single_reader(value: ir.Value) -> ir.Node | str:
    """The one node reading `value`'s numbers (shape/dtype-only readers do not count: the fold
    keeps both, so they can read the other side)."""
    if value.is_graph_output():
        return f"'{value.name}' is a graph output"
    readers = value_readers(value)
    if len(readers) != 1:
        return f"'{value.name}' has {len(readers)} readers"
    return readers[0]


def bias_add_data(node: ir.Node | None) -> ir.Value | None:
    """For `Add(data, constant)` (either order) the data input, else None."""
    if node is None or node.op_type != "Add" or len(node.inputs) != 2:
        return None
    constant = [folded_value(v) is not None for v in node.inputs]
    if constant.count(True) != 1:
        return None
    return node.inputs[constant.index(False)]


def _expects_channel(linear: ir.Node, axis: int | None, rank: int | None, input_side: bool) -> str | None:
    """Why the channel axis does not map onto the weight axis, or None when it does."""
    if axis is None:
        return "the rank of the normalized tensor is unknown"
    if linear.op_type in ("Conv", "ConvTranspose"):
        return None if axis == 1 else f"channel axis {axis} is not the conv's channel axis 1"
    if rank is not None and axis != rank - 1:
        return f"channel axis {axis} is not the last axis a {linear.op_type} contracts or produces"
    if linear.op_type == "Gemm" and input_side and linear.attributes.get_int("transA", 0):
        return "Gemm with transA=1 reads its input transposed"
    return None


def _plan_preceding(match: NormMatch, a, c) -> Fold | str:
    producer = match.input.producer()
    bias_add = None
    linear_out = bias_add_data(producer)
    if linear_out is not None and linear_out.producer() is not None and linear_out.producer().op_type == "MatMul":
        bias_add, producer = producer, linear_out.producer()
        reader = _single_reader(linear_out)
        if not isinstance(reader, ir.Node):
            return reader
    if producer is None or producer.op_type not in LINEAR:
        return f"not produced by {'/'.join(LINEAR)} (by {producer.op_type if producer else 'a graph input'})"
    reader = _single_reader(match.input)
    if not isinstance(reader, ir.Node):
        return reader
    if folded_value(producer.inputs[1]) is None:
        return f"{producer.op_type} {producer.name} has no constant weight"
    if producer.op_type == "MatMul" and folded_value(producer.inputs[0]) is not None:
        return "MatMul's constant is its first input"
    rank = _rank(match, producer)
    problem = _expects_channel(producer, _channel_axis(match, rank), rank, input_side=False)
    if problem:
        return problem
    if len(producer.inputs) > 2 and producer.inputs[2] is not None and folded_value(producer.inputs[2]) is None:
        return f"{producer.op_type} {producer.name} has a non-constant bias"
    return Fold(match, a, c, "preceding", producer, bias_add)


def _token_axis_op(node: ir.Node, data_rank: int) -> int | str:
    """Rank after a Gather/Slice/Squeeze/Unsqueeze that leaves the last (channel) axis alone,
    or why it does not."""
    def axes(index: int) -> list[int] | None:
        if node.op_type in ("Squeeze", "Unsqueeze") and "axes" in node.attributes:
            return list(node.attributes.get_ints("axes"))
        array = folded_value(node.inputs[index]) if len(node.inputs) > index and node.inputs[index] is not None else None
        return None if array is None else [int(x) for x in array.reshape(-1)]

    op = node.op_type
    if op == "Gather":
        index = folded_value(node.inputs[1])
        if index is None or node.attributes.get_int("axis", 0) % data_rank == data_rank - 1:
            return "read through a Gather on the channel axis"
        return data_rank - 1 + index.ndim
    if op == "Slice":
        sliced = axes(3) if len(node.inputs) > 3 else list(range(data_rank))
        return "read through a Slice on the channel axis" if sliced is None or any(
            a % data_rank == data_rank - 1 for a in sliced) else data_rank
    changed = axes(1) if op in ("Squeeze", "Unsqueeze") else None
    if changed is None:
        return f"read by {op} {node.name}"
    if op == "Squeeze":  # removes axes of the input: the last one must stay
        touches_last, out_rank = any(a % data_rank == data_rank - 1 for a in changed), data_rank - len(changed)
    else:  # inserts axes of the output: none may become the last one
        out_rank = data_rank + len(changed)
        touches_last = any(a % out_rank == out_rank - 1 for a in changed)
    return f"read through a {op} at the channel axis" if touches_last else out_rank


def _plan_following(match: NormMatch, a, c) -> Fold | str:
    reader = _single_reader(match.output)
    if not isinstance(reader, ir.Node):
        return reader
    rank = _rank(match, None)
    axis = _channel_axis(match, rank)
    value = match.output
    while reader.op_type in ("Gather", "Slice", "Squeeze", "Unsqueeze") and reader.inputs[0] is value:
        if rank is None or axis != rank - 1:
            return f"read through {reader.op_type} {reader.name} with the channel axis not last"
        rank = _token_axis_op(reader, rank)
        if isinstance(rank, str):
            return rank
        axis, value = rank - 1, reader.outputs[0]
        reader = _single_reader(value)
        if not isinstance(reader, ir.Node):
            return reader
    if reader.op_type not in LINEAR or reader.op_type == "ConvTranspose":
        return f"read by {reader.op_type} {reader.name}, not by Conv/MatMul/Gemm"
    if reader.inputs[0] is not value:
        return f"it is not the data input of {reader.op_type} {reader.name}"
    weight = folded_value(reader.inputs[1])
    if weight is None:
        return f"{reader.op_type} {reader.name} has no constant weight"
    if reader.op_type == "MatMul" and weight.ndim != 2:
        return f"MatMul {reader.name} has a batched weight"
    problem = _expects_channel(reader, axis, rank, input_side=True)
    if problem:
        return problem
    if reader.op_type == "Conv" and np.any(c != 0):
        pads = reader.attributes.get_ints("pads", ())
        auto = reader.attributes.get_string("auto_pad", "NOTSET")
        if any(pads) or auto in ("SAME_UPPER", "SAME_LOWER"):
            return (f"Conv {reader.name} zero-pads its input: the shift c would reach border "
                    "outputs only partly (exact only with zero pads or c == 0)")
    out = reader.outputs[0]
    nxt = consumers(out)
    bias_add = (nxt[0] if reader.op_type == "MatMul" and len(nxt) == 1 and not out.is_graph_output()
                and bias_add_data(nxt[0]) is out else None)
    return Fold(match, a, c, "following", reader, bias_add)


# ------------------------------------------------------------------------------- editing


def _add_bias_after(node: ir.Node, bias: np.ndarray) -> ir.Value:
    """Insert `out + bias` after `node`; every former reader of its output reads the sum."""
    graph, out = node.graph, node.outputs[0]
    add = ir.node("Add", [out, new_initializer(graph, f"{node.name}.folded_bias", bias)],
                  name=unique_node_name(graph, f"{node.name}.bias_add"))
    add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
    graph.insert_after(node, add)
    take_over(out, add.outputs[0])  # readers and graph outputs now read the sum ...
    add.replace_input_with(0, out)  # ... which reads the linear op's own output
    return add.outputs[0]


def fold_weights(fold: Fold) -> None:
    """New weight and bias for the linear op (formulas in affine_math; float64, cast back)."""
    node, a, c, op = fold.linear, fold.a, fold.c, fold.linear.op_type
    w = folded_value(node.inputs[1])
    if fold.bias_add is not None:  # MatMul + Add(b): the bias lives in the Add
        bias_node = fold.bias_add
        bias_index = 1 if folded_value(bias_node.inputs[1]) is not None else 0
    elif op in ("Conv", "ConvTranspose", "Gemm"):
        bias_node, bias_index = node, 2
    else:
        bias_node, bias_index = None, None
    bias_value = bias_node.inputs[bias_index] if bias_node is not None and bias_index < len(bias_node.inputs) else None
    b = folded_value(bias_value)  # any broadcastable shape; None when absent
    alpha, beta = node.attributes.get_float("alpha", 1.0), node.attributes.get_float("beta", 1.0)
    trans_b = node.attributes.get_int("transB", 0)
    if op in ("Conv", "ConvTranspose"):
        channels = w.shape[0] if op == "Conv" else w.shape[1] * node.attributes.get_int("group", 1)
        b = np.zeros(channels, w.dtype) if b is None else b
    if fold.side == "preceding":
        if op == "Conv":
            w2, b2 = am.into_conv_output(w, b, a, c)
        elif op == "ConvTranspose":
            w2, b2 = am.into_conv_transpose_output(w, b, a, c, node.attributes.get_int("group", 1))
        elif op == "Gemm":  # a*(alpha A B + beta C) + c = alpha A (B a) + (a beta C + c)
            w2, b2 = am.into_matmul_output(w.T if trans_b else w, 0.0 if b is None else beta * b, a, c)
            w2 = w2.T if trans_b else w2
        else:
            w2, b2 = am.into_matmul_output(w, 0.0 if b is None else b, a, c)
    else:
        if op == "Conv":
            w2, b2 = am.into_conv_input(w, b, a, c, node.attributes.get_int("group", 1))
        elif op == "Gemm":  # alpha (a x + c) B + beta C = alpha x (diag(a) B) + (alpha c B + beta C)
            w2, shift = am.into_matmul_input(w.T if trans_b else w, 0.0, a, c)
            w2 = w2.T if trans_b else w2
            b2 = alpha * shift + (0.0 if b is None else beta * b)
        else:
            w2, b2 = am.into_matmul_input(w, 0.0 if b is None else b, a, c)
    if op == "Gemm":
        node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)  # beta is now inside the bias
    if not (np.all(a == 1) and fold.side == "following"):  # a pure shift leaves the weight as it is
        set_constant_input(node, 1, w2.astype(w.dtype), f"{node.name}.weight")
    b2 = np.asarray(b2).astype(w.dtype if b is None else b.dtype)
    if bias_node is not None:
        set_constant_input(bias_node, bias_index, b2, f"{node.name}.bias")
    elif np.any(b2 != 0):
        _add_bias_after(node, b2)


def _apply_one(graph: ir.Graph, fold: Fold) -> None:
    m = fold.match
    members = set(m.nodes)
    entry = next((u.node, u.idx) for u in m.input.uses() if u.node in members)
    fold_weights(fold)
    if fold.side == "preceding":
        folded = entry[0].inputs[entry[1]]  # what the norm reads now (a new bias Add, if any)
        take_over(m.output, folded)
    else:  # the linear op (or the Gather before it) and any shape-only reader read x directly
        m.output.replace_all_uses_with(m.input)
    graph.remove(m.nodes, safe=True)


@register
class FoldAffineNorms(Pass):
    name = "fold-affine-norms"
    summary = "fold BatchNorm / RepBN / per-channel affine norms into the adjacent Conv, Gemm or MatMul"

    def plan(self, model: ir.Model) -> Plan:
        plan, used = Plan(), set()
        matches = find_norms(model.graph)
        matched = {n for m in matches for n in m.nodes}
        for node in model.graph:
            if node.op_type == "BatchNormalization" and node not in matched:
                plan.refusals.append(Refusal(f"batchnorm {node.name}", "its parameters are not constant "
                                             "(graph inputs or computed) or it runs in training mode"))
        for match in matches:
            if match.kind not in ("batchnorm", "affine"):
                continue
            where = f"{match.kind} at {match.where()}"
            affine = _affine(match)
            before = _plan_preceding(match, *affine)
            fold = before if isinstance(before, Fold) else _plan_following(match, *affine)
            if isinstance(fold, Fold) and fold.linear in used:
                fold = f"{fold.linear.op_type} {fold.linear.name} already takes another norm"
            if isinstance(fold, Fold):
                used.add(fold.linear)
                plan.actions.append(fold)
            else:
                plan.refusals.append(Refusal(where, f"cannot fold before ({before}) or after ({fold})"))
        if not plan.actions and not plan.refusals:
            plan.refusals.append(Refusal("model", "no BatchNorm or per-channel affine norm"))
        return plan

    def apply(self, model: ir.Model, plan: Plan) -> list[str]:
        counts: dict[str, int] = {}
        for fold in plan.actions:
            _apply_one(model.graph, fold)
            key = f"{fold.match.kind} into {fold.side} {fold.linear.op_type}"
            counts[key] = counts.get(key, 0) + 1
        return [f"folded {n} {key}" for key, n in counts.items()]
