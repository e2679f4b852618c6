import pytest

from normopt.errors import BadInput
from normopt.rewriter import pipeline
from normopt.rewriter.pass_base import Pass, Plan, Refusal, register, registered


def test_registry_knows_cleanup_and_rejects_duplicates():
    known = registered()
    assert "cleanup" in known and known["cleanup"].summary

    class Again(Pass):
        name = "cleanup"
        summary = "duplicate"

        def plan(self, model):
            return Plan()

        def apply(self, model, plan):
            return []

    with pytest.raises(ValueError, match="registered twice"):
        register(Again)


def test_resolve():
    assert pipeline.resolve(None) == list(pipeline.DEFAULT_PIPELINE)
    assert pipeline.resolve(["cleanup", "cleanup"]) == ["cleanup"]
    with pytest.raises(BadInput, match="unknown pass 'nope'.*known passes: .*cleanup"):
        pipeline.resolve(["nope"])


def test_every_registered_pass_is_documented():
    for name, cls in registered().items():
        assert cls.name == name and cls.summary and "\n" not in cls.summary
        assert cls.__module__.startswith("normopt.passes.") and cls.__module__.split(".")[-1] == name.replace("-", "_")
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert doc and "Before" in doc and "After" in doc, f"{name}: docstring needs Before/After/conditions"


def test_plan_why_not():
    assert Plan(actions=["x"]).why_not() == ""
    assert Plan().why_not() == "nothing to do"
    plan = Plan(refusals=[Refusal("node a", "reason one"), Refusal("node b", "reason two")])
    assert plan.why_not() == "node a: reason one (+1 more)"
