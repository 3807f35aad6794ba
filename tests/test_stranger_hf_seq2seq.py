"""Hugging Face encoder-decoders no other test contains, built from tiny configs, recorded through the plain loop.

* Marian (MarianMT): sinusoidal position embeddings that are no parameter, embeddings shared by encoder, decoder
  and head, a ``final_logits_bias`` buffer, ``decoder_input_ids`` shifted from the labels with the padding id as
  the decoder's start token.
* Whisper: an audio encoder (two convolutions over log-mel features, sinusoidal positions) and a text decoder whose
  embeddings are tied to the output projection; the decoder inputs shifted from the labels.

Marian's decoder starts from its padding id, whose embedding row (``padding_idx``) gets no gradient but moves
through the tied head: the loop reference explains a twin without ``padding_idx`` (the same function;
tests/test_stranger_hf_decoders.py says why), for both models. "Exact": replica <= 1e-6 relative to the trained model
in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 reference.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import DT, LENGTH, VOCAB, N, TwinReference, assert_exact, ids, train
from _hf_testkit import loop_token_loss
from test_stranger_hf_decoders import _no_padding_idx

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

TARGET = [2 * VOCAB + 5, 1 * VOCAB + 3]  # one (position, token) logit per test sequence


def _tokens(out, t):
    return F.cross_entropy(out.logits.reshape(-1, VOCAB), t.reshape(-1))


def _check(model, X: dict, labels, panels: int = 4):
    """Train on the first ``N`` rows with the token loss, check 2 held-out rows against the twin reference."""
    model, traj = train(model, {k: v[:N] for k, v in X.items()}, labels[:N], "token_cross_entropy", _tokens)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(**X_test).logits
    ref = TwinReference(traj, X_test, _no_padding_idx, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False),
                        target=TARGET, panels=panels)
    return traj, assert_exact(traj, X_test, truth, ref, TARGET)


def tiny_marian():
    torch.manual_seed(0)
    cfg = transformers.MarianConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                    encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                    decoder_ffn_dim=32, max_position_embeddings=LENGTH, dropout=0.0,
                                    attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1, eos_token_id=2,
                                    decoder_start_token_id=1, forced_eos_token_id=None)
    return transformers.MarianMTModel(cfg)


def test_marian_with_sinusoidal_positions_and_shared_embeddings_is_exact():
    model = tiny_marian()
    src, labels = ids(N + 2, 4), ids(N + 2, 5, length=4)
    labels[::3, -1] = -100
    X = {"input_ids": src, "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=labels)}
    traj, _ = _check(model, X, labels)
    assert model.lm_head.weight is model.model.shared.weight
    assert not any("embed_positions" in n for n in traj.param_names)  # sinusoids: no parameter
    assert "final_logits_bias" not in traj.param_names


def tiny_whisper():
    torch.manual_seed(0)
    cfg = transformers.WhisperConfig(vocab_size=VOCAB, num_mel_bins=4, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, d_model=16, max_source_positions=8, max_target_positions=8,
                                     dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, pad_token_id=1,
                                     bos_token_id=0, eos_token_id=2, decoder_start_token_id=0, suppress_tokens=None,
                                     begin_suppress_tokens=None, apply_spec_augment=False)
    return transformers.WhisperForConditionalGeneration(cfg)


def whisper_data():
    """Log-mel features ``(N + 2, 4 bins, 16 frames)`` and 4 labels per sample, -100 at the end of every third."""
    feats = torch.randn(N + 2, 4, 16, generator=torch.Generator().manual_seed(3), dtype=DT)
    labels = ids(N + 2, 5, length=4)
    labels[::3, -1] = -100
    return feats, labels


def test_whisper_audio_encoder_decoder_is_exact():
    model = tiny_whisper()
    feats, labels = whisper_data()
    decoder = transformers.models.whisper.modeling_whisper.shift_tokens_right(labels, 1, 0)
    _check(model, {"input_features": feats, "decoder_input_ids": decoder}, labels, panels=8)  # 4: 8.8e-9
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
