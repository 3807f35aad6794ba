"""Where the loop's thread spends a recorded step, by function (``cProfile``): ``bench_recording.py``'s loop.

Profiles the loop's thread only (``cProfile`` follows the thread that enables it; the state copier's and the
writer's threads are ``bench_recording_threads.py``'s), timed by the thread's CPU time (``time.thread_time``:
waits for a lock, a core or another thread cost nothing, so the figures mean something on a loaded machine;
the ticks are coarse, so only sums over many calls do). After a short warm-up run, prints per optimizer the
functions with the most CPU time of their own (``tottime``) in ms per step, the plain loop's step first.

Run: ``python benchmarks/bench_recording_profile.py [--cases mlp-1m] [--optimizers sgd adam] [--mode disk]
[--steps 40] [--threads 1] [--top 25]``
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import tempfile
import time

import torch
from bench_recording import CASES, OPTIMIZERS, _run


def _profile(case: str, opt: str, mode: str, steps: int, root: str, top: int) -> None:
    profile = cProfile.Profile(time.thread_time)
    profile.enable()
    _run(CASES[case], CASES[case].batch, opt, steps, mode, torch.device("cpu"), root, case)
    profile.disable()
    out = io.StringIO()
    stats = pstats.Stats(profile, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"{case} {opt} {mode}: {total * 1e3 / steps:.2f} ms of CPU per step on the loop's thread (profiled)")
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    for (file, line, name), (_, calls, tottime, cumtime, _) in rows:
        where = f"{file.rsplit('/', 1)[-1]}:{line}({name})" if file != "~" else name
        per = (tottime * 1e3 / steps, cumtime * 1e3 / steps, calls / steps)
        print(f"    {per[0]:7.3f} own {per[1]:7.3f} cum {per[2]:6.1f} calls  {where}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["mlp-1m"])
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["sgd", "adam"])
    parser.add_argument("--mode", default="disk")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        for case in args.cases:  # warm-up: imports, first allocations
            _run(CASES[case], CASES[case].batch, args.optimizers[0], 3, args.mode, torch.device("cpu"), root, case)
        for case in args.cases:
            for opt in args.optimizers:
                _profile(case, opt, "plain", args.steps, root, 5)
                _profile(case, opt, args.mode, args.steps, root, args.top)


if __name__ == "__main__":
    main()
