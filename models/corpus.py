"""The corpus of real exported models: which ones exist, and building them into a cache.

Each entry is one family exported one way (`gpt2-ts14`, `llama-dyn23`, ...). Building it writes
`model.onnx`, the example `inputs.npz` and onnxruntime's `reference.npz` (ORT_DISABLE_ALL) into
`<cache>/<name>-<key>/`, where the key hashes the builders' source and the library versions, so
a change to a builder rebuilds it. The cache lives outside git: $NORMOPT_MODEL_CACHE, or
~/.cache/normopt/models. A freshly exported model must match torch's own output, or the build
fails: a broken export is not a test model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# (exporter, opset) per suffix. TorchScript decomposes LayerNorm at opset <= 16; dynamo at 23
# emits native RMSNormalization, so -dyn23 is built only where that changes the graph.
EXPORTS = {"ts14": ("ts", 14), "ts17": ("ts", 17), "dyn18": ("dynamo", 18), "dyn23": ("dynamo", 23)}


@dataclass(frozen=True)
class Entry:
    name: str
    family: str
    exporter: str
    opset: int
    large: bool = False  # benchmark-size config, built only on request
    keep_bn: bool | None = None  # override the builder: False lets the exporter fold Conv+BN

    def builder(self) -> Callable:
        from models import cnn, dit, evonorm, hf, reparam, transformer

        families = {
            "clip": hf.clip,
            "bloom": hf.bloom,
            "swin": hf.swin,
            "wav2vec2": hf.wav2vec2,
            "whisper": hf.whisper,
            "periln": transformer.periln,
            "mixln": transformer.mixln,
            "scaledpool": transformer.scaledpool,
            "gpt2": hf.gpt2,
            "gpt2hidden": hf.gpt2hidden,
            "gpt2kv": hf.gpt2kv,
            "optkv": hf.optkv,
            "gptneoxkv": hf.gptneoxkv,
            "bloomkv": hf.bloomkv,
            "falconkv": hf.falconkv,
            "phikv": hf.phikv,
            "phi": hf.phi,
            "gpt2narrow": hf.gpt2narrow,
            "gpt2fused": hf.gpt2fused,
            "vitfused": hf.vitfused,
            "bertfused": hf.bertfused,
            "opt": hf.opt,
            "gptneox": hf.gptneox,
            "vit": hf.vit,
            "bert": hf.bert,
            "llama": hf.llama,
            "preln": transformer.preln,
            "repbn": transformer.repbn,
            "repbnpool": transformer.repbnpool,
            "unifiednorm": transformer.unifiednorm,
            "resnet18": cnn.resnet18,
            "mobilenetv2": cnn.mobilenetv2,
            "convnext": cnn.convnext,
            "convnext2d": cnn.convnext2d,
            "repvgg": cnn.repvgg,
            "mobileone": cnn.mobileone,
            "levit": cnn.levit,
            "repvggdeploy": cnn.repvgg_deploy,
            "repblocks": reparam.repblocks,
            "evonorms": evonorm.evonorms,
            "regnetzevos": evonorm.regnetz_evos,
            "resnetv2evos": evonorm.resnetv2_evo,
            "resnetv2evob": evonorm.resnetv2_evob,
            "dit": dit.dit,
        }
        build = families[self.family]
        return (lambda: build(large=True)) if self.large else build


@dataclass(frozen=True)
class Paths:
    model: Path
    inputs: Path
    reference: Path

    def load_inputs(self) -> dict[str, np.ndarray]:
        with np.load(self.inputs) as f:
            return {k: f[k] for k in f.files}

    def load_reference(self) -> dict[str, np.ndarray]:
        with np.load(self.reference) as f:
            return {k: f[k] for k in f.files}


FAMILIES = [
    "gpt2",
    "gpt2hidden",
    "gpt2kv",
    "optkv",
    "gptneoxkv",
    "bloomkv",
    "falconkv",
    "phikv",
    "opt",
    "gptneox",
    "vit",
    "bert",
    "gpt2fused",
    "vitfused",
    "bertfused",
    "clip",
    "bloom",
    "swin",
    "wav2vec2",
    "whisper",
    "llama",
    "preln",
    "periln",
    "mixln",
    "scaledpool",
    "repbn",
    "repbnpool",
    "unifiednorm",
    "resnet18",
    "mobilenetv2",
    "convnext",
    "convnext2d",
    "repvgg",
    "repblocks",
    "mobileone",
    "levit",
    "evonorms",
    "regnetzevos",
    "resnetv2evos",
    "resnetv2evob",
    "dit",
]
KV_FAMILIES = ("gpt2kv", "optkv", "gptneoxkv", "bloomkv", "falconkv", "phikv")
# Exports per family where not all of them work (Whisper: TorchScript cannot export aten::diff).
FAMILY_EXPORTS = {
    "llama": ("ts14", "ts17", "dyn18", "dyn23"),
    "whisper": ("dyn18",),
    **{f: ("ts17", "dyn18") for f in KV_FAMILIES},  # KV-cache decoders
    # onnxruntime's transformers optimizer fuses the LayerNormalization op exports (>= 17)
    **{f: ("ts17", "dyn18") for f in ("gpt2fused", "vitfused")},
    "bertfused": ("ts17",),
    **{f: ("ts17", "dyn18") for f in ("mobileone", "levit")},
    # EvoNorm CNNs (every variant in evonorms) and a DiT, both exporters
    **{f: ("ts17", "dyn18") for f in ("evonorms", "regnetzevos", "dit")},
    "resnetv2evos": ("ts17",),
    "resnetv2evob": ("dyn18",),
}
CORPUS: dict[str, Entry] = {}
for _family in FAMILIES:
    for _suffix in FAMILY_EXPORTS.get(_family, ("ts14", "ts17", "dyn18")):
        CORPUS[f"{_family}-{_suffix}"] = Entry(f"{_family}-{_suffix}", _family, *EXPORTS[_suffix])
# timm's RepVGG exported with Conv+BN folded by the exporter: only the identity BNs stay
for _suffix in ("ts17", "dyn18"):
    CORPUS[f"repvgg-folded-{_suffix}"] = Entry(
        f"repvgg-folded-{_suffix}", "repvgg", *EXPORTS[_suffix], keep_bn=False
    )
LARGE = {
    "gpt2-768x12-ts17": Entry("gpt2-768x12-ts17", "gpt2", "ts", 17, large=True),
    "gpt2-768x12-dyn18": Entry("gpt2-768x12-dyn18", "gpt2", "dynamo", 18, large=True),
    "vit-b16-dyn18": Entry("vit-b16-dyn18", "vit", "dynamo", 18, large=True),
    "gpt2-128x4-ts17": Entry("gpt2-128x4-ts17", "gpt2narrow", "ts", 17, large=True),
    "llama-512x4-dyn18": Entry("llama-512x4-dyn18", "llama", "dynamo", 18, large=True),
    "convnext-128x4-dyn18": Entry("convnext-128x4-dyn18", "convnext", "dynamo", 18, large=True),
    "convnext-128x4-ts14": Entry("convnext-128x4-ts14", "convnext", "ts", 14, large=True),
    # timm's LayerNorm2d (channels-first ConvNeXt): exports where a fused norm needs Transposes
    **{
        f"convnext2d-bench-{s}": Entry(
            f"convnext2d-bench-{s}", "convnext2d", *EXPORTS[s], large=True
        )
        for s in ("ts14", "ts17", "dyn18")
    },
    "resnet18-full-dyn18": Entry("resnet18-full-dyn18", "resnet18", "dynamo", 18, large=True),
    "resnet18-full-dyn18-folded": Entry(
        "resnet18-full-dyn18-folded", "resnet18", "dynamo", 18, large=True, keep_bn=False
    ),
    "repbn-vits-dyn18": Entry("repbn-vits-dyn18", "repbn", "dynamo", 18, large=True),
    # timm's RepVGG-A0: training form (BN kept), and timm's own reparameterized deploy form
    "repvgg-a0-dyn18": Entry("repvgg-a0-dyn18", "repvgg", "dynamo", 18, large=True),
    "repvgg-a0-deploy-dyn18": Entry(
        "repvgg-a0-deploy-dyn18", "repvggdeploy", "dynamo", 18, large=True
    ),
    # an ACNet block, a Diverse Branch Block and a DEConv, 64 channels, training form
    "repblocks-64-dyn18": Entry("repblocks-64-dyn18", "repblocks", "dynamo", 18, large=True),
    "swin-t-ts17": Entry("swin-t-ts17", "swin", "ts", 17, large=True),
    "bloom-512x8-ts17": Entry("bloom-512x8-ts17", "bloom", "ts", 17, large=True),
    "opt-512x8-ts17": Entry("opt-512x8-ts17", "opt", "ts", 17, large=True),
    "phi-512x8-ts17": Entry("phi-512x8-ts17", "phi", "ts", 17, large=True),
    # timm's regnetz_b16_evos and resnetv2_50d_evos at their real sizes (64x64)
    "regnetz-b16-evos-ts17": Entry("regnetz-b16-evos-ts17", "regnetzevos", "ts", 17, large=True),
    "resnetv2-50d-evos-ts17": Entry("resnetv2-50d-evos-ts17", "resnetv2evos", "ts", 17, large=True),
    # ResNetV2-26d with EvoNorm-B0 (at 50 layers, random weights make it chaotic: float32 and
    # float64 torch differ by 15% of the output scale)
    "resnetv2-26d-evob-dyn18": Entry(
        "resnetv2-26d-evob-dyn18", "resnetv2evob", "dynamo", 18, large=True
    ),
}


def cache_root() -> Path:
    return Path(
        os.environ.get("NORMOPT_MODEL_CACHE", Path.home() / ".cache" / "normopt" / "models")
    )


def cache_key() -> str:
    h = hashlib.sha256()
    for src in sorted(HERE.glob("*.py")):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    for dist in ("torch", "transformers", "onnx", "onnxscript"):
        h.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    return h.hexdigest()[:12]


def get(name: str) -> Entry:
    entry = CORPUS.get(name) or LARGE.get(name)
    if entry is None:
        raise KeyError(f"unknown corpus model {name!r}; known: {', '.join([*CORPUS, *LARGE])}")
    return entry


def build(name: str) -> Paths:
    """Build (or reuse from the cache) one corpus model; returns its file paths."""
    entry = get(name)
    folder = cache_root() / f"{name}-{cache_key()}"
    paths = Paths(folder / "model.onnx", folder / "inputs.npz", folder / "reference.npz")
    if paths.reference.exists():
        return paths
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=folder.parent))
    try:
        _build_into(entry, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _build_into(entry: Entry, folder: Path) -> None:
    import torch

    from models.common import export, ort_fuse, randomize_norms_and_biases
    from normopt.sessions import run_ort
    from normopt.verification import compare_output

    torch.manual_seed(0)
    built = entry.builder()()
    if entry.keep_bn is not None:
        built.keep_bn = entry.keep_bn
    randomize_norms_and_biases(built.module, seed=1)
    export(built, folder / "model.onnx", exporter=entry.exporter, opset=entry.opset)
    if built.ort_fused:
        ort_fuse(built, folder / "model.onnx")
    feeds = {k: v.numpy() for k, v in built.inputs.items()}
    reference = run_ort(folder / "model.onnx", feeds)
    with torch.no_grad():
        expected = built.module(*built.inputs.values())
    for name, tensor in zip(
        built.outputs, expected if isinstance(expected, tuple) else (expected,)
    ):
        check = compare_output(name, tensor.numpy(), reference[name], rtol=1e-4, atol=1e-5)
        if not check.ok:
            raise RuntimeError(
                f"{entry.name}: ONNX export disagrees with torch on '{name}': {check.problem}"
            )
    np.savez(folder / "inputs.npz", **feeds)
    np.savez(folder / "reference.npz", **reference)
