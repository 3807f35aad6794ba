"""Hugging Face language models no other test contains, built from configs, recorded through the plain loop.

Each (every dropout 0) is trained in float64 with AdamW on its own loss (a next-token loss for Llama, token cross
entropy for the T5 encoder-decoder; the classifiers are in tests/test_stranger_classifiers.py) and must be exact:
replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)``
scores <= 1e-9 relative to the slow float64 loop reference (``MappingReference``: per-sample gradients one
``autograd.grad`` each, the recurrence unrolled by hand, a token loss looped over positions).

Llama's ``LlamaRMSNorm`` and T5's ``T5LayerNorm`` compute in float32 whatever the model's dtype: replayed as written
their rounding (about 1e-7 relative) makes the path integrand noisy, and the adaptive quadrature stops at its cap
with a warning (``python benchmarks/bench_casts.py``: 159x and 20x the evaluations, T5's replica 2.3e-5 off the
trained model instead of 8.3e-8). By default (``casts="auto"``)
the replay finds these conversions and evaluates them in float64, with no layer replaced by hand; training gradients
keep the run's float32 rounding. The reference's explained function runs a twin of the model whose norms are
``torch.nn.RMSNorm`` (the same function in float64, an independent implementation); its training gradients run
the model as written.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _hf_testkit import MappingReference, loop_token_loss
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindWarning

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

DT = torch.float64
VOCAB, LENGTH, N = 30, 8, 12


def _ids(n: int, seed: int, length: int = LENGTH) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def float64_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every float32-computing RMS norm (Llama, T5) by ``torch.nn.RMSNorm`` with the same weight and eps."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("LlamaRMSNorm", "T5LayerNorm"):
                norm = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=child.weight.dtype)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                setattr(module, name, norm)
    return model


class TwinReference(MappingReference):
    """The loop reference with g through the float64 twin (:func:`float64_norms`), gradients through the model."""

    def __init__(self, traj, X, **kwargs):
        self.twin = float64_norms(copy.deepcopy(traj.model)).to(DT).eval()
        super().__init__(traj, X, **kwargs)

    def _compute_gradients(self) -> None:
        super()._compute_gradients()  # self.model: the recorded model, float32 norms as in training
        self.model = self.twin  # what the explained function and its kinks run from here on


def _train(model, X, y, loss, batch_loss, steps: int = 3):
    """AdamW, ``steps`` steps of 4 random samples; ``batch_loss(logits, targets)`` is the loop's own loss."""
    model = model.to(DT).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=True)
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randperm(N, generator=gen)[:4]
            opt.zero_grad()
            xb = {k: v[idx] for k, v in X.items()} if isinstance(X, dict) else X[idx]
            out = model(**xb) if isinstance(xb, dict) else model(xb)
            batch_loss(out.logits, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    return model.eval(), traj


def _assert_exact(traj, X_test, truth, ref, target=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)  # no capped warning, no residual warning
        assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth) <= 1e-6
        est = explaind.InfluenceEstimator(keep=("train",), target=target, tol=1e-11, device="cpu")
        att = est.fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
    return att


def _norms_kept_in_float64(att, norm: str) -> int:
    """How many of the model's ``norm`` layers the replay evaluated in float64 (``meta["promoted_casts"]``)."""
    return sum(f"({norm}): Tensor.to -> float32" in c for c in att.meta["promoted_casts"])


def _llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(DT)
    assert cfg._attn_implementation == "sdpa"
    return model


def _next_token(logits, t):
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))


def test_llamas_float32_norms_as_written_cap_the_adaptive_rule_with_a_warning_naming_them(monkeypatch):
    """``casts="as_written"`` is the replay before casts were found; its cap warning now names the norms."""
    import explaind.kernel.adaptive as adaptive

    monkeypatch.setattr(adaptive, "MAX_EVALS", 300)
    ids = _ids(N + 2, 1)
    X_test = {"input_ids": ids[N:]}
    _, traj = _train(_llama(), {"input_ids": ids[:N]}, ids[:N], "causal_lm", _next_token)
    for casts in ("as_written", "auto"):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            explaind.KernelReplica(device="cpu", casts=casts).fit(traj).predict(X_test)
        capped = [str(w.message) for w in seen if "stopped at the cap" in str(w.message)]
        if casts == "auto":
            assert not capped
        else:
            assert len(capped) == 1
            assert "model.norm (LlamaRMSNorm): Tensor.to -> float32" in capped[0]
            assert "model.layers.0.input_layernorm (LlamaRMSNorm)" in capped[0] and "casts='auto'" in capped[0]


def test_llama_with_rotary_embeddings_gqa_and_a_silu_gated_mlp_is_exact_as_it_is():
    ids = _ids(N + 2, 1)
    model, traj = _train(_llama(), {"input_ids": ids[:N]}, ids[:N], "causal_lm", _next_token)
    assert any(type(m).__name__ == "LlamaRMSNorm" for m in traj.model.modules())
    X_test = {"input_ids": ids[N:]}
    with torch.no_grad():
        truth = model(**X_test).logits.reshape(2, -1)
    target = [5 * VOCAB + 3, 2 * VOCAB + 7]  # one (position, token) logit per test sequence
    ref = TwinReference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=True), target=target,
                        panels=4)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    assert _norms_kept_in_float64(_assert_exact(traj, X_test, truth, ref, target), "LlamaRMSNorm") == 3


def test_t5_encoder_decoder_with_labels_is_exact_as_it_is():
    """Relative position buckets, a ReLU feed-forward, decoder inputs shifted from the labels by the model."""
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
                                num_heads=2, relative_attention_num_buckets=4, decoder_start_token_id=0,
                                pad_token_id=0, dropout_rate=0.0)
    model = transformers.T5ForConditionalGeneration(cfg).to(DT)
    src, labels = _ids(N + 1, 4), _ids(N + 1, 5, length=3)
    X = {"input_ids": src, "decoder_input_ids": model._shift_right(labels)}

    def tokens(logits, t):
        return F.cross_entropy(logits.reshape(-1, VOCAB), t.reshape(-1))

    model, traj = _train(model, {k: v[:N] for k, v in X.items()}, labels[:N], "token_cross_entropy", tokens,
                         steps=2)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits.reshape(1, -1)
    target = [2 * VOCAB + 5]
    ref = TwinReference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False), target=target,
                        panels=4)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    assert _norms_kept_in_float64(_assert_exact(traj, X_test, truth, ref, target), "T5LayerNorm") == 7
