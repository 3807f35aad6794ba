"""Where the recorder's time goes: per step, by component, on the training loop's thread and the writer's.

Runs the loops of ``bench_recording.py`` (same models, batches and optimizers) with the recorder's
parts wrapped in timers and prints, per recorded mode, the CPU time of the loop's own thread
(``time.thread_time``) per step spent in each part, the wall time spent waiting to hand a step to
the store's writer, and the CPU time of the writer's thread per step (laying out, SHA-256 and
writing the files; the overlapped device writes run on its I/O thread and are not in it), and the CPU time of
the state copier's thread per step (``copier``: the copies of the large raw gradients during ``backward()``
and their finiteness, of ``theta_{s+1}`` and of the optimizer state, the edit check, Adam's deferred ``P``):

* ``grad snapshot``: the tap's hooks after ``backward()`` reached each parameter (the copies of the small raw
  gradients; the large CPU ones are handed to the state copier's thread, explaind/trajectory/_snapshot_copies.py);
* ``finite``: their finiteness check at ``log_batch``; ``log_batch`` is the rest of that call;
* ``compare``: the comparison of the gradient the optimizer sees with the snapshot (``c_s``);
* ``adapter``: the optimizer adapter's coefficients (e.g. Adam's ``P``);
* ``theta copy`` / ``state copy``: the copies of ``theta_{s+1}`` and of the optimizer state (in a dense
  store the loop's thread only reads the state's structure and hands its tensors to the state copier's
  thread, whose time is not shown);
* ``append``: adding the step to the in-memory trajectory; ``hand-over``: queueing it for the writer;
* ``state watch``: the optimizer-state watch's hooks around ``optimizer.step()`` (its sample of each carried
  buffer's bits and the sum of its 64-bit words after the step, the comparison before the next;
  explaind/trajectory/_optimizer_state_watch.py);
* ``other``: the rest of the recorder's hooks (Python bookkeeping: records, participation, the audit's job).

The sum of the parts is the recorder's share of the loop's thread; the plain loop's thread time per
step is printed next to it. Timers add about 1 us per wrapped call.

Run: ``python benchmarks/bench_recording_parts.py [--steps N] [--repeats R] [--threads T] [--cases mlp-1m ...]
[--modes memory disk ...] [--optimizers sgd adam rmsprop adagrad nadam radam adamax]`` (the optimizers of
``bench_recording.py``; default SGD and Adam)
"""

from __future__ import annotations

import argparse
import atexit
import functools
import os
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from bench_recording import CASES, OPTIMIZERS, _run
from explaind_optimizers._adam_family import AdamFamilyAdapter
from explaind_optimizers.adagrad import AdagradAdapter
from explaind_optimizers.adam import AdamAdapter
from explaind_optimizers.rmsprop import RMSpropAdapter
from explaind_optimizers.sgd import SGDAdapter

from explaind.trajectory import _background, _recorder_store, memory, recorder, store
from explaind.trajectory._gradients import GradientTap
from explaind.trajectory._optimizer_state_watch import OptimizerStateWatch

PARTS = ("grad snapshot", "finite", "log_batch", "compare", "adapter", "theta copy", "state copy", "append",
         "hand-over", "state watch", "other")
_cpu: dict[str, float] = defaultdict(float)  # thread CPU seconds of the loop's thread per part
_wall: dict[str, float] = defaultdict(float)
_main = threading.main_thread()


def _wrap(owner: type, name: str, key: str, *, top: bool = False, wall: bool = False) -> None:
    """Time ``owner.name`` on the loop's thread under ``key`` (``top``: also under ``"total"``; ``wall``: wall time)."""
    inner: Callable = getattr(owner, name)

    @functools.wraps(inner)  # keeps the signature: the recorder reads an adapter's optional keywords from it
    def timed(*args, **kwargs):
        if threading.current_thread() is not _main:
            return inner(*args, **kwargs)
        c0, w0 = time.thread_time(), time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            dc, dw = time.thread_time() - c0, time.perf_counter() - w0
            _cpu[key] += dc
            _wall[key] += dw
            if top:
                _cpu["total"] += dc

    setattr(owner, name, timed)


def _wrap_hooks() -> None:
    make = GradientTap._make_hook

    def timed_make(self, name):
        hook = make(self, name)

        def timed(p):
            c0 = time.thread_time()
            try:
                return hook(p)
            finally:
                dc = time.thread_time() - c0
                _cpu["grad snapshot"] += dc
                _cpu["total"] += dc

        return timed

    GradientTap._make_hook = timed_make


def _wrap_writer() -> None:
    commit = store.StoreWriter._commit

    def timed(self, items):
        c0 = time.thread_time()
        try:
            return commit(self, items)
        finally:
            _cpu["writer"] += time.thread_time() - c0

    store.StoreWriter._commit = timed


def _wrap_copier() -> None:
    run = _background.StateCopier.run

    def timed_run(self, jobs):
        def timed(job):
            def inner():
                c0 = time.thread_time()
                try:
                    return job()
                finally:
                    _cpu["copier"] += time.thread_time() - c0

            return inner

        return run(self, [timed(job) for job in jobs])

    _background.StateCopier.run = timed_run


def install() -> None:
    """Wrap the recorder's parts in timers (once per process)."""
    T = recorder.TrajectoryRecorder
    _wrap(T, "log_batch", "log_batch", top=True)
    _wrap(T, "_pre_step", "pre", top=True)
    _wrap(T, "_post_step", "post", top=True)
    _wrap(GradientTap, "finite_since", "finite")
    _wrap(GradientTap, "measure", "compare")
    for cls in (SGDAdapter, AdamAdapter, RMSpropAdapter, AdagradAdapter, AdamFamilyAdapter):  # NAdam, RAdam, Adamax
        _wrap(cls, "before_step", "adapter")
        _wrap(cls, "after_step", "adapter")
    _wrap(_recorder_store.RecorderStoreMixin, "_copy_params", "theta copy")
    _wrap(_recorder_store.RecorderStoreMixin, "_optimizer_state", "state copy")
    _wrap(_recorder_store.RecorderStoreMixin, "_optimizer_state_async", "state copy")
    _wrap(memory.InMemoryTrajectory, "_append", "append")
    _wrap(store.StoreWriter, "write_step", "hand-over", wall=True)
    _wrap(OptimizerStateWatch, "check", "state watch", top=True)  # optimizer hooks of their own, outside pre/post
    _wrap(OptimizerStateWatch, "arm", "state watch", top=True)
    if hasattr(OptimizerStateWatch, "settle"):  # the wait for its reads on the copier's thread (not in older versions)
        _wrap(OptimizerStateWatch, "settle", "state watch", top=True)
    _wrap_hooks()
    _wrap_writer()
    _wrap_copier()


def measure(label: str, opt_name: str, mode: str, steps: int, root: str) -> dict[str, float]:
    """ms per step of each part (timed from step 0; the first two steps' allocations included)."""
    case = CASES[label]
    _cpu.clear()
    _wall.clear()
    _run(case, case.batch, opt_name, steps, mode, torch.device("cpu"), root, label)
    out = {k: v * 1e3 / steps for k, v in _cpu.items()}
    out["hand-over wall"] = _wall.get("hand-over", 0.0) * 1e3 / steps
    out["log_batch"] = out.get("log_batch", 0.0) - out.get("finite", 0.0)
    inner = ("finite", "log_batch", "compare", "adapter", "theta copy", "state copy", "append", "hand-over",
             "grad snapshot", "state watch")
    out["other"] = out.get("total", 0.0) - sum(out.get(k, 0.0) for k in inner)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["mlp-1m"])
    parser.add_argument("--modes", nargs="+", default=["memory", "disk", "disk+audit"])
    parser.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=["sgd", "adam"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    install()
    root = tempfile.mkdtemp(prefix="explaind-bench-")
    atexit.register(shutil.rmtree, root, True)  # the stores of a run take GBs
    print(f"steps={args.steps}  repeats={args.repeats} (median)  torch threads={torch.get_num_threads()}  "
          f"load average={os.getloadavg()[0]:.1f}")
    print("ms per step: CPU time of the loop's thread in each part; 'wait' the wall time of the hand-over; "
          "'writer' the writer thread's CPU time")
    cols = (*PARTS, "sum", "plain", "wait", "writer", "copier")
    header = f"{'model':<10}{'optim':>8}{'mode':>12}" + "".join(f"{c[:10]:>11}" for c in cols)
    print(header)
    print("-" * len(header))
    for label in args.cases:
        for opt_name in args.optimizers:
            for mode in args.modes:
                runs = []
                for _ in range(args.repeats):
                    parts = measure(label, opt_name, mode, args.steps, root)
                    case = CASES[label]
                    _, _, plain = _run(case, case.batch, opt_name, args.steps, "plain", torch.device("cpu"), root)
                    parts["plain"] = plain * 1e3
                    runs.append(parts)
                med = {k: sorted(r.get(k, 0.0) for r in runs)[len(runs) // 2] for k in (*PARTS, "total", "plain",
                                                                                         "hand-over wall", "writer",
                                                                                         "copier")}
                cells = [med[p] for p in PARTS] + [med["total"], med["plain"], med["hand-over wall"], med["writer"],
                                                   med["copier"]]
                print(f"{label:<10}{opt_name:>8}{mode:>12}" + "".join(f"{c:>11.2f}" for c in cells))


if __name__ == "__main__":
    main()
