"""The architectures of round 13, trained by tests/_zoo9_kit.py's loop: tiny configs (hidden 16, one or two layers,
vocabulary 32, float64), dropout 0.1 wherever the config has one, passed directly to the recorder.

Causal LMs train on the loop's next-token loss over right-padded sequences labelled -100 at the padding; the
classifiers and encoder-decoders on the model's own loss with ``labels`` in the call (tests/_zoo9_cases.py's
helpers). Models with train-mode batch norm are checked against tests/_zoo11_kit.py's ``BufferReplayReference``.
"""

from __future__ import annotations

import dataclasses

import torch
import transformers
from _hf_testkit import loop_token_loss
from _zoo9_cases import P, _build, _drawn_tokens, _images, _loop_tokens, _own_loss, _shift, causal_case, classifier_case
from _zoo9_kit import ROWS, VOCAB, Case, N, logits_of, token_ids
from _zoo12_cases import SMALL, TWO
from torch import Tensor

from explaind.integrations import four_d_attention_mask

__all__ = ["BATCH_NORM", "CASES"]


def _lm(name: str, model_cls, config_cls, **kw) -> Case:
    """A causal LM on the loop's next-token loss; ``kw`` holds the config, and ``case_*`` keys the case's."""
    case_kw = {k[5:]: kw.pop(k) for k in list(kw) if k.startswith("case_")}
    return causal_case(name, _build(model_cls, config_cls, **kw), **case_kw)


def _captions(seed: int):
    """16x16 images and captions of 6 target ids (some padded with -100), decoder inputs shifted behind 2."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        X, _ = _images(seed=seed)()
        labels = token_ids(seed + 1, length=6)
        labels[::3, -2:] = -100
        return {**X, "decoder_input_ids": _shift(labels)}, labels
    return data


def _vision_encoder_decoder() -> torch.nn.Module:
    """A ViT encoder and a GPT-2 decoder with cross attention (``add_cross_attention``)."""
    encoder = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=P,
                                     attention_probs_dropout_prob=P)
    decoder = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                      resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, use_cache=False,
                                      add_cross_attention=True, is_decoder=True)
    config = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.pad_token_id = 2, 0
    return transformers.VisionEncoderDecoderModel(config=config)


def _flattened_patches(seed: int, four_d: bool = False):
    """Pix2Struct's input: 16 flattened patches of 2x2x3 values behind their row and column (1-based), an all-ones
    patch mask (as the 4-D boolean mask ``four_d_attention_mask`` makes of it with ``four_d``), and target ids (6,
    some -100), decoder inputs shifted behind 0."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        gen = torch.Generator().manual_seed(seed)
        rows, cols = torch.meshgrid(torch.arange(1, 5), torch.arange(1, 5), indexing="ij")
        pos = torch.stack([rows.reshape(-1), cols.reshape(-1)], 1).to(torch.float64)
        values = torch.randn(ROWS, 16, 12, generator=gen, dtype=torch.float64)
        patches = torch.cat([pos.expand(ROWS, 16, 2), values], -1)
        labels = token_ids(seed + 1, length=6)
        labels[::3, -2:] = -100
        mask = torch.ones(ROWS, 16, dtype=torch.float64)
        return ({"flattened_patches": patches, "attention_mask": four_d_attention_mask(mask) if four_d else mask,
                 "decoder_input_ids": _t5_shift(labels)}, labels)
    return data


def _t5_shift(labels: Tensor) -> Tensor:
    """The labels shifted right behind the start id 0, -100 replaced by the pad id 0."""
    out = torch.zeros_like(labels)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0)
    return out


def _pix2struct(attn: str | None = None) -> torch.nn.Module:
    """Pix2Struct with its default attention, or ``attn`` (``"eager"``: masks built without the value-dependent
    shortcut of the SDPA path)."""
    text = dict(vocab_size=VOCAB, hidden_size=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=P,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False)
    vision = dict(hidden_size=16, patch_embed_hidden_size=12, d_ff=32, d_kv=8, num_hidden_layers=1,
                  num_attention_heads=2, dropout_rate=P, attention_dropout=P, seq_len=16)
    model = transformers.Pix2StructForConditionalGeneration(transformers.Pix2StructConfig(
        text_config=text, vision_config=vision, decoder_start_token_id=0, pad_token_id=0))
    if attn is not None:
        model.set_attn_implementation(attn)
    return model


class Pix2StructFourD(torch.nn.Module):
    """Pix2Struct called as its encoder then its decoder, each given its own 4-D boolean mask: the encoder's
    self-attention mask ``(n, 1, P, P)`` and the cross-attention mask ``(n, 1, T, P)`` of the decoder's ``T``
    queries, built from the 2-D patch mask ``attention_mask``; returns the decoder's logits."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, flattened_patches: Tensor, attention_mask: Tensor, decoder_input_ids: Tensor) -> Tensor:
        encoded = self.model.encoder(flattened_patches=flattened_patches,
                                     attention_mask=four_d_attention_mask(attention_mask)).last_hidden_state
        n, length = attention_mask.shape
        cross = attention_mask.bool()[:, None, None, :].expand(n, 1, decoder_input_ids.shape[1], length)
        return self.model.decoder(input_ids=decoder_input_ids, encoder_hidden_states=encoded,
                                  encoder_attention_mask=cross).logits


def _tokens_of_logits(model, xb, yb) -> Tensor:
    """The mean token cross entropy of the logits ``model`` returns, -100 ignored."""
    logits = model(**xb)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), ignore_index=-100)


def _blip_captioning() -> torch.nn.Module:
    vision = dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, attention_dropout=P, projection_dim=16)
    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, hidden_dropout_prob=P, attention_probs_dropout_prob=P,
                encoder_hidden_size=16, pad_token_id=0, bos_token_id=2, sep_token_id=1, projection_dim=16)
    return transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=vision,
                                                                             projection_dim=16))


def _captions_input_ids(seed: int):
    """BLIP captioning: images and caption ids (the model shifts them itself); labels equal to the ids, -100 at the
    padding, which the ids hold as 0."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        X, _ = _images(seed=seed)()
        labels = token_ids(seed + 1, length=6)
        labels[:, 0] = 2
        labels[::3, -2:] = -100
        return {**X, "input_ids": labels.masked_fill(labels == -100, 0)}, labels
    return data


def _loop_shifted_tokens(out, y: Tensor) -> Tensor:
    """BLIP's text decoder loss: next-token cross entropy (the logits shifted left, the labels right), per sample."""
    return loop_token_loss(logits_of(out), y, shift=True)


def _waveforms(seed: int, length: int = 400):
    def data() -> tuple[dict[str, Tensor], Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return ({"input_values": torch.randn(ROWS, length, generator=gen, dtype=torch.float64)},
                torch.randint(0, 3, (ROWS,), generator=gen))
    return data


def _features(seed: int):
    """Wav2Vec2-BERT's input: 6 frames of 8 features, class labels."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return ({"input_features": torch.randn(ROWS, 6, 8, generator=gen, dtype=torch.float64)},
                torch.randint(0, 3, (ROWS,), generator=gen))
    return data


AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
             conv_dim=(8, 8), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=4,
             num_conv_pos_embedding_groups=2, hidden_dropout=P, attention_dropout=P, activation_dropout=P,
             feat_proj_dropout=P, final_dropout=P, layerdrop=0.0, mask_time_prob=0.0, num_labels=3,
             classifier_proj_size=8)

def _warm(build, data):
    """``build`` with its batch norms' running statistics set from the training inputs of ``data`` (a cumulative
    average over one training-mode forward without a gradient, as a trained model's are; tests/_zoo10_cases.py's
    ``_warm_statistics`` for inputs other than its 16x16 images)."""
    def warmed() -> torch.nn.Module:
        model = build().to(torch.float64)
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for norm in norms:
            norm.momentum = None
        with torch.no_grad():
            model.train()(**{k: v[:N] for k, v in data()[0].items()})
        for norm in norms:
            norm.momentum = 0.1
        return model
    return warmed


VISION = dict(image_size=16, num_channels=3, num_labels=3)

CASES: dict[str, Case] = {
    # ---- causal LMs people fine-tune today
    "qwen3_next_gated_deltanet": _lm(
        "qwen3_next_gated_deltanet", transformers.Qwen3NextForCausalLM, transformers.Qwen3NextConfig,
        num_key_value_heads=1, head_dim=8, layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=1,
        linear_num_value_heads=2, mlp_only_layers=[0, 1], attention_dropout=P, **TWO),
    "qwen3_moe_all_experts": _lm(
        "qwen3_moe_all_experts", transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=4, moe_intermediate_size=8,
        attention_dropout=P, experts_implementation="batched_mm", **SMALL),
    "qwen3_moe_top2": _lm(
        "qwen3_moe_top2", transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig,
        num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
        attention_dropout=P, experts_implementation="batched_mm", **SMALL),
    "llama4_text_dense": _lm(
        "llama4_text_dense", transformers.Llama4ForCausalLM, transformers.Llama4TextConfig,
        num_key_value_heads=1, head_dim=8, intermediate_size_mlp=32, moe_layers=[], no_rope_layers=[1, 0],
        attention_chunk_size=4, attention_dropout=P, **TWO),
    "gpt_oss_sinks": _lm(
        "gpt_oss_sinks", transformers.GptOssForCausalLM, transformers.GptOssConfig, num_key_value_heads=1, head_dim=8,
        num_local_experts=2, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], attention_dropout=P,
        experts_implementation="batched_mm", case_panels=32, **TWO),  # the reference's quadrature 3.3e-11 at 8
    "apertus_xielu": _lm("apertus_xielu", transformers.ApertusForCausalLM, transformers.ApertusConfig,
                         num_key_value_heads=1, attention_dropout=P, **SMALL),
    "falcon_h1_hybrid": _lm(
        "falcon_h1_hybrid", transformers.FalconH1ForCausalLM, transformers.FalconH1Config, num_key_value_heads=1,
        head_dim=8, mamba_d_ssm=16, mamba_n_heads=2, mamba_d_head=8, mamba_d_state=4, mamba_d_conv=3,
        mamba_n_groups=1, mamba_chunk_size=4, attention_dropout=P, **SMALL),
    "zamba2_hybrid": _lm(
        "zamba2_hybrid", transformers.Zamba2ForCausalLM, transformers.Zamba2Config, num_key_value_heads=2,
        mamba_d_state=4, mamba_d_conv=3, mamba_expand=2, mamba_headdim=8, n_mamba_heads=4, mamba_ngroups=1,
        chunk_size=4, num_mem_blocks=1, layers_block_type=["mamba", "hybrid"], use_shared_attention_adapter=True,
        adapter_rank=4, attention_dropout=P, **TWO),
    # ---- vision
    "hiera": classifier_case("hiera", _build(
        transformers.HieraForImageClassification, transformers.HieraConfig, image_size=[16, 16],
        patch_size=[3, 3], patch_stride=[2, 2], patch_padding=[1, 1], embed_dim=8, depths=[1, 1],
        num_heads=[1, 2], mlp_ratio=2.0, query_stride=[2, 2], num_query_pool=1, masked_unit_size=[4, 4],
        masked_unit_attention=[True, False], drop_path_rate=0.1, num_channels=3, num_labels=3), _images(seed=41)),
    "data2vec_vision": classifier_case("data2vec_vision", _drawn_tokens(_build(
        transformers.Data2VecVisionForImageClassification, transformers.Data2VecVisionConfig, patch_size=8,
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=P,
        attention_probs_dropout_prob=P, use_relative_position_bias=True, use_mean_pooling=True,
        drop_path_rate=0.1, **VISION)), _images(seed=42)),
    "bit_weight_standardised": classifier_case("bit_weight_standardised", _build(
        transformers.BitForImageClassification, transformers.BitConfig, num_channels=3, embedding_size=8,
        hidden_sizes=[8, 16], depths=[1, 1], num_groups=4, layer_type="preactivation", hidden_act="gelu",
        global_padding="SAME", embedding_dynamic_padding=True, num_labels=3), _images(seed=43)),
    "vision_encoder_decoder": Case("vision_encoder_decoder", _drawn_tokens(_vision_encoder_decoder), _captions(44),
                                   _own_loss, "token_cross_entropy", _loop_tokens, target="loss"),
    "pix2struct": Case("pix2struct", _pix2struct, _flattened_patches(45), _own_loss, "token_cross_entropy",
                       _loop_tokens, target="loss"),
    "pix2struct_4d_mask": Case("pix2struct_4d_mask", _pix2struct, _flattened_patches(45, four_d=True), _own_loss,
                               "token_cross_entropy", _loop_tokens, target="loss"),
    "pix2struct_eager": Case("pix2struct_eager", lambda: _pix2struct("eager"), _flattened_patches(45), _own_loss,
                             "token_cross_entropy", _loop_tokens, target="loss"),
    "pix2struct_split_masks": Case("pix2struct_split_masks", lambda: Pix2StructFourD(_pix2struct()),
                                   _flattened_patches(45), _tokens_of_logits, "token_cross_entropy", _loop_tokens,
                                   target="loss"),
    "blip_captioning": Case("blip_captioning", _drawn_tokens(_blip_captioning), _captions_input_ids(46),
                            lambda model, xb, yb: model(**xb, labels=yb).loss, "causal_lm", _loop_shifted_tokens,
                            target="loss"),
    # ---- audio
    "wav2vec2_bert": classifier_case("wav2vec2_bert", _build(
        transformers.Wav2Vec2BertForSequenceClassification, transformers.Wav2Vec2BertConfig,
        feature_projection_input_dim=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, conv_depthwise_kernel_size=3, hidden_dropout=P, attention_dropout=P,
        activation_dropout=P, feat_proj_dropout=P, final_dropout=P, layerdrop=0.0, mask_time_prob=0.0, num_labels=3,
        classifier_proj_size=8, position_embeddings_type="relative_key", left_max_position_embeddings=4,
        right_max_position_embeddings=4), _features(48)),
}

#: Train-mode batch norm (running statistics move every step): checked against ``BufferReplayReference``.
BATCH_NORM: dict[str, Case] = {
    "wav2vec2_conformer": classifier_case("wav2vec2_conformer", _warm(_build(
        transformers.Wav2Vec2ConformerForSequenceClassification, transformers.Wav2Vec2ConformerConfig,
        conv_depthwise_kernel_size=3, position_embeddings_type="rotary", **AUDIO), _waveforms(47)),
        _waveforms(47)),
}


CASES["data2vec_vision_adamw_untuned"] = dataclasses.replace(CASES["data2vec_vision"],
                                                            name="data2vec_vision_adamw_untuned", lr=0.3, panels=32)
