"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: explain a tiny run in shards.

Every rank computes the attributions of its shard of the test inputs and gets the gathered result;
rank 0 writes it to ``argv[1]`` (safetensors) for the test to compare with one process.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from engine_testkit import engine_run
from safetensors.torch import save_file

import explaind

QUERIES = {
    "train": {"keep": ("train",), "target": [0, 2, 1, 1]},
    "step_group": {"keep": ("step", "group")},
    "param": {"keep": ("param",), "split": False},
}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    run = engine_run("relu", "adamw")
    results = {}
    for name, kwargs in QUERIES.items():
        att = explaind.InfluenceEstimator(device="cpu", **kwargs).fit(run.trajectory).transform(run.X_test)
        assert att.meta["processes"] == dist.get_world_size()
        results[f"{name}.values"] = att.values.contiguous()
        results[f"{name}.quadrature_error"] = att.quadrature_error.contiguous()
        results[f"{name}.residual"] = att.residual.contiguous()
    results["replica"] = torch.as_tensor(explaind.KernelReplica(device="cpu").fit(run.trajectory).predict(run.X_test))
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
