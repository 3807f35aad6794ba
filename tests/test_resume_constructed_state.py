"""resume=True with an optimizer whose constructor builds state (Adagrad: ``step = 0`` and the initial sum).

``restore()`` takes such an optimizer for a fresh one and the resumed run equals an uninterrupted one bit for
bit; an optimizer that has taken a step holds other state and is still refused, naming the fix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import ConfigError

STEPS, CRASH = 6, 3


def _setup() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    return model, torch.optim.Adagrad(model.parameters(), lr=0.1, initial_accumulator_value=0.5, lr_decay=0.01)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(30, 4, dtype=torch.float64, generator=gen), torch.randint(0, 3, (30,), generator=gen)


def _train(model, opt, rec, X, y, steps: range) -> None:
    with rec:
        for s in steps:
            idx = torch.arange(5) + 5 * (s % 6)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()


def _cut_run(store) -> tuple[torch.Tensor, torch.Tensor]:
    """A run recorded for CRASH of its STEPS steps (as if the process died then); its data."""
    X, y = _data()
    model, opt = _setup()
    _train(model, opt, explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store),
           X, y, range(CRASH))
    return X, y


def test_a_fresh_adagrad_restores_and_continues_like_one_run(tmp_path):
    X, y = _cut_run(tmp_path / "cut")
    model, opt = _setup()
    assert len(opt.state) > 0  # torch built Adagrad's state in its constructor
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "cut",
                                      resume=True)
    assert rec.restore() == CRASH
    _train(model, opt, rec, X, y, range(CRASH, STEPS))

    whole_model, whole_opt = _setup()
    whole = explaind.TrajectoryRecorder(whole_model, whole_opt, loss="cross_entropy", train_data=(X, y),
                                        store=tmp_path / "whole")
    _train(whole_model, whole_opt, whole, X, y, range(STEPS))
    for (name, p), q in zip(model.named_parameters(), whole_model.parameters()):
        assert torch.equal(p, q), name
    resumed, uninterrupted = rec.trajectory, whole.trajectory
    assert resumed.n_steps == uninterrupted.n_steps == STEPS
    for name, value in uninterrupted.params(STEPS).items():
        assert torch.equal(resumed.params(STEPS)[name], value), name


def test_an_adagrad_that_took_a_step_is_refused_naming_the_fix(tmp_path):
    X, y = _cut_run(tmp_path / "cut")
    model, opt = _setup()
    F.cross_entropy(model(X[:5]), y[:5]).backward()
    opt.step()  # its state is now a step's, not the constructor's
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "cut",
                                      resume=True)
    with pytest.raises(ConfigError, match="holds state that differs.*Fix: open the recorder with resume=True on a "
                                          "fresh optimizer"):
        rec.restore()
