"""Hugging Face audio and vision models whose training forwards draw random numbers or couple the batch.

* Wav2Vec2 with SpecAugment (``mask_time_prob > 0``) draws its time masks with **NumPy** (``np.random`` in
  ``_compute_mask_indices``), not torch. Without capture the recorder refuses the run at its first training forward
  naming ``capture_random=True``; with ``capture_random=False`` (nothing replayed, no guard) the residual share
  warns. With ``capture_random=True`` the
  recorder saves NumPy's global state with the torch states before every training forward and the replay sets it:
  exact, also through a store, and recording leaves the loop's own NumPy draws unchanged.
* ConvNeXt with ``drop_path_rate > 0`` (stochastic depth with ``torch.rand`` in ``forward``, in no dropout module):
  refused at step 0 naming ``capture_random=True``, with which it is exact.
* ResNet from ``transformers`` (train-mode BatchNorm, running statistics per step): exact, batch statistics replayed.

Every model is trained in float64 with AdamW on its logits' cross entropy; "exact": replica <= 1e-6 relative to the
trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to a slow loop
reference that replays each micro-batch's batched training forward under the recorded states, one
``autograd.grad`` per sample (tests/replay_reference.py), NumPy's state set by the reference itself.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import DT, N, assert_exact, train
from replay_reference import BufferReference, ReplayReference
from torch.func import functional_call

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]

TARGET = [1, 2]


def _logits_ce(out, t):
    return F.cross_entropy(out.logits, t)


def _wav2vec2(mask_time_prob: float = 0.5):
    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(8, 8),
        conv_stride=(4, 2), conv_kernel=(8, 4), num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, final_dropout=0.0,
        layerdrop=0.0, mask_time_prob=mask_time_prob, mask_time_length=2, mask_feature_prob=0.0, num_labels=3,
        classifier_proj_size=8, feat_extract_norm="layer", do_stable_layer_norm=True)
    return transformers.Wav2Vec2ForSequenceClassification(cfg)


def _audio():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N + 2, 120, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)


class _NumpyReplayReference(ReplayReference):
    """Sets NumPy's global generator to each micro-batch's recorded state before its training forward.

    The state is unpacked here from the float64 tensor the step file holds: 624 MT19937 words, the position,
    ``has_gauss`` and the cached Gaussian.
    """

    def before_forward(self, module, step, micro):
        packed = self.traj.micro_batches(step)[micro].state.numpy.numpy()
        np.random.set_state(("MT19937", packed[:624].astype(np.uint32), int(packed[624]), int(packed[625]),
                             float(packed[626])))


def test_wav2vec2_spec_augment_without_capture_is_refused_naming_capture_random():
    X, y = _audio()
    with pytest.raises(TrajectoryError, match=r"numpy\.random \(the global state\).*capture_random=True"):
        train(_wav2vec2(), X[:N], y, "cross_entropy", _logits_ce)  # no dropout: nothing is captured


def test_wav2vec2_spec_augment_with_capture_random_false_warns_naming_capture_random():
    """``capture_random=False`` switches the forward's guard off and replays nothing: the residual share warns."""
    X, y = _audio()
    model, traj = train(_wav2vec2(), X[:N], y, "cross_entropy", _logits_ce, check=False, capture_random=False)
    with pytest.warns(ExplaindWarning, match=r"residual share.*capture_random=True"):
        explaind.InfluenceEstimator(keep=(), device="cpu").fit(traj).transform(X[N:])


def test_wav2vec2_spec_augment_with_capture_random_is_exact_through_a_store(tmp_path):
    X, y = _audio()
    np.random.seed(0)
    model, recorded = train(_wav2vec2(), X[:N], y, "cross_entropy", _logits_ce, capture_random=True,
                            store=tmp_path / "run")
    traj = explaind.Trajectory.load(tmp_path / "run", model=_wav2vec2().to(DT).eval(),
                                    train_data=(X[:N], y))
    states = [traj.micro_batches(s)[0].state.numpy for s in range(traj.n_steps)]
    assert all(st is not None and st.shape == (627,) for st in states) and not torch.equal(states[0], states[1])
    with torch.no_grad():
        truth = model(X[N:]).logits
    assert_exact(traj, X[N:], truth, _NumpyReplayReference(traj, X[N:], target=TARGET, panels=4), TARGET)


def test_recording_leaves_the_loops_numpy_draws_unchanged():
    X, y = _audio()
    finals = []
    for record in (False, True):
        np.random.seed(0)
        model = _wav2vec2().to(DT).train()
        opt = torch.optim.AdamW(model.parameters(), lr=0.02)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:N], y),
                                          capture_random=True, check_gradients=True) if record else None
        with rec if record else torch.enable_grad():
            for step in range(2):
                idx = torch.arange(4 * step, 4 * step + 4)
                opt.zero_grad()
                _logits_ce(model(X[idx]), y[idx]).backward()
                if record:
                    rec.log_batch(idx)
                opt.step()
        finals.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert torch.equal(finals[0], finals[1])


def _convnext():
    torch.manual_seed(0)
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=2, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1],
                                      drop_path_rate=0.3, num_labels=3, image_size=16)
    return transformers.ConvNextForImageClassification(cfg)


def _images(size: int):
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N + 2, 3, size, size, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)


def test_convnext_stochastic_depth_is_refused_then_exact_with_capture_random():
    X, y = _images(16)
    with pytest.raises(TrajectoryError, match=r"torch\.rand.*capture_random=True"):
        train(_convnext(), X[:N], y, "cross_entropy", _logits_ce)
    model, traj = train(_convnext(), X[:N], y, "cross_entropy", _logits_ce, capture_random=True)
    assert traj.manifest.coupled == ["ConvNextForImageClassification.forward"]
    with torch.no_grad():
        truth = model(X[N:]).logits
    assert_exact(traj, X[N:], truth, ReplayReference(traj, X[N:], target=TARGET, panels=4), TARGET)


class _LogitsBufferReference(BufferReference):
    """:class:`BufferReference` for a model returning a ``ModelOutput``: its ``logits`` of the one input."""

    def forward(self, vec, xi):
        step = next((s for s, th in enumerate(self.theta) if th is vec), self._s)
        params = {**self.constants, **self.betas[step], **self._unflat(vec)}
        return functional_call(self.model, params, (self.X[xi:xi + 1],)).logits[0]

    def kinks(self, s, xi, grid=16):
        """Where an ``nn.ReLU``'s input changes sign (the model keeps a few ReLUs whatever ``hidden_act``) or the
        embedder's 3x3 max pooling (padding 1, which the base class does not watch) switches its maximum: every sign
        change of a difference of two entries of a window (a superset of the switches). Located by bisection as the
        base class does."""
        pool, seen, relus = self.model.resnet.embedder.pooler, [], []
        hooks = [pool.register_forward_hook(lambda _m, inp, _out: seen.append(inp[0].detach()))]
        hooks += [m.register_forward_hook(lambda _m, inp, _out: relus.append(inp[0].detach().reshape(-1)))
                  for m in self.model.modules() if isinstance(m, torch.nn.ReLU)]
        pairs = torch.triu_indices(9, 9, 1)

        def pre(t: float) -> torch.Tensor:
            seen.clear()
            relus.clear()
            with torch.no_grad():
                self.forward(self.theta[s] + t * self.delta[s], xi)
            padded = F.pad(seen[0], (1, 1, 1, 1), value=-1e6)  # max pooling's padding never wins
            win = F.unfold(padded, 3, stride=2).reshape(seen[0].shape[1], 9, -1)
            return torch.cat([(win[:, pairs[0]] - win[:, pairs[1]]).reshape(-1), *relus])

        try:
            ts = np.linspace(0.0, 1.0, grid + 1)
            vals = [pre(float(t)) for t in ts]
            roots = []
            for j in range(grid):
                for unit in torch.nonzero(vals[j] * vals[j + 1] < 0).reshape(-1).tolist():
                    lo, hi, sign = float(ts[j]), float(ts[j + 1]), float(vals[j][unit]) > 0
                    for _ in range(32):  # t to 2e-10: the misplaced kink's share of the integral is below 1e-18
                        mid = 0.5 * (lo + hi)
                        lo, hi = (mid, hi) if (float(pre(mid)[unit]) > 0) == sign else (lo, mid)
                    roots.append(0.5 * (lo + hi))
        finally:
            for hook in hooks:
                hook.remove()
        return sorted(set(roots))

    def buffer_terms(self):
        """``f(theta_{s+1}, beta_{s+1}) - f(theta_{s+1}, beta_s)`` of the target logits, ``(N, n, 1)``."""
        out = torch.zeros_like(self.quad_error)
        with torch.no_grad():
            for s in range(self.N):
                for xi in range(self.X.shape[0]):
                    for beta, sign in ((self.betas[s + 1], 1.0), (self.betas[s], -1.0)):
                        params = {**self.constants, **beta, **self._unflat(self.theta[s + 1])}
                        logits = functional_call(self.model, params, (self.X[xi:xi + 1],)).logits[0]
                        out[s, xi, 0] += sign * logits[self.target[xi]]
        return out


def test_transformers_resnet_with_train_mode_batch_norm_is_exact():
    """``hidden_act="gelu"`` (a ReLU-dense path is another matter: docs/guide_own_model.md); the ReLUs the model keeps
    and its max pooling are kinks the reference locates."""
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=3, hidden_act="gelu")
    X, y = _images(8)
    model, traj = train(transformers.ResNetForImageClassification(cfg), X[:N], y, "cross_entropy", _logits_ce,
                        steps=2)
    assert len(traj.manifest.coupled) == 6 and traj.buffer_names  # every BatchNorm replayed, statistics per step
    with torch.no_grad():
        truth = model(X[N:]).logits
    ref = _LogitsBufferReference(traj, X[N:], target=TARGET, panels=2)
    # the reference's values at theta_{s+1} use beta_{s+1}, its path beta_s: the difference is the buffers term
    assert_exact(traj, X[N:], truth, ref, TARGET, ref_error=ref.quad_error - ref.buffer_terms())


def test_numpy_states_round_trip_and_a_corrupted_one_is_refused():
    from explaind.trajectory._numpy_random import numpy_state, set_numpy_state

    np.random.seed(3)
    np.random.randn(1)  # leaves a cached Gaussian (has_gauss = 1)
    state = numpy_state()
    drawn = (np.random.rand(3), np.random.randn(2))
    set_numpy_state(state, "step_000001")
    assert np.array_equal(np.random.rand(3), drawn[0]) and np.array_equal(np.random.randn(2), drawn[1])
    bad = state.clone()
    bad[5] = 2.5
    for corrupted in (bad, state[:10]):
        with pytest.raises(TrajectoryError, match=r"step_000001: the recorded NumPy random state.*corrupted"):
            set_numpy_state(corrupted, "step_000001")
