"""Kinks computed inside ``forward`` (``F.relu``, ``clamp``, ``torch.maximum``) are named by the cost notices.

A model written with ``F.relu`` holds no ``nn.ReLU`` module to find by type; before, the adaptive rule's cost
notice said "the model holds no module with a kink" for it and the cap warning blamed curvature or float32 casts.
:func:`explaind.kernel.jumps.watch_jumps` lists these calls when asked (``kinks=``), and the notices name them.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.kernel import planning
from explaind.kernel.jumps import KINKED_CALLS, watch_jumps

pytestmark = pytest.mark.usefixtures("one_thread")


class FunctionalNet(nn.Module):
    """Kinks as calls (``F.relu``, ``clamp``, ``maximum``, ``abs``) and one ``nn.ReLU`` module; the input's own
    ``relu`` reads no parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        x = F.relu(x)  # no parameter in it: no site
        h = F.relu(self.a(x))
        h = torch.maximum(self.b(h), 0.1 * h).clamp(-3.0, 3.0) + self.act(h).abs()
        return self.c(h)


def _probe(model: nn.Module, x: torch.Tensor) -> tuple[list[str], list[str]]:
    for p in model.parameters():
        p.requires_grad_(True)
    kinks: list[str] = []
    with torch.enable_grad(), watch_jumps(model, kinks) as jumps:
        model(x)
    return list(jumps), kinks


def test_the_probe_lists_the_calls_with_a_kink_by_module_and_no_jump():
    jumps, kinks = _probe(FunctionalNet().double(), torch.randn(2, 4, dtype=torch.float64))
    assert jumps == []
    assert kinks == ["<root> (FunctionalNet): torch.nn.functional.relu", "<root> (FunctionalNet): torch.maximum",
                     "<root> (FunctionalNet): Tensor.clamp", "act (ReLU): torch.nn.functional.relu",
                     "<root> (FunctionalNet): Tensor.abs"], kinks


def test_without_a_list_nothing_is_collected_and_the_jumps_are_as_before():
    model = FunctionalNet().double()
    with torch.enable_grad(), watch_jumps(model) as jumps:
        model(torch.randn(2, 4, dtype=torch.float64))
    assert jumps == []
    assert {"relu", "leaky_relu", "clamp", "maximum", "abs", "max_pool2d", "hardtanh"} <= KINKED_CALLS


def _trained(build) -> tuple[nn.Module, object, torch.Tensor]:
    torch.manual_seed(0)
    X, y = torch.randn(40, 4, dtype=torch.float64), torch.randint(0, 3, (40,))
    model = build().double()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:32], y[:32]))
    with rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory, X[32:]


def test_the_cost_notice_names_kinks_computed_in_forward(monkeypatch, caplog):
    monkeypatch.setattr(planning, "EVALS_NOTICE", 0.0)  # the notice is said at any count
    model, traj, X = _trained(FunctionalNet)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.planning"):
        explaind.KernelReplica().fit(traj).predict(X)
    said = [r.getMessage() for r in caplog.records if "evaluations per (step, input)" in r.getMessage()]
    assert said, caplog.records
    assert all("the path crosses activation kinks of 1 module(s) (ReLU at act) and 4 call(s) in forward (<root> "
               "(FunctionalNet): torch.nn.functional.relu" in s for s in said), said
    assert not any("holds no module with a kink" in s for s in said), said


class SmoothNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.a(F.relu(x))))  # the relu reads the input only


def test_a_smooth_model_still_holds_no_kink(monkeypatch, caplog):
    monkeypatch.setattr(planning, "EVALS_NOTICE", 0.0)
    model, traj, X = _trained(SmoothNet)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.planning"):
        explaind.KernelReplica().fit(traj).predict(X)
    said = [r.getMessage() for r in caplog.records if "evaluations per (step, input)" in r.getMessage()]
    assert said and all("holds no module with a kink" in s for s in said), said
