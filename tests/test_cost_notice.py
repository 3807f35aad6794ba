"""The adaptive rule says what a kink-rich path costs: the mean on the bar, one warning above the level.

Expectations are written here: the mean evaluations per (step, input) as a plain sum over Python integers of
synthetic plans, and, on real runs, the count the replica's own ``fidelity_report`` gives. A path that is
smooth (tanh) never passes the level; a ReLU path trained at a large learning rate refines past a lowered
level and is said to once, naming ``tol``; the CLI's announcement names the cap for the adaptive rule only.
"""

from __future__ import annotations

import logging
import re

import pytest
import torch
from test_dense_warnings import _run  # a 4-32-3 MLP, SGD at the given lr, 3 steps, 6 test inputs
from torch import nn

import explaind
from explaind.kernel import planning
from explaind.kernel.adaptive import MAX_EVALS
from explaind.kernel.quadrature import NodePlan

pytestmark = pytest.mark.usefixtures("one_thread")
LOGGER = "explaind.kernel.planning"


def _plan(evals: list[int]) -> NodePlan:
    T = len(evals)
    return NodePlan(torch.zeros(T, 1), torch.ones(T, 1), torch.zeros(T, 2), torch.zeros(T, 2),
                    torch.tensor(evals))


class _Bar:
    def __init__(self):
        self.shown: list[str] = []

    def set_postfix_str(self, text: str) -> None:
        self.shown.append(text)


def _notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and "evaluations per (step, input)" in
            r.getMessage()]


def test_mean_on_the_bar_and_one_warning_once_the_mean_passes_the_level(caplog):
    groups = [[[4, 4, 12], [40, 4, 4]], [[300, 250, 190], [400, 120, 40]], [[500, 500, 500]]]
    notice, bar = planning.CostNotice(1e-7, n_steps=5), _Bar()
    spent = units = 0
    expected_bar, said_after = [], None
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for k, group in enumerate(groups):
            notice.add([_plan(e) for e in group], bar)
            for e in group:
                spent, units = spent + sum(e), units + len(e)
            expected_bar.append(f"{spent / units:.0f} evaluations per (step, input)")
            if said_after is None and spent / units > planning.EVALS_NOTICE:
                said_after = (k, spent / units, sum(len(g) for g in groups[:k + 1]))
    assert bar.shown == expected_bar
    said = _notices(caplog)
    assert len(said) == 1 and said_after is not None and said_after[0] == 1  # passed in the second group, said once
    assert f"spent {said_after[1]:.0f} evaluations per (step, input)" in said[0]
    assert "up to 400 for one" in said[0] and f"the first {said_after[2]} of 5 steps (1 left)" in said[0]
    assert "to reach tol=1e-07" in said[0] and "The lever is tol: tol=1e-05 " in said[0]
    assert [r.levelno for r in caplog.records if r.name == LOGGER] == [logging.WARNING]


def test_below_the_level_nothing_is_said(caplog):
    notice = planning.CostNotice(1e-7, n_steps=2)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        notice.add([_plan([100, 100]), _plan([100, 99])], _Bar())  # a mean of exactly the level is not above it
    assert not _notices(caplog)
    notice.add([], object())  # a bar without a postfix (progress off) is fine


def test_a_kink_rich_replica_is_said_with_the_count_of_its_fidelity_report(caplog, monkeypatch):
    _, traj, X = _run(nn.ReLU, 2.0)
    monkeypatch.setattr(planning, "EVALS_NOTICE", 6)  # a level this small path passes
    rep = explaind.KernelReplica().fit(traj)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = rep.fidelity_report(X)
    mean = float(report["total_evals"]) / (traj.n_steps * X.shape[0])
    assert mean > 6
    said = _notices(caplog)
    assert len(said) == 1
    got = re.search(r"spent (\d+) evaluations per \(step, input\) on average \(up to (\d+) for one\) over all "
                    r"(\d+) steps to reach tol=1e-07", said[0])
    assert got is not None and int(got.group(1)) == round(mean) and got.group(3) == str(traj.n_steps)


def test_a_smooth_replica_is_not_said(caplog):
    _, traj, X = _run(nn.Tanh, 0.5)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        report = explaind.KernelReplica().fit(traj).fidelity_report(X)
    assert float(report["total_evals"]) / (traj.n_steps * X.shape[0]) <= planning.EVALS_NOTICE
    assert not _notices(caplog)


def test_the_cli_announces_the_adaptive_rules_cap_and_a_fixed_rules_count():
    from explaind.cli_commands import _announce
    from explaind.studies.fidelity import Rule

    said: list[str] = []

    class Out:
        def info(self, text: str) -> None:
            said.append(text)

    _announce(Out(), "replicate", Rule("adaptive"), 40, 64)
    _announce(Out(), "replicate", Rule("midpoint", 100), 40, 64)
    assert f"up to about {MAX_EVALS:,} per step and input" in said[0]
    assert f"above {planning.EVALS_NOTICE} on average" in said[0]
    assert said[1] == f"replicate: midpoint-100 over 40 steps x 64 inputs = {100 * 40 * 64:,} path-gradient evaluations"
