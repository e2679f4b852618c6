"""`preln-to-rmsnorm`: make the inputs of LayerNorms zero-mean, then each is an RMSNorm (Jiang et
al., NeurIPS 2023; docs/rewrites.md, section 1): a Pre-LN transformer's residual stream, and
wherever else a LayerNorm's input can be recentred exactly.

Before: x0 = embed(...)          x_{i+1} = x_i + W_i(f_i(LN(x_i)))        y = head(LN(x_n))
After:  x0' = x0 - mean(x0)      x'_{i+1} = x'_i + W'_i(f_i(RMSNorm(x'_i)))  y = head(RMSNorm(x'_n))
        with every writer centred (W' = W - W.mean(out axis), b' = b - mean(b)), so x'_i =
        x_i - mean(x_i) and RMSNorm(x'_i) = LN(x_i) exactly (same epsilon, same gamma/beta).
Decided per LayerNorm (the analysis is rewriter.stream_plan); each norm that stays says why:
  1. the norm normalizes the hidden axis alone (a LayerNormalization op, a decomposed LN, or
     onnxruntime's SkipLayerNormalization, which normalizes input + skip + its residual bias;
     its Mean/InvStdDev outputs unread);
  2. every value recentred with its input is read only by such norms, by merges that carry the
     recentring on (residual Adds, Cast, Reshape keeping the hidden size, token-axis
     Gather/Slice/Transpose/Expand/Pad/Split, mean pooling, Concat along a token axis), or by
     readers of its shape or dtype only; a value that something else reads keeps its numbers,
     and the merges it feeds are recentred explicitly after it;
  3. no recentred value is a graph output (hidden states), unless `allow_hidden_state_change`;
  4. the writers are centred where they can be (linear ops with constant weights along their
     output axis, ungrouped Convs, embedding tables, constants; LayerScale folded in first;
     every value the centring changes has no other reader), else recentred explicitly;
  5. a region is recentred only when it converts more norms than it needs explicit
     recentrings (one mean each); shared weights are copied before centring.
Conversion: a decomposed LN loses its ReduceMean and Sub (d = x - mean(x) = x now), which
leaves the decomposed RMSNorm form onnxruntime fuses; a LayerNormalization op becomes
RMSNormalization (opset >= 23) or that decomposed form (statistics in float32 for fp16/bf16
inputs, as stash_type=1 says), gamma as the scale; a SkipLayerNormalization becomes
SkipSimplifiedLayerNormalization, its residual bias centred with the stream. A beta read only
by MatMul/Gemm ops folds into their biases (b' = b + beta W); otherwise it stays an Add.
`canonicalize-norms`, which runs next, fuses them for --target ort.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normopt.passes.base import Change, Pass, Plan, Refusal
from normopt.rewriter import numerics, streamed
from normopt.rewriter.edit import Editor
from normopt.rewriter.graph import (
    NCHW_TO_NHWC,
    NHWC_TO_NCHW,
    default_opset,
    folded_value,
    permuted_around,
)
from normopt.rewriter.linear_fold import Fold, fold_weights
from normopt.rewriter.norm_match import is_skip, skip_sum
from normopt.rewriter.norms import NormMatch, find_norms
from normopt.rewriter.stream_plan import Conversion, Planner, StreamRewrite


def _centre_input(
    edit: Editor, rewrite: StreamRewrite, node: ir.Node, index: int, axis: int | None
) -> None:
    """A writer's constant centred along the hidden axis (LayerScale first: W*g along it); a
    shift along the whole hidden axis (axis None) the recentring removes: zero."""
    original = folded_value(node.inputs[index])
    if axis is None:
        centred = np.zeros_like(original)
    else:
        values = original
        if (node, index) in rewrite.scaled:
            values = numerics.scale_along(values, rewrite.scaled[(node, index)], axis)
        centred = streamed.centred(values, axis, original.dtype)
    edit.set_constant_input(node, index, centred, f"{node.name}.centred")


def _recentre(edit: Editor, value: ir.Value, opset: int) -> None:
    """Insert y = value - ReduceMean(value, last axis) and make every reader read y."""
    uses = list(value.uses())  # before the new nodes become readers too
    base = value.name or "stream"
    mean = edit.reduce_mean(value, [-1], opset, name=f"{base}.recentre_mean")
    sub = edit.node("Sub", [value, mean.outputs[0]], name=f"{base}.recentred", like=value)
    if value.producer() is None:  # a graph input
        edit.graph.insert_before(next(iter(edit.graph)), [mean, sub])
    else:
        edit.graph.insert_after(value.producer(), [mean, sub])
    for use in uses:
        use.node.replace_input_with(use.idx, sub.outputs[0])


def _rms_nodes(
    edit: Editor, ln: ir.Node, eps: float, stash_type: int, opset: int, name: str
) -> list[ir.Node]:
    """x / Sqrt(ReduceMean(x^2, -1) + eps) * gamma for the LayerNormalization `ln` (x, gamma its
    inputs), in float32 for a 16-bit x when stash_type=1 (the form onnxruntime fuses into its
    RMSNorm); the scaled output typed as `ln`'s output (a later pass reads its dtype)."""
    x, gamma = ln.inputs[0], ln.inputs[1]
    dtype = x.dtype
    wide = stash_type == 1 and dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
    compute = np.float32 if wide else dtype.numpy()
    nodes: list[ir.Node] = []
    if wide:
        nodes.append(edit.node("Cast", [x], {"to": ir.DataType.FLOAT}, name=f"{name}.to_float32"))
        x = nodes[-1].outputs[0]
    nodes += edit.rms_core(x, eps, compute, opset, name=name)
    if wide:
        nodes.append(
            edit.node("Cast", [nodes[-1].outputs[0]], {"to": dtype}, name=f"{name}.to_input_dtype")
        )
    scaled = [nodes[-1].outputs[0], gamma]
    nodes.append(edit.node("Mul", scaled, name=f"{name}.scale", like=ln.outputs[0]))
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
    if is_skip(ln):
        _convert_skip(edit, conversion)
        return
    out = ln.outputs[0]
    beta = ln.inputs[2] if len(ln.inputs) > 2 else None
    stash, name = ln.attributes.get_int("stash_type", 1), ln.name or "layernorm"
    if opset >= 23:
        nodes = [
            edit.node(
                "RMSNormalization",
                ln.inputs[:2],
                {"axis": -1, "epsilon": float(match.epsilon), "stash_type": stash},
                name=f"{name}.rms",
                like=out,
            )
        ]
    else:
        nodes = _rms_nodes(edit, ln, float(match.epsilon), stash, opset, name)
    beta_array = folded_value(beta)
    if (
        beta is not None
        and not conversion.beta_readers
        and (beta_array is None or np.any(beta_array != 0))
    ):
        nodes.append(edit.node("Add", [nodes[-1].outputs[0], beta], name=f"{name}.bias", like=out))
    y = nodes[-1].outputs[0]
    edit.graph.insert_after(ln, nodes)
    edit.take_over(out, y)
    edit.graph.remove(ln, safe=True)
    _fold_beta(edit, conversion)


def _convert_skip(edit: Editor, conversion: Conversion) -> None:
    """SkipLayerNormalization(input, skip, gamma, beta, bias) -> SkipSimplifiedLayerNormalization
    (input, skip, gamma, bias) [+ beta]: the sum it normalizes is zero-mean now (its residual
    bias centred with the stream), and its output 3, the sum, stays where it is read."""
    ln = conversion.match.nodes[0]
    bias = ln.inputs[4] if len(ln.inputs) > 4 else None
    name = ln.name or "skiplayernorm"
    summed = skip_sum(ln) is not None  # output 3 only where it is read
    skip = ir.node(
        "SkipSimplifiedLayerNormalization",
        [*ln.inputs[:3], *([bias] if bias is not None else [])],
        {"epsilon": float(conversion.match.epsilon)},
        domain="com.microsoft",
        name=edit.node_name(f"{name}.rms"),
        num_outputs=4 if summed else 1,
    )
    y = skip.outputs[0]
    y.name = edit.value_name(f"{name}.y")
    for unused in skip.outputs[1:3]:  # no statistics outputs: onnxruntime would compute them
        unused.name = ""
    nodes = [skip]
    beta = ln.inputs[3] if len(ln.inputs) > 3 else None
    beta_array = folded_value(beta)
    if (
        beta is not None
        and not conversion.beta_readers
        and (beta_array is None or np.any(beta_array != 0))
    ):
        nodes.append(edit.node("Add", [y, beta], name=f"{name}.bias", like=ln.outputs[0]))
    edit.graph.insert_after(ln, nodes)
    edit.take_over(ln.outputs[0], nodes[-1].outputs[0])
    if summed:
        edit.take_over(ln.outputs[3], skip.outputs[3])
    edit.graph.remove(ln, safe=True)
    _fold_beta(edit, conversion)


def _fold_beta(edit: Editor, conversion: Conversion) -> None:
    """y = z + beta read by linear ops: y @ W + b = z @ W + (b + beta @ W)."""
    if not conversion.beta_readers:
        return
    beta = folded_value(conversion.match.bias).astype(np.float64).reshape(-1)
    for node, bias_add in conversion.beta_readers:
        fold_weights(edit, Fold(np.ones_like(beta), beta, "following", node, bias_add))


def _no_gain(match: NormMatch, opset: int, target: str, shared: set[ir.Value]) -> str | None:
    """Why converting this LayerNorm would not pay on `target`, or None. Below opset 23 a
    LayerNormalization op becomes the decomposed RMSNorm (no RMSNormalization op), which
    onnxruntime fuses back except where:
    - the norm is on an NCHW tensor permuted to NHWC and back (a channels-first norm: timm's
      LayerNorm2d): onnxruntime moves the permutes through the decomposed ops, cannot fuse them
      (the reduction is no longer on the last axis), and keeps permutes it had cancelled around
      its NCHWc Convs (timm ConvNeXt, opset 17, 8x128x128: 1.03x slower);
    - another LayerNormalization reads the same input (GPT-NeoX's parallel block): onnxruntime
      shares the two decomposed norms' statistics and fuses neither (GPT-NeoX, opset 17: 1.02x
      slower).
    --target ort emits a fused op there, opset >= 23 RMSNormalization."""
    if match.form != "op" or is_skip(match.nodes[0]) or opset >= 23 or target == "ort":
        return None
    if match.input in shared:
        return (
            "stays a LayerNormalization: another norm reads its input, and two decomposed "
            "RMSNorms of one "
            f"input (opset {opset} has no RMSNormalization) are not fused by onnxruntime (measured "
            "slower; "
            "--target ort or opset >= 23 converts it)"
        )
    if permuted_around(match.input, match.nodes[0].outputs[0]) != (NCHW_TO_NHWC, NHWC_TO_NCHW):
        return None
    return (
        "stays a LayerNormalization: on NCHW permuted to NHWC and back its RMSNorm would be "
        "decomposed "
        f"(opset {opset} has no RMSNormalization), which onnxruntime does not fuse there (measured "
        "slower; "
        "--target ort or opset >= 23 converts it)"
    )


@dataclass(frozen=True)
class PreLNSettings:
    """`recentring_cost`: what an explicit recentring costs, in LayerNorm conversions saved
    (None: stream_plan.RECENTRING_COST, measured on ORT CPU); a region converts only where its
    conversions outweigh its recentrings at this price. `convert_all` 1: a LayerNorm is
    converted also where the conversion alone does not pay on ORT CPU (`_no_gain`: GPT-NeoX's
    parallel norms), as a rotation of the stream needs (`rewrite --rotate` sets it); the
    recentring price stays (at 0, a recentring and the RMSNorm after it would be matched as a
    LayerNorm and converted again on every run: found by the rotation campaign, seed 20107)."""

    recentring_cost: int | None = None
    convert_all: int = 0


class PreLNToRMSNorm(Pass[StreamRewrite]):
    Settings = PreLNSettings

    name = "preln-to-rmsnorm"
    summary = "recentre a Pre-LN transformer's residual stream; its LayerNorms become RMSNorms"

    def plan(self, model: ir.Model) -> Plan[StreamRewrite]:
        norms = find_norms(model.graph)
        layernorms = [m for m in norms if m.kind == "layernorm"]
        if not layernorms:
            rms = any(m.kind == "rmsnorm" for m in norms)
            return Plan(
                idle="no LayerNorm"
                + (": its norms are RMSNorms already, nothing to recentre" if rms else "")
            )
        opset = default_opset(model)
        readers = collections.Counter(
            m.input for m in layernorms if m.form == "op" and not is_skip(m.nodes[0])
        )
        shared = {v for v, n in readers.items() if n > 1}
        every = bool(self.settings.convert_all)
        planner = Planner(
            norms,
            self.options.allow_hidden_state_change,
            lambda m: None if every else _no_gain(m, opset, self.options.target, shared),
            self.settings.recentring_cost,
        )
        rewrite, plan = StreamRewrite(), Plan()
        decided: set[int] = set()
        for comp in planner.components([v for m in layernorms for v in m.reads()]):
            regions, frozen = planner.regions(comp)
            for m in comp.norms:
                kept = next((v for v in m.reads() if v in frozen), None)
                if kept is not None:
                    decided.add(id(m))
                    plan.refusals.append(Refusal(f"layernorm at {m.where()}", frozen[kept]))
            for region in regions:
                result = planner.plan(region)
                decided.update(id(m) for m in region.norms)
                if isinstance(result, StreamRewrite):
                    rewrite.merge(result)
                    plan.changed_outputs += region.changed_outputs()
                else:
                    plan.refusals += [
                        Refusal(f"layernorm at {m.where()}", result) for m in region.norms
                    ]
        for m in layernorms:  # the ones that cannot be converted whatever their input
            if id(m) not in decided:
                plan.refusals.append(Refusal(f"layernorm at {m.where()}", planner.norm_problem(m)))
        plan.refusals += [Refusal(f"layernorm at {m.where()}", why) for m, why in rewrite.kept]
        if rewrite.conversions:
            plan.actions.append(rewrite)
        plan.stats = {
            "layernorms": len(layernorms),
            "converted": len(rewrite.conversions),
            "recentrings": len(rewrite.recentred),
            "centred_constants": len(rewrite.centred),
        }
        return plan

    def apply(self, model: ir.Model, plan: Plan[StreamRewrite]) -> list[Change]:
        edit = Editor(model.graph)
        opset = default_opset(model)
        rewrite: StreamRewrite = plan.actions[0]
        changes = [
            Change(
                "converted",
                "LayerNorm(s) reading the stream to RMSNorm",
                tuple(n.name for n in c.match.nodes),
                (c.match.output.name,),
            )
            for c in rewrite.conversions
        ]
        changes += [
            Change(
                "folded",
                "LayerNorm beta(s) into the biases of the linear ops reading them",
                tuple(r.name for r, _ in c.beta_readers),
                (c.match.bias.name,),
            )
            for c in rewrite.conversions
            if c.beta_readers
        ]
        for (node, index), axis in rewrite.centred.items():
            what = "writer weight(s) along the hidden axis"
            changes.append(Change("centred", what, (node.name,), (node.inputs[index].name,)))
            _centre_input(edit, rewrite, node, index, axis)
        for mul in rewrite.layerscales:  # folded into the writer: y = z * g is z now
            changes.append(
                Change(
                    "folded",
                    "LayerScale Mul(s) into their writers",
                    (mul.name,),
                    tuple(v.name for v in mul.inputs if folded_value(v) is not None),
                )
            )
            data = next(v for v in mul.inputs if folded_value(v) is None)
            mul.outputs[0].replace_all_uses_with(data)
            edit.graph.remove(mul, safe=True)
        for value, why in rewrite.recentred:
            what = "stream value(s) with x - ReduceMean(x)"
            changes.append(Change("recentred", what, (), (value.name,), why))
            _recentre(edit, value, opset)
        for conversion in rewrite.conversions:
            _convert(edit, conversion, opset)
        return changes
