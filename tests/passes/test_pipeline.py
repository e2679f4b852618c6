import onnx_ir as ir
import pytest

from normopt.errors import BadInput
from normopt.passes import pipeline
from normopt.passes.base import Change, Plan, Refusal


def test_table_names_every_pass_by_its_own_name():
    assert set(pipeline.DEFAULT_PIPELINE) | set(pipeline.FINAL_PASSES) <= set(pipeline.PASSES)
    assert all(cls.name == name for name, cls in pipeline.PASSES.items())


def test_resolve():
    assert pipeline.resolve(None) == list(pipeline.DEFAULT_PIPELINE)
    assert pipeline.resolve(["cleanup", "cleanup"]) == ["cleanup"]
    with pytest.raises(BadInput, match="unknown pass 'nope'.*known passes: .*cleanup"):
        pipeline.resolve(["nope"])
    with pytest.raises(BadInput, match="names no pass"):
        pipeline.resolve([])


def test_every_registered_pass_is_documented():
    for name, cls in pipeline.PASSES.items():
        assert cls.name == name and cls.summary and "\n" not in cls.summary
        assert cls.__module__.startswith("normopt.passes.") and cls.__module__.split(".")[
            -1
        ] == name.replace("-", "_")
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert doc and "Before" in doc and "After" in doc, (
            f"{name}: docstring needs Before/After/conditions"
        )


def test_plan_why_not():
    assert Plan(actions=["x"]).why_not() == ""
    assert Plan().why_not() == "nothing to do"
    assert Plan(idle="no norm").why_not() == "model: no norm"
    plan = Plan(refusals=[Refusal("node a", "reason one"), Refusal("node b", "reason two")])
    assert plan.why_not() == "node a: reason one (+1 more)"


def test_the_pipeline_repeats_until_nothing_changes():
    """Found by the fuzzer (not idempotent): a tied table blocks preln-to-rmsnorm; then
    fold-affine-norms folds the norm's fp16 affine (left outside the fused op by its Cast) into
    the head, which gets a weight of its own and frees the table; only a second run converted
    the norm. The pipeline now repeats until nothing changes, so a second run changes nothing."""
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from normopt.passes.pipeline import DEFAULT_PIPELINE, run_pipeline
    from tests.helpers import const, make_model, tensor

    h = TensorProto.FLOAT16
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["e"]),
        helper.make_node("Add", ["e", "pos"], ["x"]),
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["xf"], ["mu"], axes=[-1]),
        helper.make_node("Sub", ["xf", "mu"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
        helper.make_node("Add", ["var", "eps"], ["ve"]),
        helper.make_node("Sqrt", ["ve"], ["std"]),
        helper.make_node("Div", ["d", "std"], ["n"]),
        helper.make_node("Cast", ["n"], ["n16"], to=h),
        helper.make_node("Mul", ["n16", "g"], ["s"]),
        helper.make_node("Add", ["s", "b"], ["f"]),
        helper.make_node("Transpose", ["table"], ["tt"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "tt"], ["y"]),
    ]
    inits = [
        const("table", rng.standard_normal((10, 6)).astype(np.float16)),
        const("pos", rng.standard_normal((3, 6)).astype(np.float16)),
        const("eps", np.float32(1e-5)),
        const("g", (1 + rng.random(6)).astype(np.float16)),
        const("b", rng.standard_normal(6).astype(np.float16)),
    ]
    proto = make_model(
        nodes, [tensor("ids", TensorProto.INT64, (2, 3))], [tensor("y", h, (2, 3, 10))], inits
    )
    model = ir.serde.deserialize_model(proto)
    first = {r.name: r for r in run_pipeline(model, list(DEFAULT_PIPELINE))}
    assert first["preln-to-rmsnorm"].modified and first["fold-affine-norms"].modified
    assert not any(r.modified for r in run_pipeline(model, list(DEFAULT_PIPELINE)))


def test_a_pass_after_one_that_changed_the_model_runs_again(monkeypatch):
    """Round 1: `a` refuses a candidate, `c` changes the model, so `a` runs again; when `a`
    then changes the model, `b` (after it) runs again too, though `b` refused nothing; a pass
    with nothing left that another pass could free is not run again (each round costs a pass
    over the whole graph)."""
    from normopt.passes.pipeline import run_pipeline

    calls = _stubs(
        monkeypatch,
        {"a": lambda k: k == 1, "b": lambda k: k == 1, "c": lambda k: k == 0},
        {"a": Refusal("x", "later perhaps")},
    )
    results = {
        r.name: r
        for r in run_pipeline(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), ["a", "b", "c"])
    }
    assert calls == ["a", "b", "c", "cleanup", "a", "b", "c", "cleanup"]
    assert results["a"].modified and results["b"].modified and results["c"].modified


def test_a_refusal_no_other_pass_can_lift_costs_no_second_round(monkeypatch):
    """An opset refusal (`settled`) cannot be freed by a later pass's edit: one round."""
    from normopt.passes.pipeline import run_pipeline

    calls = _stubs(
        monkeypatch,
        {"a": lambda k: False, "c": lambda k: k == 0},
        {"a": Refusal("x", "opset 14 has no RMSNormalization", settled=True)},
    )
    run_pipeline(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), ["a", "c"])
    assert calls == ["a", "c", "cleanup"]


def _stubs(monkeypatch, modifies: dict, first_refusal: dict) -> list[str]:
    """Stub passes named by `modifies` (k -> does the k-th run change the model?) and cleanup;
    a pass in `first_refusal` refuses that candidate on its first run. Returns the call log."""
    from normopt.passes.base import Pass

    calls: list[str] = []

    def stub(name: str, changes):
        class Stub(Pass):
            summary = "stub"

            def plan(self, model):
                k = calls.count(name)
                calls.append(name)
                if changes(k):
                    return Plan(actions=["edit"])
                return Plan(
                    refusals=[first_refusal[name]] if name in first_refusal and k == 0 else [],
                    idle="none",
                )

            def apply(self, model, plan):
                return [Change("did", "thing")]

        Stub.name = name
        return Stub

    passes = {n: stub(n, f) for n, f in {**modifies, "cleanup": lambda k: False}.items()}
    monkeypatch.setattr(pipeline, "PASSES", passes)
    return calls


def test_a_later_round_sees_the_shapes_of_what_an_earlier_round_created(monkeypatch):
    """Regression (fuzz seed 72616: a second run converted LayerNorms a re-run round had refused,
    because values canonicalize-norms created in round 1 had no rank in round 2): each round is
    annotated afresh, as a new run would be."""
    import numpy as np
    from onnx import helper

    from normopt.passes.base import Pass
    from tests.helpers import const, make_model, tensor

    seen: list = []

    class Creates(
        Pass
    ):  # round 1: replaces Relu(x) by a new Neg(Neg(x)) whose outputs have no shape
        name, summary = "creates", "stub"

        def plan(self, model):
            new = [n for n in model.graph if n.name.startswith("created")]
            seen.append([v.shape for n in new for v in n.outputs])
            relu = [n for n in model.graph if n.op_type == "Relu"]
            return Plan(
                actions=relu, refusals=[Refusal("another candidate", "another pass may free it")]
            )

        def apply(self, model, plan):
            relu = plan.actions[0]
            first = ir.node("Neg", [relu.inputs[0]], name="created1")
            second = ir.node("Neg", [first.outputs[0]], name="created2")
            first.outputs[0].name, second.outputs[0].name = "n1", "n2"
            model.graph.insert_after(relu, [first, second])
            relu.outputs[0].replace_all_uses_with(second.outputs[0], replace_graph_outputs=True)
            model.graph.remove(relu, safe=True)
            return [Change("replaced", "Relu")]

    class Later(Pass):  # changes the model once, after `creates`: `creates` runs again
        name, summary = "later", "stub"

        def plan(self, model):
            return Plan(actions=["x"]) if "mark" not in model.metadata_props else Plan(idle="none")

        def apply(self, model, plan):
            model.metadata_props["mark"] = "1"
            return [Change("marked", "model")]

    monkeypatch.setattr(pipeline, "PASSES", {"creates": Creates, "later": Later, "cleanup": Later})
    model = ir.serde.deserialize_model(
        make_model(
            [
                helper.make_node("Relu", ["x"], ["y"], name="relu"),
                helper.make_node("Add", ["y", "b"], ["z"], name="add"),
            ],
            [tensor("x", shape=(2, 8))],
            [tensor("z", shape=(2, 8))],
            [const("b", np.ones(8, np.float32))],
        )
    )
    pipeline.run_pipeline(model, ["creates", "later"])
    assert seen[0] == [] and seen[1] == [ir.Shape([2, 8]), ir.Shape([2, 8])]


def test_a_pipeline_string_carries_a_pass_s_own_settings():
    """`name{field=value}` sets the pass's Settings (xDSL style); what the pass has not is
    refused by name, before any work."""
    from normopt.errors import BadInput
    from normopt.passes.pipeline import parse, resolve, settings_of
    from normopt.passes.preln_to_rmsnorm import PreLNSettings

    assert parse("preln-to-rmsnorm{recentring_cost=0}") == (
        "preln-to-rmsnorm",
        PreLNSettings(recentring_cost=0),
    )
    assert parse("preln-to-rmsnorm{recentring-cost=3}")[1].recentring_cost == 3
    assert resolve(["preln-to-rmsnorm{recentring_cost=1}", "cleanup"]) == [
        "preln-to-rmsnorm",
        "cleanup",
    ]
    assert settings_of(["cleanup"]) == {}
    with pytest.raises(
        BadInput, match="has no setting 'cost' \\(it has: recentring_cost, convert_all\\)"
    ):
        resolve(["preln-to-rmsnorm{cost=1}"])
    with pytest.raises(BadInput, match="recentring_cost takes a int, not 'many'"):
        resolve(["preln-to-rmsnorm{recentring_cost=many}"])
    with pytest.raises(BadInput, match="skip_sites cannot be set in a pipeline string"):
        resolve(["canonicalize-norms{skip_sites=a}"])
    with pytest.raises(BadInput, match="has no setting 'x' \\(it has: none\\)"):
        resolve(["cleanup{x=1}"])
