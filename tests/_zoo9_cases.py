"""The architectures of tests/_zoo9_kit.py's round: tiny configs (hidden 16, one or two layers, vocabulary 32,
float64), dropout 0.1 wherever the config has one.

Causal LMs train on the loop's next-token loss over right-padded sequences whose padding is labelled -100
(``ignore_index``; no attention mask is needed: no token attends to a later one); the recorder is given
``causal_lm``. Classifiers and encoder-decoders train on the model's own loss with ``labels`` in the call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import transformers
from _hf_testkit import loop_token_loss
from _zoo9_kit import LENGTH, ROWS, VOCAB, Case, logits_of, next_token, token_ids
from torch import Tensor

P = 0.1  # every dropout probability the configs have

__all__ = ["CAUSAL", "OTHERS", "causal_case", "classifier_case", "seq2seq_case"]


def padded_lm_data(seed: int = 1) -> tuple[dict[str, Tensor], Tensor]:
    """Right-padded ids (pad 0, lengths 4..LENGTH) and labels with -100 at the padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (ROWS, LENGTH), generator=gen)
    lengths = torch.randint(4, LENGTH + 1, (ROWS,), generator=gen)
    pad = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    return {"input_ids": ids.masked_fill(pad, 0)}, ids.masked_fill(pad, -100)


def _loop_next_token(out, y: Tensor) -> Tensor:
    return loop_token_loss(logits_of(out), y, shift=True)


def _step_next_token(model, xb, yb) -> Tensor:
    return next_token(model(**xb), yb)


def causal_case(name: str, build, **kw) -> Case:
    """A causal LM on ``padded_lm_data`` with the loop's next-token loss."""
    return Case(name, build, padded_lm_data, _step_next_token, "causal_lm", _loop_next_token, **kw)


def _lm(model_cls, config_cls, **cfg):
    def build():
        return model_cls(config_cls(**cfg))
    return build


class TanhGelu(torch.nn.Module):
    """Bloom's GELU written with torch operations: the forward of its ``GeLUFunction`` (``bloom_gelu_forward``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


def _torch_gelu(model):
    """``model`` with every Bloom ``gelu_impl`` (an old-style ``torch.autograd.Function``) replaced by
    :class:`TanhGelu`, the fix the refusal names."""
    for block in model.transformer.h:
        block.mlp.gelu_impl = TanhGelu()
    return model


SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             max_position_embeddings=16, use_cache=False)

CAUSAL = {
    "gptj": causal_case("gptj", _lm(transformers.GPTJForCausalLM, transformers.GPTJConfig, vocab_size=VOCAB,
                                    n_positions=16, n_embd=16, n_layer=1, n_head=2, rotary_dim=4, resid_pdrop=P,
                                    embd_pdrop=P, attn_pdrop=P, use_cache=False)),
    "gpt_bigcode_mqa": causal_case("gpt_bigcode_mqa", _lm(
        transformers.GPTBigCodeForCausalLM, transformers.GPTBigCodeConfig, vocab_size=VOCAB, n_positions=16,
        n_embd=16, n_layer=1, n_head=2, multi_query=True, resid_pdrop=P, embd_pdrop=P, attn_pdrop=P,
        use_cache=False)),
    "codegen": causal_case("codegen", _lm(transformers.CodeGenForCausalLM, transformers.CodeGenConfig,
                                          vocab_size=VOCAB, n_positions=16, n_ctx=16, n_embd=16, n_layer=1,
                                          n_head=2, rotary_dim=4, resid_pdrop=P, embd_pdrop=P, attn_pdrop=P,
                                          use_cache=False)),
    "bloom_alibi": causal_case("bloom_alibi", _lm(transformers.BloomForCausalLM, transformers.BloomConfig,
                                                  vocab_size=VOCAB, hidden_size=16, n_layer=1, n_head=2,
                                                  hidden_dropout=P, attention_dropout=P, use_cache=False)),
    "bloom_torch_gelu": causal_case("bloom_torch_gelu", lambda: _torch_gelu(_lm(
        transformers.BloomForCausalLM, transformers.BloomConfig, vocab_size=VOCAB, hidden_size=16, n_layer=1,
        n_head=2, hidden_dropout=P, attention_dropout=P, use_cache=False)())),
    "gptj_sgd_untuned": causal_case("gptj_sgd_untuned", _lm(
        transformers.GPTJForCausalLM, transformers.GPTJConfig, vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1,
        n_head=2, rotary_dim=4, resid_pdrop=P, embd_pdrop=P, attn_pdrop=P, use_cache=False), optimizer="sgd", lr=1.0,
        panels=32),
    "mpt": causal_case("mpt", _lm(transformers.MptForCausalLM, transformers.MptConfig, vocab_size=VOCAB,
                                  d_model=16, n_heads=2, n_layers=1, max_seq_len=16, resid_pdrop=P, emb_pdrop=P,
                                  use_cache=False)),
    "stablelm": causal_case("stablelm", _lm(transformers.StableLmForCausalLM, transformers.StableLmConfig,
                                            num_key_value_heads=1, partial_rotary_factor=0.5, hidden_dropout=P,
                                            attention_dropout=P, **SMALL)),
    "phi3": causal_case("phi3", _lm(transformers.Phi3ForCausalLM, transformers.Phi3Config, resid_pdrop=P,
                                    embd_pdrop=P, attention_dropout=P, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2, **SMALL)),
    "cohere": causal_case("cohere", _lm(transformers.CohereForCausalLM, transformers.CohereConfig,
                                        attention_dropout=P, logit_scale=0.5, pad_token_id=0, bos_token_id=1,
                                        eos_token_id=2, **SMALL)),
    "olmo": causal_case("olmo", _lm(transformers.OlmoForCausalLM, transformers.OlmoConfig, attention_dropout=P,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL)),
    "starcoder2": causal_case("starcoder2", _lm(transformers.Starcoder2ForCausalLM, transformers.Starcoder2Config,
                                                num_key_value_heads=1, residual_dropout=P, embedding_dropout=P,
                                                attention_dropout=P, sliding_window=4, **SMALL)),
    "persimmon": causal_case("persimmon", _lm(transformers.PersimmonForCausalLM, transformers.PersimmonConfig,
                                              qk_layernorm=True, partial_rotary_factor=0.5, hidden_act="gelu",
                                              hidden_dropout=P, attention_dropout=P, **SMALL), tol=1e-11),
    "gemma2_softcap": causal_case("gemma2_softcap", _lm(
        transformers.Gemma2ForCausalLM, transformers.Gemma2Config, num_key_value_heads=1, head_dim=8,
        sliding_window=4, final_logit_softcapping=5.0, attn_logit_softcapping=3.0, query_pre_attn_scalar=8,
        attention_dropout=P, pad_token_id=0, bos_token_id=1, eos_token_id=2, **SMALL), panels=32),
    "mamba": causal_case("mamba", _lm(transformers.MambaForCausalLM, transformers.MambaConfig, vocab_size=VOCAB,
                                      hidden_size=16, state_size=4, num_hidden_layers=1, expand=2, conv_kernel=3,
                                      time_step_rank=4, use_cache=False)),
    "mamba2": causal_case("mamba2", _lm(transformers.Mamba2ForCausalLM, transformers.Mamba2Config,
                                        vocab_size=VOCAB, hidden_size=16, state_size=4, num_hidden_layers=1,
                                        expand=2, conv_kernel=3, num_heads=4, head_dim=8, n_groups=1,
                                        chunk_size=4, use_cache=False)),
    "rwkv": causal_case("rwkv", _lm(transformers.RwkvForCausalLM, transformers.RwkvConfig, vocab_size=VOCAB,
                                    context_length=16, hidden_size=16, num_hidden_layers=2,
                                    attention_hidden_size=16, intermediate_size=32, rescale_every=0,
                                    use_cache=False)),
    "mixtral_top2": causal_case("mixtral_top2", _lm(transformers.MixtralForCausalLM, transformers.MixtralConfig,
                                                    num_key_value_heads=1, num_local_experts=4,
                                                    num_experts_per_tok=2, attention_dropout=P,
                                                    experts_implementation="eager", **SMALL)),
    "qwen2_moe_top2": causal_case("qwen2_moe_top2", _lm(
        transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig, num_key_value_heads=1, num_experts=4,
        num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        attention_dropout=P, experts_implementation="eager", **SMALL)),
    "reformer_lsh": causal_case("reformer_lsh", _lm(
        transformers.ReformerModelWithLMHead, transformers.ReformerConfig, vocab_size=VOCAB, hidden_size=16,
        num_attention_heads=2, attention_head_size=8, attn_layers=["lsh", "local"], axial_pos_embds=False,
        max_position_embeddings=16, feed_forward_size=32, lsh_attn_chunk_length=4, local_attn_chunk_length=4,
        num_buckets=2, num_hashes=1, is_decoder=True, hidden_dropout_prob=P, lsh_attention_probs_dropout_prob=P,
        local_attention_probs_dropout_prob=P, use_cache=False)),
    "mixtral_batched_top2": causal_case("mixtral_batched_top2", _lm(
        transformers.MixtralForCausalLM, transformers.MixtralConfig, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=2, attention_dropout=P, experts_implementation="batched_mm", **SMALL)),
    "mixtral_batched_dense": causal_case("mixtral_batched_dense", _lm(
        transformers.MixtralForCausalLM, transformers.MixtralConfig, num_key_value_heads=1, num_local_experts=4,
        num_experts_per_tok=4, attention_dropout=P, experts_implementation="batched_mm", **SMALL)),
}


# ---------------------------------------------------------------- encoder-decoders, on the model's own loss
def _seq2seq_data(shift):
    def data():
        src, labels = token_ids(4), token_ids(5, length=6)
        labels[::3, -2:] = -100  # padded targets
        return {"input_ids": src, "decoder_input_ids": shift(labels)}, labels
    return data


def _own_loss(model, xb, yb) -> Tensor:
    return model(**xb, labels=yb).loss


def _loop_tokens(out, y: Tensor) -> Tensor:
    return loop_token_loss(logits_of(out), y, shift=False)


def _shift(labels: Tensor) -> Tensor:
    return transformers.models.bart.modeling_bart.shift_tokens_right(labels, 0, 2)


def _mbart_shift(labels: Tensor) -> Tensor:
    return transformers.models.mbart.modeling_mbart.shift_tokens_right(labels, 0)


S2S = dict(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
           decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=16,
           dropout=P, attention_dropout=P, activation_dropout=P, pad_token_id=0, bos_token_id=1, eos_token_id=2,
           decoder_start_token_id=2, forced_eos_token_id=None, use_cache=False)


def seq2seq_case(name: str, build, shift) -> Case:
    """An encoder-decoder on the model's own token loss (``labels`` in the call, -100 ignored)."""
    return Case(name, build, _seq2seq_data(shift), _own_loss, "token_cross_entropy", _loop_tokens)


# ---------------------------------------------------------------- classifiers, on the model's own loss
def _images(seed: int = 3, labels: int = 3):
    def data():
        gen = torch.Generator().manual_seed(seed)
        return ({"pixel_values": torch.randn(ROWS, 3, 16, 16, generator=gen, dtype=torch.float64)},
                torch.randint(0, labels, (ROWS,), generator=gen))
    return data


def _texts(seed: int = 6, kind: str = "single"):
    def data():
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(1, VOCAB, (ROWS, LENGTH), generator=gen)
        if kind == "regression":
            y = torch.randn(ROWS, generator=gen, dtype=torch.float64)
        elif kind == "multi_label":
            y = (torch.rand(ROWS, 3, generator=gen) < 0.5).double()
        elif kind == "tokens":
            y = torch.randint(0, 3, (ROWS, LENGTH), generator=gen)
            y[::4, -3:] = -100
        else:
            y = torch.randint(0, 3, (ROWS,), generator=gen)
        return {"input_ids": ids}, y
    return data


def _choices() -> tuple[dict[str, Tensor], Tensor]:
    """Three choices of ``LENGTH`` tokens per row, ``(ROWS, 3, LENGTH)``, and the right choice."""
    gen = torch.Generator().manual_seed(8)
    return ({"input_ids": torch.randint(1, VOCAB, (ROWS, 3, LENGTH), generator=gen)},
            torch.randint(0, 3, (ROWS,), generator=gen))


def _audio() -> tuple[dict[str, Tensor], Tensor]:
    """Raw waveforms of 64 samples and class labels."""
    gen = torch.Generator().manual_seed(9)
    return ({"input_values": torch.randn(ROWS, 64, generator=gen, dtype=torch.float64)},
            torch.randint(0, 3, (ROWS,), generator=gen))


def _loop_ce(out, y: Tensor) -> Tensor:
    logits = logits_of(out)
    return torch.stack([-torch.log_softmax(logits[k], -1)[int(y[k])] for k in range(len(y))])


def _loop_squared(out, y: Tensor) -> Tensor:
    logits = logits_of(out)
    return torch.stack([(logits[k, 0] - y[k]) ** 2 for k in range(len(y))])


def _loop_bce(out, y: Tensor) -> Tensor:
    logits = logits_of(out)
    return torch.stack([sum(-(y[k, j] * F.logsigmoid(logits[k, j]) + (1 - y[k, j]) * F.logsigmoid(-logits[k, j]))
                            for j in range(y.shape[1])) / y.shape[1] for k in range(len(y))])


def _squared(out, y: Tensor) -> Tensor:
    return F.mse_loss(logits_of(out)[:, 0], y)


def _bce(out, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(logits_of(out), y)


def classifier_case(name: str, build, data, kind: str = "single", **kw) -> Case:
    """A classifier on its own loss: cross entropy, or squared error (``problem_type="regression"``), or binary
    cross entropy (``"multi_label_classification"``), or token cross entropy (``kind="tokens"``)."""
    loss, ref = {"single": ("cross_entropy", _loop_ce), "regression": (_squared, _loop_squared),
                 "multi_label": (_bce, _loop_bce), "tokens": ("token_cross_entropy", _loop_tokens)}[kind]
    return Case(name, build, data, _own_loss, loss, ref, target=None if kind != "tokens" else "loss", **kw)


def _build(model_cls, config_cls, **cfg):
    def build():
        return model_cls(config_cls(**cfg))
    return build


def _drawn_tokens(build):
    """``build`` with every all-zero parameter (the class and distillation tokens and position embeddings that
    vision transformers initialise to 0) drawn from N(0, 0.02^2), as in a trained model.

    From zeros, the first step moves such a token along ``t * delta``, and the LayerNorm it enters (eps 1e-12)
    maps it to ``t delta / sqrt(t^2 var + 1e-12)``: a step of width ~1e-6 in ``t``, smooth but steep. The adaptive
    rule integrates it; the reference's fixed Gauss-Legendre panels cannot (its own quadrature error does not
    vanish).
    """
    def drawn():
        model = build()
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
        return model
    return drawn


IMAGE = dict(image_size=16, patch_size=8, num_channels=3, hidden_size=16, num_hidden_layers=1,
             num_attention_heads=2, intermediate_size=32, hidden_dropout_prob=P, attention_probs_dropout_prob=P,
             num_labels=3)
TEXT = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=16, hidden_dropout_prob=P, attention_probs_dropout_prob=P)

class DistributionParams(torch.nn.Module):
    """A module holding ``model`` whose forward returns its distribution head's parameters stacked on a new last
    axis (``torch.stack(model(**x).prediction_outputs, -1)``), the fix explaind's refusal names."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, **inputs: Tensor) -> Tensor:
        return torch.stack(self.model(**inputs).prediction_outputs, dim=-1)


def _series() -> tuple[dict[str, Tensor], Tensor]:
    """Two-channel series: 16 past values, 4 future values to forecast."""
    gen = torch.Generator().manual_seed(10)
    t = torch.arange(20, dtype=torch.float64)
    waves = torch.sin(t[None, :, None] * torch.rand(ROWS, 1, 2, generator=gen, dtype=torch.float64))
    series = waves + 0.1 * torch.randn(ROWS, 20, 2, generator=gen, dtype=torch.float64)
    return {"past_values": series[:, :16]}, series[:, 16:]


def _patchtst():
    return transformers.PatchTSTForPrediction(transformers.PatchTSTConfig(
        num_input_channels=2, context_length=16, patch_length=4, patch_stride=4, prediction_length=4, d_model=16,
        num_attention_heads=2, num_hidden_layers=1, ffn_dim=32, dropout=P, attention_dropout=P, ff_dropout=P,
        head_dropout=P, norm_type="layernorm", distribution_output="normal", loss="nll", scaling=None))


def _normal_nll(out: Tensor, y: Tensor) -> Tensor:
    """The mean negative log-likelihood of ``y`` under Normal(out[..., 0], out[..., 1]) (torch.distributions)."""
    return -torch.distributions.Normal(out[..., 0], out[..., 1]).log_prob(y).mean()


def _loop_normal_nll(out: Tensor, y: Tensor) -> Tensor:
    """Per sample, the mean of 0.5 log(2 pi s^2) + (y - m)^2 / (2 s^2), written out."""
    return torch.stack([(0.5 * torch.log(2 * math.pi * out[k, ..., 1] ** 2)
                         + (y[k] - out[k, ..., 0]) ** 2 / (2 * out[k, ..., 1] ** 2)).mean() for k in range(len(y))])


def _step_nll(model, xb, yb) -> Tensor:
    return _normal_nll(model(**xb), yb)


OTHERS = {
    "patchtst_normal_head": Case("patchtst_normal_head", _patchtst, _series,
                                 lambda model, xb, yb: model(**xb, future_values=yb).loss, _normal_nll,
                                 _loop_normal_nll, target=None),
    "patchtst_normal_params": Case("patchtst_normal_params", lambda: DistributionParams(_patchtst()), _series,
                                   _step_nll, _normal_nll, _loop_normal_nll, target=None),
    "pegasus": seq2seq_case("pegasus", _build(transformers.PegasusForConditionalGeneration,
                                              transformers.PegasusConfig, **S2S), _shift),
    "mbart": seq2seq_case("mbart", _build(transformers.MBartForConditionalGeneration, transformers.MBartConfig,
                                          **S2S), _mbart_shift),
    "led": seq2seq_case("led", _build(transformers.LEDForConditionalGeneration, transformers.LEDConfig,
                                      attention_window=4, max_encoder_position_embeddings=16,
                                      max_decoder_position_embeddings=16,
                                      **{k: v for k, v in S2S.items() if k != "max_position_embeddings"}), _shift),
    "deit": classifier_case("deit", _drawn_tokens(_build(transformers.DeiTForImageClassification,
                                                         transformers.DeiTConfig, **IMAGE)), _images()),
    "beit_drop_path": classifier_case("beit_drop_path", _drawn_tokens(_build(
        transformers.BeitForImageClassification, transformers.BeitConfig, use_relative_position_bias=True,
        layer_scale_init_value=0.1, drop_path_rate=0.2, **IMAGE)), _images()),
    "dinov2": classifier_case("dinov2", _build(transformers.Dinov2ForImageClassification, transformers.Dinov2Config,
                                               drop_path_rate=0.2, **{**IMAGE, "intermediate_size": None}
                                               if False else dict(IMAGE, mlp_ratio=2)), _images()),
    "segformer": classifier_case("segformer", _build(
        transformers.SegformerForImageClassification, transformers.SegformerConfig, num_channels=3,
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], patch_sizes=[3, 3],
        strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2], hidden_dropout_prob=P,
        attention_probs_dropout_prob=P, classifier_dropout_prob=P, drop_path_rate=0.0, num_labels=3), _images()),
    "data2vec_regression": classifier_case("data2vec_regression", _build(
        transformers.Data2VecTextForSequenceClassification, transformers.Data2VecTextConfig,
        problem_type="regression", num_labels=1, pad_token_id=0, **TEXT), _texts(kind="regression"),
        kind="regression"),
    "ernie_multi_label": classifier_case("ernie_multi_label", _build(
        transformers.ErnieForSequenceClassification, transformers.ErnieConfig,
        problem_type="multi_label_classification", num_labels=3, **TEXT), _texts(kind="multi_label"),
        kind="multi_label"),
    "ernie_multiple_choice": Case("ernie_multiple_choice", _build(
        transformers.ErnieForMultipleChoice, transformers.ErnieConfig, **TEXT), _choices, _own_loss, "cross_entropy",
        _loop_ce, target=None),
    "hubert_audio": classifier_case("hubert_audio", _build(
        transformers.HubertForSequenceClassification, transformers.HubertConfig, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8), conv_stride=(4, 2), conv_kernel=(8, 4),
        num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2, hidden_dropout=P, attention_dropout=P,
        activation_dropout=P, feat_proj_dropout=P, mask_time_prob=0.0, classifier_proj_size=8, num_labels=3),
        _audio),
    "mpnet_tokens": classifier_case("mpnet_tokens", _build(
        transformers.MPNetForTokenClassification, transformers.MPNetConfig, num_labels=3, **TEXT),
        _texts(kind="tokens"), kind="tokens"),
}


def regnet_batch_norm() -> dict[str, float]:
    """RegNet (two stages, GELU, train-mode batch norm: running statistics move every step) trained by
    tests/_hf_stranger_kit.py's loop on 16x16 images (AdamW 0.01, ``capture_random=True``), checked by its
    ``assert_exact`` against tests/test_stranger_hf_audio_vision.py's buffer-replaying reference (step ``s``'s path
    at the recorded statistics ``beta_s``, plus the exact buffers term); returns the figures it measured.

    The running statistics are first set from the training images (a cumulative average over one forward), as a
    trained model's are.
    """
    from _hf_stranger_kit import MEASURED, assert_exact, train
    from reference import Reference
    from test_stranger_hf_audio_vision import _images, _logits_ce, _LogitsBufferReference

    class SmoothBufferReference(_LogitsBufferReference):
        kinks = Reference.kinks  # no ReLU, no max pooling: the base class's watch (it finds nothing)

    torch.manual_seed(0)
    model = transformers.RegNetForImageClassification(transformers.RegNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=4, hidden_act="gelu",
        num_labels=3)).double()
    X, y = _images(16)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None
    with torch.no_grad():
        model.train()(X[:12])
    for norm in norms:
        norm.momentum = 0.1
    model, traj = train(model, X[:12], y, "cross_entropy", _logits_ce, lr=0.01, capture_random=True)
    assert traj.buffer_names and traj.manifest.coupled
    with torch.no_grad():
        truth = model(X[12:]).logits
    ref = SmoothBufferReference(traj, X[12:], target=[1, 2], panels=8)
    assert_exact(traj, X[12:], truth, ref, [1, 2], ref_error=ref.quad_error - ref.buffer_terms())
    return MEASURED[-1]
