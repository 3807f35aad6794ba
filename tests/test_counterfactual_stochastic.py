"""CounterfactualEstimator on dropout, batch-norm, private-generator and spectral-norm runs, against finite differences.

The retraining loop below fixes every forward's masks by seeding the generators itself (``torch.manual_seed`` and
the noise layer's own generator before each micro-batch's forward), so the perturbed runs draw exactly the masks
of the recorded run; the estimator instead replays the random states the recorder captured. The perturbed models
are evaluated in evaluation mode with their own running statistics, so the batch-norm derivative includes how the
retrained parameters move the running statistics. Spectral norm's power iteration draws nothing; a retrained run's
buffers ``u, v`` differ, and its training forwards read them (docs/maths.md §9, "Spectral norm").
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import explaind
import explaind.kernel.metagrad as metagrad
from explaind.exceptions import UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
M, H = 8, 1e-5
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 1], [2, 7, 0, 5], [3, 6, 1, 4], [0, 2, 4, 6]]


def _mlp() -> nn.Module:
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(DT)


class _Noise(nn.Module):
    """Multiplicative Gaussian noise in training mode from the layer's own generator (not the global one)."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (1 + 0.5 * torch.randn(x.shape, generator=self.gen, dtype=x.dtype)) if self.training else x


def _noise_mlp() -> nn.Module:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(3, 6), _Noise(), nn.Tanh(), nn.Linear(6, 3)).to(DT)


def _bn_cnn(momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3, momentum=momentum), nn.Tanh(), nn.Flatten(),
                         nn.Linear(27, 3)).to(DT)


def _spectral_mlp(iterations: int = 1) -> nn.Module:
    torch.manual_seed(3)  # spectral_norm draws the initial u, v
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    spectral_norm(model[0], n_power_iterations=iterations)
    spectral_norm(model[2])
    return model


CASES = {
    "dropout_mlp_sgd": (_mlp, (3,), torch.optim.SGD, {"lr": 0.3}, 1),
    "dropout_mlp_adam_two_micro_batches": (_mlp, (3,), torch.optim.Adam, {"lr": 0.05, "weight_decay": 0.01}, 2),
    "batchnorm_cnn_sgd_momentum": (_bn_cnn, (1, 5, 5), torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}, 1),
    "private_generator_noise_adam": (_noise_mlp, (3,), torch.optim.Adam, {"lr": 0.05}, 1),
    "batchnorm_cumulative_two_micro_batches": (lambda: _bn_cnn(None), (1, 5, 5), torch.optim.SGD,
                                               {"lr": 0.1, "momentum": 0.9}, 2),
    "spectral_norm_sgd_momentum": (_spectral_mlp, (3,), torch.optim.SGD, {"lr": 0.5, "momentum": 0.9}, 1),
    "spectral_norm_two_iterations_adam_two_micro_batches": (lambda: _spectral_mlp(2), (3,), torch.optim.Adam,
                                                            {"lr": 0.05}, 2),
}


def _data(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(31)
    X = torch.randn(M + 3, *shape, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (M,), generator=gen)
    return X[:M], y, X[M:]


def _train(case: str, scale: torch.Tensor | None = None, record: bool = False, window: tuple[int, int] = (0, 5)):
    """The loop: sample k's loss weighted ``scale[k] / |B|``, each micro-batch's masks from its own seed.

    ``window=(a, b)``: the loop stops after step ``b - 1`` and the weights are scaled in steps ``a <= s < b`` only
    (the state at ``a`` is then the recorded one: retraining from the recorded state at ``a``).
    """
    build, shape, cls, kwargs, micro = CASES[case]
    X, y, _ = _data(shape)
    model = build()
    opt = cls(model.parameters(), **kwargs)
    scale = torch.ones(M, dtype=DT) if scale is None else scale
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y)) if record else None
    if rec is not None:
        rec.__enter__()
    model.train()
    for s, batch in enumerate(BATCHES[:window[1]]):
        weight = scale if s >= window[0] else torch.ones(M, dtype=DT)
        opt.zero_grad()
        for j, part in enumerate(torch.tensor(batch).chunk(micro)):
            torch.manual_seed(1000 + 10 * s + j)
            for layer in model.modules():
                if isinstance(layer, _Noise):
                    layer.gen.manual_seed(2000 + 10 * s + j)
            losses = F.cross_entropy(model(X[part]), y[part], reduction="none")
            (losses * weight[part] / len(batch)).sum().backward()
            if rec is not None:
                rec.log_batch(part, torch.full((len(part),), 1.0 / len(batch), dtype=DT))
        opt.step()
    if rec is not None:
        rec.__exit__(None, None, None)
        return rec.trajectory
    return model.eval()


def _finite_differences(case: str, X_test: torch.Tensor, window: tuple[int, int] = (0, 5)) -> torch.Tensor:
    """Central differences of the retrained model's evaluation-mode outputs, ``(T, M, O)``."""
    out = []
    for k in range(M):
        up, down = torch.ones(M, dtype=DT), torch.ones(M, dtype=DT)
        up[k], down[k] = 1 + H, 1 - H
        plus, minus = _train(case, up, window=window), _train(case, down, window=window)
        with torch.no_grad():
            out.append((plus(X_test) - minus(X_test)) / (2 * H))
    return torch.stack(out, 1)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("case", sorted(CASES))
def test_metagradient_of_a_stochastic_run_matches_finite_differences(case):
    traj = _train(case, record=True)
    assert traj.manifest.random_capture
    X_test = _data(CASES[case][1])[2]
    att = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj).transform(X_test)
    fd = _finite_differences(case, X_test)
    assert att.values.shape == fd.shape
    assert _rel(att.values, fd) <= 1e-6
    assert att.meta["replay_residual"] <= 1e-12  # the replayed updates are the recorded ones
    trained = _train(case)
    with torch.no_grad():  # final is the trained model in evaluation mode, running statistics included
        assert _rel(att.final, trained(X_test)) <= 1e-12


@pytest.mark.parametrize("case", ["batchnorm_cnn_sgd_momentum", "dropout_mlp_adam_two_micro_batches",
                                  "spectral_norm_two_iterations_adam_two_micro_batches"])
def test_sample_chunks_of_the_replayed_forward_do_not_change_the_result(case):
    """Per-sample gradients through the replayed batched forward, 1 or 3 at a time, equal all at once to 1e-12."""
    traj = _train(case, record=True)
    X_test = _data(CASES[case][1])[2]
    whole = explaind.CounterfactualEstimator(device="cpu", chunk_size=None).fit(traj).transform(X_test).values
    for chunk in (1, 3):
        got = explaind.CounterfactualEstimator(device="cpu", chunk_size=chunk).fit(traj).transform(X_test).values
        assert _rel(got, whole) <= 1e-12


@pytest.mark.parametrize("case", ["batchnorm_cumulative_two_micro_batches", "dropout_mlp_adam_two_micro_batches",
                                  "spectral_norm_two_iterations_adam_two_micro_batches"])
def test_a_window_of_a_stochastic_run_matches_finite_differences(case):
    """``steps=(2, 4)``: theta, optimizer state and running statistics at step 2 held, f taken at step 4."""
    traj = _train(case, record=True)
    X_test = _data(CASES[case][1])[2]
    att = explaind.CounterfactualEstimator(device="cpu", steps=(2, 4)).fit(traj).transform(X_test)
    assert _rel(att.values, _finite_differences(case, X_test, window=(2, 4))) <= 1e-6
    at_start, at_stop = _train(case, window=(0, 2)), _train(case, window=(0, 4))
    with torch.no_grad():
        assert _rel(att.initial, at_start(X_test)) <= 1e-12 and _rel(att.final, at_stop(X_test)) <= 1e-12


def test_without_the_replay_the_dropout_metagradient_is_wrong(monkeypatch):
    """The evaluation-mode metagradient of before (no masks) fails the comparison above."""
    case = "dropout_mlp_sgd"
    traj = _train(case, record=True)
    X_test = _data(CASES[case][1])[2]
    fd = _finite_differences(case, X_test)
    monkeypatch.setattr(metagrad, "step_replay", lambda traj, s: None)
    est = explaind.CounterfactualEstimator(device="cpu")
    att = est.fit(traj).transform(X_test)
    assert _rel(att.values, fd) > 1e-2
    assert est.replay_residual_ > 1e-2


def test_without_the_running_statistics_the_batchnorm_metagradient_is_wrong(monkeypatch):
    """Holding the running statistics fixed (no lambda^beta) misses part of the retrained model's change."""
    case = "batchnorm_cnn_sgd_momentum"
    traj = _train(case, record=True)
    X_test = _data(CASES[case][1])[2]
    fd = _finite_differences(case, X_test)
    monkeypatch.setattr(metagrad, "running_stats", lambda fm, names, owner: ())
    att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)
    assert _rel(att.values, fd) > 1e-3


def test_without_the_power_iteration_term_the_spectral_norm_metagradient_is_wrong(monkeypatch):
    """Holding u, v fixed (no lambda^beta through the power iteration) misses part of the retrained model's change."""
    case = "spectral_norm_sgd_momentum"
    traj = _train(case, record=True)
    X_test = _data(CASES[case][1])[2]
    fd = _finite_differences(case, X_test)
    assert _rel(explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test).values, fd) <= 1e-8
    monkeypatch.setattr(metagrad, "power_iterations", lambda fm, names, owner: ())
    att = explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)
    assert _rel(att.values, fd) > 1e-3


def _hook_based_spectral_norm() -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook-based API is deprecated on some torch versions
        nn.utils.spectral_norm(model[0])
    return model


class _Counter(nn.Module):
    """Counts its training forwards in a float buffer: a buffer training changes that is no running statistic."""

    def __init__(self):
        super().__init__()
        self.register_buffer("seen", torch.zeros((), dtype=DT))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen += 1
        return x


def test_a_changing_buffer_that_is_not_a_running_statistic_is_refused():
    X_test = _data((3,))[2]
    torch.manual_seed(7)
    traj = _two_plain_steps(nn.Sequential(nn.Linear(3, 4), _Counter(), nn.Tanh(), nn.Linear(4, 3)).to(DT))
    assert traj.buffer_names == ("1.seen",)
    with pytest.raises(UnsupportedModelError, match=r"changed the buffers \['1.seen'\].*not batch-norm running "
                                                    r"statistics.*Fix: keep those buffers constant"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)


def _two_plain_steps(model: nn.Module, **recorder):
    """Two SGD steps of the plain loop over ``model`` (unweighted batches), recorded with ``recorder`` options."""
    X, y, _ = _data((3,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), **recorder)
    with rec:
        for batch in BATCHES[:2]:
            opt.zero_grad()
            F.cross_entropy(model(X[batch]), y[batch]).backward()
            rec.log_batch(torch.tensor(batch))
            opt.step()
    return rec.trajectory


def test_the_hook_based_spectral_norm_is_refused_naming_the_parametrization(tmp_path):
    X_test = _data((3,))[2]
    _two_plain_steps(_hook_based_spectral_norm(), store=tmp_path / "run")
    traj = explaind.Trajectory.load(tmp_path / "run", model=_hook_based_spectral_norm())  # no forward has run
    with pytest.raises(UnsupportedModelError, match=r"'0' uses the hook-based torch\.nn\.utils\.spectral_norm.*"
                                                    r"Allowed: torch\.nn\.utils\.parametrizations\.spectral_norm\. "
                                                    r"Fix: apply that one"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(X_test)


def test_a_spectral_norm_run_recorded_without_its_forwards_is_refused_naming_the_capture():
    traj = _two_plain_steps(_spectral_mlp(), capture_random=False, check_gradients=False)
    with pytest.raises(UnsupportedModelError, match=r"step 1 of this run with spectral norm ran no training forward "
                                                    r"that can be replayed.*Fix: record with capture_random='auto'"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj).transform(_data((3,))[2])
