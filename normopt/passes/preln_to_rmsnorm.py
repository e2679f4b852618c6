"""`preln-to-rmsnorm`: make a Pre-LN transformer's residual stream zero-mean, then every LayerNorm
that reads it is an RMSNorm (Jiang et al., NeurIPS 2023; shared/docs/rewrites.md section 1).

Before: x0 = embed(...)          x_{i+1} = x_i + W_i(f_i(LN(x_i)))        y = head(LN(x_n))
After:  x0' = x0 - mean(x0)      x'_{i+1} = x'_i + W'_i(f_i(RMSNorm(x'_i)))  y = head(RMSNorm(x'_n))
        with every writer centred (W' = W - W.mean(out axis), b' = b - mean(b)), so x'_i =
        x_i - mean(x_i) and RMSNorm(x'_i) = LN(x_i) exactly (same epsilon, same gamma/beta).
Conditions (each refusal names the node):
  1. the model classifies as pre-ln (rewriter.stream): not Post-LN, not already RMSNorm;
  2. every reader of a stream value is a LayerNorm (converted), a residual Add, a reader of
     its shape or dtype only (Shape, Size, CastLike's type input), or an op that keeps every token's hidden vector zero-mean (Cast, Reshape keeping the
     hidden size last, Transpose/Gather/Slice/Squeeze/Unsqueeze away from the hidden axis,
     ReduceMean over token axes); its output then joins the stream and is checked the same way;
  3. no stream value is a graph output (hidden states would change), unless
     `allow_hidden_state_change`;
  4. every branch output is written by linear ops with constant weights (MatMul, Gemm, their
     bias Adds, sums of such branches as in parallel blocks), optionally scaled by a per-channel
     LayerScale Mul, which is folded into them first (W*g, b*g) and removed; the initial stream value by
     embedding Gathers, constants, a patch Conv, Concat/Expand/Slice/Reshape/Transpose of
     those. An initial value it cannot centre through its weights, or whose embedding table is
     shared (a tied LM head), gets one explicit `x - ReduceMean(x)` instead (a copy of the
     table would cost its full size);
  5. weights shared with other nodes are copied before centring (copy-on-write).
Conversion: a decomposed LN loses its ReduceMean and Sub (d = x - mean(x) = x now), which
leaves the decomposed RMSNorm form onnxruntime fuses; a LayerNormalization op becomes
RMSNormalization (opset >= 23) or that decomposed form, gamma as the scale, beta as an Add.
`canonicalize-norms`, which runs next, fuses them for --target ort.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from normopt.rewriter.centering_math import center
from normopt.rewriter.graph import (consumers, folded_value, new_initializer, rank, set_constant_input, take_over,
                                    unique_node_name, value_readers)
from normopt.rewriter.norms import NormMatch, find_norms
from normopt.rewriter.pass_base import Pass, Plan, Refusal, register
from normopt.rewriter.stream import analyze

# Readers through which the stream stays a per-token zero-mean stream (checked further below).
_CARRIERS = {"Cast", "Identity", "Reshape", "Transpose", "Gather", "Slice", "Squeeze", "Unsqueeze", "ReduceMean"}


@dataclass
class StreamRewrite:
    conversions: list[NormMatch] = field(default_factory=list)
    centred: dict[tuple[ir.Node, int], int] = field(default_factory=dict)  # (node, input) -> axis
    scaled: dict[tuple[ir.Node, int], np.ndarray] = field(default_factory=dict)  # LayerScale folded in first
    layerscales: list[ir.Node] = field(default_factory=list)  # Muls removed once folded
    recentred: list[tuple[ir.Value, str]] = field(default_factory=list)  # explicit x - mean(x)

    def describe(self) -> str:
        parts = [f"convert {len(self.conversions)} LayerNorm(s) to RMSNorm",
                 f"centre {len(self.centred)} writer weight(s)"]
        parts += [f"recentre '{v.name}' explicitly ({why})" for v, why in self.recentred]
        return "; ".join(parts)


class _Refuse(Exception):
    """A precondition failed: the message is the reason a user reads."""


def _hidden_through(node: ir.Node, out_axis: int) -> int:
    """The input axis that becomes `out_axis` (non-negative) of a shape-moving node's output."""
    out_rank, in_rank = rank(node.outputs[0]), rank(node.inputs[0])
    if node.op_type in ("Cast", "Identity", "Expand", "Slice"):
        if out_rank is None or in_rank is None or out_rank != in_rank:
            raise _Refuse(f"rank unknown around {node.op_type} {node.name}")
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
        raise _Refuse(f"cannot tell where the hidden axis goes through {node.op_type} {node.name}")
    raise _Refuse(f"unexpected {node.op_type}")


def _keeps_hidden(node: ir.Node) -> bool:
    """Does `node` keep each token's hidden vector whole (so zero-mean stays zero-mean)?"""
    r = rank(node.inputs[0])
    if node.op_type in ("Cast", "Identity"):
        return True
    if r is None:
        return False
    last = r - 1
    if node.op_type == "Reshape":
        a, b = node.inputs[0].shape, node.outputs[0].shape
        return a is not None and b is not None and isinstance(a[-1], int) and a[-1] == b[-1]
    if node.op_type == "Transpose":
        perm = node.attributes.get_ints("perm", None)
        return perm is not None and perm[-1] == last
    if node.op_type == "Gather":
        return node.attributes.get_int("axis", 0) % r != last
    axes = node.attributes.get_ints("axes", None)
    if axes is None and len(node.inputs) > (3 if node.op_type == "Slice" else 1):
        array = folded_value(node.inputs[3 if node.op_type == "Slice" else 1])
        axes = None if array is None else [int(a) for a in array.reshape(-1)]
    if axes is None:
        return False
    out_r = r + len(axes) if node.op_type == "Unsqueeze" else r
    return all(a % out_r != out_r - 1 for a in axes)


class _Planner:
    def __init__(self, norms: list[NormMatch], allow_hidden: bool) -> None:
        self.allow_hidden = allow_hidden
        self.plan = StreamRewrite()
        self.changed_outputs: list[str] = []
        self.norm_of = {n: m for m in norms if m.kind in ("layernorm", "rmsnorm") for n in m.nodes}

    # ------------------------------------------------------------------ readers (condition 2, 3)
    def check_readers(self, starts: list[ir.Value], adds: set[ir.Node]) -> None:
        queue, seen = list(starts), set()
        while queue:
            value = queue.pop()
            if value in seen:
                continue
            seen.add(value)
            if value.is_graph_output():
                if not self.allow_hidden:
                    raise _Refuse(f"stream value '{value.name}' is a graph output: its hidden states would "
                                  "change (pass --allow-hidden-state-change to accept that)")
                self.changed_outputs.append(value.name)
            for node in value_readers(value):  # shape/dtype-only readers see no change
                match = self.norm_of.get(node)
                if node in adds:
                    continue
                if match is not None and match.input is value:
                    if match.kind != "layernorm":
                        raise _Refuse(f"{match.kind} {match.where()} reads the stream (mixed norms)")
                    if match.form == "op" and any(o.uses() or o.is_graph_output() for o in match.nodes[0].outputs[1:]):
                        raise _Refuse(f"LayerNormalization {match.where()}'s Mean/InvStdDev outputs are read")
                    if match not in self.plan.conversions:
                        self.plan.conversions.append(match)
                    continue
                if node.op_type in _CARRIERS and node.inputs[0] is value and _keeps_hidden(node):
                    queue.extend(node.outputs[:1])
                    continue
                raise _Refuse(f"{node.op_type} {node.name} reads stream value '{value.name}' and would see "
                              "the recentred values (not shift-invariant)")

    # ---------------------------------------------------------------------- writers (condition 4)
    def centre_writer(self, value: ir.Value, hidden: int | None = None, depth: int = 0,
                      scale: np.ndarray | None = None) -> None:
        """Plan centring of everything that writes `value` along its hidden axis. `scale` is a
        LayerScale vector to fold into the linear writers first (W*g, b*g, then centred)."""
        node = value.producer()
        r = rank(value)
        hidden = (r - 1 if r is not None else -1) if hidden is None else hidden
        if node is None:
            raise _Refuse(f"'{value.name}' is a graph input")
        if depth > 32:
            raise _Refuse(f"'{value.name}' is written by a chain too deep to follow")
        op = node.op_type
        last = hidden == -1 or (r is not None and hidden == r - 1)
        if op in ("Add", "Sub", "Concat"):
            if op == "Concat" and node.attributes.get_int("axis", 0) % (r or 1) == hidden % (r or 1):
                raise _Refuse(f"Concat {node.name} joins pieces along the hidden axis")
            for i, v in enumerate(node.inputs):
                if folded_value(v) is not None:
                    self._centre(scale, node, i, hidden - (r or 0) if hidden >= 0 else hidden)
                else:
                    self.centre_writer(v, hidden if (rank(v) == r or hidden < 0) else None, depth + 1, scale)
            return
        if op == "MatMul" and folded_value(node.inputs[1]) is not None and last:
            self._centre(scale, node, 1, -1)
            return
        if op == "Gemm" and folded_value(node.inputs[1]) is not None and last:
            self._centre(scale, node, 1, 0 if node.attributes.get_int("transB", 0) else -1)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._centre(scale, node, 2, -1)
            return
        if op == "Conv" and folded_value(node.inputs[1]) is not None and hidden == 1:  # output channels
            self._centre(scale, node, 1, 0)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                self._centre(scale, node, 2, -1)
            return
        if op == "Gather" and node.attributes.get_int("axis", 0) == 0 and folded_value(node.inputs[0]) is not None and last:
            table = node.inputs[0]
            if len(consumers(table)) > 1 or table.is_graph_output():
                raise _Refuse(f"embedding table '{table.name}' is shared (tied LM head?)")
            self._centre(scale, node, 0, -1)
            return
        if op == "Mul" and last and scale is None:  # LayerScale: branch * g, g per hidden channel
            constant = [folded_value(v) is not None for v in node.inputs]
            if constant.count(True) == 1:
                g = folded_value(node.inputs[constant.index(True)]).astype(np.float64)
                if g.size in (1, g.shape[-1] if g.ndim else 1) and len(consumers(value)) == 1 and not value.is_graph_output():
                    self.plan.layerscales.append(node)
                    self.centre_writer(node.inputs[constant.index(False)], hidden, depth + 1, g.reshape(-1))
                    return
        if op in ("Cast", "Identity", "Expand", "Slice", "Transpose", "Reshape", "Flatten"):
            if folded_value(node.inputs[0]) is not None:
                self._centre(scale, node, 0, _hidden_through(node, hidden if hidden >= 0 else r - 1) - rank(node.inputs[0]))
            else:
                self.centre_writer(node.inputs[0], _hidden_through(node, hidden if hidden >= 0 else r - 1), depth + 1, scale)
            return
        raise _Refuse(f"{op} {node.name} writes '{value.name}' and is not a linear op with constant weights")

    def _centre(self, scale: np.ndarray | None, node: ir.Node, index: int, axis: int) -> None:
        """Plan centring of a constant input along `axis` (negative: counted from its end)."""
        array = folded_value(node.inputs[index])
        if array.ndim < -axis or array.shape[axis] == 1:  # broadcast along the hidden axis
            if np.all(array == 0):
                return
            raise _Refuse(f"constant '{node.inputs[index].name}' is added along the whole hidden axis")
        self.plan.centred[(node, index)] = axis
        if scale is not None:
            self.plan.scaled[(node, index)] = scale


# ------------------------------------------------------------------------------- editing


def _axes_input(graph: ir.Graph, opset: int, axes: list[int], attrs: dict) -> list[ir.Value]:
    if opset >= 18:
        return [new_initializer(graph, "rms_axes", np.array(axes, np.int64))]
    attrs["axes"] = axes
    return []


def _recentre(graph: ir.Graph, value: ir.Value, opset: int) -> None:
    """Insert y = value - ReduceMean(value, last axis) and make every reader read y."""
    readers = list(value.uses())  # before the new nodes become readers too
    attrs: dict = {"keepdims": 1}
    mean = ir.node("ReduceMean", [value, *_axes_input(graph, opset, [-1], attrs)], attrs,
                   name=unique_node_name(graph, f"{value.name}.recentre_mean"))
    sub = ir.node("Sub", [value, mean.outputs[0]], name=unique_node_name(graph, f"{value.name}.recentre"))
    sub.outputs[0].type, sub.outputs[0].shape = value.type, value.shape
    if value.producer() is None:  # a graph input
        graph.insert_before(next(iter(graph)), [mean, sub])
    else:
        graph.insert_after(value.producer(), [mean, sub])
    for use in readers:
        use.node.replace_input_with(use.idx, sub.outputs[0])


def _convert(graph: ir.Graph, match: NormMatch, opset: int) -> ir.Value:
    """Turn one stream LayerNorm into an RMSNorm; returns the value that now ends the norm."""
    if match.form == "decomposed":  # d = x - mean(x) is x now: drop the mean and the Sub
        mean_node = next(n for n in match.nodes if n.op_type == "ReduceMean" and n.inputs[0] is match.core_input)
        sub = next(n for n in match.nodes if n.op_type == "Sub" and n.inputs[0] is match.core_input)
        sub.outputs[0].replace_all_uses_with(match.core_input)
        graph.remove([sub, mean_node], safe=True)
        return match.output
    ln = match.nodes[0]
    x, gamma = ln.inputs[0], ln.inputs[1]
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    eps, axis = float(match.epsilon), match.axis  # negative: the matcher normalized it
    name = ln.name or "layernorm"
    nodes: list[ir.Node] = []
    if opset >= 23:
        rms = ir.node("RMSNormalization", [x, gamma], {"axis": axis, "epsilon": eps,
                      "stash_type": ln.attributes.get_int("stash_type", 1)}, name=unique_node_name(graph, f"{name}.rms"))
        nodes.append(rms)
        y = rms.outputs[0]
    else:  # the decomposed form onnxruntime fuses: x / Sqrt(ReduceMean(x^2) + eps) * gamma
        axes = list(range(axis, 0))
        two = new_initializer(graph, f"{name}.two", np.array(2, dtype=folded_value(gamma).dtype))
        epsilon = new_initializer(graph, f"{name}.eps", np.array(eps, dtype=folded_value(gamma).dtype))
        attrs: dict = {"keepdims": 1}
        sq = ir.node("Pow", [x, two], name=unique_node_name(graph, f"{name}.square"))
        mean = ir.node("ReduceMean", [sq.outputs[0], *_axes_input(graph, opset, axes, attrs)], attrs,
                       name=unique_node_name(graph, f"{name}.mean_square"))
        add = ir.node("Add", [mean.outputs[0], epsilon], name=unique_node_name(graph, f"{name}.add_eps"))
        sqrt = ir.node("Sqrt", [add.outputs[0]], name=unique_node_name(graph, f"{name}.rms"))
        div = ir.node("Div", [x, sqrt.outputs[0]], name=unique_node_name(graph, f"{name}.normalize"))
        mul = ir.node("Mul", [div.outputs[0], gamma], name=unique_node_name(graph, f"{name}.scale"))
        nodes += [sq, mean, add, sqrt, div, mul]
        y = mul.outputs[0]
    if beta is not None and not np.all(folded_value(beta) == 0):
        bias = ir.node("Add", [y, beta], name=unique_node_name(graph, f"{name}.bias"))
        nodes.append(bias)
        y = bias.outputs[0]
    out = ln.outputs[0]
    y.type, y.shape = out.type, out.shape
    graph.insert_after(ln, nodes)
    take_over(out, y)
    graph.remove(ln, safe=True)
    return y


def _beta_add(match: NormMatch, converted_output: ir.Value) -> ir.Node | None:
    """The `+ beta` Add that follows a converted norm (its epilogue Add, or the one we made)."""
    if match.form == "decomposed":
        return next((n for n in match.nodes if n.op_type == "Add" and match.bias is not None and match.bias in n.inputs), None)
    producer = converted_output.producer()
    return producer if producer is not None and producer.op_type == "Add" else None


def _fold_beta(graph: ir.Graph, match: NormMatch, add: ir.Node) -> bool:
    """Fold y = z + beta into every linear reader (y @ W + b -> z @ W + (b + beta @ W)) when only
    MatMul/Gemm with constant weights read y (also through Reshapes keeping the hidden size).
    Returns whether it folded; otherwise the Add stays."""
    from normopt.passes.fold_affine_norms import Fold, bias_add_data, fold_weights

    y, beta_value = add.outputs[0], next(v for v in add.inputs if folded_value(v) is not None)
    z = next(v for v in add.inputs if v is not beta_value)
    beta = folded_value(beta_value).astype(np.float64).reshape(-1)
    if y.is_graph_output():
        return False
    readers, stack = [], value_readers(y)
    while stack:
        node = stack.pop()
        if node.op_type == "Reshape" and _keeps_hidden(node) and not node.outputs[0].is_graph_output():
            stack.extend(value_readers(node.outputs[0]))
        elif node.op_type == "MatMul" and folded_value(node.inputs[1]) is not None and folded_value(node.inputs[1]).ndim == 2:
            readers.append(node)
        elif node.op_type == "Gemm" and folded_value(node.inputs[1]) is not None and not node.attributes.get_int("transA", 0):
            readers.append(node)
        else:
            return False
    if not readers:
        return False
    for node in readers:
        out = node.outputs[0]
        nxt = consumers(out)
        bias = nxt[0] if node.op_type == "MatMul" and len(nxt) == 1 and not out.is_graph_output() and bias_add_data(nxt[0]) is out else None
        fold_weights(Fold(match, np.ones_like(beta), beta, "following", node, bias))
    y.replace_all_uses_with(z)
    graph.remove(add, safe=True)
    return True


@register
class PreLNToRMSNorm(Pass):
    name = "preln-to-rmsnorm"
    summary = "recentre a Pre-LN transformer's residual stream; its LayerNorms become RMSNorms"

    def plan(self, model: ir.Model) -> Plan:
        graph = model.graph
        norms = find_norms(graph)
        stream = analyze(graph, norms)
        if stream.architecture != "pre-ln":
            why = {
                "pre-rmsnorm": "already Pre-RMSNorm: nothing to recentre",
                "post-ln": "Post-LN: the LayerNorms read the sum after each residual Add, not a stream that can be recentred",
            }.get(stream.architecture, f"architecture is {stream.architecture}: {'; '.join(stream.reasons)}")
            return Plan(refusals=[Refusal("model", why)])
        planner = _Planner(norms, self.options.allow_hidden_state_change)
        adds = {r.node for r in stream.residual_adds}
        try:
            planner.check_readers([*stream.initial, *(r.node.outputs[0] for r in stream.residual_adds)], adds)
            for r in stream.residual_adds:
                try:
                    planner.centre_writer(r.branch)
                except _Refuse as exc:
                    raise _Refuse(f"branch written into the stream by residual Add {r.node.name}: {exc}") from None
        except _Refuse as exc:
            return Plan(refusals=[Refusal("model", str(exc))])
        for value in stream.initial:
            saved = dict(planner.plan.centred)
            try:
                planner.centre_writer(value)
            except _Refuse as exc:
                planner.plan.centred = saved
                planner.plan.recentred.append((value, str(exc)))
        return Plan(actions=[planner.plan], changed_outputs=planner.changed_outputs)

    def apply(self, model: ir.Model, plan: Plan) -> list[str]:
        graph = model.graph
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        rewrite: StreamRewrite = plan.actions[0]
        for (node, index), axis in rewrite.centred.items():
            original = folded_value(node.inputs[index])
            values = original.astype(np.float64)
            if (node, index) in rewrite.scaled:  # LayerScale first: W*g along the hidden axis
                g = rewrite.scaled[(node, index)]
                values = values * g.reshape([-1 if i == axis % values.ndim else 1 for i in range(values.ndim)])
            set_constant_input(node, index, center(values, axis).astype(original.dtype), f"{node.name}.centred")
        for mul in rewrite.layerscales:  # folded into the writer: y = z * g is z now
            data = next(v for v in mul.inputs if folded_value(v) is None)
            mul.outputs[0].replace_all_uses_with(data)
            graph.remove(mul, safe=True)
        for value, _why in rewrite.recentred:
            _recentre(graph, value, opset)
        folded = 0
        for match in rewrite.conversions:
            end = _convert(graph, match, opset)
            add = _beta_add(match, end)
            folded += add is not None and _fold_beta(graph, match, add)
        changes = [f"converted {len(rewrite.conversions)} LayerNorm(s) reading the stream to RMSNorm",
                   f"centred {len(rewrite.centred)} writer weight(s) along the hidden axis"]
        if rewrite.layerscales:
            changes.append(f"folded {len(rewrite.layerscales)} LayerScale Mul(s) into their writers")
        if folded:
            changes.append(f"folded {folded} LayerNorm beta(s) into the biases of the linear ops reading them")
        changes += [f"inserted x - ReduceMean(x) after '{v.name}' ({why})" for v, why in rewrite.recentred]
        return changes
