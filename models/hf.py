"""transformers models from small configs (random weights): GPT-2, OPT, GPT-NeoX, ViT, BERT, LLaMA,
CLIP's vision tower.

Each returns a `Built` whose module returns one tensor (logits, or hidden states for BERT).
Eager attention, no KV cache, explicit attention_mask (transformers 5 needs it to export).
"""

from __future__ import annotations

import torch

import models._torchvision_shim  # noqa: F401  (before transformers imports torchvision)
from models.common import Built

VOCAB, POSITIONS, BATCH, SEQ = 128, 64, 2, 16
# the small size the families are built at (the config names most of transformers shares)
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
SMALL_TEXT = {**SMALL, "intermediate_size": 128, "vocab_size": VOCAB}
SMALL_TEXT["max_position_embeddings"] = POSITIONS
TEXT_AXES = {0: "batch", 1: "sequence"}


class _TextModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, output: str, extra: str | None) -> None:
        super().__init__()
        self.model, self.output, self.extra = model, output, extra

    def forward(self, input_ids, attention_mask, extra=None):
        kwargs = {self.extra: extra} if self.extra else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        return getattr(out, self.output)


def _transformers():
    import transformers

    transformers.logging.set_verbosity_error()  # random-weight configs trip token-id warnings
    return transformers


def _small(config):
    config.use_cache = False
    config._attn_implementation = "eager"
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    return config


def _text(model: torch.nn.Module, output: str = "logits", extra: str | None = None) -> Built:
    """`extra`: a third input, token_type_ids (BERT) or position_ids (LLaMA: without it HF
    derives batch-1 positions, which the opset-23 RotaryEmbedding fusion mis-shapes)."""
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
        "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
    }
    if extra == "token_type_ids":
        inputs[extra] = torch.randint(0, 2, (BATCH, SEQ), generator=g)
    elif extra == "position_ids":
        inputs[extra] = torch.arange(SEQ).expand(BATCH, SEQ).contiguous()
    dynamic = {name: TEXT_AXES for name in inputs} | {output: TEXT_AXES}
    return Built(_TextModel(model, output, extra).eval(), inputs, [output], dynamic)


def gpt2(large: bool = False) -> Built:
    """Pre-LN, learned positions, LM head tied to the token embedding."""
    T = _transformers()

    d, layers, heads = (768, 12, 12) if large else (64, 2, 4)
    vocab = 50257 if large else VOCAB
    cfg = _small(
        T.GPT2Config(
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            vocab_size=vocab,
            n_positions=1024 if large else POSITIONS,
        )
    )
    return _text(T.GPT2LMHeadModel(cfg))


class _CachedDecoder(torch.nn.Module):
    """One decoding step with the KV cache as tensors, as LLMs are exported for serving:
    (input_ids, attention_mask over past + new, past key and value per layer) -> (logits,
    present key and value per layer)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, pk0, pv0, pk1, pv1):
        cache = _transformers().DynamicCache()
        for i, (k, v) in enumerate(((pk0, pv0), (pk1, pv1))):
            cache.update(k, v, i)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
        )
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _with_cache(built: Built, heads: int, head_dim: int) -> Built:
    """`built`'s causal LM (2 layers) exported with its KV cache: past 3 tokens, 2 new."""
    model = built.module.model
    model.config.use_cache = True
    past, new = 3, 2
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (BATCH, new), generator=g),
        "attention_mask": torch.ones(BATCH, past + new, dtype=torch.long),
    }
    names = [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    for name in names:
        inputs[name] = torch.randn(BATCH, heads, past, head_dim, generator=g)
    outputs = ["logits"] + [n.replace("past_key_values", "present") for n in names]
    dynamic = {"input_ids": TEXT_AXES, "attention_mask": {0: "batch", 1: "total"}}
    dynamic |= {n: {0: "batch", 2: "past"} for n in names}
    return Built(_CachedDecoder(model).eval(), inputs, outputs, dynamic)


def gpt2kv() -> Built:
    """GPT-2 with its KV cache (the family's decoding step)."""
    return _with_cache(gpt2(), 4, 16)


def optkv() -> Built:
    """OPT with its KV cache."""
    return _with_cache(opt(), 4, 16)


def gptneoxkv() -> Built:
    """GPT-NeoX (parallel blocks, rotary) with its KV cache."""
    return _with_cache(gptneox(), 4, 16)


def bloomkv() -> Built:
    """BLOOM (ALiBi, a LayerNorm on the embeddings) with its KV cache."""
    return _with_cache(bloom(), 4, 16)


def falconkv() -> Built:
    """Falcon (multi-query attention: one key/value head; parallel attention and MLP reading one
    LayerNorm; rotary) with its KV cache."""
    T = _transformers()

    cfg = _small(
        T.FalconConfig(
            **SMALL,
            vocab_size=VOCAB,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            bias=True,
        )
    )
    return _with_cache(_text(T.FalconForCausalLM(cfg)), 1, 16)


def phi(large: bool = False) -> Built:
    """Phi: one LayerNorm feeds a parallel attention and MLP; partial rotary; an LM head with a
    bias. Large: 512 wide, 8 layers, 8 heads (vocab kept small)."""
    T = _transformers()

    size = SMALL_TEXT
    if large:
        size = {**SMALL_TEXT, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                "intermediate_size": 2048}  # fmt: skip
    return _text(T.PhiForCausalLM(_small(T.PhiConfig(**size, partial_rotary_factor=0.5))))


def phikv() -> Built:
    """Phi with its KV cache."""
    return _with_cache(phi(), 4, 16)


def gpt2narrow(large: bool = True) -> Built:
    """A norm-heavy GPT-2 for benchmarks: 128 wide, 4 layers, 1024 positions (long sequences)."""
    T = _transformers()

    cfg = _small(T.GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=VOCAB, n_positions=1024))
    return _text(T.GPT2LMHeadModel(cfg))


class _HiddenStates(torch.nn.Module):
    """Logits and every hidden state: embeddings, each block's output (the last after ln_f)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True
        )
        return (out.logits, *out.hidden_states)


def gpt2hidden() -> Built:
    """GPT-2 that also returns its hidden states: residual-stream values are graph outputs."""
    built = gpt2()
    built.module = _HiddenStates(built.module.model).eval()
    layers = built.module.model.config.n_layer
    built.outputs = ["logits", *(f"hidden_{i}" for i in range(layers + 1))]
    built.dynamic = {**built.dynamic, **{name: TEXT_AXES for name in built.outputs}}
    return built


def opt(large: bool = False) -> Built:
    """Pre-LN (do_layer_norm_before), learned positions with offset 2, tied LM head. Large: 512
    wide, 8 layers, 8 heads (vocab kept small)."""
    T = _transformers()

    d, layers, heads = (512, 8, 8) if large else (64, 2, 4)
    cfg = _small(
        T.OPTConfig(
            hidden_size=d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            ffn_dim=4 * d if large else 128,
            vocab_size=VOCAB,
            max_position_embeddings=POSITIONS,
            word_embed_proj_dim=d,
            do_layer_norm_before=True,
        )
    )
    return _text(T.OPTForCausalLM(cfg))


def gptneox() -> Built:
    """Parallel residual: x + attn(LN1(x)) + mlp(LN2(x)); rotary positions; untied head."""
    T = _transformers()

    cfg = _small(
        T.GPTNeoXConfig(
            **SMALL_TEXT,
            use_parallel_residual=True,
            rotary_pct=0.25,
            tie_word_embeddings=False,
        )
    )
    return _text(T.GPTNeoXForCausalLM(cfg))


def bert() -> Built:
    """Post-LN encoder (embedding LN, LN after each residual add); hidden states out."""
    T = _transformers()

    cfg = _small(T.BertConfig(**SMALL_TEXT, type_vocab_size=2))
    return _text(T.BertModel(cfg, add_pooling_layer=False), "last_hidden_state", "token_type_ids")


def llama(large: bool = False) -> Built:
    """Pre-RMSNorm, rotary positions, grouped-query attention, untied head."""
    T = _transformers()

    d, layers, heads = (512, 4, 8) if large else (64, 2, 4)
    cfg = _small(
        T.LlamaConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads // 2,
            vocab_size=VOCAB,
            max_position_embeddings=1024 if large else POSITIONS,
            tie_word_embeddings=False,
        )
    )
    return _text(T.LlamaForCausalLM(cfg), extra="position_ids")


class _ImageModel(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, output: str = "logits") -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, pixel_values):
        return getattr(self.model(pixel_values=pixel_values), self.output)


def vit(large: bool = False) -> Built:
    """Pre-LN ViT: patch Conv, cls token, learned positions, classification head."""
    T = _transformers()

    if large:
        cfg = T.ViTConfig(num_labels=1000)  # ViT-B/16 at 224x224
    else:
        cfg = T.ViTConfig(
            **SMALL,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1 if large else BATCH, 3, cfg.image_size, cfg.image_size, generator=g)
    return Built(
        _ImageModel(T.ViTForImageClassification(cfg)).eval(),
        {"pixel_values": pixels},
        ["logits"],
        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
    )


def clip() -> Built:
    """CLIP's vision tower: a LayerNorm on the patch + position embeddings before the Pre-LN
    blocks (pre_layrnorm), bias-free patch Conv, pooled cls token through post_layernorm."""
    T = _transformers()

    cfg = T.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(BATCH, 3, cfg.image_size, cfg.image_size, generator=g)
    return Built(
        _ImageModel(T.CLIPVisionModel(cfg), "pooler_output").eval(),
        {"pixel_values": pixels},
        ["pooled"],
        {"pixel_values": {0: "batch"}, "pooled": {0: "batch"}},
    )


def bloom(large: bool = False) -> Built:
    """Pre-LN LM with a LayerNorm on the word embeddings before the first block (ALiBi, tied
    head). Large: 512 wide, 8 layers, 8 heads (vocab kept small: the head is not the point)."""
    T = _transformers()

    d, layers, heads = (512, 8, 8) if large else (64, 2, 4)
    cfg = _small(T.BloomConfig(hidden_size=d, n_layer=layers, n_head=heads, vocab_size=VOCAB))
    return _text(T.BloomForCausalLM(cfg))


def swin(large: bool = False) -> Built:
    """Hierarchical vision transformer: shifted windows (Reshape/Transpose, roll) in the branches,
    stages joined by patch merging (strided token slices joined on the hidden axis, LayerNorm,
    a linear reduction that starts the next stage's stream). Large: Swin-T at 224x224, batch 1."""
    T = _transformers()

    if large:
        cfg = T.SwinConfig(image_size=224, num_labels=1000)  # Swin-T: 96 wide, depths 2-2-6-2
    else:
        cfg = T.SwinConfig(
            image_size=32,
            patch_size=2,
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=4,
            num_labels=10,
        )
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(1 if large else BATCH, 3, cfg.image_size, cfg.image_size, generator=g)
    return Built(
        _ImageModel(T.SwinForImageClassification(cfg)).eval(),
        {"pixel_values": pixels},
        ["logits"],
        {"pixel_values": {0: "batch"}, "logits": {0: "batch"}},
    )


class _Audio(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_values):
        return self.model(input_values=input_values).last_hidden_state


def wav2vec2() -> Built:
    """Speech encoder, Pre-LN ("stable layer norm"): a conv front end with GELU, a feature
    projection with its own LayerNorm, a grouped-conv positional embedding added to the
    stream (it reads the stream's start), Pre-LN blocks, a final LayerNorm."""
    T = _transformers()

    cfg = T.Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        do_stable_layer_norm=True,
        feat_extract_norm="layer",
    )
    cfg._attn_implementation = "eager"
    g = torch.Generator().manual_seed(0)
    audio = torch.randn(BATCH, 400, generator=g)
    return Built(
        _Audio(T.Wav2Vec2Model(cfg)).eval(),
        {"input_values": audio},
        ["hidden"],
        {"input_values": {0: "batch", 1: "samples"}, "hidden": {0: "batch", 1: "frames"}},
    )


class _Seq2Seq(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_features, decoder_input_ids):
        return self.model(input_features=input_features, decoder_input_ids=decoder_input_ids).logits


def whisper() -> Built:
    """Encoder-decoder, Pre-LN on both sides; the decoder's cross-attention reads the encoder's
    final LayerNorm output. (TorchScript cannot export it: aten::diff; dynamo only.)"""
    T = _transformers()

    cfg = _small(
        T.WhisperConfig(
            vocab_size=VOCAB,
            num_mel_bins=8,
            encoder_layers=2,
            encoder_attention_heads=4,
            decoder_layers=2,
            decoder_attention_heads=4,
            d_model=32,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_source_positions=16,
            max_target_positions=16,
            decoder_start_token_id=0,
        )
    )
    g = torch.Generator().manual_seed(0)
    inputs = {
        "input_features": torch.randn(BATCH, 8, 32, generator=g),
        "decoder_input_ids": torch.randint(0, VOCAB, (BATCH, 5), generator=g),
    }
    return Built(
        _Seq2Seq(T.WhisperForConditionalGeneration(cfg)).eval(),
        inputs,
        ["logits"],
        {
            "input_features": {0: "batch"},
            "decoder_input_ids": {0: "batch", 1: "target"},
            "logits": {0: "batch", 1: "target"},
        },
    )


def _fused(built: Built, model_type: str) -> Built:
    """`built` as onnxruntime's transformers optimizer leaves it (small configs: 4 heads, 64)."""
    built.ort_fused = (model_type, 4, 64)
    return built


def gpt2fused() -> Built:
    """GPT-2 fused by onnxruntime: a LayerNormalization, 4 SkipLayerNormalization, FastGelu."""
    return _fused(gpt2(), "gpt2")


def vitfused() -> Built:
    """ViT fused by onnxruntime: a LayerNormalization, 4 SkipLayerNormalization, BiasGelu."""
    return _fused(vit(), "vit")


def bertfused() -> Built:
    """BERT (Post-LN) fused by onnxruntime: EmbedLayerNormalization, Attention, 4
    SkipLayerNormalization, BiasGelu."""
    return _fused(bert(), "bert")
