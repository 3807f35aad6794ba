"""The recorder's whole-process CPU time per step, by thread (Linux): what makes ``bench_recording.py``'s CPU ratio.

Runs the loops of ``bench_recording.py`` (same models, batches and optimizers), recorded in each mode asked for,
and reads every thread's CPU time from ``/proc/self/task/<tid>/stat`` before the steps and when the recorder
exits (before its threads stop): the loop's thread (``MainThread``), the state copier (``explaind-state-copy``:
the copies beside ``backward()`` and after the step, the edit check, the optimizer-state watch's reads after a
step, Adam's deferred ``P``), the store's writer (``explaind-store-writer``: laying out and hashing), its I/O and
``fsync`` threads, and in memory the thread that page-faults the memory of the next copies of θ
(``explaind-warm-buffers``). The kernel counts thread CPU time in clock ticks (10 ms at ``CLK_TCK`` = 100), so
the figures are exact to about 10 ms over the run: ``--steps 200`` gives ±0.05 ms per step. Also printed, per
step after two warm-up steps: the wall time, the process CPU time and the loop thread's CPU time, and the plain
loop's (one run before the recorded ones).

Run: ``python benchmarks/bench_recording_threads.py [--cases mlp-1m ...] [--optimizers sgd adam]
[--modes memory disk] [--steps 200] [--threads 1]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import threading

import torch
from bench_recording import CASES, OPTIMIZERS, _run

import explaind


def _cpu_by_thread() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, by native thread id."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["mlp-1m"])
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["sgd", "adam"])
    parser.add_argument("--modes", nargs="+", default=["memory", "disk"], help="recorded modes of bench_recording.py")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    at_exit: dict[int, float] = {}
    names: dict[int, str] = {}
    exit_ = explaind.TrajectoryRecorder.__exit__

    def read_then_exit(self, *exc):
        at_exit.update(_cpu_by_thread())
        names.update({t.native_id: t.name for t in threading.enumerate() if t.native_id is not None})
        return exit_(self, *exc)

    explaind.TrajectoryRecorder.__exit__ = read_then_exit
    root = tempfile.mkdtemp(prefix="explaind-bench-threads-")
    try:
        _measure(args, root, at_exit, names)
    finally:  # each run leaves stores of a few GB
        shutil.rmtree(root, ignore_errors=True)


def _measure(args: argparse.Namespace, root: str, at_exit: dict[int, float], names: dict[int, str]) -> None:
    print(f"steps={args.steps}  torch threads={torch.get_num_threads()}  load average={os.getloadavg()[0]:.1f}")
    for label in args.cases:
        case = CASES[label]
        for opt_name in args.optimizers:
            wall, cpu, loop = _run(case, case.batch, opt_name, args.steps, "plain", torch.device("cpu"), root)
            print(f"\n{label} {opt_name} plain: wall {wall * 1e3:.2f}, process CPU {cpu * 1e3:.2f}, loop thread "
                  f"{loop * 1e3:.2f} ms per step")
            for mode in args.modes:
                at_exit.clear()
                before = _cpu_by_thread()
                wall, cpu, loop = _run(case, case.batch, opt_name, args.steps, mode, torch.device("cpu"), root,
                                       label)
                print(f"{label} {opt_name} {mode}: wall {wall * 1e3:.2f}, process CPU {cpu * 1e3:.2f}, loop thread "
                      f"{loop * 1e3:.2f} ms per step; CPU ms per step by thread (all {args.steps} steps):")
                spent = {tid: (t - before.get(tid, 0.0)) / args.steps * 1e3 for tid, t in at_exit.items()}
                for tid, ms in sorted(spent.items(), key=lambda kv: -kv[1]):
                    if ms >= 0.02:
                        print(f"    {names.get(tid, f'thread {tid}'):<30}{ms:7.2f}")
    print(f"\nload average at the end={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
