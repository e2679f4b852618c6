import pytest

from normopt.errors import BadInput
from normopt.passes import pipeline
from normopt.passes.base import Plan, Refusal


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
        assert cls.__module__.startswith("normopt.passes.") and cls.__module__.split(".")[-1] == name.replace("-", "_")
        doc = __import__(cls.__module__, fromlist=["x"]).__doc__
        assert doc and "Before" in doc and "After" in doc, f"{name}: docstring needs Before/After/conditions"


def test_plan_why_not():
    assert Plan(actions=["x"]).why_not() == ""
    assert Plan().why_not() == "nothing to do"
    assert Plan(idle="no norm").why_not() == "model: no norm"
    plan = Plan(refusals=[Refusal("node a", "reason one"), Refusal("node b", "reason two")])
    assert plan.why_not() == "node a: reason one (+1 more)"
