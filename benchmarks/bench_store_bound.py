"""The floor of a dense store on this machine: the plain loop beside the least a store must do per step.

For the ~1M-parameter MLP of ``bench_recording.py`` (784-1024-256-10, batch 64, SGD with momentum),
each step of the plain training loop is followed by the bare minimum of a dense store, without
the recorder (no gradient copy, no coefficients, no checksum, no JSON, no audit):

* ``copy``: ``theta_{s+1}`` (and, with ``+state``, the momentum buffer) copied on the loop's thread
  into one of 5 reused page-aligned buffers (what the store must hold, since the next step
  changes the parameters);
* ``direct+fsync``: those bytes handed to a background thread that writes them to a new file with
  ``O_DIRECT`` and ``fsync`` (a durable store), at most 4 steps queued, as the store's writer;
* ``cache``: the same through the page cache without ``fsync`` (``fsync=False``).

Printed: ms per step (wall) and the ratio to the plain loop, the loop thread's CPU ratio, the MB
written per step, and the writer thread's time in its file calls per step next to the plain loop
thread's CPU time per step; all variants alternate within one run (best of ``--repeats``). On a
loaded machine the wall columns say little; the last column does not depend on the load much:
where ``direct+fsync`` needs more device time per step than 1.3 plain steps of compute, no dense,
durable store of every step can be within 1.3x of the plain loop here, whatever the recorder does.

Run: ``python benchmarks/bench_store_bound.py [--steps N] [--repeats R] [--threads T] [--root DIR]``
"""

from __future__ import annotations

import argparse
import mmap
import os
import queue
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from explaind.models import build_model

CONFIG = {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}
BLOCK = 4096
VARIANTS = ("plain", "copy", "copy+state", "direct+fsync", "direct+fsync+state", "cache", "cache+state")


class _Sink:
    """A background thread writing each handed-over buffer to a new file (``direct``: O_DIRECT and fsync)."""

    def __init__(self, root: Path, direct: bool):
        self.root, self.direct, self.n = root, direct, 0
        self.busy = 0.0  # seconds spent in open, write, fsync and close (the device's time, with O_DIRECT)
        self.jobs: queue.Queue = queue.Queue(maxsize=4)
        self.free: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            buf, n = job
            start = time.perf_counter()
            flags = os.O_WRONLY | os.O_CREAT | (os.O_DIRECT if self.direct else 0)
            fd = os.open(self.root / f"{self.n:06d}.bin", flags, 0o644)
            self.n += 1
            view = memoryview(buf)[: -(-n // BLOCK) * BLOCK if self.direct else n]
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
            if self.direct:
                os.fsync(fd)
            os.close(fd)
            self.busy += time.perf_counter() - start
            self.free.put(buf)

    def close(self) -> None:
        self.jobs.put(None)
        self.thread.join()


def _run(variant: str, steps: int, root: Path) -> tuple[float, float, float, float]:
    """Wall ms, loop-thread CPU ms, MB and the writer's ms in its file calls, per step (warm-up steps excluded)."""
    model = build_model("mlp", CONFIG, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(512, 784, generator=g), torch.randint(0, 10, (512,), generator=g)
    params = list(model.parameters())
    with_state = variant.endswith("+state")
    nbytes = sum(p.numel() * 4 for p in params) * (2 if with_state else 1)
    sink = None
    if variant != "plain" and not variant.startswith("copy"):
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        sink = _Sink(root, variant.startswith("direct"))
    bufs = [mmap.mmap(-1, -(-nbytes // BLOCK) * BLOCK) for _ in range(5)] if variant != "plain" else []
    for buf in bufs:
        torch.frombuffer(buf, dtype=torch.uint8).zero_()  # page-faulted before the timed steps
        if sink is not None:
            sink.free.put(buf)
    for i in range(steps):
        if i == 2:
            start, cpu = time.perf_counter(), time.thread_time()
        idx = torch.arange(i * 64, (i + 1) * 64) % 512
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        opt.step()
        if variant == "plain":
            continue
        # a buffer the writer is done with (waits while 5 steps are queued or being written)
        buf = bufs[i % len(bufs)] if sink is None else sink.free.get()
        flat = torch.frombuffer(buf, dtype=torch.float32, count=nbytes // 4)
        sources = [p.detach() for p in params]
        if with_state:
            sources += [opt.state[p]["momentum_buffer"] for p in params]
        torch.cat([t.reshape(-1) for t in sources], out=flat)
        if sink is not None:
            sink.jobs.put((buf, nbytes))
    if sink is not None:
        sink.close()  # the writes still queued belong to the run
    wall, loop = time.perf_counter() - start, time.thread_time() - cpu
    busy = 0.0 if sink is None else sink.busy / sink.n * 1e3
    return wall / (steps - 2) * 1e3, loop / (steps - 2) * 1e3, nbytes / 1e6, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="directory to write into (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = Path(args.root or tempfile.mkdtemp(prefix="explaind-bound-"))
    wall: dict[str, float] = {}
    loop: dict[str, float] = {}
    mb: dict[str, float] = {}
    busy: dict[str, float] = {}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            w, c, mb[variant], b = _run(variant, args.steps, base / "files")
            wall[variant], loop[variant] = min(wall.get(variant, w), w), min(loop.get(variant, c), c)
            busy[variant] = min(busy.get(variant, b), b)
    shutil.rmtree(base, ignore_errors=True)
    print(f"torch threads={torch.get_num_threads()}  steps={args.steps}  repeats={args.repeats} (best of)  "
          f"load average={os.getloadavg()[0]:.1f}")
    print("'file ms': the writer's time per step in open, write, fsync and close (with O_DIRECT and fsync: the "
          "device's), and its ratio to the plain loop thread's CPU time per step (a step's compute)")
    print(f"{'variant':<20}{'MB/step':>9}{'wall ms':>9}{'wall ratio':>12}{'loop CPU ratio':>16}{'file ms':>9}"
          f"{'file / plain CPU':>18}")
    for v in VARIANTS:
        written = mb[v] if v != "plain" else 0.0
        print(f"{v:<20}{written:>9.2f}{wall[v]:>9.2f}{wall[v] / wall['plain']:>12.2f}"
              f"{loop[v] / loop['plain']:>16.2f}{busy[v]:>9.2f}{busy[v] / loop['plain']:>18.2f}")


if __name__ == "__main__":
    main()
