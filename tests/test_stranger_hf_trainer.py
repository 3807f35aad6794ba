"""Stranger Hugging Face models trained by the ``Trainer`` and recorded by ``ExplaindTrainerCallback``.

* BART on its own loss: the Trainer passes ``labels`` and the model builds ``decoder_input_ids`` from them (shifted
  right, -100 as the padding id); explaind calls ``model(**X)`` without labels, where BART would build them from
  ``input_ids``. Before, that recorded another function (measured on this run with labels as long as the source,
  before the callback's fix): a ``TrajectoryError`` at step 0 (gradient mismatch 0.85), with the check off a
  residual share of 64; with labels shorter than the source a ``ConfigError`` about the logits' shape. Now the
  callback records the decoder inputs the model builds: exact.
  With ``compute_loss_func=`` the Trainer takes the labels out, so the model builds them otherwise: refused.
* ELECTRA token classification on its own loss (labels -100 at the padding), accumulation 2: the Trainer passes
  ``num_items_in_batch`` to the model (its ``forward`` takes ``**kwargs``) and so does not divide the loss by the
  accumulation, but the head's loss is a plain mean that ignores it: the run trains on the sum of the micro-batches'
  means. ``normalization="auto"`` weights by the step's token counts, which the gradient check refuses at step 0
  (best scale 1.99), its message naming the cause and ``normalization="micro_batch"``, with which the run is
  exact against the slow loop reference.
* Wav2Vec2 with SpecAugment (NumPy masks, ``mask_time_prob=0.5``) and ``capture_random=True``: exact.
* Marian on its own loss: exact, decoder inputs as BART's. Whisper on its own loss: it shifts the labels in
  ``forward`` but has no ``prepare_decoder_input_ids_from_labels``, so the callback recorded no decoder inputs and
  the recorder's first check failed inside Whisper's decoder (``ValueError: You cannot specify both
  decoder_input_ids and decoder_inputs_embeds``, neither being given). Now the callback shifts them as the config
  says (``decoder_start_token_id`` first, -100 as ``pad_token_id``): exact.

"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)``
<= 1e-9 relative to the slow float64 loop reference (BART, ELECTRA, Marian, Whisper).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from _hf_stranger_kit import DT, LENGTH, VOCAB, N, TwinReference, ids, note, padded, tiny_bart
from _hf_testkit import MappingReference, loop_token_loss, trainer_args
from reference import rel_err
from test_stranger_hf_audio_vision import _audio, _wav2vec2
from test_stranger_hf_decoders import _no_padding_idx

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset, four_d_attention_mask

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _args(tmp_path, **overrides):
    return trainer_args(tmp_path, **{**dict(per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                                          weight_decay=0.01), **overrides})


def _bart_items():
    src, labels = ids(N + 1, 4), ids(N + 1, 5, length=4)
    labels[::3, -2:] = -100
    return src, labels, IndexedDataset([{"input_ids": src[i], "labels": labels[i]} for i in range(N)])


def _assert_replica_and_share(traj, X_test, truth, target=None):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth)
        est = explaind.InfluenceEstimator(keep=("train",), target=target, tol=1e-11, device="cpu")
        att = est.fit(traj).transform(X_test)
    note(replica=replica, share=att.meta["residual_share"])
    assert replica <= 1e-6
    assert att.meta["residual_share"] <= 1e-9
    return att


def test_trainer_bart_on_its_own_loss_records_the_decoder_inputs_built_from_the_labels(tmp_path):
    src, labels, data = _bart_items()
    model = tiny_bart()
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy", check_gradients=True)
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[callback]).train()
    traj = callback.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    X_train, _ = traj.train_samples(torch.arange(N))
    shifted = torch.cat([torch.full((N, 1), 2), labels[:N, :-1].masked_fill(labels[:N, :-1] == -100, 1)], dim=1)
    assert torch.equal(X_train.data["decoder_input_ids"], shifted)  # labels shifted right, -100 as the padding id
    X_test = {"input_ids": src[N:], "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels[N:])}
    with torch.no_grad():
        truth = model.eval()(input_ids=src[N:], labels=labels[N:]).logits.reshape(1, -1)
    _assert_seq2seq_exact(traj, X_test, truth, [2 * VOCAB + 5], panels=4)


def _assert_seq2seq_exact(traj, X_test, truth, target, panels: int) -> None:
    """Replica and residual share as :func:`_assert_replica_and_share`, train scores <= 1e-9 relative to the loop
    reference of a twin without ``padding_idx`` (token cross entropy), whose quadrature error must vanish."""
    att = _assert_replica_and_share(traj, X_test, truth, target)
    ref = TwinReference(traj, X_test, _no_padding_idx, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False),
                        target=target, panels=panels)
    assert float(ref.quad_error.abs().max()) <= 1e-11
    note(train=rel_err(att.values, ref.kept(("train",))))
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


def test_trainer_bart_without_labels_in_the_forward_is_refused_naming_decoder_input_ids(tmp_path):
    _, _, data = _bart_items()
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy")
    trainer = transformers.Trainer(model=tiny_bart(), args=_args(tmp_path), train_dataset=data, callbacks=[callback],
                                   compute_loss_func=callback.compute_loss)  # the Trainer pops the labels
    with pytest.raises(ConfigError, match=r"without labels.*add 'decoder_input_ids' to every item"):
        trainer.train()


def test_trainer_electra_token_classification_on_its_own_loss_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=LENGTH,
                                     num_labels=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = transformers.ElectraForTokenClassification(cfg).to(DT)
    mask, gen = padded(N + 2, 3)
    tokens = ids(N + 2, 2) * mask
    labels = torch.randint(0, 4, (N + 2, LENGTH), generator=gen).masked_fill(mask == 0, -100)
    data = IndexedDataset([{"input_ids": tokens[i], "attention_mask": mask[i], "labels": labels[i]}
                           for i in range(N)])
    args = _args(tmp_path, gradient_accumulation_steps=2)
    refused = ExplaindTrainerCallback(data, loss="token_cross_entropy", attention_mask="bidirectional")
    with pytest.raises(TrajectoryError, match=r"best scale 1\.99.*ignores num_items_in_batch.*'micro_batch'"):
        transformers.Trainer(model=copy.deepcopy(model), args=args, train_dataset=data, callbacks=[refused]).train()
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy", attention_mask="bidirectional",
                                       check_gradients=True, normalization="micro_batch")
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    traj = callback.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    X_test = {"input_ids": tokens[N:], "attention_mask": four_d_attention_mask(mask[N:])}
    with torch.no_grad():
        truth = model.eval()(input_ids=tokens[N:], attention_mask=mask[N:]).logits.reshape(2, -1)
    target = [3 * 4 + 1, 0 * 4 + 2]
    att = _assert_replica_and_share(traj, X_test, truth, target)
    ref = MappingReference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False), target=target,
                           panels=4)
    assert float(ref.quad_error.abs().max()) <= 1e-11
    note(train=rel_err(att.values, ref.kept(("train",))))
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


def test_trainer_wav2vec2_spec_augment_with_capture_random_is_exact(tmp_path):
    X, y = _audio()
    model = _wav2vec2().to(DT)
    data = IndexedDataset([{"input_values": X[i], "labels": y[i]} for i in range(N)])
    callback = ExplaindTrainerCallback(data, loss="cross_entropy", capture_random=True, check_gradients=True)
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[callback]).train()
    traj = callback.trajectory
    assert max(traj.gradient_check()) <= 1e-12 and traj.micro_batches(0)[0].state.numpy is not None
    with torch.no_grad():
        truth = model.eval()(X[N:]).logits
    _assert_replica_and_share(traj, {"input_values": X[N:]}, truth)


def _seq2seq_through_the_trainer(tmp_path, model, inputs: dict, labels, prepare):
    """Train ``model`` on its own loss (the Trainer passes the labels), check 2 held-out rows against the loop
    reference of a twin without ``padding_idx``; ``prepare(labels)`` builds the decoder inputs as the model does."""
    data = IndexedDataset([{**{k: v[i] for k, v in inputs.items()}, "labels": labels[i]} for i in range(N)])
    callback = ExplaindTrainerCallback(data, loss="token_cross_entropy", check_gradients=True)
    transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[callback]).train()
    traj = callback.trajectory
    assert max(traj.gradient_check()) <= 1e-12
    X_train, _ = traj.train_samples(torch.arange(N))
    assert torch.equal(X_train.data["decoder_input_ids"], prepare(labels[:N]))
    X_test = {**{k: v[N:] for k, v in inputs.items()}, "decoder_input_ids": prepare(labels[N:])}
    with torch.no_grad():
        truth = model.eval()(**{k: v[N:] for k, v in inputs.items()}, labels=labels[N:]).logits.reshape(2, -1)
    _assert_seq2seq_exact(traj, X_test, truth, [2 * VOCAB + 5, 1 * VOCAB + 3], panels=8)


def test_trainer_marian_on_its_own_loss_is_exact(tmp_path):
    from test_stranger_hf_seq2seq import tiny_marian

    model = tiny_marian().to(DT)
    src, labels = ids(N + 2, 4), ids(N + 2, 5, length=4)
    labels[::3, -1] = -100
    _seq2seq_through_the_trainer(tmp_path, model, {"input_ids": src}, labels,
                                 lambda t: model.prepare_decoder_input_ids_from_labels(labels=t))


def test_trainer_whisper_without_a_prepare_method_records_the_decoder_inputs_it_builds_from_the_labels(tmp_path):
    """Whisper shifts the labels in ``forward`` and has no ``prepare_decoder_input_ids_from_labels``: the callback
    shifts them as its config says (start token, -100 as the padding id)."""
    from test_stranger_hf_seq2seq import tiny_whisper, whisper_data

    model = tiny_whisper().to(DT)
    assert not hasattr(model, "prepare_decoder_input_ids_from_labels")
    feats, labels = whisper_data()
    _seq2seq_through_the_trainer(tmp_path, model, {"input_features": feats}, labels,
                                 lambda t: transformers.models.whisper.modeling_whisper.shift_tokens_right(t, 1, 0))
