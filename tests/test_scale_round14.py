"""What breaks at real widths, checked at small ones (benchmarks/bench_scale.py measures the real widths).

The adaptive quadrature refines each test input on its own rows: a ``vmap`` over rows whose every row holds copies
of all the parameters. Those calls took ``chunk_size`` (256) rows whatever the model's size: 92 GB for a full-width
ResNet-18 in float64, killed for memory. They now take at most ``STACK_BYTES`` of copies
(``AutogradEvaluator.rows_per_call``); the tests shrink ``STACK_BYTES`` so that a small ReLU MLP meets the cap, count
the rows of every such call, and hold the results to the trained model and to the slow float64 loop reference. A
train-axis sweep that cannot meet ``memory_budget`` at its smallest chunks warns (it was a log line), and the
benchmark's ``--quick`` sizes run from the repository.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import Reference, rel_err
from resnet_model import ResNet18
from torch import nn

import explaind
from explaind.kernel import autograd

pytestmark = pytest.mark.usefixtures("one_thread")

N_TRAIN, BATCH, STEPS = 16, 8, 3
QUAD = {"quadrature": "adaptive", "tol": 1e-11}
ROWS = 3  # rows of parameter copies STACK_BYTES is shrunk to


def relu_run():
    """A float64 ReLU MLP (8-64-64-3, 4,931 parameters) after three SGD-momentum steps; the trained model in
    evaluation mode, its trajectory and three test inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3)).double()
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(N_TRAIN + 3, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN + 3,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:N_TRAIN], y[:N_TRAIN]))
    with rec:
        for _ in range(STEPS):
            idx = torch.randperm(N_TRAIN, generator=gen)[:BATCH]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[N_TRAIN:]


@pytest.fixture(scope="module")
def run():
    return relu_run()


@pytest.fixture
def counted(monkeypatch, run):
    """``STACK_BYTES`` shrunk to ``ROWS`` rows of the run's parameter copies; the rows of every per-row call."""
    D = sum(v.numel() for v in run[1].params(0).values())
    monkeypatch.setattr(autograd, "STACK_BYTES", ROWS * 4 * 8 * D)  # 4 copies a row (autograd.ROW_COPIES)
    seen: dict[str, list[int]] = {"slopes": [], "jvp": [], "jacobian": []}
    for name, key, arg in (("_slopes_rows", "slopes", 3), ("_jvp_pairs", "jvp", 2), ("_jac_pairs", "jacobian", 2)):
        original = getattr(autograd.AutogradEvaluator, name)

        def spy(self, *args, _original=original, _key=key, _arg=arg):
            seen[_key].append(int(args[_arg - 1].shape[0]))
            return _original(self, *args)

        monkeypatch.setattr(autograd.AutogradEvaluator, name, spy)
    return seen


def test_the_replicas_per_row_calls_hold_at_most_stack_bytes_of_parameter_copies_and_stay_exact(run, counted):
    model, traj, X_test = run
    replica = explaind.KernelReplica(device="cpu", factored="never", **QUAD).fit(traj).predict(X_test)
    assert counted["slopes"], "the adaptive rule refined no rows: the test does not reach the per-row calls"
    assert max(counted["slopes"]) <= ROWS  # 256 rows per call (chunk_size) before
    with torch.no_grad():
        assert rel_err(replica, as_numpy(model(X_test))) <= 1e-9


def test_train_scores_per_pair_jacobians_are_capped_too_and_match_the_loop_reference(run, counted):
    _, traj, X_test = run
    target = [0, 1, 2]
    att = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", factored="never", **QUAD).fit(
        traj).transform(X_test)
    assert counted["jacobian"] and max(counted["jacobian"]) <= ROWS  # the plan's Jacobian chunk before
    ref = Reference(traj, X_test, target=target)
    assert rel_err(as_numpy(att.values), reference_terms(ref, att)["values"]) <= 1e-9
    assert float(np.abs(att.completeness_error())) <= 1e-12


def test_rows_per_call_keeps_chunk_size_below_the_cap_and_never_goes_below_one_row(run):
    _, traj, _ = run
    fm = explaind.KernelReplica(device="cpu").fit(traj).engine_.fm
    ev = autograd.AutogradEvaluator(fm, chunk_size=256)
    D_full = sum(p.numel() for p in ResNet18().parameters())  # width 64: 4 float64 copies take 358 MB > 256 MiB
    assert ev.rows_per_call(1000, D_full) == 1
    assert ev.rows_per_call(1000, 1000) == 256
    assert autograd.AutogradEvaluator(fm, chunk_size=None).rows_per_call(1000, 1000) == 1000
    assert ev.rows_per_call(1000, 700_000) == 2**28 // (4 * 8 * 700_000)


def test_a_sweep_that_cannot_meet_memory_budget_warns_with_the_estimate_and_the_budget_that_would_hold_it(run):
    """A batch's per-sample gradients over the largest tensor alone pass a small budget: before, a log line only."""
    _, traj, X_test = run
    est = explaind.InfluenceEstimator(keep=("train",), target=[0, 1, 2], device="cpu", memory_budget=50_000, **QUAD)
    with pytest.warns(explaind.exceptions.ExplaindWarning,
                      match=r"exceeds memory_budget=5e-05 GB.*largest parameter tensor, 4096.*memory_budget='"):
        att = est.fit(traj).transform(X_test)
    ref = Reference(traj, X_test, target=[0, 1, 2])
    assert rel_err(as_numpy(att.values), reference_terms(ref, att)["values"]) <= 1e-9


def test_the_scale_benchmark_runs_at_its_quick_sizes_and_prints_one_row_per_case():
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_scale.py"), "--quick", "--cases", "fp16",
                           "--reference"], capture_output=True, text=True, env=env, cwd=root, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| fp16 |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert float(cells[8]) <= 1e-6 and float(cells[12]) <= 1e-12 and float(cells[13]) <= 1e-9  # replica, complete, ref
