"""The architectures of round 14, trained by tests/_zoo9_kit.py's loop: tiny configs (hidden 16, one or two layers,
vocabulary 32, float64), dropout 0.1 wherever the config has one, passed directly to the recorder.

Causal LMs train on the loop's next-token loss over right-padded sequences labelled -100 at the padding; the
classifiers and encoder-decoders on the model's own loss with ``labels`` in the call (tests/_zoo9_cases.py's
helpers). Mixtures of experts route every token to all of their experts (a top-k below that switches routes along
the steps: round 9's Mixtral).
"""

from __future__ import annotations

import dataclasses
import types

import torch
import transformers
from _zoo9_cases import (
    TEXT,
    P,
    _build,
    _images,
    _loop_tokens,
    _own_loss,
    _texts,
    causal_case,
    classifier_case,
    seq2seq_case,
)
from _zoo9_kit import ROWS, VOCAB, Case, token_ids
from _zoo10_cases import BATCH_NORM as ROUND10
from _zoo12_cases import SMALL, TWO, _t5_shift
from _zoo13_cases import AUDIO, _waveforms
from torch import Tensor

__all__ = ["CASES", "LEFT"]


def _lm(name: str, model_cls, config_cls, **kw) -> Case:
    """A causal LM on the loop's next-token loss; ``kw`` holds the config, and ``case_*`` keys the case's."""
    case_kw = {k[5:]: kw.pop(k) for k in list(kw) if k.startswith("case_")}
    return causal_case(name, _build(model_cls, config_cls, **kw), **case_kw)


def _videos(seed: int, frames: int = 2):
    """Videos of ``frames`` 16x16 RGB frames, ``(ROWS, frames, 3, 16, 16)``, and 3 classes."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return ({"pixel_values": torch.randn(ROWS, frames, 3, 16, 16, generator=gen, dtype=torch.float64)},
                torch.randint(0, 3, (ROWS,), generator=gen))
    return data


def _texts_in_languages(seed: int):
    """``_texts`` with a language id per row (0 or 1), which X-MOD routes to that language's adapter."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        X, y = _texts(seed)()
        lang = torch.randint(0, 2, (ROWS,), generator=torch.Generator().manual_seed(seed + 1))
        return {**X, "lang_ids": lang}, y
    return data


def _where_adapters(output: torch.nn.Module, lang_ids: Tensor, hidden_states: Tensor) -> Tensor:
    """X-MOD's ``XmodOutput.lang_adapter`` with ``torch.where`` in place of its boolean-mask indexing: every adapter
    runs on every row and each row keeps its own language's (the same function; vmap traces it)."""
    residual = hidden_states if not output.ln_before_adapter else None
    if output.adapter_layer_norm is not None:
        hidden_states = output.adapter_layer_norm(hidden_states)
    elif output.adapter_reuse_layer_norm:
        hidden_states = output.LayerNorm(hidden_states)
    if output.ln_before_adapter:
        residual = hidden_states
    new = torch.zeros_like(hidden_states)
    for index, key in enumerate(output.adapter_modules.keys()):
        chosen = (lang_ids == index).reshape(-1, *([1] * (hidden_states.dim() - 1)))
        new = torch.where(chosen, output.adapter_modules[key](hidden_states), new)
    return output.dropout(new) + residual


def _patched(build, class_name: str, method: str, fn):
    """``build`` with ``method`` of every module of class ``class_name`` replaced by ``fn`` bound to the module,
    before training (the fixes the refusals name, for a model one did not write)."""
    def built() -> torch.nn.Module:
        model = build()
        for module in model.modules():
            if type(module).__name__ == class_name:
                setattr(module, method, types.MethodType(fn, module))
        return model
    return built


def _routers_in_model_dtype(build):
    """``build`` with the fix the recorder's refusal names for NLLB-MoE's routers, which convert their classifier
    to ``config.router_dtype`` inside forward: each router keeps the model's dtype (float64 here)."""
    def built() -> torch.nn.Module:
        model = build()
        for module in model.modules():
            if type(module).__name__ == "NllbMoeTop2Router":
                module.dtype = torch.float64
                module.classifier.to = lambda *args, _keep=module.classifier, **kwargs: _keep
        return model
    return built


def _dense_dbrx_experts(experts: torch.nn.Module, hidden_states: Tensor, top_k_index: Tensor,
                        top_k_weights: Tensor) -> Tensor:
    """``DbrxExperts.forward`` without its loop over the routed experts (``one_hot``, ``nonzero``): every expert
    runs on every token, weighted by its routing weight (0 where not routed); the same function, which vmap
    traces."""
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, experts.hidden_size)
    split = (-1, experts.ffn_hidden_size, experts.hidden_size)
    out = torch.zeros_like(flat)
    for e in range(experts.num_experts):
        weight = (top_k_weights * (top_k_index == e).to(top_k_weights.dtype)).sum(-1, keepdim=True)
        w1, v1, w2 = (getattr(experts.mlp, n).view(split)[e] for n in ("w1", "v1", "w2"))
        out = out + experts.mlp(flat, w1, v1, w2) * weight
    return out.view(shape)


def _t5_data(seed: int):
    """Source ids, target ids (6, some -100) and T5's decoder inputs (shifted behind 0)."""
    def data() -> tuple[dict[str, Tensor], Tensor]:
        src, labels = token_ids(seed), token_ids(seed + 1, length=6)
        labels[::3, -2:] = -100
        return {"input_ids": src, "decoder_input_ids": _t5_shift(labels)}, labels
    return data


def _dbrx(clip_qkv: float) -> dict:
    """DBRX with 2 experts, both routed, and its queries, keys and values clamped to +-``clip_qkv``."""
    return dict(d_model=16, n_heads=2, n_layers=1, max_seq_len=16, vocab_size=VOCAB, resid_pdrop=P, emb_pdrop=P,
                attn_config={"kv_n_heads": 1, "attn_pdrop": P, "clip_qkv": clip_qkv, "rope_theta": 10000.0},
                ffn_config={"ffn_hidden_size": 16, "moe_num_experts": 2, "moe_top_k": 2}, use_cache=False)


_S2S = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
            dropout=P, attention_dropout=P, activation_dropout=P, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=2, use_cache=False)


_NLLB = dict(model_cls=transformers.NllbMoeForConditionalGeneration, config_cls=transformers.NllbMoeConfig,
             num_experts=2, expert_capacity=64, encoder_sparse_step=1, decoder_sparse_step=1, encoder_layerdrop=0.0,
             decoder_layerdrop=0.0, moe_token_dropout=P, **_S2S)


def _shift(labels: Tensor) -> Tensor:
    return transformers.models.bart.modeling_bart.shift_tokens_right(labels, 0, 2)


VIT = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
           intermediate_size=32, hidden_dropout_prob=P, attention_probs_dropout_prob=P, num_labels=3)

CASES: dict[str, Case] = {
    # ---- causal LMs
    "dbrx_all_experts": _lm("dbrx_all_experts", transformers.DbrxForCausalLM, transformers.DbrxConfig, **_dbrx(8.0)),
    "dbrx_dense_experts": causal_case("dbrx_dense_experts", _patched(_build(
        transformers.DbrxForCausalLM, transformers.DbrxConfig, **_dbrx(8.0)), "DbrxExperts", "forward",
        _dense_dbrx_experts)),
    "dbrx_clip_qkv": causal_case("dbrx_clip_qkv", _patched(_build(
        transformers.DbrxForCausalLM, transformers.DbrxConfig, **_dbrx(0.5)), "DbrxExperts", "forward",
        _dense_dbrx_experts)),
    "gpt_neo_local": _lm(
        "gpt_neo_local", transformers.GPTNeoForCausalLM, transformers.GPTNeoConfig, vocab_size=VOCAB,
        max_position_embeddings=16, hidden_size=16, num_layers=2, attention_types=[[["global", "local"], 1]],
        num_heads=2, intermediate_size=32, window_size=4, resid_dropout=P, embed_dropout=P, attention_dropout=P,
        use_cache=False),
    "openai_gpt": _lm("openai_gpt", transformers.OpenAIGPTLMHeadModel, transformers.OpenAIGPTConfig,
                      vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=P, embd_pdrop=P,
                      attn_pdrop=P),
    "ctrl": _lm("ctrl", transformers.CTRLLMHeadModel, transformers.CTRLConfig, vocab_size=VOCAB, n_positions=16,
                n_embd=16, dff=32, n_layer=1, n_head=2, resid_pdrop=P, embd_pdrop=P, use_cache=False),
    "minimax_lightning": _lm(
        "minimax_lightning", transformers.MiniMaxForCausalLM, transformers.MiniMaxConfig, num_key_value_heads=1,
        head_dim=8, num_local_experts=2, num_experts_per_tok=2, layer_types=["linear_attention", "full_attention"],
        block_size=4, attention_dropout=P, experts_implementation="batched_mm", **TWO),
    "doge": _lm("doge", transformers.DogeForCausalLM, transformers.DogeConfig, num_key_value_heads=1,
                hidden_dropout=P, attention_dropout=P, keep_window_size=4, **SMALL),
    "doge_window_whole": _lm("doge_window_whole", transformers.DogeForCausalLM, transformers.DogeConfig,
                             num_key_value_heads=1, hidden_dropout=P, attention_dropout=P, keep_window_size=8,
                             **SMALL),
    # ---- encoder-decoders
    "mt5": Case("mt5", _build(transformers.MT5ForConditionalGeneration, transformers.MT5Config, vocab_size=VOCAB,
                              d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
                              relative_attention_num_buckets=8, relative_attention_max_distance=16,
                              dropout_rate=P, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                              use_cache=False),
                _t5_data(50), _own_loss, "token_cross_entropy", _loop_tokens),
    "bigbird_pegasus": seq2seq_case("bigbird_pegasus", _build(
        transformers.BigBirdPegasusForConditionalGeneration, transformers.BigBirdPegasusConfig,
        attention_type="original_full", **_S2S), _shift),
    "nllb_moe_all_experts": seq2seq_case("nllb_moe_all_experts", _build(**_NLLB), _shift),
    "nllb_moe_routers_fixed": seq2seq_case("nllb_moe_routers_fixed", _routers_in_model_dtype(_build(**_NLLB)),
                                           _shift),
    # ---- text classifiers
    "mra": classifier_case("mra", _build(transformers.MraForSequenceClassification, transformers.MraConfig,
                                         num_labels=3, **TEXT), _texts(51)),
    "xlm": classifier_case("xlm", _build(
        transformers.XLMForSequenceClassification, transformers.XLMConfig, vocab_size=VOCAB, emb_dim=16, n_layers=1,
        n_heads=2, dropout=P, attention_dropout=P, max_position_embeddings=16, n_langs=1, pad_token_id=0,
        num_labels=3), _texts(52)),
    "xmod_language_adapters": classifier_case("xmod_language_adapters", _build(
        transformers.XmodForSequenceClassification, transformers.XmodConfig, languages=["en_XX", "de_DE"],
        default_language="en_XX", adapter_reduction_factor=2, num_labels=3, pad_token_id=0, **TEXT),
        _texts_in_languages(53)),
    "xmod_where_adapters": classifier_case("xmod_where_adapters", _patched(_build(
        transformers.XmodForSequenceClassification, transformers.XmodConfig, languages=["en_XX", "de_DE"],
        default_language="en_XX", adapter_reduction_factor=2, num_labels=3, pad_token_id=0, **TEXT),
        "XmodOutput", "lang_adapter", _where_adapters),
        _texts_in_languages(53)),
    # ---- vision and video
    "timesformer_divided": classifier_case("timesformer_divided", _build(
        transformers.TimesformerForVideoClassification, transformers.TimesformerConfig, num_frames=2,
        attention_type="divided_space_time", drop_path_rate=0, **VIT), _videos(54)),
    "pvt_spatial_reduction": classifier_case("pvt_spatial_reduction", _build(
        transformers.PvtForImageClassification, transformers.PvtConfig, image_size=16, num_channels=3,
        num_encoder_blocks=2, depths=[1, 1], sequence_reduction_ratios=[2, 1], hidden_sizes=[8, 16],
        patch_sizes=[4, 2], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=P,
        attention_probs_dropout_prob=P, drop_path_rate=0.1, num_labels=3), _images(seed=55)),
    "ijepa_adamw_untuned": classifier_case("ijepa_adamw_untuned", _build(
        transformers.IJepaForImageClassification, transformers.IJepaConfig, **VIT), _images(seed=56), lr=0.3,
        panels=32),
    # ---- audio
    "sew_d": classifier_case("sew_d", _build(
        transformers.SEWDForSequenceClassification, transformers.SEWDConfig, squeeze_factor=2,
        max_position_embeddings=16, position_buckets=8, **AUDIO), _waveforms(57)),
    "unispeech_sat": classifier_case("unispeech_sat", _build(
        transformers.UniSpeechSatForSequenceClassification, transformers.UniSpeechSatConfig, **AUDIO),
        _waveforms(58)),
}

#: Cases left from earlier rounds, with train-mode batch norm (checked against tests/_zoo11_kit.py's
#: ``BufferReplayReference``). Round 10's MobileNetV2 at AdamW 0.02 leaves evaluation-mode logits up to 3.8e16 (a
#: diverging run: the running statistics no longer fit the moved weights of its 17 blocks); at 1e-4 the run converges.
LEFT: dict[str, Case] = {
    "mobilenet_v2_converging": dataclasses.replace(ROUND10["mobilenet_v2"], name="mobilenet_v2_converging", lr=1e-4),
}
