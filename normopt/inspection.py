"""What `normopt inspect` reports: the model, its operators, and which passes would apply.

Analysis: each pass is asked for its plan, not run. One question needs a run: on a Pre-LN
model, would the stream carry d-1 coordinates after preln-to-rmsnorm? That pass then runs on
normopt's own loaded copy (never on a caller's in-memory model; nothing is written).
"""

from __future__ import annotations

import os
import time

import onnx_ir as ir

from normopt.passes.base import Options
from normopt.passes.pipeline import PASSES, ordered
from normopt.passes.preln_to_crmsnorm import PreLNToCRMSNorm
from normopt.passes.preln_to_rmsnorm import PreLNToRMSNorm
from normopt.passes.rotate_stream import RotateStream
from normopt.rewriter import io
from normopt.rewriter.graph import dim_list, op_histogram
from normopt.rewriter.norms import find_norms
from normopt.rewriter.shapes import annotated
from normopt.rewriter.stream import analyze
from normopt.schema import document


def _io(values) -> list[dict]:
    return [
        {"name": v.name, "dtype": str(v.dtype) if v.dtype else None, "shape": dim_list(v.shape)}
        for v in values
    ]


def inspect_model(path: str | os.PathLike, target: str = "onnx") -> dict:
    """`normopt inspect`'s document (normopt.schema): `architecture` (pre-ln|post-ln|
    pre-rmsnorm|peri-ln|mixed|none), `norms` (kind, form, axis, epsilon, nodes, ...), `passes`
    ({name: {applies, reason}}), `crms` (would the stream carry d-1 coordinates, after
    preln-to-rmsnorm where it needs that), `rotation` (could it be rotated, likewise); plus
    `architecture_reasons`, `stream`, `model` and `operators`."""
    start = time.perf_counter()
    return describe(io.load(path), str(path), target, start)


def describe(
    model: ir.Model,
    path: str,
    target: str = "onnx",
    start: float | None = None,
    scratch: bool = True,
) -> dict:
    """The document for a loaded model (its shapes annotated meanwhile, then taken back);
    `scratch`: the model is normopt's own copy, which the CRMS question may edit (a caller's
    ir.Model is not: CRMS is then asked of the model as it is)."""
    start = time.perf_counter() if start is None else start
    with annotated(model):
        info = _describe(model, path, target, scratch)
    return document("inspect", info, seconds={"total": time.perf_counter() - start})


def _describe(model: ir.Model, path: str, target: str, scratch: bool) -> dict:
    norms = find_norms(model.graph)
    stream = analyze(model.graph, norms)
    subgraphs = sum(
        1
        for node in model.graph.all_nodes()
        for a in node.attributes.values()
        if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
    )
    info = {
        "model": {
            "path": path,
            "ir_version": model.ir_version,
            "opsets": dict(model.opset_imports),
            "producer": f"{model.producer_name or '?'} {model.producer_version or ''}".strip(),
            "inputs": _io(v for v in model.graph.inputs if not v.is_initializer()),
            "outputs": _io(model.graph.outputs),
            "nodes": sum(1 for _ in model.graph.all_nodes()),
            "initializers": len(model.graph.initializers),
            "initializer_bytes": io.initializer_bytes(model),
            "external_data": io.uses_external_data(model),
            "functions": len(model.functions),
            "nodes_with_subgraphs": subgraphs,
        },
        "architecture": stream.architecture,
        "architecture_reasons": stream.reasons,
        "norms": [n.to_json() for n in norms],
        "stream": stream.to_json(),
        "operators": op_histogram(model),
        "passes": {},
    }
    for name, cls in ((n, PASSES[n]) for n in ordered()):  # the pipeline's order
        plan = cls(Options(target=target)).plan(model)
        info["passes"][name] = {
            "applies": plan.applies,
            "reason": plan.summary() if plan.applies else plan.why_not(),
            **({"stats": plan.stats} if plan.stats else {}),
        }
    info.update(_after_rms(model, info["passes"], target, scratch))
    return info


def _after_rms(model: ir.Model, passes: dict, target: str, scratch: bool) -> dict:
    """Would the stream carry d-1 coordinates (`rewrite --crms on`), could it be rotated
    (`rewrite --rotate`)? On a Pre-LN model both need preln-to-rmsnorm first: it runs here, on
    the loaded copy (nothing is written), and each pass is asked for its plan after it. Last of
    all: the model is edited."""
    asked = {"crms": PreLNToCRMSNorm, "rotation": RotateStream}
    found = {
        key: {"applies": passes[cls.name]["applies"], "after": None,
              "reason": passes[cls.name]["reason"]}
        for key, cls in asked.items()
    }  # fmt: skip
    settled = all(f["applies"] for f in found.values())
    if settled or not passes[PreLNToRMSNorm.name]["applies"] or not scratch:
        return found
    PreLNToRMSNorm(Options(target=target)).run(model)
    for key, cls in asked.items():
        if not found[key]["applies"]:
            plan = cls(Options(target=target)).plan(model)
            reason = plan.summary() if plan.applies else plan.why_not()
            found[key] = {"applies": plan.applies, "after": PreLNToRMSNorm.name, "reason": reason}
    return found
