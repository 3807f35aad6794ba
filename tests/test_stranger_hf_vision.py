"""Hugging Face vision models no other test contains, built from tiny configs, recorded through the plain loop.

* Swin: shifted windows (``torch.roll``) with an attention mask built from the sizes, a learned relative position
  bias table indexed per window, patch merging. Exact. Its smooth path costs the adaptive rule more than 100
  evaluations per (step, input) at ``tol=1e-11``, and the cost notice says so without claiming activation kinks
  (the model holds none).
* MobileViT: convolutions with train-mode BatchNorm (statistics replayed per step) and transformer blocks over
  unfolded patches. Exact, against a reference that replays the batched training forwards and adds the buffers'
  term per step; residual share <= 1e-8 (measured 2.2e-9). Its running statistics are set from the training
  images before recording: with the initial ones this tiny network's evaluation-mode logits were 1e-56 plus the
  classifier's bias, the same for every input, which an earlier version of this test explained "exactly".
  The share's source: nine biases whose training gradient is zero in exact arithmetic and float64 rounding in
  fact (<= 1.8e-15, per sample too): six ``reduce_1x1`` BatchNorm biases (no activation after them) and three
  ``layernorm`` biases after the transformer blocks, each reaching the loss only through a 1x1 convolution and a
  train-mode BatchNorm, which removes any per-channel constant. AdamW divides that rounding by ``sqrt(v) + eps``,
  about ``eps`` = 1e-8: the recorded update of these biases is amplified rounding (about 4e-11), and the per-sample
  split sums per-sample gradients whose rounding differs from the batch gradient's. In evaluation mode (running
  statistics) the biases do move the outputs, so that difference is the residual: the six ``reduce_1x1`` biases
  carry 99.6% of it (``keep=("train", "param")``), with the nine frozen the share is 1.3e-13, and with
  ``keep=("step",)`` (the step's own gradient, no split) the residual is 3e-16. A property of the run (AdamW on a
  gradient that is rounding), not an engine error; BERT multiple choice shows the same
  (tests/test_stranger_hf_encoders.py). The query and key weights of the deepest blocks (one patch per sequence)
  get gradient exactly 0, which AdamW maps to an update of exactly 0.
* ViT called with ``interpolate_pos_encoding=True`` (12x12 images, position embeddings made for 8x8): the flag is
  an entry of the mapping input, passed unchanged to every forward (before, ``vmap`` refused the ``bool``). Exact.
* CLIP: ``CLIPForImageClassification`` (the vision tower with a per-sample head) exact; ``CLIPModel`` trained
  contrastively (``logits_per_image`` scores every image of the batch against every text) refused at the
  recorder's first check, naming the batch coupling and a per-sample head as the fix.

"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9,
``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import DT, N, assert_exact, note, per_sample_ce, train
from _hf_testkit import MappingReference
from reference import rel_err
from test_stranger_hf_audio_vision import _images, _LogitsBufferReference

import explaind
from explaind.exceptions import UnsupportedModelError

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

TARGET = [0, 2]
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _logits_ce(out, t):
    return F.cross_entropy(out.logits, t)


def _check_mapping(model, X: dict, y, *, panels: int = 4, **kwargs):
    """Train on the first ``N`` rows of ``X`` (tensors; flags as they are), check on the last 2."""
    def rows(sl):
        return {k: v[sl] if torch.is_tensor(v) else v for k, v in X.items()}

    model, traj = train(model, rows(slice(0, N)), y[:N], "cross_entropy", _logits_ce)
    X_test = rows(slice(N, None))
    with torch.no_grad():
        truth = model(**X_test).logits
    ref = MappingReference(traj, X_test, loss_fn=per_sample_ce, target=TARGET, panels=panels)
    return assert_exact(traj, X_test, truth, ref, TARGET, **kwargs)


def test_swin_with_shifted_windows_and_relative_position_bias_is_exact_and_its_cost_notice_claims_no_kinks(caplog):
    torch.manual_seed(0)
    cfg = transformers.SwinConfig(image_size=8, patch_size=2, num_channels=3, embed_dim=8, depths=[1, 1],
                                  num_heads=[2, 2], window_size=2, mlp_ratio=2.0, drop_path_rate=0.0, num_labels=3,
                                  **NO_DROPOUT)
    model = transformers.SwinForImageClassification(cfg)
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d)) for m in model.modules())
    X, y = _images(8)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.planning"):
        _check_mapping(model, {"pixel_values": X}, y, panels=8)
    said = [r.getMessage() for r in caplog.records if "evaluations per (step, input)" in r.getMessage()]
    assert said and all("holds no module with a kink" in s and "crosses many activation kinks" not in s for s in said)


class _SmoothBufferReference(_LogitsBufferReference):
    """The buffers reference for a model without kinks (SiLU only): one smooth piece per segment."""

    def kinks(self, s, xi, grid=16):
        return []


def _mobilevit(frozen: tuple[str, ...] = ()):
    """The trained MobileViT (2 AdamW steps at lr 0.002) with the parameters whose names end in ``frozen``
    frozen, its trajectory and the held-out truth."""
    torch.manual_seed(0)
    cfg = transformers.MobileViTConfig(image_size=16, patch_size=2, num_channels=3, hidden_sizes=[8, 8, 8],
                                       neck_hidden_sizes=[4, 4, 8, 8, 8, 8, 16], num_attention_heads=2,
                                       mlp_ratio=2.0, expand_ratio=2.0, classifier_dropout_prob=0.0, num_labels=3,
                                       initializer_range=0.3, **NO_DROPOUT)
    model = transformers.MobileViTForImageClassification(cfg).to(DT)
    assert not any(isinstance(m, (torch.nn.ReLU, torch.nn.MaxPool2d)) for m in model.modules())
    X, y = _images(16)
    # running statistics set from the training images first, as a trained model's are: with the initial ones
    # (mean 0, variance 1) the evaluation-mode features of this tiny network vanish (logits 1e-56, only the bias)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.momentum = None  # a cumulative average: one forward sets the batch's statistics
    with torch.no_grad():
        model.train()(X[:N])
    for norm in norms:
        norm.momentum = 0.1
    for name, p in model.named_parameters():
        p.requires_grad_(not name.endswith(frozen) if frozen else True)
    with torch.no_grad():
        before = model.eval()(X[N:]).logits
    model, traj = train(model, X[:N], y, "cross_entropy", _logits_ce, steps=2, lr=0.002)
    with torch.no_grad():
        truth = model(X[N:]).logits
    return model, traj, X, before, truth


def test_mobilevit_with_train_mode_batch_norm_and_unfolded_patches_is_exact():
    model, traj, X, before, truth = _mobilevit()
    assert traj.buffer_names and traj.manifest.coupled  # the BatchNorms' training forwards replayed
    assert rel_err(truth[0], truth[1]) > 0.1 and rel_err(before, truth) > 0.01  # the features carry the inputs
    ref = _SmoothBufferReference(traj, X[N:], target=TARGET, panels=16)
    # the short path (lr 0.002) is sharp: the reference needs 16 panels (4: 3.8e-6 off on one pair); the residual
    # share, 2.2e-9 measured, is AdamW's eps-amplified rounding of nine biases' vanishing gradient (module docstring)
    assert_exact(traj, X[N:], truth, ref, TARGET, ref_error=ref.quad_error - ref.buffer_terms(), max_share=1e-8)


def test_mobilevit_residual_share_comes_from_biases_whose_gradient_vanishes():
    """Nine biases' training gradient is rounding; with them frozen the share drops to rounding level."""
    model, _, X, _, _ = _mobilevit()
    out = model.train()(X[:4]).logits
    names = [n for n, _ in model.named_parameters()]
    grads = dict(zip(names, torch.autograd.grad(F.cross_entropy(out, torch.arange(4) % 3), list(model.parameters())),
                     strict=True))
    vanishing = tuple(n for n in names if 0 < float(grads[n].abs().max()) <= 1e-14)  # zero up to rounding
    assert sum(n.endswith("reduce_1x1.normalization.bias") for n in vanishing) == 6
    assert sum(n.endswith("layernorm.bias") for n in vanishing) == 3 and len(vanishing) == 9
    assert max(float(g.abs().max()) for g in grads.values()) >= 1e-2
    _, traj, X, _, _ = _mobilevit(frozen=vanishing)
    att = explaind.InfluenceEstimator(keep=("train",), target=TARGET, tol=1e-11, device="cpu").fit(traj)
    share = att.transform(X[N:]).meta["residual_share"]
    note(share=share)
    assert share <= 1e-12  # measured 1.3e-13; 2.2e-9 with them trained


def test_vit_with_interpolate_pos_encoding_passed_as_a_flag_in_the_inputs_is_exact():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3, **NO_DROPOUT)
    model = transformers.ViTForImageClassification(cfg)
    X, y = _images(12)  # 9 patches; the position embeddings are made for 4
    with pytest.raises(ValueError, match="doesn't match model"):
        model.to(DT)(pixel_values=X[:1])  # without the flag the model refuses these images
    _check_mapping(model, {"pixel_values": X, "interpolate_pos_encoding": True}, y, panels=8)


def _clip_vision():
    return dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=8,
                patch_size=4, num_channels=3, dropout=0.0, attention_dropout=0.0)


def test_clip_image_classification_is_exact():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=30, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2, bos_token_id=0,
                                                   eos_token_id=2),
                                  vision_config=_clip_vision(), num_labels=3)
    X, y = _images(8)
    _check_mapping(transformers.CLIPForImageClassification(cfg), {"pixel_values": X}, y)


def test_clip_trained_contrastively_is_refused_naming_the_batch_coupling_and_a_per_sample_head():
    torch.manual_seed(0)
    cfg = transformers.CLIPConfig(text_config=dict(vocab_size=30, hidden_size=16, intermediate_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   max_position_embeddings=8, bos_token_id=0, eos_token_id=2),
                                  vision_config=_clip_vision(), projection_dim=8)
    X, _ = _images(8)
    tokens = torch.randint(1, 30, (N, 8), generator=torch.Generator().manual_seed(1))

    def contrastive(out, _t):  # CLIP's own loss: image i and text i match, every other pair of the batch not
        same = torch.arange(out.logits_per_image.shape[0])
        return (F.cross_entropy(out.logits_per_image, same) + F.cross_entropy(out.logits_per_text, same)) / 2

    refused = r"CLIPOutput, whose \['logits_per_image', 'logits_per_text'\] score every sample.*per-sample terms"
    with pytest.raises(UnsupportedModelError, match=refused + r".*CLIPForImageClassification"):
        train(transformers.CLIPModel(cfg), {"input_ids": tokens, "pixel_values": X[:N]}, torch.zeros(N), "mse",
              contrastive)
