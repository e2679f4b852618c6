"""`preln-to-rmsnorm`: make a Pre-LN transformer's residual stream zero-mean, then every LayerNorm
that reads it is an RMSNorm (Jiang et al., NeurIPS 2023; docs/rewrites.md, section 1).

Before: x0 = embed(...)          x_{i+1} = x_i + W_i(f_i(LN(x_i)))        y = head(LN(x_n))
After:  x0' = x0 - mean(x0)      x'_{i+1} = x'_i + W'_i(f_i(RMSNorm(x'_i)))  y = head(RMSNorm(x'_n))
        with every writer centred (W' = W - W.mean(out axis), b' = b - mean(b)), so x'_i =
        x_i - mean(x_i) and RMSNorm(x'_i) = LN(x_i) exactly (same epsilon, same gamma/beta).
Conditions (each refusal names the node; the planning is rewriter.stream_plan):
  1. the model classifies as pre-ln (rewriter.stream): not Post-LN, not already RMSNorm;
  2. every reader of a stream value is a LayerNorm over the hidden axis alone (converted), a
     residual Add, a reader of its shape or dtype only (Shape, Size, CastLike's type input),
     or an op that keeps every token's hidden vector whole (Cast, Reshape keeping the hidden
     size last, Transpose/Gather/Slice/Squeeze/Unsqueeze away from the hidden axis,
     ReduceMean over token axes), whose output then joins the stream and is checked the same;
  3. no stream value is a graph output (hidden states would change), unless
     `allow_hidden_state_change`;
  4. every branch output is written by linear ops with constant weights (MatMul, Gemm, an
     ungrouped Conv, their bias Adds, sums of such branches as in parallel blocks),
     optionally scaled by a per-channel LayerScale Mul, which is folded into them first (W*g,
     b*g) and removed; the initial stream value by embedding Gathers, constants, a patch Conv,
     Concat/Expand/Slice/Reshape/Transpose of those. Every value whose numbers change has no
     other reader. An initial value it cannot centre through its weights (a graph input, an
     activation, an embedding table shared with a tied LM head, whose copy would cost its full
     size) gets one explicit `x - ReduceMean(x)` instead;
  5. weights shared with other nodes are copied before centring (copy-on-write).
Conversion: a decomposed LN loses its ReduceMean and Sub (d = x - mean(x) = x now), which
leaves the decomposed RMSNorm form onnxruntime fuses; a LayerNormalization op becomes
RMSNormalization (opset >= 23) or that decomposed form (statistics in float32 for fp16/bf16
inputs, as stash_type=1 says), gamma as the scale. A beta read only by MatMul/Gemm ops folds
into their biases (b' = b + beta W); otherwise it stays an Add. `canonicalize-norms`, which
runs next, fuses them for --target ort.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Pass, Plan, Refusal
from normopt.rewriter import numerics
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import default_opset, folded_value
from normopt.rewriter.linear_fold import Fold, fold_weights
from normopt.rewriter.norms import find_norms
from normopt.rewriter.stream import analyze
from normopt.rewriter.stream_plan import Conversion, Planner, Refuse, StreamRewrite


def _axes_input(edit: Editor, opset: int, axes: list[int], attrs: dict, name: str) -> list[ir.Value]:
    if opset >= 18:
        return [edit.initializer(f"{name}.axes", np.array(axes, np.int64))]
    attrs["axes"] = axes
    return []


def _recentre(edit: Editor, value: ir.Value, opset: int) -> None:
    """Insert y = value - ReduceMean(value, last axis) and make every reader read y."""
    uses = list(value.uses())  # before the new nodes become readers too
    attrs: dict = {"keepdims": 1}
    base = value.name or "stream"
    mean = edit.node("ReduceMean", [value, *_axes_input(edit, opset, [-1], attrs, f"{base}.recentre")], attrs,
                     name=f"{base}.recentre_mean")
    sub = edit.node("Sub", [value, mean.outputs[0]], name=f"{base}.recentred", like=value)
    if value.producer() is None:  # a graph input
        edit.graph.insert_before(next(iter(edit.graph)), [mean, sub])
    else:
        edit.graph.insert_after(value.producer(), [mean, sub])
    for use in uses:
        use.node.replace_input_with(use.idx, sub.outputs[0])


def _rms_nodes(edit: Editor, x: ir.Value, gamma: ir.Value, eps: float, stash_type: int, opset: int,
               name: str) -> list[ir.Node]:
    """x / Sqrt(ReduceMean(x^2, -1) + eps) * gamma, in float32 for a 16-bit x when stash_type=1
    (the form onnxruntime fuses into its RMSNorm)."""
    dtype = x.dtype
    wide = stash_type == 1 and dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    compute = np.float32 if wide else dtype.numpy()
    nodes: list[ir.Node] = []
    if wide:
        nodes.append(edit.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}.to_float32"))
        x = nodes[-1].outputs[0]
    attrs: dict = {"keepdims": 1}
    nodes.append(edit.node("Pow", [x, edit.initializer(f"{name}.two", np.array(2, compute))], name=f"{name}.square"))
    nodes.append(edit.node("ReduceMean", [nodes[-1].outputs[0], *_axes_input(edit, opset, [-1], attrs, name)], attrs,
                           name=f"{name}.mean_square"))
    nodes.append(edit.node("Add", [nodes[-1].outputs[0], edit.initializer(f"{name}.eps", np.array(eps, compute))],
                           name=f"{name}.add_eps"))
    nodes.append(edit.node("Sqrt", [nodes[-1].outputs[0]], name=f"{name}.rms"))
    nodes.append(edit.node("Div", [x, nodes[-1].outputs[0]], name=f"{name}.normalize"))
    if wide:
        nodes.append(edit.node("Cast", [nodes[-1].outputs[0]], {"to": dtype}, name=f"{name}.to_input_dtype"))
    nodes.append(edit.node("Mul", [nodes[-1].outputs[0], gamma], name=f"{name}.scale"))
    return nodes


def _convert(edit: Editor, conversion: Conversion, opset: int) -> None:
    """Turn one stream LayerNorm into an RMSNorm (its beta folded where planned)."""
    match = conversion.match
    if match.form == "decomposed":  # d = x - mean(x) is x now: drop the mean and the Sub
        mean_node, sub = match.centring
        sub.outputs[0].replace_all_uses_with(sub.inputs[0])
        edit.graph.remove([sub, mean_node], safe=True)
        if conversion.beta_readers:  # y = z + beta: the readers take beta, z replaces y
            add = next(n for n in match.nodes if n.op_type == "Add" and match.bias in n.inputs)
            z = next(v for v in add.inputs if v is not match.bias)
            _fold_beta(edit, conversion)
            add.outputs[0].replace_all_uses_with(z)
            edit.graph.remove(add, safe=True)
        return
    ln = match.nodes[0]
    x, gamma = ln.inputs[0], ln.inputs[1]
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    stash, name = ln.attributes.get_int("stash_type", 1), ln.name or "layernorm"
    if opset >= 23:
        nodes = [edit.node("RMSNormalization", [x, gamma], {"axis": -1, "epsilon": float(match.epsilon),
                           "stash_type": stash}, name=f"{name}.rms")]
    else:
        nodes = _rms_nodes(edit, x, gamma, float(match.epsilon), stash, opset, name)
    beta_array = folded_value(beta)
    if beta is not None and not conversion.beta_readers and (beta_array is None or np.any(beta_array != 0)):
        nodes.append(edit.node("Add", [nodes[-1].outputs[0], beta], name=f"{name}.bias"))
    out = ln.outputs[0]
    y = nodes[-1].outputs[0]
    y.type, y.shape = out.type, out.shape
    edit.graph.insert_after(ln, nodes)
    edit.take_over(out, y)
    edit.graph.remove(ln, safe=True)
    _fold_beta(edit, conversion)


def _fold_beta(edit: Editor, conversion: Conversion) -> None:
    """y = z + beta read by linear ops: y @ W + b = z @ W + (b + beta @ W)."""
    if not conversion.beta_readers:
        return
    beta = folded_value(conversion.match.bias).astype(np.float64).reshape(-1)
    for node, bias_add in conversion.beta_readers:
        fold_weights(edit, Fold(np.ones_like(beta), beta, "following", node, bias_add))


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
        planner = Planner(norms, self.options.allow_hidden_state_change)
        adds = {r.node for r in stream.residual_adds}
        try:
            rewrite = planner.readers([*stream.initial, *(r.node.outputs[0] for r in stream.residual_adds)], adds)
            for r in stream.residual_adds:
                try:
                    rewrite.merge(planner.writer(r.branch, r.node))
                except Refuse as exc:
                    raise Refuse(f"branch written into the stream by residual Add {r.node.name}: {exc}") from None
        except Refuse as exc:
            return Plan(refusals=[Refusal("model", str(exc))])
        for value in stream.initial:  # each in a plan of its own, merged only if it succeeds
            try:
                rewrite.merge(planner.writer(value))
            except Refuse as exc:
                rewrite.recentred.append((value, str(exc)))
        return Plan(actions=[rewrite], changed_outputs=planner.changed_outputs)

    def apply(self, model: ir.Model, plan: Plan) -> list[str]:
        edit = Editor(model.graph)
        opset = default_opset(model)
        rewrite: StreamRewrite = plan.actions[0]
        for (node, index), axis in rewrite.centred.items():
            original = folded_value(node.inputs[index])
            values = original.astype(np.float64)
            if (node, index) in rewrite.scaled:  # LayerScale first: W*g along the hidden axis
                values = numerics.scale_along(values, rewrite.scaled[(node, index)], axis)
            edit.set_constant_input(node, index, numerics.center(values, axis).astype(original.dtype),
                                    f"{node.name}.centred")
        for mul in rewrite.layerscales:  # folded into the writer: y = z * g is z now
            data = next(v for v in mul.inputs if folded_value(v) is None)
            mul.outputs[0].replace_all_uses_with(data)
            edit.graph.remove(mul, safe=True)
        for value, _why in rewrite.recentred:
            _recentre(edit, value, opset)
        for conversion in rewrite.conversions:
            _convert(edit, conversion, opset)
        changes = [f"converted {len(rewrite.conversions)} LayerNorm(s) reading the stream to RMSNorm",
                   f"centred {len(rewrite.centred)} writer weight(s) along the hidden axis"]
        if rewrite.layerscales:
            changes.append(f"folded {len(rewrite.layerscales)} LayerScale Mul(s) into their writers")
        folded = sum(1 for c in rewrite.conversions if c.beta_readers)
        if folded:
            changes.append(f"folded {folded} LayerNorm beta(s) into the biases of the linear ops reading them")
        changes += [f"inserted x - ReduceMean(x) after '{v.name}' ({why})" for v, why in rewrite.recentred]
        return changes
