"""Hugging Face decoders and an encoder-decoder no other test contains, built from tiny configs, plain loop.

BART (embeddings shared by encoder, decoder and head, ``decoder_input_ids`` shifted from labels with -100 padding),
GPT-NeoX (partial rotary, parallel residual), Mistral (sliding-window attention, grouped-query heads, float32 RMS
norms), Phi (partial rotary, parallel attention and MLP) and Qwen2 with left padding. Trained in float64 with AdamW
(every dropout 0) on the loop's own token loss; "exact": replica <= 1e-6 relative to the trained model in evaluation
mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference.

Two findings the tests pin down:

* ``nn.Embedding(padding_idx=p)`` gives row ``p`` no gradient, but its forward reads that row; when the weight is
  shared with the output head (BART) row ``p`` moves, so the explained function's derivative includes it. explaind's
  path integral does (the telescoping is exact); a reverse-mode reference through ``padding_idx`` misses it (7e-5
  here), so the reference explains a twin whose embeddings have no ``padding_idx`` (the same function).
* Llama-family RMS norms convert to float32 in ``forward``, so the backward rounds the gradient flowing through them
  to float32, and that rounding depends on the loss's scale: a batch's mean over 23 tokens and the per-sample means
  over 6 or 5 tokens, weighted 6/23 and 5/23, round differently (with weights that are powers of two, as in equal-
  length batches, they do not). The per-sample split then differs from the step's gradient at float32 rounding:
  residual share 5e-7 for the left-padded Qwen2, the same residual as the independent reference's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import (
    VOCAB,
    N,
    TwinReference,
    assert_exact,
    float64_rms_norms,
    ids,
    padded,
    tiny_bart,
    train,
)
from _hf_testkit import MappingReference, loop_token_loss
from reference import rel_err

import explaind
from explaind.exceptions import UnsupportedModelError
from explaind.integrations import four_d_attention_mask

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

TARGET = [5 * VOCAB + 3, 6 * VOCAB + 7]  # one (position, token) logit per test sequence


def _next_token(out, t):
    return F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))


def _shifted_loss(out, t):
    return loop_token_loss(out, t, shift=True)


def _causal_lm(model, X, y, *, reference=MappingReference, panels: int = 4, **ref_kw):
    """Train on ``X`` (a mapping, first ``N`` rows) with the next-token loss; check on the last 2 rows."""
    model, traj = train(model, {k: v[:N] for k, v in X.items()}, y[:N], "causal_lm", _next_token)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits
    ref = reference(traj, X_test, loss_fn=_shifted_loss, target=TARGET, panels=panels, **ref_kw)
    return model, traj, X_test, truth, ref


def _no_padding_idx(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            module.padding_idx = None  # the forward is unchanged; only autograd's rule for that row goes
    return model


def test_bart_with_shared_embeddings_and_labels_padded_with_minus_100_is_exact():
    src, labels = ids(N + 1, 4), ids(N + 1, 5, length=4)
    labels[::3, -2:] = -100  # padded targets; the decoder reads the padding id after the first
    decoder_ids = transformers.models.bart.modeling_bart.shift_tokens_right(labels, 1, 2)
    X = {"input_ids": src, "decoder_input_ids": decoder_ids}
    model, traj = train(tiny_bart(), {k: v[:N] for k, v in X.items()}, labels[:N],
                        "token_cross_entropy", lambda out, t: F.cross_entropy(out.logits.reshape(-1, VOCAB),
                                                                              t.reshape(-1)))
    assert model.lm_head.weight is model.model.shared.weight and "lm_head.weight" not in traj.param_names
    rows = [traj.params(s)["model.shared.weight"][1] for s in (0, traj.n_steps)]
    assert float((rows[1] - rows[0]).abs().max()) > 1e-3  # the padding row moved, and the test input reads it:
    assert bool((decoder_ids[N:] == 1).any()) and bool((src[N:] == 1).any())
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits
    target = [2 * VOCAB + 5]

    def loss(out, t):
        return loop_token_loss(out, t, shift=False)

    through_padding_idx = MappingReference(traj, X_test, loss_fn=loss, target=target, panels=4)
    assert float(through_padding_idx.quad_error.abs().max()) > 1e-6  # misses the padding row's motion
    assert_exact(traj, X_test, truth, TwinReference(traj, X_test, _no_padding_idx, loss_fn=loss, target=target,
                                                    panels=4), target)


def _neox():
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, rotary_pct=0.5, use_parallel_residual=True, hidden_dropout=0.0,
        attention_dropout=0.0, tie_word_embeddings=False))


def _phi():
    return transformers.PhiForCausalLM(transformers.PhiConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, partial_rotary_factor=0.5, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0))


@pytest.mark.parametrize("build", [_neox, _phi], ids=["gpt_neox_parallel_residual", "phi_parallel_attention"])
def test_partial_rotary_decoders_are_exact(build):
    """GPT-NeoX (``rotary_pct=0.5``, parallel residual) and Phi (``partial_rotary_factor=0.5``, attention and MLP in
    parallel, one norm)."""
    torch.manual_seed(0)
    tokens = ids(N + 2, 1)
    _, traj, X_test, truth, ref = _causal_lm(build(), {"input_ids": tokens}, tokens, panels=8)
    assert_exact(traj, X_test, truth, ref, TARGET)


def test_mistral_with_sliding_window_attention_is_exact():
    torch.manual_seed(0)
    cfg = transformers.MistralConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                     sliding_window=3, tie_word_embeddings=False)
    tokens = ids(N + 2, 1)
    model, traj, X_test, truth, ref = _causal_lm(transformers.MistralForCausalLM(cfg), {"input_ids": tokens}, tokens,
                                                 reference=TwinReference, twin=float64_rms_norms)
    model.config.sliding_window = None  # the window matters: without it the trained model says otherwise
    with torch.no_grad():
        assert rel_err(model(**X_test).logits, truth) > 1e-3
    model.config.sliding_window = 3  # the trajectory explains this very model
    assert_exact(traj, X_test, truth, ref, TARGET)


def _qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                   tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg)


def _left_padded():
    mask, _ = padded(N + 2, 7, left=True)
    tokens = ids(N + 2, 1)
    return tokens * mask, mask, tokens.masked_fill(mask == 0, -100)


def test_qwen2_left_padded_with_a_2d_mask_is_refused_naming_the_causal_4d_mask():
    tokens, mask, labels = _left_padded()
    X = {"input_ids": tokens, "attention_mask": mask}
    _, traj = train(_qwen2(), {k: v[:N] for k, v in X.items()}, labels[:N], "causal_lm", _next_token, steps=1)
    with pytest.raises(UnsupportedModelError, match=r"four_d_attention_mask\(mask, causal=True\)"):
        explaind.KernelReplica(device="cpu").fit(traj).predict({k: v[N:] for k, v in X.items()})


def test_qwen2_left_padded_with_the_causal_4d_mask_is_exact_up_to_its_float32_norms_rounding():
    tokens, mask, labels = _left_padded()
    X = {"input_ids": tokens, "attention_mask": four_d_attention_mask(mask, causal=True)}
    model, traj, X_test, truth, ref = _causal_lm(_qwen2(), X, labels, reference=TwinReference,
                                                 twin=float64_rms_norms)
    with torch.no_grad():  # the 4-D mask is the model's own left-padding mask
        assert rel_err(model(input_ids=tokens[N:], attention_mask=mask[N:]).logits, truth) <= 1e-15
    idx, w = traj.batch(0)
    assert not np.allclose(np.log2(w.numpy()), np.round(np.log2(w.numpy())))  # token weights: not powers of two
    # the per-sample gradients round in float32 too, one input at a time here and under vmap in the engine: 7e-10
    att = assert_exact(traj, X_test, truth, ref, TARGET, max_share=1e-5, train_tol=1e-8)
    assert att.meta["residual_share"] > 1e-8  # float32 rounding, not the engine's: the reference has the same residual
    assert rel_err(att.residual, ref.residual(("train",))) <= 1e-3
