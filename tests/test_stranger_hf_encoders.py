"""Hugging Face encoders no other test contains, built from tiny configs, recorded through the plain loop.

ALBERT (one layer's weights shared by both layers, factorized embeddings), RoBERTa (position ids counted from the
padding id), DeBERTa-v2 (disentangled relative attention, its own 2-D mask handling), ELECTRA token classification
(labels -100 at the padding), BERT multiple choice (inputs ``(n, choices, L)``) and BERT question answering (a
``ModelOutput`` with ``start_logits`` and ``end_logits`` and no ``logits``). Each is trained in float64 with AdamW
(every dropout 0) and must be exact: replica <= 1e-6 relative to the trained model in evaluation mode, residual
share <= 1e-9, ``keep=("train",)`` scores <= 1e-9 relative to the slow float64 loop reference (``MappingReference``:
per-sample gradients one ``autograd.grad`` each, the recurrence unrolled by hand).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import LENGTH, VOCAB, N, assert_exact, ids, padded, per_sample_ce, train
from _hf_testkit import MappingReference, loop_token_loss
from torch.func import functional_call

from explaind.exceptions import UnsupportedModelError
from explaind.integrations import four_d_attention_mask
from explaind.outputs import model_output

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
SMALL = dict(vocab_size=VOCAB, hidden_size=16, num_attention_heads=2, intermediate_size=32)


def _classify(model, pad: int, four_d: bool = True):
    """Train a sequence classifier on padded ids (padding id ``pad``) and check it on 2 held-out inputs."""
    mask, gen = padded(N + 2, 3)
    y = torch.randint(0, 3, (N + 2,), generator=gen)
    tokens = torch.where(mask.bool(), ids(N + 2, 2), torch.full((N + 2, LENGTH), pad))
    X = {"input_ids": tokens, "attention_mask": four_d_attention_mask(mask) if four_d else mask}
    model, traj = train(model, {k: v[:N] for k, v in X.items()}, y[:N], "cross_entropy",
                        lambda out, t: F.cross_entropy(out.logits, t))
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(input_ids=tokens[N:], attention_mask=mask[N:]).logits  # the 2-D mask, as users call it
    target = [0, 2]
    assert_exact(traj, X_test, truth, MappingReference(traj, X_test, loss_fn=per_sample_ce, target=target, panels=4),
                 target)
    return traj


def test_albert_with_one_layer_shared_by_all_and_factorized_embeddings_is_exact():
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(**SMALL, embedding_size=8, num_hidden_layers=2, max_position_embeddings=LENGTH,
                                    classifier_dropout_prob=0.0, num_labels=3, pad_token_id=0, **NO_DROPOUT)
    traj = _classify(transformers.AlbertForSequenceClassification(cfg), pad=0)
    # the two layers are one set of parameters (recorded once), the embeddings 8-wide projected to 16
    names = traj.param_names
    assert sum("albert_layer_groups" in n for n in names) == 16 and not any(".1." in n for n in names)


def test_roberta_with_position_ids_from_the_padding_id_is_exact():
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(**SMALL, num_hidden_layers=1, max_position_embeddings=LENGTH + 2, num_labels=3,
                                     pad_token_id=1, **NO_DROPOUT)
    _classify(transformers.RobertaForSequenceClassification(cfg), pad=1)


def test_deberta_v2_with_disentangled_relative_attention_and_a_2d_mask_is_exact():
    """DeBERTa-v2 builds its attention mask from the 2-D padding mask without a value-dependent shortcut."""
    torch.manual_seed(0)
    cfg = transformers.DebertaV2Config(**SMALL, num_hidden_layers=1, max_position_embeddings=LENGTH, num_labels=3,
                                       relative_attention=True, position_buckets=4, max_relative_positions=LENGTH,
                                       pos_att_type=["p2c", "c2p"], pooler_dropout=0.0, pad_token_id=0, **NO_DROPOUT)
    _classify(transformers.DebertaV2ForSequenceClassification(cfg), pad=0, four_d=False)


def test_electra_token_classification_with_labels_minus_100_at_the_padding_is_exact():
    torch.manual_seed(0)
    cfg = transformers.ElectraConfig(**SMALL, embedding_size=8, num_hidden_layers=1, max_position_embeddings=LENGTH,
                                     num_labels=4, **NO_DROPOUT)
    mask, gen = padded(N + 2, 3)
    tokens = ids(N + 2, 2) * mask
    labels = torch.randint(0, 4, (N + 2, LENGTH), generator=gen).masked_fill(mask == 0, -100)
    X = {"input_ids": tokens, "attention_mask": four_d_attention_mask(mask)}
    model, traj = train(transformers.ElectraForTokenClassification(cfg), {k: v[:N] for k, v in X.items()},
                        labels[:N], "token_cross_entropy",
                        lambda out, t: F.cross_entropy(out.logits.reshape(-1, 4), t.reshape(-1)))
    counted = (labels[:N] != -100).sum(1).double()
    idx, w = traj.batch(0)  # each sequence weighs its share of the batch's counted tokens
    assert torch.allclose(w, counted[idx] / counted[idx].sum(), rtol=0, atol=1e-15)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(input_ids=tokens[N:], attention_mask=mask[N:]).logits
    target = [3 * 4 + 1, 0 * 4 + 2]  # (position, label) per test input
    ref = MappingReference(traj, X_test, loss_fn=lambda out, t: loop_token_loss(out, t, shift=False), target=target,
                           panels=4)
    assert_exact(traj, X_test, truth, ref, target)


def test_bert_multiple_choice_is_exact():
    """Inputs ``(n, 3 choices, L)``, one logit per choice: the outputs are ``(n, 3)``.

    The classifier's bias is added to every choice, so the softmax cancels it: its gradient is 0 up to rounding
    (1e-16), which AdamW divides by ``sqrt(v) + eps`` into a step of about 1e-10 that the per-sample split carries
    only up to rounding. That puts the residual share at 2e-9 to 5e-9 (the reference's own residual is the same
    size), so the bound here is 5e-8. (The question-answering head's bias cancels the same way: 2e-10.)
    """
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**SMALL, num_hidden_layers=1, max_position_embeddings=LENGTH, **NO_DROPOUT)
    choices = torch.stack([ids(N + 2, 1), ids(N + 2, 5), ids(N + 2, 6)], dim=1)
    y = torch.randint(0, 3, (N + 2,), generator=torch.Generator().manual_seed(4))
    model, traj = train(transformers.BertForMultipleChoice(cfg), {"input_ids": choices[:N]}, y[:N], "cross_entropy",
                        lambda out, t: F.cross_entropy(out.logits, t))
    X_test = {"input_ids": choices[N:]}
    with torch.no_grad():
        truth = model(**X_test).logits
    bias = [traj.params(s)["classifier.bias"] for s in (0, traj.n_steps)]
    assert 0 < float((bias[1] - bias[0]).abs().max()) < 1e-9  # rounding divided by eps
    target = [0, 2]
    assert_exact(traj, X_test, truth, MappingReference(traj, X_test, loss_fn=per_sample_ce, target=target, panels=4),
                 target, max_share=5e-8)


class _SpanReference(MappingReference):
    """The loop reference with the outputs ``(L, 2)``: start logits in column 0, end logits in column 1."""

    def _logits(self, vec, x):
        out = functional_call(self.model, {**self.constants, **self._unflat(vec)}, (), x)
        return torch.stack([out.start_logits, out.end_logits], dim=-1)


def _span_loss(out: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of the start and end cross entropies' mean (Hugging Face's question-answering loss)."""
    return (F.cross_entropy(out[..., 0], positions[:, 0]) + F.cross_entropy(out[..., 1], positions[:, 1])) / 2


def test_bert_question_answering_explains_start_and_end_logits_stacked():
    """``start_logits`` and ``end_logits`` ``(n, L)`` are the output ``(n, L, 2)``; trained on the model's own loss."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(**SMALL, num_hidden_layers=1, max_position_embeddings=LENGTH, **NO_DROPOUT)
    tokens = ids(N + 2, 1)
    spans = torch.sort(torch.randint(0, LENGTH, (N + 2, 2), generator=torch.Generator().manual_seed(4)), dim=1).values

    def own_loss(out, t):  # the loop trains on the model's own loss, computed again from the returned logits
        return (F.cross_entropy(out.start_logits, t[:, 0]) + F.cross_entropy(out.end_logits, t[:, 1])) / 2

    model, traj = train(transformers.BertForQuestionAnswering(cfg), {"input_ids": tokens[:N]}, spans[:N], _span_loss,
                        own_loss)
    X_test = {"input_ids": tokens[N:]}
    with torch.no_grad():
        out = model(**X_test)
        truth = torch.stack([out.start_logits, out.end_logits], dim=-1)
    target = [5 * 2 + 0, 6 * 2 + 1]  # the start logit of position 5, the end logit of position 6
    ref = _SpanReference(traj, X_test, loss_fn=_span_loss, target=target, panels=4)
    assert_exact(traj, X_test, truth, ref, target)


def test_logit_fields_of_different_shapes_are_refused_naming_them():
    out = transformers.modeling_outputs.ModelOutput(prediction_logits=torch.zeros(2, 4, 30),
                                                    seq_relationship_logits=torch.zeros(2, 2))
    with pytest.raises(UnsupportedModelError, match=r"prediction_logits.*seq_relationship_logits.*shapes differ"):
        model_output(out)
