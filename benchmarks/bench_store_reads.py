"""Step-file reads of the demo's queries on a stored run, and the CPU time of one read.

For a store (``explaind demo``'s ``OUT/run``, or any ``explaind train --out RUN``), runs the demo's fidelity
rules (:data:`explaind.studies.demo.DEMO_RULES`) and the report's step x group query on ``--n-test``
validation inputs, counting the step files each reads (``read_tensors`` calls), then reads every step file
once more with an empty cache and times it (checksum, decoding and the checks of what was read). The
script uses the public API only, so the same command runs on an older checkout for the figures before.

Prints one table: query, CPU seconds, step-file reads, reads per step; then the CPU milliseconds per step
file. State the load (``uptime``, printed before and after) next to the figures.

Run: ``python benchmarks/bench_store_reads.py RUN [--n-test N]`` (``RUN``: the folder holding ``run.json``).
"""

from __future__ import annotations

import argparse
import collections
import os
import time

import torch


def _uptime() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="run folder (holds run.json and trajectory/)")
    parser.add_argument("--n-test", type=int, default=8, help="validation inputs of the step x group query")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(_uptime())

    import explaind.trajectory.disk as disk
    from explaind.studies import analysis, fidelity
    from explaind.studies.demo import DEMO_RULES
    from explaind.studies.runs import load_run

    reads: collections.Counter = collections.Counter()
    original = disk.read_tensors

    def counted(root, record, step=None):  # noqa: ANN001, ANN202 - the signature of read_tensors
        reads[step] += 1
        return original(root, record, step)

    disk.read_tensors = counted
    run = load_run(args.run)
    n = int(run.trajectory.n_steps)
    rows = []
    for rule in DEMO_RULES:
        reads.clear()
        t = time.process_time()
        fidelity.run_fidelity(run, [rule], n_test=4, progress=False, setup="demo", warn=False)
        rows.append((f"fidelity {rule.quadrature}-{rule.nodes}", time.process_time() - t, sum(reads.values())))
    reads.clear()
    t = time.process_time()
    analysis.influence(run, keep=("step", "group"), n_test=args.n_test, quadrature=fidelity.SCORES_RULE.quadrature,
                       nodes=fidelity.SCORES_RULE.nodes, tol=fidelity.SCORES_TOL)
    rows.append((f"step x group, {args.n_test} inputs", time.process_time() - t, sum(reads.values())))
    print(f"{'query':<28} {'CPU s':>8} {'reads':>7} {'per step':>9}")
    for name, cpu, count in rows:
        print(f"{name:<28} {cpu:8.1f} {count:7d} {count / n:9.2f}")

    traj = run.trajectory
    t = time.process_time()
    for s in range(n):
        traj._cache.clear()  # noqa: SLF001 - an empty cache: every step read from its file
        traj.batch(s)
    per_file = (time.process_time() - t) / n * 1e3
    print(f"one step file read, verified and checked: {per_file:.2f} ms CPU ({n} files)")
    print(_uptime())


if __name__ == "__main__":
    main()
