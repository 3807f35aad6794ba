"""Test inputs sharded over two torch.distributed processes (gloo, launched by torchrun) equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _distributed_job import QUERIES
from engine_testkit import engine_run, rel
from safetensors.torch import load_file

import explaind


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "sharded.safetensors"
    job = Path(__file__).with_name("_distributed_job.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(job), str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = load_file(str(out))
    run = engine_run("relu", "adamw")
    for name, kwargs in QUERIES.items():
        att = explaind.InfluenceEstimator(device="cpu", **kwargs).fit(run.trajectory).transform(run.X_test)
        assert "processes" not in att.meta
        assert rel(sharded[f"{name}.values"], att.values) <= 1e-12, name
        assert rel(sharded[f"{name}.quadrature_error"], att.quadrature_error) <= 1e-12 or float(
            (sharded[f"{name}.quadrature_error"] - att.quadrature_error).abs().max()) <= 1e-15, name
        assert float((sharded[f"{name}.residual"] - att.residual).abs().max()) <= 1e-12 * max(
            1.0, float(att.residual.abs().max())), name
    replica = explaind.KernelReplica(device="cpu").fit(run.trajectory).predict(run.X_test)
    assert rel(sharded["replica"], replica) <= 1e-12
