"""`normopt inspect`: finds every norm in every export and keeps its JSON contract."""

import collections
import json
import subprocess
import sys

import pytest

from models.corpus import CORPUS
from normopt.inspection import inspect_model
from normopt.rewriter.stream import ARCHITECTURES

LN = {
    "gpt2",
    "gpt2hidden",
    "gpt2kv",
    "optkv",
    "gptneoxkv",
    "opt",
    "gptneox",
    "vit",
    "bert",
    "preln",
}
# (kind, form) -> count, per family; form depends on the export for LN / RMSNorm
NORMS = {
    "llama": lambda e: {("rmsnorm", "op" if e.opset >= 23 else "decomposed"): 5},
    "resnet18": lambda e: {("batchnorm", "op"): 20},
    "mobilenetv2": lambda e: {("batchnorm", "op"): 52},
    "repbn": lambda e: {("batchnorm", "op"): 5},
    "repbnpool": lambda e: {("batchnorm", "op"): 5},
    "repvgg": lambda e: {
        ("batchnorm", "op"): 19 if e.keep_bn is None else 3
    },  # the exporter folds Conv+BN
    "repblocks": lambda e: {("batchnorm", "op"): 9},
    "mobileone": lambda e: {("batchnorm", "op"): 226},
    "levit": lambda e: {("batchnorm", "op"): 52},
    "unifiednorm": lambda e: {("affine", "decomposed"): 5},
    # every EvoNorm variant (B0, B1, B2, S0, S0a with group size, S1, S2, S0a without act), and
    # two without their activation: pure affines (timm's S0 and B0 with apply_act=False)
    "evonorms": lambda e: {("evonorm", "decomposed"): 8, ("affine", "decomposed"): 2},
    "regnetzevos": lambda e: {("evonorm", "decomposed"): 26},
    "resnetv2evos": lambda e: {("evonorm", "decomposed"): 15},
    "resnetv2evob": lambda e: {("evonorm", "decomposed"): 15},
    "dit": lambda e: {("layernorm", "op"): 5},
    "convnext": lambda e: {("layernorm", "decomposed"): 2},
    **{
        f: (lambda e, n=n: {("layernorm", "decomposed" if e.opset < 17 else "op"): n})
        for f, n in {
            "clip": 6,
            "bloom": 6,
            "swin": 11,
            "wav2vec2": 8,
            "whisper": 12,
            "periln": 9,
            "mixln": 7,
            "scaledpool": 5,
            "convnext2d": 9,
        }.items()
    },
    **{f: (lambda e: {("layernorm", "decomposed" if e.opset < 17 else "op"): 5}) for f in LN},
    # onnxruntime-fused: a LayerNormalization and 4 SkipLayerNormalization (BERT: 4, its
    # embedding LayerNorm is inside EmbedLayerNormalization, which is no norm match)
    "gpt2fused": lambda e: {("layernorm", "op"): 5},
    "bloomkv": lambda e: {("layernorm", "op"): 6},
    "falconkv": lambda e: {("layernorm", "op"): 3},
    "phikv": lambda e: {("layernorm", "op"): 3},
    "vitfused": lambda e: {("layernorm", "op"): 5},
    "bertfused": lambda e: {("layernorm", "op"): 4},
}


@pytest.mark.parametrize("name", sorted(CORPUS))
def test_inspect_finds_every_norm(corpus, name):
    entry = CORPUS[name]
    info = inspect_model(corpus(name).model)
    found = collections.Counter((n["kind"], n["form"]) for n in info["norms"])
    assert dict(found) == NORMS[entry.family](entry)
    for n in info["norms"]:
        assert n["nodes"] and n["dtype"] == "FLOAT"
        if n["kind"] in ("layernorm", "rmsnorm"):
            assert n["axis"] == -1 and 0 < n["epsilon"] < 1e-4
    if entry.family == "evonorms":
        variants = [(n["variant"], n["groups"]) for n in info["norms"] if n["kind"] == "evonorm"]
        assert variants == [
            ("B0", None),
            ("B1", None),
            ("B2", None),
            ("S0", 4),
            ("S0", 2),  # S0a with its activation: S0's formula (group size 8: 2 groups)
            ("S1", 2),
            ("S2", 4),
            ("S0a", 4),
        ]
        assert [n["epsilon"] for n in info["norms"][:8]] == pytest.approx(
            [1e-3, 1e-5, 1e-5, 1e-5, 1e-3, 1e-5, 1e-5, 1e-3]
        )
    if entry.family in ("repbn", "repbnpool"):
        assert all(n["transposed"] and n["repbn_alpha"] > 0 for n in info["norms"])


def test_json_contract(corpus):
    proc = subprocess.run(
        [sys.executable, "-m", "normopt", "inspect", str(corpus("gpt2-ts17").model), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    data = json.loads(proc.stdout)
    assert data["architecture"] == "pre-ln" and data["architecture"] in ARCHITECTURES
    assert {"kind", "form", "axis", "epsilon", "nodes"} <= set(data["norms"][0])
    assert data["passes"]["canonicalize-norms"] == {
        "applies": False,
        "reason": "model: no decomposed LayerNorm or RMSNorm",
    }
    assert set(data["passes"]) >= {"canonicalize-norms", "cleanup"}


def test_target_changes_the_verdict(corpus):
    path = corpus("llama-dyn18").model
    assert not inspect_model(path, "onnx")["passes"]["canonicalize-norms"]["applies"]
    verdict = inspect_model(path, "ort")["passes"]["canonicalize-norms"]
    assert verdict["applies"] and "SimplifiedLayerNormalization" in verdict["reason"]


def test_shapes_are_lists_in_json_and_shown_in_the_table(corpus):
    """Found from outside: shapes printed blank (rich read "[batch, 3, 64, 64]" as markup) and
    JSON shapes were strings."""
    path = corpus("gpt2-dyn18").model
    proc = subprocess.run(
        [sys.executable, "-m", "normopt", "inspect", str(path), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    inputs = json.loads(proc.stdout)["model"]["inputs"]
    assert (
        inputs[0]["name"] == "input_ids"
        and isinstance(inputs[0]["shape"], list)
        and len(inputs[0]["shape"]) == 2
    )
    table = subprocess.run(
        [sys.executable, "-m", "normopt", "inspect", str(path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    dims = ", ".join(map(str, inputs[0]["shape"]))
    assert f"input_ids INT64 [{dims}]" in table


@pytest.mark.parametrize(
    ("name", "applies", "after", "reason"),
    [
        (
            "vit-ts17",
            True,
            "preln-to-rmsnorm",
            "a stream of width 64 -> 63: 5 norm(s), 12 constant(s) cut",
        ),
        ("bert-ts17", False, "preln-to-rmsnorm", "the stream is post-ln, not Pre-RMSNorm"),
        ("llama-dyn18", False, None, "the stream is not zero-mean"),
    ],
)
def test_inspect_says_whether_the_stream_can_carry_d_minus_1(corpus, name, applies, after, reason):
    """Pre-LN models are asked after preln-to-rmsnorm (run on the loaded copy; the file is not
    touched); a model trained with RMSNorm as it is."""
    path = corpus(name).model
    before = path.read_bytes()
    crms = inspect_model(path)["crms"]
    assert (crms["applies"], crms["after"]) == (applies, after) and reason in crms["reason"]
    assert path.read_bytes() == before


def test_the_table_names_each_evonorm_s_variant_and_groups(corpus, cli_env, tmp_path):
    from tests.evo_graphs import build_tf
    from tests.helpers import cli, save

    text = cli("inspect", corpus("evonorms-ts17").model, env=cli_env).stdout
    for kind in ("evonorm B0 (per channel)", "evonorm S0 (4 groups)", "evonorm S0a (4 groups)"):
        assert kind in text
    tf = save(build_tf("S0", "channels_last")[0], tmp_path / "tf.onnx")
    assert "evonorm S0 (2 groups, NHWC)" in cli("inspect", tf, env=cli_env).stdout
