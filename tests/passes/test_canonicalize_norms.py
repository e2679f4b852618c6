"""canonicalize-norms on real exports: equivalent, idempotent, refusing where it must."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from models.corpus import CORPUS
from normopt import files
from normopt.passes.base import Options
from normopt.passes.canonicalize_norms import CanonicalizeNorms, CanonicalizeSettings
from normopt.rewriter import io
from tests.helpers import assert_matches_reference
from tests.norm_graphs import Variant, build

# decomposed norms per export that canonicalize can fuse, by target
LN_TS14 = {
    f"{f}-ts14": 5 for f in ("gpt2", "gpt2hidden", "opt", "gptneox", "vit", "bert", "preln")
} | {
    "convnext-ts14": 2,
    "clip-ts14": 6,
    "bloom-ts14": 6,
    "swin-ts14": 11,
    "wav2vec2-ts14": 8,
    "periln-ts14": 9,
    "mixln-ts14": 7,
    "scaledpool-ts14": 5,
    "convnext2d-ts14": 9,
}
FUSED = {
    **{(name, "ort"): {"LayerNormalization": n} for name, n in LN_TS14.items()},  # ORT's contrib op
    ("convnext-ts17", "onnx"): {"LayerNormalization": 2},
    ("convnext-dyn18", "onnx"): {"LayerNormalization": 2},
    ("convnext-ts17", "ort"): {"LayerNormalization": 2},
    ("convnext-dyn18", "ort"): {"LayerNormalization": 2},
    ("llama-ts14", "ort"): {"SimplifiedLayerNormalization": 5},
    ("llama-ts17", "ort"): {"SimplifiedLayerNormalization": 5},
    ("llama-dyn18", "ort"): {"SimplifiedLayerNormalization": 5},
}


@pytest.mark.parametrize("target", ["onnx", "ort"])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_equivalent_and_idempotent(corpus, tmp_path, name, target):
    paths = corpus(name)
    model = io.load(paths.model)
    before = collections.Counter(n.op_type for n in model.graph)
    result = CanonicalizeNorms(Options(target=target)).run(model)
    expected = FUSED.get((name, target), {})
    after = collections.Counter(n.op_type for n in model.graph)
    for op, count in expected.items():
        assert after[op] - before[op] == count
    assert result.modified == bool(expected), result.refusals
    assert not CanonicalizeNorms(Options(target=target)).run(model).modified
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    assert_matches_reference(out, paths)


def test_refusals_name_the_opset():
    model = ir.serde.deserialize_model(build(Variant(kind="rmsnorm"))[0])
    result = CanonicalizeNorms(Options(target="onnx")).run(model)
    assert not result.modified
    assert "opset 17 has no RMSNormalization (needs >= 23)" in result.refusals[0].reason
    assert "--target ort" in result.refusals[0].reason
    proto = build(Variant())[0]
    proto.opset_import[0].version = 16
    result = CanonicalizeNorms().run(ir.serde.deserialize_model(proto))
    assert "opset 16 has no LayerNormalization" in result.refusals[0].reason


def test_rmsnormalization_at_opset_23():
    from tests.helpers import supported_opset

    if supported_opset() < 23:
        pytest.skip("opset 23 needs a newer onnx and onnxruntime than installed")
    proto = build(Variant(kind="rmsnorm", axes_as_input=True))[0]
    proto.opset_import[0].version = 23
    model = ir.serde.deserialize_model(proto)
    assert CanonicalizeNorms(Options(target="onnx")).run(model).modified
    assert [n.op_type for n in model.graph].count("RMSNormalization") == 1
    x = {"x": np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)}
    from tests.helpers import ort_run

    np.testing.assert_allclose(
        ort_run(ir.serde.serialize_model(model), x)["out"],
        ort_run(proto, x)["out"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_nothing_to_do_says_so():
    result = CanonicalizeNorms().run(
        ir.serde.deserialize_model(build(Variant(mutation="eps_outside"))[0])
    )
    assert not result.modified and result.refusals[0].reason == "no decomposed LayerNorm or RMSNorm"


def test_fitting_parameters_keep_their_names(corpus):
    """Refit by name keeps working: gamma/beta already shaped [d] in float32 are reused."""
    model = io.load(corpus("llama-dyn18").model)
    names = {
        n for n in model.graph.initializers if "layernorm.weight" in n or n.endswith("norm.weight")
    }
    CanonicalizeNorms(Options(target="ort")).run(model)
    fused = [n for n in model.graph if n.op_type == "SimplifiedLayerNormalization"]
    assert {n.inputs[1].name for n in fused} == names and len(names) == 5


def test_normalized_size_not_static_is_refused():
    """An RMSNorm of an intermediate with no recorded shape and no scale: the fused op's scale
    needs the size, so it stays decomposed with that reason (condition 3)."""
    model = ir.serde.deserialize_model(
        build(Variant(mutation="other_mean", scale="none", bias=False))[0]
    )
    result = CanonicalizeNorms(Options(target="ort")).run(model)
    assert not result.modified
    assert result.refusals[0].reason == "the size of the last 1 axis/axes is not static"


def test_a_norm_reading_another_norms_output():
    """Found from outside (TorchScript opset 14, a LayerNorm on the embeddings read by the first
    block's LayerNorm): the second fusion read the value the first had replaced, and the output
    failed onnx.checker. Each fusion reads its input where the pattern reads it now."""

    from tests.helpers import const, make_model, ort_run, tensor
    from tests.passes.test_preln_to_rmsnorm import _ln_decomposed

    d = 6
    gamma, beta = (
        np.linspace(0.5, 1.5, d).astype(np.float32),
        np.linspace(-1, 1, d).astype(np.float32),
    )
    nodes = _ln_decomposed("x", "first", [-1], "g", "b") + _ln_decomposed(
        "first", "y", [-1], "g", "b"
    )
    proto = make_model(
        nodes,
        [tensor("x", shape=(2, 3, d))],
        [tensor("y", shape=(2, 3, d))],
        [const("g", gamma), const("b", beta), const("eps", np.float32(1e-5))],
        opset=14,
    )
    model = ir.serde.deserialize_model(proto)
    result = CanonicalizeNorms(Options(target="ort")).run(model)
    assert result.lines == ["fused 2 decomposed layernorm -> LayerNormalization"]
    rewritten = ir.serde.serialize_model(model)
    onnx.checker.check_model(rewritten, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, d)).astype(np.float32)}
    np.testing.assert_allclose(
        ort_run(rewritten, feeds)["y"], ort_run(proto, feeds)["y"], rtol=1e-5, atol=1e-5
    )


def test_fusions_come_in_groups_by_layout_and_a_skipped_site_stays_with_its_reason(
    corpus, tmp_path
):
    """timm's ConvNeXt (TorchScript 14): the LayerNorm2d norms (stem, downsampling, head) sit
    between permutes, the block norms do not; the speed guard drops such a group through
    `CanonicalizeSettings.skip_sites`, and those norms stay decomposed, saying why."""
    paths = corpus("convnext2d-ts14")
    model = io.load(paths.model)
    result = CanonicalizeNorms(Options(target="ort")).run(model)
    assert {k: len(v) for k, v in result.units.items()} == {
        "layernorm -> LayerNormalization between Transposes": 5,
        "layernorm -> LayerNormalization": 4,
    }
    skip = frozenset(result.units["layernorm -> LayerNormalization between Transposes"])
    model = io.load(paths.model)
    result = CanonicalizeNorms(Options(target="ort"), CanonicalizeSettings(skip)).run(model)
    assert list(result.units) == ["layernorm -> LayerNormalization"] and result.lines == [
        "fused 4 decomposed layernorm -> LayerNormalization"
    ]
    kept = [r for r in result.refusals if "speed guard measured the fused op slower" in r.reason]
    assert len(kept) == 5 and not any(r.may_change for r in kept)
    out = tmp_path / "out.onnx"
    files.save(model, out, external_data=False)
    assert_matches_reference(out, paths)
