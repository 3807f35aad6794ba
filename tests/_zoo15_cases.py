"""Round 15's architectures for tests/_zoo9_kit.py's loop (the set-up of round 14's tests/_zoo14_cases.py: tiny float64
configs, dropout 0.1 where a config has it, the model passed directly; causal LMs on the loop's next-token loss,
the others on their own loss), the cases left from earlier rounds with their references (:data:`LEFT`), and two
measurements of LeViT's paths: the kinks per Hardswish module and the scales of their inputs."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers
from _zoo9_cases import (
    TEXT,
    P,
    _build,
    _drawn_tokens,
    _images,
    _loop_ce,
    _texts,
    classifier_case,
    seq2seq_case,
)
from _zoo9_kit import VOCAB, Case, logits_of, record
from _zoo10_cases import BATCH_NORM
from _zoo11_cases import ROUTES
from _zoo11_kit import BufferReplayReference
from _zoo12_cases import SMALL, TWO
from _zoo14_cases import _S2S, _lm, _shift
from torch import Tensor
from torch.func import functional_call

__all__ = ["CASES", "LEFT", "evaluation_scales", "kinks_per_module"]


def _logits_loss(model: torch.nn.Module, xb: dict[str, Tensor], yb: Tensor) -> Tensor:
    """The loop's mean cross entropy on the logits, in the model's dtype (DeBERTa's own loss converts its logits to
    float32 first)."""
    return torch.nn.functional.cross_entropy(logits_of(model(**xb)), yb)


#: Multi-head latent attention (DeepSeek-V2, MiniCPM3): low-rank queries and keys-values, a rotary part of 4.
_MLA = dict(q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)

CASES: dict[str, Case] = {
    # ---- causal LMs
    "helium": _lm("helium", transformers.HeliumForCausalLM, transformers.HeliumConfig, num_key_value_heads=1,
                  head_dim=8, attention_dropout=P, **SMALL),
    "helium_adamw_untuned": _lm("helium_adamw_untuned", transformers.HeliumForCausalLM, transformers.HeliumConfig,
                                num_key_value_heads=1, head_dim=8, attention_dropout=P, case_lr=0.3,
                                case_panels=32, **SMALL),
    "glm_partial_rotary": _lm("glm_partial_rotary", transformers.GlmForCausalLM, transformers.GlmConfig,
                              num_key_value_heads=1, head_dim=8, partial_rotary_factor=0.5, attention_dropout=P,
                              **SMALL),
    "olmo3_sliding": _lm("olmo3_sliding", transformers.Olmo3ForCausalLM, transformers.Olmo3Config,
                         num_key_value_heads=1, sliding_window=4, layer_types=["sliding_attention",
                                                                               "full_attention"],
                         attention_dropout=P, case_panels=32, **TWO),
    "vaultgemma": _lm("vaultgemma", transformers.VaultGemmaForCausalLM, transformers.VaultGemmaConfig,
                      num_key_value_heads=1, head_dim=8, attention_dropout=P, query_pre_attn_scalar=8, **SMALL),
    "seed_oss": _lm("seed_oss", transformers.SeedOssForCausalLM, transformers.SeedOssConfig, num_key_value_heads=1,
                    head_dim=8, attention_dropout=P, residual_dropout=P, **SMALL),
    "ernie4_5": _lm("ernie4_5", transformers.Ernie4_5ForCausalLM, transformers.Ernie4_5Config,
                    num_key_value_heads=1, head_dim=8, **SMALL),
    "arcee_relu2": _lm("arcee_relu2", transformers.ArceeForCausalLM, transformers.ArceeConfig,
                       num_key_value_heads=1, head_dim=8, attention_dropout=P, case_panels=64, **SMALL),
    "deepseek_v2_mla": _lm("deepseek_v2_mla", transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config,
                           num_key_value_heads=2, n_routed_experts=2, num_experts_per_tok=2, n_shared_experts=1,
                           moe_intermediate_size=16, first_k_dense_replace=0, attention_dropout=P,
                           experts_implementation="batched_mm", **_MLA, **SMALL),
    "minicpm3_mla": _lm("minicpm3_mla", transformers.MiniCPM3ForCausalLM, transformers.MiniCPM3Config,
                        num_key_value_heads=2, attention_dropout=P, **_MLA, **SMALL),
    "jetmoe": _lm("jetmoe", transformers.JetMoeForCausalLM, transformers.JetMoeConfig, vocab_size=VOCAB,
                  hidden_size=16, num_hidden_layers=1, num_key_value_heads=2, kv_channels=8, intermediate_size=16,
                  max_position_embeddings=16, num_local_experts=2, num_experts_per_tok=2, attention_dropout=P,
                  use_cache=False),
    "zamba": _lm("zamba", transformers.ZambaForCausalLM, transformers.ZambaConfig, vocab_size=VOCAB,
                 hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                 attention_head_dim=16, num_key_value_heads=2, n_mamba_heads=1, mamba_d_state=4, mamba_d_conv=3,
                 mamba_expand=2, mamba_dt_rank=4, layer_types=["mamba", "hybrid", "hybrid"],
                 attention_dropout=P, max_position_embeddings=16, use_cache=False),
    "xlstm": _lm("xlstm", transformers.xLSTMForCausalLM, transformers.xLSTMConfig, vocab_size=VOCAB,
                 hidden_size=16, embedding_dim=16, num_hidden_layers=1, num_blocks=1, num_heads=2, qk_dim_factor=0.5,
                 v_dim_factor=1.0, chunk_size=4, mode="inference", use_cache=False),
    "xlstm_recurrent": _lm("xlstm_recurrent", transformers.xLSTMForCausalLM, transformers.xLSTMConfig,
                           vocab_size=VOCAB, hidden_size=16, embedding_dim=16, num_hidden_layers=1, num_blocks=1,
                           num_heads=2, qk_dim_factor=0.5, v_dim_factor=1.0, chunk_size=16, mode="inference",
                           use_cache=False),
    # ---- encoder-decoders
    "pegasus_x": seq2seq_case("pegasus_x", _build(
        transformers.PegasusXForConditionalGeneration, transformers.PegasusXConfig, num_global_tokens=2,
        block_size=4, stagger_local_blocks=True, **_S2S), _shift),
    "pegasus_x_adamw_untuned": dataclasses.replace(seq2seq_case("pegasus_x_adamw_untuned", _build(
        transformers.PegasusXForConditionalGeneration, transformers.PegasusXConfig, num_global_tokens=2,
        block_size=4, stagger_local_blocks=True, **_S2S), _shift), lr=0.3, panels=32),
    # ---- text classifiers
    "mobilebert": classifier_case("mobilebert", _build(
        transformers.MobileBertForSequenceClassification, transformers.MobileBertConfig, embedding_size=8,
        intra_bottleneck_size=8, num_feedforward_networks=2, num_labels=3, **TEXT), _texts(60)),
    "roberta_prelayernorm": classifier_case("roberta_prelayernorm", _build(
        transformers.RobertaPreLayerNormForSequenceClassification, transformers.RobertaPreLayerNormConfig,
        pad_token_id=0, num_labels=3, **{**TEXT, "max_position_embeddings": 16}), _texts(61)),
    "deberta": classifier_case("deberta", _build(
        transformers.DebertaForSequenceClassification, transformers.DebertaConfig, relative_attention=True,
        max_relative_positions=8, pos_att_type=["c2p", "p2c"], num_labels=3, **TEXT), _texts(62)),
    "deberta_no_pad_check": classifier_case("deberta_no_pad_check", _build(
        transformers.DebertaForSequenceClassification, transformers.DebertaConfig, relative_attention=True,
        max_relative_positions=8, pos_att_type=["c2p", "p2c"], pad_token_id=None, num_labels=3, **TEXT),
        _texts(62)),
    "deberta_float64_loss": Case("deberta_float64_loss", _build(
        transformers.DebertaForSequenceClassification, transformers.DebertaConfig, relative_attention=True,
        max_relative_positions=8, pos_att_type=["c2p", "p2c"], pad_token_id=None, num_labels=3, **TEXT),
        _texts(62), _logits_loss, "cross_entropy", _loop_ce, target=None),
    "eurobert": classifier_case("eurobert", _build(
        transformers.EuroBertForSequenceClassification, transformers.EuroBertConfig, num_key_value_heads=1,
        attention_dropout=P, mask_token_id=3, num_labels=3, **{k: v for k, v in SMALL.items() if k != "use_cache"}),
        _texts(63)),
    # ---- vision
    "vit_msn": classifier_case("vit_msn", _build(
        transformers.ViTMSNForImageClassification, transformers.ViTMSNConfig, image_size=16, patch_size=8,
        num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=P, attention_probs_dropout_prob=P, num_labels=3), _images(seed=64)),
    "vit_msn_drawn_tokens": classifier_case("vit_msn_drawn_tokens", _drawn_tokens(_build(
        transformers.ViTMSNForImageClassification, transformers.ViTMSNConfig, image_size=16, patch_size=8,
        num_channels=3, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=P, attention_probs_dropout_prob=P, num_labels=3)), _images(seed=64)),
}


def _silu_for_hardswish(build):
    """``build`` with every ``nn.Hardswish`` replaced by ``nn.SiLU`` (the smooth function Hardswish approximates),
    everything else as built: LeViT without its kinks."""
    def built() -> torch.nn.Module:
        model = build()
        for module in list(model.modules()):
            for child_name, child in module.named_children():
                if isinstance(child, torch.nn.Hardswish):
                    setattr(module, child_name, torch.nn.SiLU())
        return model
    return built


def kinks_per_module(model: torch.nn.Module, traj, X: dict[str, Tensor], grid: int = 256) -> dict[str, int]:
    """Per Hardswish module of ``model`` (by path), the sign changes of its input minus -3 and minus 3 between the
    ``grid + 1`` points of each step's segment ``theta_s + t delta_s`` (evaluation mode at the step's recorded
    buffers), summed over the steps and the rows of ``X`` (tests/_zoo13_kinks.py's count, split by module)."""
    seen: dict[str, list[Tensor]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inp, path=path: seen.setdefault(path, []).append(
        torch.cat([inp[0].detach().reshape(-1) + 3.0, inp[0].detach().reshape(-1) - 3.0])))
        for path, m in model.named_modules() if isinstance(m, torch.nn.Hardswish)]
    model.eval()
    counts: dict[str, int] = {}
    try:
        for s in range(traj.n_steps):
            start, stop, fixed = traj.params(s), traj.params(s + 1), {**traj.constants(), **traj.buffers(s)}
            for i in range(next(iter(X.values())).shape[0]):
                seen.clear()
                for t in torch.linspace(0.0, 1.0, grid + 1, dtype=torch.float64).tolist():
                    params = {n: start[n] + t * (stop[n] - start[n]) for n in start}
                    with torch.no_grad():
                        functional_call(model, {**fixed, **params}, (), {k: v[i:i + 1] for k, v in X.items()})
                for path, values in seen.items():
                    signs = torch.stack(values) > 0
                    counts[path] = counts.get(path, 0) + int((signs[1:] != signs[:-1]).sum())
    finally:
        for hook in hooks:
            hook.remove()
    return counts


#: Cases left from earlier rounds, each with its reference (``False``: explaind's figures only): round 11's LeViT
#: with its attention-bias cache emptied, the same with SiLU for Hardswish, round 10's SwiftFormer.
LEFT: dict[str, tuple[Case, Any]] = {
    "levit_cache_emptied": (ROUTES["levit_cache_emptied"], False),
    "levit_silu": (dataclasses.replace(ROUTES["levit_cache_emptied"], name="levit_silu",
                                       build=_silu_for_hardswish(ROUTES["levit_cache_emptied"].build)),
                   BufferReplayReference),
    "levit_converging": (dataclasses.replace(ROUTES["levit_cache_emptied"], name="levit_converging", lr=1e-4),
                         BufferReplayReference),
    "levit_silu_converging": (dataclasses.replace(ROUTES["levit_cache_emptied"], name="levit_silu_converging",
                                                  build=_silu_for_hardswish(ROUTES["levit_cache_emptied"].build),
                                                  lr=1e-4), BufferReplayReference),
    "swiftformer": (BATCH_NORM["swiftformer"], False),
}


def evaluation_scales(case: Case, lr: float) -> tuple[float, float, float]:
    """``case`` (LeViT) trained at AdamW ``lr``: the largest input of its Hardswish modules over the held-out inputs
    in evaluation mode before training, the same after training (``theta_N`` at the recorded ``beta_N``), and the
    largest logit after training."""
    model, traj, X, _ = record(dataclasses.replace(case, lr=lr))
    found = []
    for s in (0, traj.n_steps):
        seen: list[float] = []
        hooks = [m.register_forward_pre_hook(lambda m, inp, seen=seen: seen.append(float(inp[0].abs().max())))
                 for m in model.modules() if isinstance(m, torch.nn.Hardswish)]
        try:
            with torch.no_grad():
                out = functional_call(model.eval(), {**traj.constants(), **traj.buffers(s), **traj.params(s)}, (), X)
        finally:
            for hook in hooks:
                hook.remove()
        found.append(max(seen))
    return found[0], found[1], float(logits_of(out).abs().max())
