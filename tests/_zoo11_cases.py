"""The architectures of round 11, trained by tests/_zoo9_kit.py's loop: tiny configs (hidden 16, one layer,
vocabulary 32, float64), dropout 0.1 wherever the config has one, passed directly to the recorder.

Causal LMs train on the loop's next-token loss over right-padded sequences labelled -100 at the padding; the
others on the model's own loss with ``labels`` in the call (tests/_zoo9_cases.py's helpers).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import transformers
from _zoo9_cases import (
    S2S,
    P,
    _audio,
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
from _zoo9_kit import ROWS, VOCAB, Case, logits_of
from _zoo10_cases import (
    BATCH_NORM,
    TS,
    VITMAE,
    _all_patches_mse,
    _forecast_data,
    _masked_images,
    _warm_statistics,
)
from torch import Tensor

__all__ = ["BATCH_NORM_MORE", "CASES", "ROUTES", "SeriesDistribution"]

SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, use_cache=False)
TEXT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=P, attention_probs_dropout_prob=P)
AUDIO = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
             conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
             hidden_dropout=P, attention_dropout=P, activation_dropout=P, feat_proj_dropout=P, mask_time_prob=0.0,
             classifier_proj_size=8, num_labels=3)


def _lm(name: str, model_cls, config_cls, **cfg) -> Case:
    """A causal LM on the loop's next-token loss."""
    return causal_case(name, _build(model_cls, config_cls, **cfg))


def _text(name: str, model_cls, config_cls, **cfg) -> Case:
    """A sequence classifier (3 labels) on its own cross entropy over ``_texts``'s ids."""
    return classifier_case(name, _build(model_cls, config_cls, num_labels=3, **cfg), _texts())


def _markup_data() -> tuple[dict[str, Tensor], Tensor]:
    """Token ids with an XPath per token (tag ids and subscripts, depth 4) and class labels."""
    gen = torch.Generator().manual_seed(21)
    ids = torch.randint(1, VOCAB, (ROWS, 8), generator=gen)
    tags = torch.randint(0, 8, (ROWS, 8, 4), generator=gen)
    subs = torch.randint(0, 8, (ROWS, 8, 4), generator=gen)
    return ({"input_ids": ids, "xpath_tags_seq": tags, "xpath_subs_seq": subs},
            torch.randint(0, 3, (ROWS,), generator=gen))


CASES: dict[str, Case] = {
    # ---- causal LMs
    "granite": _lm("granite", transformers.GraniteForCausalLM, transformers.GraniteConfig, num_key_value_heads=1,
                   attention_dropout=P, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0,
                   attention_multiplier=0.25, **SMALL),
    "nemotron": _lm("nemotron", transformers.NemotronForCausalLM, transformers.NemotronConfig, num_key_value_heads=1,
                    attention_dropout=P, partial_rotary_factor=0.5, **SMALL),
    "qwen3": _lm("qwen3", transformers.Qwen3ForCausalLM, transformers.Qwen3Config, num_key_value_heads=1,
                 head_dim=8, attention_dropout=P, **SMALL),
    "granite_moe_top2": _lm("granite_moe_top2", transformers.GraniteMoeForCausalLM, transformers.GraniteMoeConfig,
                            num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, attention_dropout=P,
                            experts_implementation="batched_mm",
                            **SMALL),
    "olmoe_top2": _lm("olmoe_top2", transformers.OlmoeForCausalLM, transformers.OlmoeConfig, num_key_value_heads=1,
                      num_experts=4, num_experts_per_tok=2, attention_dropout=P,
                      experts_implementation="batched_mm", **SMALL),
    "recurrent_gemma": _lm("recurrent_gemma", transformers.RecurrentGemmaForCausalLM,
                           transformers.RecurrentGemmaConfig, vocab_size=VOCAB, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, lru_width=16,
                           attention_window_size=8, conv1d_width=3, block_types=["recurrent", "attention"],
                           head_dim=8, attention_dropout=P, use_cache=False),
    "jamba": _lm("jamba", transformers.JambaForCausalLM, transformers.JambaConfig, num_key_value_heads=1,
                 num_experts=1, num_experts_per_tok=1, mamba_d_state=4, mamba_d_conv=3, mamba_expand=2,
                 mamba_dt_rank=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                 expert_layer_offset=1, attention_dropout=P, use_mamba_kernels=False,
                 **{**SMALL, "num_hidden_layers": 2}),
    # ---- encoders
    "modernbert": classifier_case("modernbert", _build(
        transformers.ModernBertForSequenceClassification, transformers.ModernBertConfig, vocab_size=VOCAB,
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
        global_attn_every_n_layers=1, local_attention=8, attention_dropout=P, embedding_dropout=P, mlp_dropout=P,
        classifier_dropout=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        num_labels=3), _texts()),
    "fnet": dataclasses.replace(_text(
        "fnet", transformers.FNetForSequenceClassification, transformers.FNetConfig, vocab_size=VOCAB,
        hidden_size=16, num_hidden_layers=1, intermediate_size=32, max_position_embeddings=16, hidden_dropout_prob=P,
        use_tpu_fourier_optimizations=False, pad_token_id=None), panels=16),
    "luke": _text("luke", transformers.LukeForSequenceClassification, transformers.LukeConfig, entity_vocab_size=8,
                  entity_emb_size=8, pad_token_id=0, **TEXT),
    "markuplm": classifier_case("markuplm", _build(
        transformers.MarkupLMForSequenceClassification, transformers.MarkupLMConfig, num_labels=3, max_depth=4,
        max_xpath_tag_unit_embeddings=8, max_xpath_subs_unit_embeddings=8, xpath_unit_hidden_size=8,
        pad_token_id=0, **TEXT), _markup_data),
    "xlm_roberta_xl": _text("xlm_roberta_xl", transformers.XLMRobertaXLForSequenceClassification,
                            transformers.XLMRobertaXLConfig, pad_token_id=0, **TEXT),
    # ---- audio
    "data2vec_audio": classifier_case("data2vec_audio", _build(
        transformers.Data2VecAudioForSequenceClassification, transformers.Data2VecAudioConfig,
        num_adapter_layers=1, conv_pos_kernel_size=3, **{k: v for k, v in AUDIO.items()
                                                        if k != "num_conv_pos_embeddings"}), _audio),
    "sew": classifier_case("sew", _build(transformers.SEWForSequenceClassification, transformers.SEWConfig,
                                         squeeze_factor=2, **AUDIO), _audio),
    "unispeech": classifier_case("unispeech", _build(transformers.UniSpeechForSequenceClassification,
                                                     transformers.UniSpeechConfig, **AUDIO), _audio),
    "wavlm": classifier_case("wavlm", _build(transformers.WavLMForSequenceClassification, transformers.WavLMConfig,
                                             num_buckets=8, max_bucket_distance=16, **AUDIO), _audio),
}


# ---------------------------------------------------------------- the routes round 10 named
class SeriesDistribution(torch.nn.Module):
    """A module holding a Student-t forecaster whose forward returns the head's parameters and the scaler's shift
    and scale, ``(n, prediction_length, 5)``: ``df, mu, sigma, loc, scale`` on the last axis (the wrapper the
    refusal names, with ``loc`` and ``scale``, which rescale the head's distribution)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        out = self.model(**inputs)
        steps = out.params[0].shape[1]
        shift = [t.reshape(t.shape[0], 1).expand(-1, steps) for t in (out.loc, out.scale)]
        return torch.stack([*out.params, *shift], dim=-1)


def _student_t_nll(out: Tensor, y: Tensor) -> Tensor:
    """The mean negative log-likelihood of ``y`` under ``loc + scale * StudentT(df, mu, sigma)``
    (torch.distributions), the forecaster's own loss."""
    df, mu, sigma, loc, scale = out.unbind(-1)
    return -(torch.distributions.StudentT(df, mu, sigma).log_prob((y - loc) / scale) - scale.log()).mean()


def _loop_student_t_nll(out: Tensor, y: Tensor) -> Tensor:
    """Per sample, the mean over the window of the Student-t negative log-likelihood written out: ``-lgamma((v+1)/2)
    + lgamma(v/2) + log(sqrt(v pi) s) + (v+1)/2 log(1 + z^2 / v) + log(scale)``, ``z = ((y - loc)/scale - mu)/s``."""
    rows = []
    for k in range(len(y)):
        v, m, s, loc, scale = (out[k, :, j] for j in range(5))
        z = ((y[k] - loc) / scale - m) / s
        nll = (-torch.lgamma((v + 1) / 2) + torch.lgamma(v / 2) + torch.log(torch.sqrt(v * math.pi) * s)
               + (v + 1) / 2 * torch.log1p(z * z / v) + torch.log(scale))
        rows.append(nll.mean())
    return torch.stack(rows)


def _series_case(name: str, model_cls, config_cls, **cfg) -> Case:
    return Case(name, lambda: SeriesDistribution(_build(model_cls, config_cls, **{**TS, **cfg})()), _forecast_data,
                lambda model, xb, yb: _student_t_nll(model(**xb), yb), _student_t_nll, _loop_student_t_nll,
                target="loss")


def _per_row_patches_mse(out, y: Tensor) -> Tensor:
    """Per sample, the mean squared reconstruction error over all patches (a plain loop)."""
    logits = logits_of(out)
    return torch.stack([((logits[k] - y[k, :, :-1]) ** 2).mean() for k in range(len(y))])


def _levit_cache_emptied(build):
    """``build`` with forward hooks that empty each ``attention_bias_cache`` before and after every forward, so an
    evaluation-mode forward computes LeViT's attention biases from the parameters it is called with and leaves the
    cache as recorded (empty)."""
    def built():
        model = build()
        for module in model.modules():
            if hasattr(module, "attention_bias_cache"):
                module.register_forward_pre_hook(lambda m, args: setattr(m, "attention_bias_cache", {}))
                module.register_forward_hook(lambda m, args, out: setattr(m, "attention_bias_cache", {}))
        return model
    return built


ROUTES: dict[str, Case] = {
    "vitmae_noise": Case("vitmae_noise", _drawn_tokens(_build(transformers.ViTMAEForPreTraining,
                                                              transformers.ViTMAEConfig, **VITMAE)),
                         _masked_images(True),
                         lambda model, xb, yb: _all_patches_mse(model(**xb), yb), _all_patches_mse,
                         _per_row_patches_mse, target="loss"),
    "time_series_transformer_nll": _series_case("time_series_transformer_nll",
                                                transformers.TimeSeriesTransformerForPrediction,
                                                transformers.TimeSeriesTransformerConfig),
    "informer_nll": _series_case("informer_nll", transformers.InformerForPrediction, transformers.InformerConfig,
                                 attention_type="full"),
    "levit_cache_emptied": dataclasses.replace(BATCH_NORM["levit"], name="levit_cache_emptied",
                                               build=_levit_cache_emptied(BATCH_NORM["levit"].build)),
}

#: Batch-norm models of round 9 trained by the zoo loop (round 9 checked RegNet through its own loop).
BATCH_NORM_MORE: dict[str, Case] = {
    "regnet": classifier_case("regnet", _warm_statistics(_build(
        transformers.RegNetForImageClassification, transformers.RegNetConfig, num_channels=3, embedding_size=8,
        hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, hidden_act="gelu", num_labels=3)), _images()),
}


# ---------------------------------------------------------------- a depth head and its scale-invariant loss
class Depth(torch.nn.Module):
    """A module holding a depth estimator whose forward returns ``predicted_depth`` (the wrapper the refusal
    names)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        return self.model(**inputs).predicted_depth


def _depth_data() -> tuple[dict[str, Tensor], Tensor]:
    """16x16 images and positive depth maps at the 32x32 resolution GLPN predicts with two 2-strided blocks."""
    X, _ = _images(seed=23)()
    return X, 1.0 + torch.rand(ROWS, 32, 32, generator=torch.Generator().manual_seed(23), dtype=torch.float64)


def _silog(out, y: Tensor) -> Tensor:
    """GLPN's own loss (``SiLogLoss``): ``sqrt(mean(d^2) - 0.5 mean(d)^2)``, ``d = log y - log pred`` over the
    batch's pixels."""
    d = torch.log(y) - torch.log(out if isinstance(out, Tensor) else out.predicted_depth)
    return torch.sqrt((d ** 2).mean() - 0.5 * d.mean() ** 2)


def _loop_silog(out, y: Tensor) -> Tensor:
    return torch.stack([_silog(out[k:k + 1], y[k:k + 1]) for k in range(len(y))])


GLPN = dict(num_channels=3, num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
            patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=P,
            attention_probs_dropout_prob=P, drop_path_rate=0.0, decoder_hidden_size=16, head_in_index=-1)
CASES["glpn"] = Case("glpn", _build(transformers.GLPNForDepthEstimation, transformers.GLPNConfig, **GLPN),
                     _depth_data, lambda model, xb, yb: model(**xb, labels=yb).loss, _silog, _loop_silog,
                     target=None)
CASES["glpn_depth_silog"] = Case(
    "glpn_depth_silog", lambda: Depth(_build(transformers.GLPNForDepthEstimation, transformers.GLPNConfig, **GLPN)()),
    _depth_data, lambda model, xb, yb: _silog(model(**xb), yb), _silog, _loop_silog, target=None)


# ---------------------------------------------------------------- more causal LMs and encoder-decoders
def _features() -> tuple[dict[str, Tensor], Tensor]:
    """Filter-bank-like inputs (16 frames of 8 features) and target token ids (6, some padded with -100)."""
    gen = torch.Generator().manual_seed(24)
    labels = torch.randint(3, VOCAB, (ROWS, 6), generator=gen)
    labels[::3, -2:] = -100
    return ({"input_features": torch.randn(ROWS, 16, 8, generator=gen, dtype=torch.float64),
             "decoder_input_ids": _shift(labels)}, labels)


CASES["bamba"] = _lm("bamba", transformers.BambaForCausalLM, transformers.BambaConfig, num_key_value_heads=1,
                     mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=1, mamba_d_state=4, mamba_chunk_size=4,
                     mamba_d_conv=3, mamba_expand=2, attn_layer_indices=[1], attention_dropout=P,
                     **{**SMALL, "num_hidden_layers": 2})
CASES["prophetnet"] = seq2seq_case("prophetnet", _build(
    transformers.ProphetNetForConditionalGeneration, transformers.ProphetNetConfig, vocab_size=VOCAB, hidden_size=16,
    encoder_ffn_dim=32, decoder_ffn_dim=32, num_encoder_layers=1, num_decoder_layers=1, num_encoder_attention_heads=2,
    num_decoder_attention_heads=2, max_position_embeddings=16, ngram=2, num_buckets=8, relative_max_distance=16,
    dropout=P, attention_dropout=P, activation_dropout=P, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    decoder_start_token_id=2, use_cache=False), _shift)
CASES["speech2text"] = Case("speech2text", _build(
    transformers.Speech2TextForConditionalGeneration, transformers.Speech2TextConfig, input_feat_per_channel=8,
    input_channels=1, num_conv_layers=2, conv_kernel_sizes=[3, 3], conv_channels=16, max_source_positions=16,
    max_target_positions=16, **S2S), _features, _own_loss, "token_cross_entropy", _loop_tokens)
