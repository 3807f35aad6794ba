"""Work sharded over two torch.distributed processes (gloo, launched by torchrun) equals one process.

The cases cover each arrangement of :mod:`explaind.kernel.shard`: test shards (4 and, uneven, 3
inputs), parameter-block shards (one input, ``train`` kept, so no step windows) and step windows
(one input; the JVP path, the Jacobian sweeps with the split and the whole-update sweep, a window
that starts mid-run), and the replica over test shards and step windows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from _distributed_job import BN_CASES, CASES, REPLICAS, bn_run
from engine_testkit import engine_run, rel
from safetensors.torch import load_file

import explaind


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "sharded.safetensors"
    job = Path(__file__).with_name("_distributed_job.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(job), str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out))


def _close(a, b, tol=1e-12):
    """Equal to ``tol`` relative to the larger of 1e-3 and the largest entry (rounding of sums in another order)."""
    return float((a - b).abs().max()) <= tol * max(1e-3, float(b.abs().max()))


def _compare(sharded, name, layout, att):
    assert "processes" not in att.meta and "shards" not in att.meta
    assert tuple(sharded[f"{name}.shards"].tolist()) == layout
    assert rel(sharded[f"{name}.values"], att.values) <= 1e-12, name
    for field in ("regularization", "residual", "quadrature_error", "initial", "final", "buffers"):
        if getattr(att, field, None) is not None:
            assert _close(sharded[f"{name}.{field}"], getattr(att, field)), (name, field)
        else:
            assert f"{name}.{field}" not in sharded, (name, field)
    assert _close(sharded[f"{name}.evals"], att.values.new_tensor(att.meta["evals_per_step"])), name


@pytest.mark.parametrize("name", list(CASES))
def test_two_processes_equal_one(sharded, name):
    n, kwargs, layout = CASES[name]
    run = engine_run("relu", "adamw")
    att = explaind.InfluenceEstimator(device="cpu", **kwargs).fit(run.trajectory).transform(run.X_test[:n])
    _compare(sharded, name, layout, att)


@pytest.mark.parametrize("name", list(BN_CASES))
def test_buffers_terms_shard_like_the_rest(sharded, name):
    n, kwargs, layout = BN_CASES[name]
    traj, X = bn_run()
    att = explaind.InfluenceEstimator(device="cpu", **kwargs).fit(traj).transform(X[:n])
    assert float(att.buffers.abs().max()) > 1e-6  # the running statistics moved the outputs
    _compare(sharded, name, layout, att)
    if name == "bn_step_window":
        assert rel(sharded["bn_replica"], explaind.KernelReplica(device="cpu").fit(traj).predict(X[:1])) <= 1e-12


@pytest.mark.parametrize("name", list(REPLICAS))
def test_two_processes_replicate_like_one(sharded, name):
    run = engine_run("relu", "adamw")
    X = run.X_test[:REPLICAS[name]]
    replica = explaind.KernelReplica(device="cpu").fit(run.trajectory)
    assert rel(sharded[name], replica.predict(X)) <= 1e-12
    report = replica.fidelity_report(X)
    for key in ("quadrature_error", "evals_per_step"):
        assert _close(sharded[f"{name}.{key}"], sharded[name].new_tensor(report[key])), key


def test_distributed_off_computes_everything_in_each_process(sharded):
    run = engine_run("relu", "adamw")
    att = explaind.InfluenceEstimator(device="cpu", keep=("step",)).fit(run.trajectory).transform(run.X_test)
    assert float((sharded["off.values"] - att.values).abs().max()) == 0.0
