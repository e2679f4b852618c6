"""simplify-evonorm: a B variant's spread values broadcast instead, exactly; what cannot be
proven to spread to x's shape is left, with the reason."""

import numpy as np
import onnx_ir as ir
import pytest

from normopt.passes.pipeline import run_pipeline
from normopt.passes.simplify_evonorm import SimplifyEvoNorm
from normopt.rewriter.norms import find_norms
from tests.evo_graphs import Evo, build
from tests.helpers import ort_run, run_pass

X = np.random.default_rng(2).standard_normal((2, 8, 4, 4)).astype(np.float32)


def live_ops(model) -> list[str]:
    """The ops whose results something reads (the pass leaves dead nodes to cleanup)."""
    read = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    return [n.op_type for n in model.graph.node if set(n.output) & read]


@pytest.mark.parametrize("variant", ["B0", "B1", "B2"])
@pytest.mark.parametrize("left", ["expand", "spread", "plain"])
def test_spread_values_broadcast_and_the_output_is_unchanged(variant, left):
    model, _ = build(Evo(variant, left=left))
    result, out = run_pass(SimplifyEvoNorm(), model)
    # the instance statistic's Expand, and the left branch's spread (Expand or full constant)
    assert len(result.changes) == (1 if left == "plain" else 2)
    assert live_ops(out).count("Expand") == 0
    if left == "spread":
        assert "EvoNorm constant(s) of x's shape cut to their channels" in [
            c.what for c in result.changes
        ]
        (maximum,) = [n for n in out.graph.node if n.op_type == "Max"]
        (left_now,) = [i for i in out.graph.initializer if i.name == maximum.input[0]]
        assert list(left_now.dims) == [1, 8, 1, 1]
    np.testing.assert_array_equal(ort_run(out, {"x": X})["y"], ort_run(model, {"x": X})["y"])
    run_pass(SimplifyEvoNorm(), out, expect_modified=False)  # a second run changes nothing


def test_a_spread_to_a_shape_not_proven_to_be_x_s_is_left():
    """x's batch is symbolic and the left branch is a constant [2, C, H, W]: broadcasting it
    instead could change the result's shape (a batch of 1 would become 2)."""
    model, _ = build(Evo("B0", left="spread", batch="N"))
    result, _ = run_pass(SimplifyEvoNorm(), model)
    assert [c.values for c in result.changes] == [("stat",)]  # Expand(std, Shape(x)) dropped
    assert result.changes[0].what == "EvoNorm Expand(s) to x's shape (the op broadcasts instead)"


def test_no_b_variant_is_idle():
    model, _ = build(Evo("S0"))
    result, _ = run_pass(SimplifyEvoNorm(), model, expect_modified=False)
    assert result.refusals[0].reason == "no EvoNorm B0/B1/B2"


def test_a_b_variant_with_nothing_spread_says_so():
    """After the pass (and cleanup) the EvoNorm is still one, with nothing left to do."""
    model, _ = build(Evo("B2", left="plain"))
    graph = ir.serde.deserialize_model(model)
    results = run_pipeline(graph, ["simplify-evonorm"])
    assert results[0].modified
    (second,) = run_pipeline(graph, ["simplify-evonorm"])[:1]
    assert not second.modified
    assert "no operand spread to its input's shape" in second.refusals[0].reason
    assert [m.detail["variant"] for m in find_norms(graph.graph)] == ["B2"]


@pytest.mark.parametrize("variant", ["B0", "B1"])
def test_the_passes_after_it_in_the_same_round_still_see_the_evonorm(variant):
    """Found by the EvoNorm fuzz campaign (seed 67, tests/test_fuzz.py): the Expand it dropped
    stayed (dead) until cleanup and still read the statistic, so fold-affine-norms, later in the
    same round, found no EvoNorm and folded its affine only on a second run."""
    model, _ = build(Evo(variant))
    graph = ir.serde.deserialize_model(model)
    first = {r.name: r for r in run_pipeline(graph, ["simplify-evonorm", "fold-affine-norms"])}
    assert first["simplify-evonorm"].modified
    # as the EvoNorm's (a lone affine otherwise, or nothing where it has one channel)
    assert first["fold-affine-norms"].lines == ["folded 1 evonorm affine into following Conv"]
    again = run_pipeline(graph, ["simplify-evonorm", "fold-affine-norms"])
    assert not any(r.modified for r in again)


def test_an_expand_whose_reader_s_other_operand_is_not_x_shaped_stays():
    """The variance spread to x's shape before `+ eps`: the Add's other operand is the scalar eps,
    so without the Expand the Add's result would change shape; only the statistic's Expand, read
    with `x * v`, goes."""
    model, _ = build(Evo("B0", keepdims0=True, spread_var=True, left="plain"))
    result, out = run_pass(SimplifyEvoNorm(), model)
    assert [c.values for c in result.changes] == [("stat",)]
    assert "var_spread" in [n.output[0] for n in out.graph.node if n.op_type == "Expand"]
    np.testing.assert_array_equal(ort_run(out, {"x": X})["y"], ort_run(model, {"x": X})["y"])
