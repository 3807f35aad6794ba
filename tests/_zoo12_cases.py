"""The architectures of round 12, trained by tests/_zoo9_kit.py's loop: tiny configs (hidden 16, one or two layers,
vocabulary 32, float64), dropout 0.1 wherever the config has one, passed directly to the recorder.

Causal LMs train on the loop's next-token loss over right-padded sequences labelled -100 at the padding; the
encoder-decoders and classifiers on the model's own loss with ``labels`` in the call (tests/_zoo9_cases.py's
helpers). SigLIP trains contrastively on its pairwise sigmoid loss, declared by its terms with
``explaind.batch_coupled_loss`` (docs/guide_own_model.md, "Batch-coupled losses").
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
import transformers
from _zoo9_cases import (
    IMAGE,
    S2S,
    P,
    _build,
    _drawn_tokens,
    _images,
    _loop_tokens,
    _own_loss,
    _shift,
    _texts,
    causal_case,
    classifier_case,
    seq2seq_case,
)
from _zoo9_kit import ROWS, VOCAB, Case, token_ids
from torch import Tensor

import explaind

__all__ = ["CASES", "SigLipPairs", "siglip_terms"]

SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TWO = {**SMALL, "num_hidden_layers": 2}


def _lm(name: str, model_cls, config_cls, **kw) -> Case:
    """A causal LM on the loop's next-token loss; ``kw`` holds the config, and ``case_*`` keys the case's."""
    case_kw = {k[5:]: kw.pop(k) for k in list(kw) if k.startswith("case_")}
    return causal_case(name, _build(model_cls, config_cls, **kw), **case_kw)


# ---------------------------------------------------------------- T5-style encoder-decoders
def _t5_shift(labels: Tensor) -> Tensor:
    """T5's decoder inputs: the labels shifted right behind the start id 0, -100 replaced by the pad id 0."""
    out = torch.zeros_like(labels)
    out[:, 1:] = labels[:, :-1].masked_fill(labels[:, :-1] == -100, 0)
    return out


T5_SMALL = dict(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=P,
                pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, use_cache=False,
                feed_forward_proj="gated-gelu")


def _switch(**cfg):
    """Switch Transformers, two layers each side, the second sparse (2 experts, capacity 64: no token dropped), the
    model's own token loss without the router's auxiliary losses; ``cfg`` overrides (the router's dtype, its
    multiplicative jitter noise, drawn in training mode)."""
    return _build(transformers.SwitchTransformersForConditionalGeneration, transformers.SwitchTransformersConfig,
                  **{**T5_SMALL, "num_layers": 2, "num_decoder_layers": 2, "feed_forward_proj": "gated-gelu",
                     "num_experts": 2, "expert_capacity": 64, "num_sparse_encoder_layers": 1,
                     "num_sparse_decoder_layers": 1, "router_jitter_noise": 0.0, "output_router_logits": False,
                     **cfg})


def _kept(module: torch.nn.Module):
    """A ``to`` for ``module`` that returns it as it is (``Module.to`` writes ``p.data``, refused under torch.func)."""
    def to(*args, **kwargs) -> torch.nn.Module:
        return module
    return to


def _routers_float64(build):
    """``build`` with every router's ``dtype`` attribute set to float64 (the dtype its forward converts its
    classifier to; the config refuses ``router_dtype='float64'``), the fix the refusal names."""
    def built():
        model = build()
        for module in model.modules():
            if hasattr(module, "jitter_noise") and hasattr(module, "classifier"):
                module.dtype = torch.float64
                module.classifier.to = _kept(module.classifier)
        return model
    return built


# ---------------------------------------------------------------- SigLIP's pairwise sigmoid loss
class SigLipPairs(torch.nn.Module):
    """A module holding a ``SiglipModel`` whose forward returns, per (image, text) pair, the image embedding, the
    text embedding (unnormalised, the projections' outputs) and the learned ``logit_scale`` and ``logit_bias`` as
    two more columns, so that the loss reads them through the outputs
    (docs/guide_own_model.md, "Batch-coupled losses")."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, pixel_values: Tensor) -> Tensor:
        image = self.model.get_image_features(pixel_values=pixel_values)
        text = self.model.get_text_features(input_ids=input_ids)
        image, text = (t if torch.is_tensor(t) else t.pooler_output for t in (image, text))
        n = image.shape[0]
        return torch.cat([image, text, self.model.logit_scale.expand(n, 1), self.model.logit_bias.expand(n, 1)], 1)


EMBED = 16  # SigLIP's projection width (its hidden size)


def siglip_terms(out: Tensor, _: Tensor) -> Tensor:
    """SigLIP's loss by image: ``-sum_j log sigmoid(z_kj (t a_k . b_j + bias))``, ``z`` = +1 on the pair's own text
    and -1 on the others'; their mean is the model's loss (``-sum log sigmoid / n``)."""
    a, b = F.normalize(out[:, :EMBED], dim=1), F.normalize(out[:, EMBED:2 * EMBED], dim=1)
    logits = a @ b.T * out[0, 2 * EMBED].exp() + out[0, 2 * EMBED + 1]
    z = 2 * torch.eye(len(out), dtype=out.dtype) - 1
    return -F.logsigmoid(z * logits).sum(1)


def _loop_siglip_terms(out: Tensor, _: Tensor) -> Tensor:
    """:func:`siglip_terms` written as a loop over image ``k`` and text ``j`` (the reference's)."""
    rows = []
    for k in range(len(out)):
        a = out[k, :EMBED] / out[k, :EMBED].norm()
        total = out.new_zeros(())
        for j in range(len(out)):
            b = out[j, EMBED:2 * EMBED] / out[j, EMBED:2 * EMBED].norm()
            logit = (a * b).sum() * torch.exp(out[0, 2 * EMBED]) + out[0, 2 * EMBED + 1]
            total = total - F.logsigmoid(logit if j == k else -logit)
        rows.append(total)
    return torch.stack(rows)


def _siglip() -> SigLipPairs:
    vision = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, attention_dropout=P)
    text = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=16, attention_dropout=P, pad_token_id=0)
    return SigLipPairs(transformers.SiglipModel(transformers.SiglipConfig(text_config=text, vision_config=vision)))


def _pairs() -> tuple[dict[str, Tensor], Tensor]:
    """(image, caption) pairs: 16x16 images and 8 token ids each; the targets are unused (zeros)."""
    X, _ = _images(seed=31)()
    return {"input_ids": token_ids(32), **X}, torch.zeros(ROWS, dtype=torch.float64)


def _siglip_step(model, xb, yb) -> Tensor:
    return siglip_terms(model(**xb), yb).mean()


# ---------------------------------------------------------------- audio
def _moonshine_data() -> tuple[dict[str, Tensor], Tensor]:
    """Raw waveforms of 2048 samples (4 frames after the stem) and target ids (6, some padded with -100), decoder
    inputs shifted behind 1."""
    gen = torch.Generator().manual_seed(33)
    labels = torch.randint(3, VOCAB, (ROWS, 6), generator=gen)
    labels[::3, -2:] = -100
    return ({"input_values": torch.randn(ROWS, 2048, generator=gen, dtype=torch.float64),
             "decoder_input_ids": _shift(labels)}, labels)


CASES: dict[str, Case] = {
    # ---- causal LMs
    "olmo2": _lm("olmo2", transformers.Olmo2ForCausalLM, transformers.Olmo2Config, num_key_value_heads=1,
                 attention_dropout=P, **SMALL),
    "gemma3_sliding_global": _lm(
        "gemma3_sliding_global", transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig,
        num_key_value_heads=1, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=8, final_logit_softcapping=5.0, attention_dropout=P, case_panels=32, **TWO),
    "glm4_partial_rotary": _lm("glm4_partial_rotary", transformers.Glm4ForCausalLM, transformers.Glm4Config,
                               num_key_value_heads=1, head_dim=8, partial_rotary_factor=0.5, attention_dropout=P,
                               case_panels=32, **SMALL),
    "smollm3_no_rope_layer": _lm("smollm3_no_rope_layer", transformers.SmolLM3ForCausalLM,
                                 transformers.SmolLM3Config, num_key_value_heads=1, no_rope_layers=[1, 0],
                                 attention_dropout=P, **TWO),
    "cohere2_sliding": _lm("cohere2_sliding", transformers.Cohere2ForCausalLM, transformers.Cohere2Config,
                           num_key_value_heads=1, sliding_window=4, layer_types=["sliding_attention",
                                                                                  "full_attention"],
                           logit_scale=0.5, attention_dropout=P, **TWO),
    "exaone4_sliding": _lm("exaone4_sliding", transformers.Exaone4ForCausalLM, transformers.Exaone4Config,
                           num_key_value_heads=1, sliding_window=4, layer_types=["sliding_attention",
                                                                                  "full_attention"],
                           attention_dropout=P, case_panels=96, **TWO),
    "diffllama": _lm("diffllama", transformers.DiffLlamaForCausalLM, transformers.DiffLlamaConfig,
                     num_key_value_heads=2, **SMALL),  # refuses attention_dropout > 0 and one key-value head
    "deepseek_v3_mla_moe": _lm(
        "deepseek_v3_mla_moe", transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config,
        moe_intermediate_size=8, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
        topk_group=1, n_shared_experts=1, kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=4, num_key_value_heads=2, attention_dropout=P, experts_implementation="batched_mm", **TWO),
    "lfm2_short_conv": _lm("lfm2_short_conv", transformers.Lfm2ForCausalLM, transformers.Lfm2Config,
                           num_key_value_heads=1, layer_types=["conv", "full_attention"], conv_L_cache=3,
                           case_panels=16,
                           **{k: v for k, v in TWO.items() if k != "intermediate_size"}, intermediate_size=32),
    "olmo2_sgd_untuned": _lm("olmo2_sgd_untuned", transformers.Olmo2ForCausalLM, transformers.Olmo2Config,
                             num_key_value_heads=1, attention_dropout=P, case_optimizer="sgd", case_lr=2.0,
                             case_panels=96, **SMALL),
    # ---- encoder-decoders
    "longt5_transient_global": seq2seq_case("longt5_transient_global", _build(
        transformers.LongT5ForConditionalGeneration, transformers.LongT5Config, local_radius=2, global_block_size=4,
        encoder_attention_type="transient-global", **T5_SMALL), _t5_shift),
    "switch_transformers": seq2seq_case("switch_transformers", _switch(), _t5_shift),
    "switch_transformers_router_float64": seq2seq_case("switch_transformers_router_float64",
                                                       _routers_float64(_switch()), _t5_shift),
    "switch_transformers_jitter": seq2seq_case("switch_transformers_jitter",
                                               _routers_float64(_switch(router_jitter_noise=0.1)), _t5_shift),
    "m2m100": seq2seq_case("m2m100", _build(transformers.M2M100ForConditionalGeneration, transformers.M2M100Config,
                                            encoder_layerdrop=0.0, decoder_layerdrop=0.0,
                                            activation_function="gelu", **S2S), _shift),
    "moonshine_audio": Case("moonshine_audio", _build(
        transformers.MoonshineForConditionalGeneration, transformers.MoonshineConfig, vocab_size=VOCAB,
        hidden_size=16, intermediate_size=32, encoder_num_hidden_layers=1, decoder_num_hidden_layers=1,
        encoder_num_attention_heads=2, decoder_num_attention_heads=2, encoder_num_key_value_heads=2,
        decoder_num_key_value_heads=2, max_position_embeddings=32, attention_dropout=P, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=2, use_cache=False), _moonshine_data, _own_loss,
        "token_cross_entropy", _loop_tokens),
    # ---- vision and text encoders
    "swinv2": classifier_case("swinv2", _build(
        transformers.Swinv2ForImageClassification, transformers.Swinv2Config, image_size=16, patch_size=2,
        num_channels=3, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, mlp_ratio=2.0,
        hidden_dropout_prob=P, attention_probs_dropout_prob=P, drop_path_rate=0.1, num_labels=3), _images()),
    "dinov2_registers": classifier_case("dinov2_registers", _drawn_tokens(_build(
        transformers.Dinov2WithRegistersForImageClassification, transformers.Dinov2WithRegistersConfig,
        num_register_tokens=2, drop_path_rate=0.2, mlp_ratio=2, **{k: v for k, v in IMAGE.items()
                                                                     if k != "intermediate_size"})), _images()),
    "focalnet": classifier_case("focalnet", _build(
        transformers.FocalNetForImageClassification, transformers.FocalNetConfig, image_size=16, patch_size=2,
        num_channels=3, embed_dim=8, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3], mlp_ratio=2.0,
        hidden_dropout_prob=P, drop_path_rate=0.1, num_labels=3), _images()),
    "pvt_v2": classifier_case("pvt_v2", _build(
        transformers.PvtV2ForImageClassification, transformers.PvtV2Config, image_size=16, num_channels=3,
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=P,
        attention_probs_dropout_prob=P, drop_path_rate=0.1, num_labels=3), _images()),
    "roformer": classifier_case("roformer", _build(
        transformers.RoFormerForSequenceClassification, transformers.RoFormerConfig, vocab_size=VOCAB,
        embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=P, attention_probs_dropout_prob=P, pad_token_id=0,
        num_labels=3), _texts()),
    "roformer_pad_token_none": classifier_case("roformer_pad_token_none", _build(
        transformers.RoFormerForSequenceClassification, transformers.RoFormerConfig, vocab_size=VOCAB,
        embedding_size=16, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, hidden_dropout_prob=P, attention_probs_dropout_prob=P, pad_token_id=None,
        num_labels=3), _texts()),
    # ---- contrastive
    "siglip_sigmoid_pairs": Case("siglip_sigmoid_pairs", _siglip, _pairs, _siglip_step,
                                 explaind.batch_coupled_loss(siglip_terms), _loop_siglip_terms, target=None,
                                 panels=4),  # the reference's quadrature 2.7e-15 at 8 panels
}
def _float64_tokens(model, xb, yb) -> Tensor:
    """The mean token cross entropy in the model's dtype (the model's own loss computes it in float32:
    ``logits.float()`` in Hugging Face's loss functions)."""
    logits = model(**xb).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1), ignore_index=-100)


CASES["moonshine_audio_float64_loss"] = dataclasses.replace(CASES["moonshine_audio"],
                                                            name="moonshine_audio_float64_loss",
                                                            step=_float64_tokens)
CASES["siglip_sigmoid_pairs_adamw_untuned"] = dataclasses.replace(
    CASES["siglip_sigmoid_pairs"], name="siglip_sigmoid_pairs_adamw_untuned", optimizer="adamw", lr=0.3, panels=64)
