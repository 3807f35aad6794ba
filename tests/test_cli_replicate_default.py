"""``explaind replicate RUN`` without a rule: the adaptive rule meets the tolerance it states, or it warns.

The run is kink-dense on purpose: a modular transformer trained in float64 with a large learning rate, whose
steps cross many ReLU kinks. There the adaptive rule at the replica's own tolerance, 1e-7 (the command's default
when its cost fits ``--max-evals``), integrates some (step, input) pairs on a grid and misses it (and warns); the
default on longer runs, the adaptive rule on 2-node panels at 1e-3 (``fidelity.DEFAULT_RULES[1]``), meets 1e-3 on
every pair without a warning.

Each pair's error is measured here independently of the engine: the replica of the one-step window
``[s, s+1]`` (``KernelReplica.predict``) against :math:`g(\\theta_{s+1}, x)` from the model's own forward
pass, relative to the step's change :math:`\\max_o |g_o(\\theta_{s+1}, x) - g_o(\\theta_s, x)|` of the same
input (the tolerance of the adaptive rule, docs/engine.md section 2).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch.func import functional_call

import explaind
from explaind.cli import main
from explaind.exceptions import ExplaindWarning
from explaind.studies import fidelity
from explaind.studies.runs import load_run

STEPS, N_TEST = 16, 32


@pytest.fixture(scope="module")
def kinky(tmp_path_factory):
    run = tmp_path_factory.mktemp("replicate") / "kinky"
    assert main(["-q", "train", "--out", str(run), "-a", "modular_transformer", "-d", "modular", "--data", "p=11",
                 "--data", "n_train=0.6", "--data", "n_val=null", "--model", "d_model=16", "--model", "n_heads=2",
                 "--model", "d_mlp=64", "--lr", "3e-2", "--weight-decay", "2", "--betas", "0.9", "0.98", "--steps",
                 str(STEPS), "--dtype", "float64"]) == 0
    return run


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def _pair_errors(run, rule: fidelity.Rule) -> tuple[torch.Tensor, list[str]]:
    """Each (step, input) pair's error relative to its change, ``(STEPS, N_TEST)``, by a loop of one-step replicas;
    and the warnings those replicas gave."""
    traj = run.trajectory
    X = run.dataset.val[0][:N_TEST]
    model = traj.model
    tol = {} if rule.tol is None else {"tol": rule.tol}
    rel, said = [], []
    with torch.no_grad():
        g = [functional_call(model, {k: v.double() for k, v in traj.params(s).items()}, (X,)).double()
             for s in range(STEPS + 1)]
    for s in range(STEPS):
        replica = explaind.KernelReplica(quadrature=rule.quadrature, nodes=rule.nodes, steps=(s, s + 1), device="cpu",
                                         **tol).fit(traj)
        out, warned = _caught(lambda r=replica: r.predict(X))
        said += warned
        err = (torch.as_tensor(out, dtype=torch.float64) - g[s + 1]).abs().amax(-1)
        rel.append(err / (g[s + 1] - g[s]).abs().amax(-1))
    return torch.stack(rel), said


#: Between the lower bounds of the first two default rules (12 and 2 evaluations per step and input): the command
#: passes over the adaptive rule at 1e-7 for the 2-node one at 1e-3, as on the quickstart's run at the default budget.
BUDGET = 4 * STEPS * N_TEST


def test_replicate_defaults_to_the_replicas_own_tolerance_when_it_fits(kinky, capsys):
    (code, _) = _caught(lambda: main(["-q", "--json", "replicate", str(kinky), "--n-test", str(N_TEST)]))
    assert code == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["rule"] == "adaptive" and row["tol"] == 1e-7


def test_replicate_falls_back_to_a_rule_that_meets_its_tolerance_without_a_warning(kinky, capsys):
    budget = ["--max-evals", str(BUDGET)]
    (code, warned) = _caught(lambda: main(["--json", "replicate", str(kinky), "--n-test", str(N_TEST), *budget]))
    assert code == 0 and warned == []
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["rule"] == "adaptive-2" and row["tol"] == 1e-3
    assert row["step error"] <= row["tol"]
    # the same rule, pair by pair, measured by the loop
    rel, warned = _pair_errors(load_run(kinky), fidelity.DEFAULT_RULES[1])
    assert warned == []
    assert float(rel.max()) <= 1e-3 * (1 + 1e-6)
    assert float(rel.max()) > 1e-6  # the path is not smooth: 1e-3 is not met by accident of a tiny error
    assert main(["replicate", str(kinky), "--n-test", str(N_TEST), "--steps", "0:4", "--max-evals", "600"]) == 0
    captured = capsys.readouterr()
    assert "adaptive-2 at tol 0.001: largest step error " in captured.out
    assert "adaptive, tol 1e-07 would take at least 1,536 path-gradient evaluations, more than --max-evals 600" \
        in captured.err


@pytest.mark.parametrize("rule", [fidelity.Rule("adaptive"), fidelity.Rule("gauss-legendre", 2)],
                         ids=["adaptive-1e-7", "gauss-legendre-2"])
def test_a_rule_that_misses_the_tolerance_warns(kinky, rule):
    # the replica's tolerance, 1e-7: on this path some pairs stay above it, and every step replica that leaves one
    # there says so
    rel, warned = _pair_errors(load_run(kinky), rule)
    above = rel > 1e-7 * 1.01
    assert int(above.sum()) > 0
    assert len(warned) >= int(above.any(-1).sum())
    assert all("above tol=1e-07" in w for w in warned)
