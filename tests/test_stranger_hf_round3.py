"""Hugging Face models no other test contains (third round), tiny configs, float64, plain loop and one Trainer run.

* Gemma: GeGLU MLP (``gelu_pytorch_tanh``), embeddings scaled by ``sqrt(hidden_size)``, RMS norms with ``1 + w``
  computed in float32 (``x.float()``, ``w.float()``) whatever the model's dtype, grouped-query attention. The replay
  evaluates those norms in float64 (``casts="auto"``); the loop's training gradients keep float32 rounding (the
  whole hidden state passes through float32 in every norm, forward and backward), so the per-sample split differs
  from the step's gradient at that rounding: residual share <= 1e-8 (measured 3.4e-9), the slow reference's own
  residual the same. The reference explains a float64 twin of the norms (the same function).
* Falcon with ALiBi and with rotary positions, multi-query attention, parallel attention and MLP: exact.
* UMT5 (T5 with its own relative attention bias in every layer; RMS norms whose variance is computed in float32):
  exact, against the reference of a float64 twin of the norms.
* Funnel transformer (a pooled middle block, an upsampling decoder): replica and residual share exact; its attention
  scores are cast to float32, which the replay evaluates in float64 and the slow reference as written, so the train
  scores agree with the reference to its float32 rounding (bound 1e-8).
* ConvNeXt-V2 image classifier (global response normalisation, LayerNorm, GELU): exact.
* Longformer (sliding-window local attention plus global attention): refused when explaining, naming Longformer:
  its attention reads the global-attention indices as values (``nonzero``, ``.item()``) in every forward, which
  ``torch.func.vmap`` cannot trace.
* Falcon with ALiBi trained by the ``Trainer`` (accumulation 2, clipping, warm-up) on the next-token loss: exact.

"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9,
``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference (tests/_hf_stranger_kit.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import DT, VOCAB, N, TwinReference, assert_exact, ids, note, per_sample_ce, train
from _hf_testkit import MappingReference, lm_data, lm_figures, loop_token_loss, trainer_args
from reference import rel_err

import explaind
from explaind.exceptions import UnsupportedModelError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

TARGET = [5 * VOCAB + 3, 6 * VOCAB + 7]  # one (position, token) logit per test sequence


def _next_token(out, t):
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))


def _causal_lm(model, *, reference=MappingReference, panels: int = 8, **ref_kw):
    """Train on ``N`` random sequences with the next-token loss; the trained model's truth on 2 more."""
    torch.manual_seed(0)
    tokens = ids(N + 2, 1)
    model, traj = train(model, {"input_ids": tokens[:N]}, tokens[:N], "causal_lm", _next_token)
    X_test = {"input_ids": tokens[N:]}
    with torch.no_grad():
        truth = model(**X_test).logits
    ref = reference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=True), target=TARGET,
                    panels=panels, **ref_kw)
    return traj, X_test, truth, ref


class _Float64RMSNorm(torch.nn.Module):
    """``x / sqrt(mean(x^2) + eps) * (offset + weight)`` in the input's dtype (float64 here)."""

    def __init__(self, weight: torch.Tensor, eps: float, offset: float):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (self.offset + self.weight)


def _float64_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Every Gemma RMS norm (``1 + w``, ``eps``) and UMT5 norm (``w``, ``variance_epsilon``) as a float64 twin."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            kind = type(child).__name__
            if kind == "GemmaRMSNorm":
                setattr(module, name, _Float64RMSNorm(child.weight, child.eps, 1.0))
            elif kind == "UMT5LayerNorm":
                setattr(module, name, _Float64RMSNorm(child.weight, child.variance_epsilon, 0.0))
    return model


def test_gemma_geglu_scaled_embeddings_and_one_plus_w_norms_are_exact_up_to_their_float32_rounding():
    torch.manual_seed(0)
    cfg = transformers.GemmaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                   max_position_embeddings=16, hidden_activation="gelu_pytorch_tanh")
    traj, X_test, truth, ref = _causal_lm(transformers.GemmaForCausalLM(cfg), reference=TwinReference,
                                          twin=_float64_norms)
    twin = _float64_norms(transformers.GemmaForCausalLM(cfg).to(DT))
    twin.load_state_dict(traj.model.state_dict())
    with torch.no_grad():
        assert rel_err(twin.eval()(**X_test).logits, truth) <= 1e-6  # the twin is the model, float32 aside
    att = assert_exact(traj, X_test, truth, ref, TARGET, max_share=1e-8)
    # float32 rounding of the loop's gradients, not the engine's: the independent reference has the same residual
    assert rel_err(att.residual, ref.residual(("train",))) <= 1e-3


@pytest.mark.parametrize("alibi", [True, False], ids=["alibi", "rotary"])
def test_falcon_multi_query_with_alibi_or_rotary_is_exact(alibi):
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                    multi_query=True, alibi=alibi, new_decoder_architecture=False, parallel_attn=True,
                                    hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=16)
    assert_exact(*_causal_lm(transformers.FalconForCausalLM(cfg)), TARGET)


def test_umt5_with_a_relative_attention_bias_in_every_layer_is_exact():
    torch.manual_seed(0)
    cfg = transformers.UMT5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_decoder_layers=1,
                                  num_heads=2, relative_attention_num_buckets=4, decoder_start_token_id=0,
                                  pad_token_id=0, dropout_rate=0.0)
    model = transformers.UMT5ForConditionalGeneration(cfg).to(DT)
    assert len({id(m) for m in model.modules() if type(m).__name__ == "Embedding" and m.num_embeddings == 4}) >= 3
    src, labels = ids(N + 1, 4), ids(N + 1, 5, length=3)
    X = {"input_ids": src, "decoder_input_ids": model._shift_right(labels)}

    def tokens(out, t):
        return F.cross_entropy(out.logits.reshape(-1, VOCAB), t.reshape(-1))

    model, traj = train(model, {k: v[:N] for k, v in X.items()}, labels[:N], "token_cross_entropy", tokens, steps=2)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits
    target = [2 * VOCAB + 5]
    ref = TwinReference(traj, X_test, _float64_norms, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False),
                        target=target, panels=4)
    assert_exact(traj, X_test, truth, ref, target)


def _classifier(model, X: dict, *, panels: int, ref_tol: float = 1e-11, train_tol: float = 1e-9):
    """Train on the first ``N`` rows of ``X`` (3 classes), check on the last 2 against the loop reference, whose own
    quadrature error must stay within ``ref_tol``."""
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(5))
    model, traj = train(model, {k: v[:N] for k, v in X.items()}, y, "cross_entropy",
                        lambda out, t: F.cross_entropy(out.logits, t))
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits
    ref = MappingReference(traj, X_test, loss_fn=per_sample_ce, target=[0, 2], panels=panels)
    assert float(ref.quad_error.abs().max()) <= ref_tol
    assert_exact(traj, X_test, truth, ref, [0, 2], ref_error=torch.zeros(1), train_tol=train_tol)


def test_funnel_with_pooling_and_an_upsampling_decoder_is_exact():
    """Funnel's attention casts its scores to float32 (``attn_score.float()``): the replay evaluates them in float64
    (``casts="auto"``), the slow reference as written, so its path integral misses by float32 rounding that more
    panels do not shrink (6.3e-9 with 16 panels, 6.1e-9 with 32): the reference is held to 1e-8, and so are the
    train scores against it."""
    torch.manual_seed(0)
    cfg = transformers.FunnelConfig(vocab_size=VOCAB, block_sizes=[1, 1], num_decoder_layers=1, d_model=16, n_head=2,
                                    d_head=8, d_inner=32, hidden_dropout=0.0, attention_dropout=0.0,
                                    activation_dropout=0.0, max_position_embeddings=16, num_labels=3)
    _classifier(transformers.FunnelForSequenceClassification(cfg), {"input_ids": ids(N + 2, 1)}, panels=4,
                ref_tol=1e-8, train_tol=1e-8)


def test_convnext_v2_with_global_response_normalisation_is_exact():
    torch.manual_seed(0)
    cfg = transformers.ConvNextV2Config(num_channels=3, patch_size=2, hidden_sizes=[8, 16], depths=[1, 1],
                                        num_stages=2, num_labels=3, image_size=8, drop_path_rate=0.0)
    model = transformers.ConvNextV2ForImageClassification(cfg)
    assert any(type(m).__name__ == "ConvNextV2GRN" for m in model.modules())
    X = torch.randn(N + 2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=DT)
    _classifier(model, {"pixel_values": X}, panels=16)


def test_longformer_is_refused_when_explaining_naming_its_global_attention():
    torch.manual_seed(0)
    cfg = transformers.LongformerConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, max_position_embeddings=16, attention_window=[4],
                                        num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                        pad_token_id=1)
    tokens = ids(N + 2, 1)
    tokens[:, 0] = 0
    glob = torch.zeros_like(tokens)
    glob[:, 0] = 1  # global attention on the first token
    X = {"input_ids": tokens, "global_attention_mask": glob}
    y = torch.randint(0, 3, (N,), generator=torch.Generator().manual_seed(5))
    _, traj = train(transformers.LongformerForSequenceClassification(cfg), {k: v[:N] for k, v in X.items()}, y,
                    "cross_entropy", lambda out, t: F.cross_entropy(out.logits, t), steps=1)  # records exactly
    with pytest.raises(UnsupportedModelError, match=r"Longformer.*global-attention.*cannot be explained"):
        explaind.KernelReplica(device="cpu").fit(traj).predict({k: v[N:] for k, v in X.items()})


def test_trainer_falcon_with_alibi_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    multi_query=True, alibi=True, new_decoder_architecture=False, parallel_attn=True,
                                    hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=16,
                                    bos_token_id=0, eos_token_id=0)
    model = transformers.FalconForCausalLM(cfg).to(DT)
    tokens, labels = lm_data()
    data = IndexedDataset([{"input_ids": tokens[i], "labels": labels[i]} for i in range(len(tokens))])
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    args = trainer_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                        learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1, weight_decay=0.01,
                        max_grad_norm=0.5)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                         compute_loss_func=callback.compute_loss).train()
    traj = callback.trajectory
    assert traj.n_steps == 2 and max(traj.gradient_check()) <= 1e-7
    got = lm_figures(model.eval(), traj)
    note(replica=got["replica"], share=got["residual_share"], train=got["train"])
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


def test_mapping_test_inputs_the_model_refuses_raise_a_config_error_naming_them():
    """Before: the message read ``X.dtype`` of the mapping and raised ``AttributeError`` instead."""
    torch.manual_seed(0)
    cfg = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    multi_query=True, alibi=False, new_decoder_architecture=False,
                                    hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=16)
    tokens = ids(N, 1)
    _, traj = train(transformers.FalconForCausalLM(cfg), {"input_ids": tokens}, tokens, "causal_lm", _next_token,
                    steps=1, check=False)
    X_bad = {"input_ids": tokens[:2].to(DT)}  # token ids as floats: the embedding refuses them
    with pytest.raises(explaind.exceptions.ConfigError, match=r"fails on X Inputs\(\['input_ids'\], batch=2\) .*"
                                                              r"Pass test inputs shaped like"):
        explaind.KernelReplica(device="cpu").fit(traj).predict(X_bad)
