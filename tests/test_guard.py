"""`rewrite --guard speed`: a change that measures slower is dropped and reported; the rest stay.

The slowdown is made on purpose and large (200 extra MatMuls by an identity matrix, exactly
equivalent, several times the model's own time), so the test does not depend on small timing
differences."""

import collections
import json

import numpy as np
import onnx_ir as ir

from normopt.guard import units
from normopt.passes import pipeline
from normopt.passes.base import Change, Options, Pass, PassResult, Plan
from normopt.rewriter import io
from normopt.rewriter.edit import Editor
from normopt.verification import VerifyOptions
from tests.helpers import assert_matches_reference, rewrite_file


class SlowDown(Pass):
    """Appends 200 MatMuls by the identity to the first graph output (x @ I == x exactly)."""

    name = "slow-down"
    summary = "test only: an exactly equivalent rewrite that is much slower"

    def plan(self, model: ir.Model) -> Plan:
        done = any(n.name.startswith("slow") for n in model.graph)
        return Plan(idle="done already") if done else Plan(actions=["slow"])

    def apply(self, model: ir.Model, plan: Plan) -> list[Change]:
        edit = Editor(model.graph)
        out = model.graph.outputs[0]
        eye = edit.initializer("slow.eye", np.eye(out.shape[-1], dtype=np.float32))
        value, last, first = out, out.producer(), None
        for i in range(200):
            node = edit.node("MatMul", [value, eye], name=f"slow{i}", like=out)
            model.graph.insert_after(last, node)
            value, last, first = node.outputs[0], node, first or node
        edit.take_over(out, value)  # the graph output reads the chain's end ...
        first.replace_input_with(0, out)  # ... which starts at the original output
        return [Change("appended", "identity MatMul(s)", (f"slow{i}",)) for i in range(200)]


def test_a_pass_that_makes_the_model_slower_is_dropped_and_reported(corpus, tmp_path, monkeypatch):
    monkeypatch.setitem(pipeline.PASSES, "slow-down", SlowDown)
    paths = corpus("gpt2-ts17")
    out, report_path = tmp_path / "out.onnx", tmp_path / "report.json"
    report = rewrite_file(
        paths.model,
        out,
        passes=["preln-to-rmsnorm", "slow-down"],
        report_path=report_path,
        checks=VerifyOptions(inputs=paths.load_inputs()),
        speed_guard=True,
    )
    guard = report.guard
    assert guard.dropped == ["slow-down"] and guard.kept == ["preln-to-rmsnorm"], guard.verdict
    assert guard.steps[0]["rewritten"].verdict == "slower"
    assert {
        "original",
        "original (A/A)",
        "current",
        "without preln-to-rmsnorm",
        "without slow-down",
    } == set(guard.steps[1])
    assert (
        guard.final.verdict != "slower" and "dropped slow-down (measured slower)" in guard.verdict
    )
    ops = collections.Counter(n.op_type for n in io.load(out).graph)
    assert ops["MatMul"] < 100  # the identity MatMuls are gone ...
    assert ops["LayerNormalization"] == 0  # ... preln-to-rmsnorm's conversion stays
    assert_matches_reference(out, paths)
    data = json.loads(report_path.read_text())["speed_guard"]
    assert data["dropped"] == ["slow-down"] and data["steps"][0]["rewritten"]["verdict"] == "slower"


def test_the_guard_drops_one_group_of_fusions_and_keeps_the_rest(corpus, tmp_path, monkeypatch):
    """The dropping logic without timing noise: `compare` is replaced by figures that call
    every variant slower except the one without canonicalize-norms' fusions between permutes
    (timm's LayerNorm2d). Only that group is dropped: its 4 norms stay decomposed, the 4 block
    norms are fused, the stem's (an RMSNorm now, its beta an Add after it) too, preln-to-rmsnorm's
    conversion stays, and what is written is verified."""
    from normopt import variants
    from normopt.profiling import Figure

    slow = "canonicalize-norms (layernorm -> LayerNormalization between Transposes)"

    def figures(rows, baseline, *_args, **_kwargs):
        def figure(ratio, verdict):
            return Figure(ratio, ratio, ratio, [ratio], 1.0, 1.0, verdict)

        out = {baseline: figure(1.0, "baseline"), baseline + " (A/A)": figure(1.0, "A/A control")}
        for label in rows:
            if label != baseline:
                out[label] = (
                    figure(0.95, "faster") if label == f"without {slow}" else figure(1.1, "slower")
                )
        return out

    monkeypatch.setattr(variants, "compare", figures)
    paths = corpus("convnext2d-ts14")
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model,
        out,
        options=Options(target="ort"),
        speed_guard=True,
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    assert report.guard.dropped == [slow]
    assert sorted(report.guard.kept) == [
        "canonicalize-norms (layernorm -> LayerNormalization)",
        "canonicalize-norms (rmsnorm -> SimplifiedLayerNormalization)",  # the stem
        "preln-to-rmsnorm",
    ]
    assert [set(step) - {"original", "original (A/A)"} for step in report.guard.steps] == [
        {"rewritten"},
        {"current", *(f"without {u}" for u in [*report.guard.kept, slow])},
    ]
    ops = collections.Counter(n.op_type for n in io.load(out).graph)
    assert ops["LayerNormalization"] == 4 and ops["SimplifiedLayerNormalization"] == 1
    assert report.verification.ok
    assert_matches_reference(out, paths)


def test_units_split_a_pass_into_the_groups_it_reports():
    results = [
        PassResult("preln-to-rmsnorm", True, [Change("did", "x")], []),
        PassResult(
            "canonicalize-norms",
            True,
            [Change("did", "y")],
            [],
            units={"a": ["n1"], "b": ["n2", "n3"]},
        ),
        PassResult("fold-affine-norms", False, [], []),
        PassResult("cleanup", True, [Change("did", "z")], []),
    ]
    assert [str(u) for u in units(results)] == [
        "preln-to-rmsnorm",
        "canonicalize-norms (a)",
        "canonicalize-norms (b)",
    ]
