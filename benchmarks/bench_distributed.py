"""Store bytes per step, and the sharded estimators' time per process count (torchrun, gloo on CPU).

Prints two tables.

1. **Store**: a dense run folder's bytes per recorded step, measured as the growth of the
   folder between two recordings of the same run that differ only in length
   (``(bytes(S2) - bytes(S1)) / (S2 - S1)``), next to the model's parameter bytes.
2. **Processes**: wall time of each query on one process (no process group) and on N processes
   under ``torch.distributed.run`` (each timed between two barriers, after one untimed warm-up
   query), the speed-up, the shard arrangement (tests × blocks × steps) and the largest
   difference from the one-process result relative to its largest entry.

Run: ``python benchmarks/bench_distributed.py [--nproc 2] [--steps 30] [--n-test 16] [--root DIR]``.
On a machine with fewer free cores than processes the speed-up is capped by the cores, not the
method: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

#: Workload of the process table: an MLP on digits, AdamW, float64, mini-batches of 64.
MLP = {"architecture": "mlp", "model": {"hidden_sizes": [128]}, "dataset": "digits", "optimizer": "adamw",
       "lr": 0.01, "weight_decay": 0.1, "batch_size": 64, "dtype": "float64", "eval_every": 1000}
#: Models of the store table (float32, as trained by default).
STORE_CASES = {
    "mlp 64-128-10 / adamw": {**MLP, "dtype": "float32"},
    "modular transformer / adamw": {"architecture": "modular_transformer", "dataset": "modular",
                                    "data": {"p": 23, "n_train": 0.5, "n_val": 0.25}, "optimizer": "adamw",
                                    "weight_decay": 1.0, "eval_every": 1000},
    "mlp 64-128-10 / sgd": {**MLP, "dtype": "float32", "optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0},
}
#: name -> (number of test inputs: "all" or 1, estimator, parameters)
QUERIES = {
    "train (test shards)": ("all", "influence", {"keep": ["train"]}),
    "step,group (test shards)": ("all", "influence", {"keep": ["step", "group"]}),
    "train, 1 input (blocks)": (1, "influence", {"keep": ["train"], "memory_budget": "64MB"}),
    "step,group, 1 input (windows)": (1, "influence", {"keep": ["step", "group"]}),
    "replica (test shards)": ("all", "replica", {}),
    "replica, 1 input (windows)": (1, "replica", {}),
}


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def store_table(root: Path, s1: int, s2: int) -> None:
    """Bytes per step of a dense store, from two recordings of different length."""
    from explaind.studies.runs import train_run

    print(f"\nstore bytes per step (dense run folder; growth from {s1} to {s2} steps)")
    header = f"{'model':<30}{'params':>9}{'param bytes':>13}{'bytes/step':>12}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, config in STORE_CASES.items():
        sizes = []
        for steps in (s1, s2):
            folder = root / f"store-{name.replace(' ', '_').replace('/', '')}-{steps}"
            run = train_run({**config, "steps": steps}, folder, progress=False)
            sizes.append(_folder_bytes(folder))
        params = run.trajectory.params(0)
        n = sum(v.numel() for v in params.values())
        pbytes = sum(v.numel() * v.element_size() for v in params.values())
        per_step = (sizes[1] - sizes[0]) / (s2 - s1)
        print(f"{name:<30}{n:>9,}{pbytes:>13,}{per_step:>12,.0f}{per_step / pbytes:>7.2f}")


def _estimator(kind: str, params: dict):
    import explaind

    if kind == "replica":
        return explaind.KernelReplica(device="cpu", quadrature="gauss-legendre", nodes=2, **params)
    return explaind.InfluenceEstimator(device="cpu", quadrature="gauss-legendre", nodes=2, **params)


def worker(run_dir: str, out: str, n_test: int) -> None:
    """Time every query in this process (a torchrun rank when the group variables are set)."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    from explaind.studies.runs import load_run

    torch.set_num_threads(1)
    warnings.simplefilter("ignore")  # the fixed 2-node rule's quadrature-error warnings (same work either way)
    grouped = "WORLD_SIZE" in os.environ
    if grouped:
        dist.init_process_group("gloo")
    sync = dist.barrier if grouped else (lambda: None)
    run = load_run(run_dir)
    X = run.dataset.val[0][:n_test]
    timings, results = {}, {}
    _estimator("influence", {"keep": ["step"]}).fit(run.trajectory).transform(X[:1])  # warm-up
    for name, (n, kind, params) in QUERIES.items():
        Xq = X if n == "all" else X[:n]
        est = _estimator(kind, params).fit(run.trajectory)
        sync()
        start = time.perf_counter()
        if kind == "replica":
            value = torch.as_tensor(est.predict(Xq))
            shards = "-"
        else:
            att = est.transform(Xq)
            value = att.values
            shards = "x".join(str(v) for v in att.meta.get("shards", {"t": 1, "b": 1, "s": 1}).values())
        sync()
        timings[name] = {"seconds": time.perf_counter() - start, "shards": shards}
        results[name] = value.contiguous()
    if not grouped or dist.get_rank() == 0:
        save_file(results, out + ".safetensors")
        Path(out).write_text(json.dumps(timings))
    if grouped:
        sync()
        sys.stdout.flush()
        os._exit(0)  # no gloo teardown (see explaind.cli_launch.leave_group)


def process_table(root: Path, nproc: int, steps: int, n_test: int) -> None:
    """Time the queries on 1 and on ``nproc`` processes."""
    from safetensors.torch import load_file

    from explaind.studies.runs import train_run

    run_dir = root / "timed-run"
    train_run({**MLP, "steps": steps}, run_dir, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    this = str(Path(__file__).resolve())
    out1, outn = str(root / "one.json"), str(root / f"n{nproc}.json")
    subprocess.run([sys.executable, this, "--worker", str(run_dir), out1, "--n-test", str(n_test)], check=True,
                   env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                    this, "--", "--worker", str(run_dir), outn, "--n-test", str(n_test)], check=True, env=env)
    one, many = json.loads(Path(out1).read_text()), json.loads(Path(outn).read_text())
    r1, rn = load_file(out1 + ".safetensors"), load_file(outn + ".safetensors")
    print(f"\ntime per process count: MLP 64-128-10 on digits, AdamW, {steps} steps of 64, float64, "
          f"{n_test} test inputs, gauss-legendre 2; one torch thread per process; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    header = f"{'query':<32}{'1 proc s':>10}{f'{nproc} proc s':>10}{'speed-up':>10}{'shards':>9}{'max rel diff':>14}"
    print(header)
    print("-" * len(header))
    for name in QUERIES:
        t1, tn = one[name]["seconds"], many[name]["seconds"]
        ref = r1[name]
        diff = float((rn[name] - ref).abs().max() / ref.abs().max().clamp_min(1e-300))
        print(f"{name:<32}{t1:>10.2f}{tn:>10.2f}{t1 / tn:>10.2f}{many[name]['shards']:>9}{diff:>14.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30, help="recorded steps of the timed run")
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--store-steps", type=int, nargs=2, default=(10, 30), metavar=("S1", "S2"))
    parser.add_argument("--root", default=None, help="folder for the runs (default: a temp dir)")
    parser.add_argument("--worker", nargs=2, metavar=("RUN", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], args.worker[1], args.n_test)
        return
    root = Path(args.root or tempfile.mkdtemp(prefix="explaind-dist-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}; runs under {root}")
    store_table(root, *args.store_steps)
    process_table(root, args.nproc, args.steps, args.n_test)


if __name__ == "__main__":
    main()
