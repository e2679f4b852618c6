"""Every real exported model goes through `rewrite` (cleanup only at this stage) unharmed."""

import collections
import hashlib

import onnx
import pytest

from models.corpus import CORPUS
from normopt.passes.base import Options
from normopt.verification import VerifyOptions
from tests.helpers import assert_matches_reference, rewrite_file

LN_COUNTS = {
    "gpt2": 5,
    "gpt2hidden": 5,
    "gpt2kv": 5,
    "optkv": 5,
    "gptneoxkv": 5,
    "bloomkv": 6,  # a LayerNorm on the embeddings
    "falconkv": 3,  # one LayerNorm per parallel block
    "phikv": 3,
    "opt": 5,
    "gptneox": 5,
    "vit": 5,
    "bert": 5,
    "preln": 5,
    "clip": 6,
    "bloom": 6,
    "swin": 11,
    "wav2vec2": 8,
    "whisper": 12,
    "periln": 9,
    "mixln": 7,
    "scaledpool": 5,
}
BN_COUNTS = {
    "resnet18": 20,
    "mobilenetv2": 52,
    "repbn": 5,
    "repbnpool": 5,
    "repvgg": 19,
    "repblocks": 9,
    "mobileone": 226,
    "levit": 52,
}

EVONORMS = {"evonorms": 8, "regnetzevos": 26, "resnetv2evos": 15, "resnetv2evob": 15}


def digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ops(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_export_has_the_structure_it_claims(corpus, name):
    """The corpus is only useful if each export really has the form it is named for."""
    entry, count = CORPUS[name], ops(corpus(name).model)
    assert onnx.load(str(corpus(name).model)).opset_import[0].version == entry.opset
    if entry.family.endswith("kv"):  # the cache goes in and out: a past and a present per layer
        graph = onnx.load(str(corpus(name).model)).graph
        assert [i.name for i in graph.input][2:] == [
            f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")
        ]
        assert len(graph.output) == 5 and count["Concat"] >= 4
    if entry.family.endswith("fused"):  # onnxruntime's transformers optimizer fused the norms
        assert count["SkipLayerNormalization"] == 4
        first = "EmbedLayerNormalization" if entry.family == "bertfused" else "LayerNormalization"
        assert count[first] == 1 and not count["ReduceMean"]
    elif entry.family in LN_COUNTS:
        # TorchScript decomposes LayerNorm below opset 17 (two ReduceMeans per LN).
        n = LN_COUNTS[entry.family]  # (mean pooling adds a ReduceMean of its own)
        assert count["LayerNormalization"] == (0 if entry.opset < 17 else n)
        assert count["ReduceMean"] >= 2 * n if entry.opset < 17 else count["ReduceMean"] <= 1
    elif entry.family == "llama":
        assert (count["RMSNormalization"], count["ReduceMean"]) == (
            (5, 0) if entry.opset >= 23 else (0, 5)
        )
    elif entry.family in BN_COUNTS:
        # kept, not folded into Conv (where the exporter folds, only RepVGG's 3 identity BNs stay)
        assert count["BatchNormalization"] == (
            BN_COUNTS[entry.family] if entry.keep_bn is None else 3
        )
    elif entry.family == "convnext":
        # two hand-written LNs (two ReduceMeans each) and the global average pool
        assert count["ReduceMean"] == 5 and not count["LayerNormalization"]
    elif entry.family == "convnext2d":
        # 9 LayerNorms (5 of them timm's LayerNorm2d), each between permutes to and from NHWC
        assert count["Transpose"] == 18
        assert count["LayerNormalization"] == (0 if entry.opset < 17 else 9)
    elif entry.family in EVONORMS:
        # every EvoNorm divides by its statistic (B: by a Max); statistics squared and averaged
        variants_with_max = {"evonorms": 3, "regnetzevos": 0, "resnetv2evos": 0}
        assert count["Div"] >= EVONORMS[entry.family]
        assert count["Max"] == variants_with_max.get(entry.family, EVONORMS[entry.family])
        assert count["ReduceMean"] >= EVONORMS[entry.family] and not count["BatchNormalization"]
    elif entry.family == "dit":
        # 5 LayerNorms without affine (two per block and the final one), each modulated
        graph = onnx.load(str(corpus(name).model)).graph
        lns = [n for n in graph.node if n.op_type == "LayerNormalization"]
        assert len(lns) == 5  # TorchScript feeds weight 1 and bias 0, dynamo a weight only
        assert [i.name for i in graph.input] == ["latents", "t", "y"]
    else:
        assert entry.family == "unifiednorm"
        assert (
            count["Sqrt"] == 5
            and not count["LayerNormalization"]
            and not count["BatchNormalization"]
        )


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_rewrite_is_valid_equivalent_and_deterministic(corpus, tmp_path, name):
    paths = corpus(name)
    inputs = paths.load_inputs()
    before = digest(paths.model)
    first, second = tmp_path / "a" / "out.onnx", tmp_path / "b" / "out.onnx"
    first.parent.mkdir()
    second.parent.mkdir()
    report = rewrite_file(paths.model, first, checks=VerifyOptions(inputs=inputs))
    assert report.written and report.verification.ok
    rewrite_file(paths.model, second, verify=False)

    assert digest(paths.model) == before, "the input model was modified"
    assert digest(first) == digest(second), "two runs wrote different bytes"
    assert_matches_reference(first, paths)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_rewrite_for_onnxruntime_is_valid_and_equivalent(corpus, tmp_path, name):
    """--target ort emits onnxruntime's contrib norms at any opset. Found from outside: on
    TorchScript opset-14 exports with a LayerNorm right after another (CLIP's pre_layrnorm,
    a LayerNorm on embeddings) the second fusion read a value the first had replaced, and
    the output failed onnx.checker (nodes not sorted)."""
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(
        paths.model,
        out,
        options=Options(target="ort"),
        checks=VerifyOptions(inputs=paths.load_inputs()),
    )
    assert report.written and report.verification.ok
    assert_matches_reference(out, paths)


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_a_rewrite_that_changes_nothing_writes_the_input_graph(corpus, tmp_path, name):
    """Found from outside: with no pass applying, the output still carried ~1,400 value_info
    entries from shape annotation (818 KB -> 931 KB). The output differs from IN only where
    a pass changed something."""
    paths = corpus(name)
    out = tmp_path / "out.onnx"
    report = rewrite_file(paths.model, out, verify=False)
    if any(p.modified for p in report.passes):
        pytest.skip("a pass applies to this export")
    assert onnx.load(str(out)).graph == onnx.load(str(paths.model)).graph
