"""Hugging Face classifiers no other test contains, built from configs: DistilBERT (a 4-D mask) and ViT (images).

Trained in float64 with AdamW on the mean cross entropy through the plain loop (every dropout 0), each is exact:
replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)``
scores <= 1e-9 relative to the slow float64 loop reference (``MappingReference`` of tests/_hf_testkit.py).
The language models are in tests/test_stranger_models.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _hf_testkit import MappingReference
from test_stranger_models import DT, LENGTH, VOCAB, N, _assert_exact, _ids, _train

from explaind.integrations import four_d_attention_mask

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _classifier_data(n: int):
    gen = torch.Generator().manual_seed(3)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return _ids(n, 2) * mask, mask, torch.randint(0, 3, (n,), generator=gen)


class _InlineReluReference(MappingReference):
    """DistilBERT applies ``nn.ReLU()(pre_classifier(h))`` inline: the reference cuts its panels at those sign flips."""

    kink_outputs = ("pre_classifier",)


def test_distilbert_sequence_classifier_with_a_4d_mask_is_exact():
    torch.manual_seed(0)
    cfg = transformers.DistilBertConfig(vocab_size=VOCAB, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                                        max_position_embeddings=LENGTH, num_labels=3, dropout=0.0,
                                        attention_dropout=0.0, seq_classif_dropout=0.0)
    ids, mask, y = _classifier_data(N + 2)
    X = {"input_ids": ids, "attention_mask": four_d_attention_mask(mask)}
    model, traj = _train(transformers.DistilBertForSequenceClassification(cfg),
                         {k: v[:N] for k, v in X.items()}, y[:N], "cross_entropy", F.cross_entropy)
    X_test = {k: v[N:] for k, v in X.items()}
    with torch.no_grad():
        truth = model(input_ids=ids[N:], attention_mask=mask[N:]).logits
    target = [0, 2]
    ref = _InlineReluReference(traj, X_test, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"),
                               target=target)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    _assert_exact(traj, X_test, truth, ref, target)


def test_vit_image_classifier_is_exact():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(N + 2, 1, 8, 8, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)
    model, traj = _train(transformers.ViTForImageClassification(cfg), {"pixel_values": X[:N]}, y, "cross_entropy",
                         F.cross_entropy)
    with torch.no_grad():
        truth = model(X[N:]).logits
    X_test = {"pixel_values": X[N:]}
    target = [1, 2]
    ref = MappingReference(traj, X_test, loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"),
                           target=target, panels=8)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    _assert_exact(traj, X_test, truth, ref, target)
