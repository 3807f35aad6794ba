"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: explain a tiny run in shards.

Every rank computes its share (test inputs × parameter blocks × step windows, :mod:`explaind.kernel.shard`)
and gets the summed result; rank 0 writes it to ``argv[1]`` (safetensors) for the test to compare with
one process, with the shard arrangement each case used.
"""

from __future__ import annotations

import functools
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from engine_testkit import engine_run
from safetensors.torch import save_file
from torch import nn

import explaind

#: name -> (number of test inputs, InfluenceEstimator parameters, expected (tests, blocks, steps) on 2 ranks)
CASES = {
    "train": (4, {"keep": ("train",), "target": [0, 2, 1, 1]}, (2, 1, 1)),
    "train_3_inputs": (3, {"keep": ("train", "group")}, (2, 1, 1)),
    "train_blocks": (1, {"keep": ("train",)}, (1, 2, 1)),
    "step_train_blocks": (1, {"keep": ("step", "train"), "target": [1]}, (1, 2, 1)),
    "step_group": (4, {"keep": ("step", "group")}, (2, 1, 1)),
    "step_window_jvp": (1, {"keep": ("step",)}, (1, 1, 2)),
    "group_window_jacobian": (1, {"keep": ("step", "group")}, (1, 1, 2)),
    "param_window": (1, {"keep": ("param",)}, (1, 1, 2)),
    "param": (4, {"keep": ("param",), "split": False}, (2, 1, 1)),
    "whole_window": (1, {"keep": ("step", "param"), "split": False}, (1, 1, 2)),
    "late_window": (1, {"keep": ("group",), "steps": (3, 6)}, (1, 1, 2)),
}

#: name -> number of test inputs of the replica (1: two step windows)
REPLICAS = {"replica": 4, "replica_window": 1}
#: name -> (test inputs, parameters, expected shards) on a run whose BatchNorm statistics move (buffers terms)
BN_CASES = {
    "bn_step_window": (1, {"keep": ("step",)}, (1, 1, 2)),
    "bn_train": (3, {"keep": ("train",)}, (2, 1, 1)),
}


@functools.cache
def bn_run() -> tuple[explaind.Trajectory, torch.Tensor]:
    """A conv net with train-mode BatchNorm, SGD with momentum, 4 steps of 5 (float64), and 3 test inputs."""
    gen = torch.Generator().manual_seed(10)
    X = torch.randn(18, 1, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (18,), generator=gen)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:15], y[:15]))
    order = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(4):
            idx = torch.randperm(15, generator=order)[:5]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[15:]


def _save(results: dict, name: str, att: explaind.Attribution) -> None:
    results[f"{name}.shards"] = torch.tensor([att.meta["shards"][k] for k in ("tests", "blocks", "steps")])
    for field in ("values", "regularization", "residual", "quadrature_error", "initial", "final", "buffers"):
        if getattr(att, field, None) is not None:
            results[f"{name}.{field}"] = getattr(att, field).contiguous()
    results[f"{name}.evals"] = torch.tensor(att.meta["evals_per_step"], dtype=torch.float64)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    run = engine_run("relu", "adamw")
    results = {}
    for name, (n, kwargs, _) in CASES.items():
        att = explaind.InfluenceEstimator(device="cpu", **kwargs).fit(run.trajectory).transform(run.X_test[:n])
        assert att.meta["processes"] == dist.get_world_size()
        _save(results, name, att)
    traj, X_bn = bn_run()
    for name, (n, kwargs, _) in BN_CASES.items():
        _save(results, name, explaind.InfluenceEstimator(device="cpu", **kwargs).fit(traj).transform(X_bn[:n]))
    results["bn_replica"] = torch.as_tensor(explaind.KernelReplica(device="cpu").fit(traj).predict(X_bn[:1]))
    alone = explaind.InfluenceEstimator(device="cpu", keep=("step",), distributed="off").fit(run.trajectory)
    results["off.values"] = alone.transform(run.X_test).values.contiguous()
    assert "processes" not in alone.sweep_  # distributed="off": this process computed everything
    for name, n in REPLICAS.items():
        replica = explaind.KernelReplica(device="cpu").fit(run.trajectory)
        results[name] = torch.as_tensor(replica.predict(run.X_test[:n]))
        report = replica.fidelity_report(run.X_test[:n])
        for key in ("quadrature_error", "evals_per_step"):
            results[f"{name}.{key}"] = torch.as_tensor(report[key])
    if dist.get_rank() == 0:
        save_file(results, out)
    dist.barrier()
    # leave without tearing the gloo group down: its destructor can abort a process that is exiting
    # ("terminate called without an active exception") after every result is already written
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(sys.argv[1])
