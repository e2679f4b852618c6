"""EvoNorm matching: every variant in both exporters' statistic forms is found with its variant,
groups and epsilon; every mutation that makes it compute something else is not."""

import numpy as np
import onnx_ir as ir
import pytest

from normopt.rewriter.norms import find_norms
from normopt.rewriter.norms_evo import trailing_affine
from tests.evo_graphs import Evo, build, build_tf, reference, reference_tf
from tests.helpers import ort_run

X = np.random.default_rng(1).standard_normal((2, 8, 4, 4)).astype(np.float32)
VARIANTS = ["S0", "S0a", "S1", "S2", "B0", "B1", "B2"]


def evonorms(model):
    return [m for m in find_norms(ir.serde.deserialize_model(model).graph) if m.kind == "evonorm"]


def the_evonorm(e: Evo):
    """The one EvoNorm found in the graph `e` describes, which computes timm's formula (or the
    test would prove nothing)."""
    model, params = build(e)
    np.testing.assert_allclose(
        ort_run(model, {"x": X})["y"], reference(e, params, X), rtol=1e-5, atol=1e-5
    )
    (match,) = evonorms(model)
    return match


@pytest.mark.parametrize("keepdims0", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_found_with_its_variant_groups_and_eps(variant, keepdims0):
    e = Evo(variant, keepdims0=keepdims0)
    match = the_evonorm(e)
    assert match.detail["variant"] == variant
    assert match.detail["groups"] == (None if e.instance else 2)
    assert match.epsilon == pytest.approx(1e-3 if variant in ("B0", "S0a") else 1e-5)
    assert match.input.name == "x" and match.output.name == "evo"
    assert (match.scale.name, match.bias.name) == ("gamma", "beta")
    affine = trailing_affine(match)
    assert [n.name for n in affine.nodes] == ["qg", "evo"] and affine.input.name == "q"


@pytest.mark.parametrize(
    "variant, mutation",
    [
        ("S0", "eps_outside"),  # sqrt(var) + eps: not the statistic
        ("B0", "eps_outside"),
        ("S0", "other_x"),  # the statistic of another tensor than the numerator's
        ("B2", "other_x"),
        ("S1", "leak"),  # an intermediate value read outside (a graph output)
        ("S0", "axes"),  # statistics over part of the group
        ("B1", "axes"),
        ("S0", "v_per_w"),  # v varies along W: no per-channel swish
        ("B0", "left_input"),  # the running-variance branch computed from x
        ("B0", "left_varies"),  # a constant branch that is not per channel
    ],
)
def test_what_computes_something_else_is_no_evonorm(variant, mutation):
    model, _ = build(Evo(variant, mutation=mutation))
    assert evonorms(model) == []


def test_the_affine_after_an_evonorm_is_no_norm_of_its_own():
    """Its trailing `* gamma + beta` belongs to the EvoNorm (fold-affine-norms folds it as the
    EvoNorm's), not to a separate affine match."""
    model, _ = build(Evo("S0"))
    kinds = [m.kind for m in find_norms(ir.serde.deserialize_model(model).graph)]
    assert kinds == ["evonorm"]


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("variant", ["S0", "B0"])
def test_the_authors_tensorflow_forms_are_found(variant, data_format):
    """tf2onnx's export of the paper's own code: NHWC statistics (channels_first S0 transposes to
    NHWC and back around them), instance_std without an Expand, `v * x`."""
    model, params = build_tf(variant, data_format)
    x = np.random.default_rng(3).standard_normal(model_input_shape(model)).astype(np.float32)
    np.testing.assert_allclose(
        ort_run(model, {"x": x})["y"],
        reference_tf(variant, data_format, params, x),
        rtol=1e-5,
        atol=1e-5,
    )
    (match,) = evonorms(model)
    last = data_format == "channels_last"
    assert match.detail["variant"] == variant and match.detail["groups"] == (
        2 if variant == "S0" else None
    )
    assert match.detail["layout"] == ("NHWC" if last else "NCHW") and match.axis == (
        -1 if last else -3
    )
    assert match.input.name == "x" and match.epsilon == pytest.approx(1e-5)
    assert [n.name for n in trailing_affine(match).nodes] == ["qg", "evo"]


def model_input_shape(model) -> tuple[int, ...]:
    return tuple(d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim)


def test_an_nhwc_reshape_that_does_not_cut_the_channels_into_groups_is_no_evonorm():
    """[B, H, W * 2, 2, C / 4]: the "groups" along axis 3 would gather every other pair of
    channels, not G runs of C/G."""
    model, _ = build_tf("S0", "channels_last", grouped=[2, 4, 8, 2, 2])
    assert evonorms(model) == []


@pytest.mark.parametrize("act", ["Relu", "HardSwish"])
@pytest.mark.parametrize("variant", ["S1", "S2"])
def test_s1_and_s2_with_another_activation_name_it(variant, act):
    match = the_evonorm(Evo(variant, act=act))
    assert (match.detail["variant"], match.detail["activation"]) == (variant, act.lower())
