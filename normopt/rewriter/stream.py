"""Residual-stream analysis: find the stream, its writers and readers, and classify the model.

Graph-based, no architecture names. Analysis only; never edits.

A *residual Add* is `Add(skip, branch)` where `branch` is computed from `skip` through at least
one linear op (MatMul/Gemm/Conv): a transformer block, a ResNet block. That rules out the
elementwise Adds inside activations (tanh-GELU's x + 0.044715 x^3) and bias or mask Adds.
The *stream* is the chain of skip values and residual-Add outputs.

Per residual Add:
  pre   a LayerNorm/RMSNorm reads the skip and its output feeds the branch (Pre-LN);
  post  the stream is normalized between blocks: the skip is a norm's output, or the Add's
        output reaches the next block only through a norm (Post-LN, with or without an
        embedding LN before the first block);
  peri  the branch ends in a norm (Peri-LN normalizes branch outputs too).
Classification: `pre-ln` / `pre-rmsnorm` (every Add pre, none post or peri, one norm kind),
`post-ln` (every Add post, none pre), `peri-ln` (every Add pre and peri), `mixed` (anything
else with norms), `none` (no residual Add, or no LN/RMSNorm on them: CNNs, BN transformers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from normopt.rewriter.graph import LINEAR_OPS, constant_value, forwards, is_op, readers
from normopt.rewriter.norm_match import NormMatch, is_skip, skip_sum

ARCHITECTURES = ("pre-ln", "post-ln", "pre-rmsnorm", "peri-ln", "mixed", "none")


@dataclass
class ResidualAdd:
    node: ir.Node
    skip: ir.Value
    branch: ir.Value
    pre: list[NormMatch] = field(default_factory=list)  # norms reading the skip, feeding the branch
    post: NormMatch | None = None  # the norm between this block and a neighbouring one
    peri: NormMatch | None = None  # the norm that ends the branch
    start_norm: NormMatch | None = None  # the norm whose output starts the stream this Add reads


@dataclass
class StreamAnalysis:
    architecture: str
    reasons: list[str]
    residual_adds: list[ResidualAdd]
    initial: list[ir.Value]  # stream values no residual Add produced (embedding sums, ...)
    final_norms: list[NormMatch]  # norms reading the last stream value
    readers: dict[str, list[str]]  # other readers of stream values: op type -> node names

    def writers(self) -> list[dict]:
        """What writes into the stream: its initial values and every branch output."""
        out = [{"value": v.name, "role": "initial", "op": _op(v)} for v in self.initial]
        out += [
            {"value": r.branch.name, "role": "branch", "op": _op(r.branch)}
            for r in self.residual_adds
        ]
        return out

    def to_json(self) -> dict:
        return {
            "architecture": self.architecture,
            "reasons": self.reasons,
            "residual_adds": len(self.residual_adds),
            "writers": self.writers(),
            "final_norms": [n.where() for n in self.final_norms],
            "other_readers": self.readers,
        }


def _op(value: ir.Value) -> str:
    node = value.producer()
    return "graph input" if node is None else node.op_type


def _source(value: ir.Value) -> ir.Value:
    """`value` with Casts and reshapes peeled off: the stream value it carries (OPT reshapes
    the stream between blocks)."""
    node = value.producer()
    while forwards(node, "value", "reshape") and node.inputs:
        value = node.inputs[0]
        node = value.producer()
    return value


def _reaches_through_linear(source: ir.Value, target: ir.Value, order: dict[ir.Node, int]) -> bool:
    """Is `target` computed from `source` along a path through a linear op? (backward search,
    pruned at nodes that come before `source`'s producer; a fused Skip norm's normalized output
    is computed from its sum, `source` then)"""
    producer = source.producer()
    floor = order.get(producer, -1)
    found = set(producer.outputs) if is_skip(producer) else {source}
    stack, seen = [(target, False)], set()
    while stack:
        value, linear = stack.pop()
        if value in found:
            if linear:
                return True
            continue
        node = value.producer()
        if node is None or (value, linear) in seen or order.get(node, -1) < floor:
            continue
        seen.add((value, linear))
        passes = linear or is_op(node, *LINEAR_OPS)
        stack.extend((v, passes) for v in node.inputs if v is not None)
    return False


def find_residual_adds(
    graph: ir.Graph, norm_inputs: dict[ir.Value, ir.Value] | None = None
) -> list[ResidualAdd]:
    """Residual Adds that form the stream. `norm_inputs` maps a norm's output to its input, so
    a Post-LN stream links through its norms.

    A candidate (skip reaches branch through a linear op) is kept only if it is linked into a
    chain: its output carries on as another candidate's skip, or its skip is another one's
    output. That drops a later layer's attention-mask Add, whose mask reaches the scores
    through the earlier layers but never carries the stream. With no chain at all (a single
    block), every candidate is kept.
    """
    order = {node: i for i, node in enumerate(graph)}
    norm_inputs = norm_inputs or {}
    candidates = []
    for node in graph:
        # a fused Skip norm (onnxruntime's) is a residual Add too
        if not (is_skip(node) or is_op(node, "Add") and len(node.inputs) == 2):
            continue
        a, b = node.inputs[:2]
        if a is None or b is None or a is b:
            continue
        for skip, branch in ((a, b), (b, a)):
            # a constant is never the stream (a beta two norms share reaches the later one's input)
            if (
                (len(readers(skip)) > 1 or is_skip(skip.producer()))  # the Skip's norm reads it
                and constant_value(skip) is None
                and _reaches_through_linear(skip, branch, order)
            ):
                candidates.append(ResidualAdd(node, skip, branch))
                break
    outputs = {total(r.node) for r in candidates}
    fed = {_carried_from(r.skip, norm_inputs) for r in candidates}
    linked = [
        r
        for r in candidates
        if total(r.node) in fed or _carried_from(r.skip, norm_inputs) in outputs
    ]
    return linked or candidates


def total(node: ir.Node) -> ir.Value | ir.Node:
    """What a residual Add outputs: an Add's output; a fused Skip norm's sum, or the node itself
    where it outputs none (its own norm reads the sum inside it)."""
    return (skip_sum(node) or node) if is_skip(node) else node.outputs[0]


def _norm_reads(norm: NormMatch) -> ir.Value | ir.Node:
    """The stream value a norm reads (a fused Skip norm: its residual Add's `total`)."""
    return total(norm.nodes[0]) if is_skip(norm.nodes[0]) else _source(norm.input)


def _carried_from(skip: ir.Value, norm_inputs: dict) -> ir.Value | ir.Node:
    """The stream value a skip carries: through reshapes and casts, and through the norm
    that a Post-LN block applies after its residual Add (`norm_inputs`: from `_norm_reads`)."""
    value = _source(skip)
    return norm_inputs.get(value, value)


def analyze(graph: ir.Graph, norms: list[NormMatch]) -> StreamAnalysis:
    """Classify the residual structure of `graph` given its norms (from `find_norms`)."""
    order = {node: i for i, node in enumerate(graph)}
    seq_norms = [n for n in norms if n.kind in ("layernorm", "rmsnorm")]
    by_input: dict[ir.Value, list[NormMatch]] = {}
    by_output: dict[ir.Value, NormMatch] = {}
    for n in seq_norms:
        by_input.setdefault(_norm_reads(n), []).append(n)
        by_output[n.output] = n
    norm_inputs = {n.output: _norm_reads(n) for n in seq_norms}
    adds = find_residual_adds(graph, norm_inputs)
    by_add_output = {total(r.node): r for r in adds}
    for r in adds:
        skip = _source(r.skip)
        r.pre = [
            n
            for n in by_input.get(skip, [])
            if _reaches_through_linear(n.output, r.branch, order) or n.output is r.branch
        ]
        r.peri = by_output.get(r.branch)
        norm = by_output.get(skip)
        previous = by_add_output.get(_norm_reads(norm)) if norm is not None else None
        if previous is not None:  # Post-LN: this block reads the previous block's sum, normalized
            r.post = norm
            previous.post = previous.post or norm
        elif (
            norm is not None
        ):  # a norm before the first block (embeddings, pre-encoder, stage start)
            r.start_norm = norm
    outputs = {total(r.node) for r in adds}
    carried = [_carried_from(r.skip, norm_inputs) for r in adds]
    initial = [v for v in dict.fromkeys(carried) if v not in outputs]
    stream = {_source(r.skip) for r in adds} | {v for v in outputs if isinstance(v, ir.Value)}
    last = [v for v in outputs if v not in carried]
    final_norms = [n for v in last for n in by_input.get(v, [])]
    other: dict[str, list[str]] = {}
    stream_nodes = {r.node for r in adds} | {node for n in seq_norms for node in n.nodes}
    for value in stream:
        for node in readers(value):
            if node not in stream_nodes and node.op_type not in ("Cast", "Identity"):
                other.setdefault(node.op_type, []).append(node.name)
    architecture, reasons = _classify(adds, seq_norms, norms)
    return StreamAnalysis(
        architecture,
        reasons,
        adds,
        initial,
        final_norms,
        {k: sorted(v) for k, v in sorted(other.items())},
    )


def _classify(
    adds: list[ResidualAdd], seq_norms: list[NormMatch], norms: list[NormMatch]
) -> tuple[str, list[str]]:
    if not adds:
        return "none", [
            "no residual Add (an Add of a value and a branch computed from it "
            "through MatMul/Gemm/Conv)"
        ]
    n = len(adds)
    pre = [r for r in adds if r.pre]
    post = [r for r in adds if r.post]
    peri = [r for r in adds if r.peri]
    counts = (
        f"{n} residual Adds: {len(pre)} pre-norm, {len(post)} post-norm, {len(peri)} branch-output "
        "norm"
    )
    starts = [r.start_norm.where() for r in adds if r.start_norm is not None]
    start_note = (
        [
            f"{len(starts)} norm(s) write the start of a stream (before its first block): "
            f"{', '.join(starts)}"
        ]
        if starts
        else []
    )
    if not pre and not post and not peri:
        why = _why_unnormalized(seq_norms, norms)
        return "none", [f"{n} residual Adds, none normalized by a LayerNorm or RMSNorm: {why}"]
    if len(post) == n and not pre:
        return "post-ln", [
            counts,
            "every block input is a norm's output (normalized after the residual Add)",
        ]
    kinds = {m.kind for r in pre for m in r.pre}
    if len(pre) == n and not post:
        if len(peri) == n:
            return "peri-ln", [counts, "norms both before each branch and on each branch output"]
        if not peri and len(kinds) == 1:
            kind = kinds.pop()
            label = "pre-ln" if kind == "layernorm" else "pre-rmsnorm"
            return label, [
                counts,
                f"every branch reads the raw stream through a {kind}",
                *start_note,
            ]
    return "mixed", [
        counts,
        f"norm kinds before branches: {', '.join(sorted(kinds)) or 'none'}",
        *_not_pre(adds),
        *start_note,
    ]


def _why_unnormalized(seq_norms: list[NormMatch], norms: list[NormMatch]) -> str:
    if seq_norms:
        return (
            f"its {len(seq_norms)} LayerNorm/RMSNorm(s) read values off the stream "
            "(e.g. a conv output), not the stream itself"
        )
    other = sorted({m.kind for m in norms})
    return f"its norms are {', '.join(other)}" if other else "it has no norms"


def _not_pre(adds: list[ResidualAdd]) -> list[str]:
    """The residual Adds that are not plain pre-norm, as one line (the first three)."""
    deciders = [
        f"Add {r.node.name or r.node.outputs[0].name}: "
        + (
            ", ".join(
                k for k, v in (("pre", r.pre), ("post", r.post), ("branch-output", r.peri)) if v
            )
            or "no norm"
        )
        for r in adds
        if not (r.pre and not r.post and not r.peri)
    ]
    if not deciders:
        return []
    more = f" (+{len(deciders) - 3} more)" if len(deciders) > 3 else ""
    return [f"not plain pre-norm: {'; '.join(deciders[:3])}" + more]
