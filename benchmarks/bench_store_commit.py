"""Commit of a group of steps by the store's writer: one flush after the other, or all at once.

A dense store's writer commits the steps queued behind it as one group (docs/recording.md,
"The store"): each step file, the newest optimizer state, the directories and
then the journal line are flushed to the device. This script writes such groups of the ~1M-parameter
MLP's files (``mlp-1m`` of ``bench_recording.py``: 4.28 MB per step file and per SGD momentum state)
with ``O_DIRECT`` and ``fsync``, two ways, alternated in one run:

* ``one by one`` (before): each file written, flushed and renamed before the next
  (``TensorFileWriter.write(..., fsync=True)``), then each directory flushed, then the journal;
* ``together`` (now, ``StoreWriter._commit``): every file written under its temporary name
  (``write(..., staged=...)``), all flushed at once (``settle``: one ``fsync`` per file, each on a
  thread of its own), renamed, the directories flushed at once, then the journal.

Both make the same files durable in the same order of what a power loss may keep. Printed: the
median (and the fastest) wall time per group, per step, and the ratio together / one by one of the
medians (of the fastest). The disk is shared with whatever else runs: on a busy machine only
many repeats, alternated, compare.

Run: ``python benchmarks/bench_store_commit.py [--groups 1 2 4] [--repeats 7] [--root DIR]``
(``--root`` must be on the disk to measure: a tmpfs has no flushes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from explaind._io import fsync_directory
from explaind.trajectory._filewrite import TensorFileWriter

#: the mlp-1m parameters (784-1024-256-10): theta and the SGD momentum have these shapes
SHAPES = {"net.0.weight": (1024, 784), "net.0.bias": (1024,), "net.2.weight": (256, 1024), "net.2.bias": (256,),
          "net.4.weight": (10, 256), "net.4.bias": (10,)}


def _group(root: Path, writer: TensorFileWriter, theta: dict, state: dict, first: int, n: int,
           together: bool) -> None:
    """Commit steps ``first .. first+n-1`` (their step files and the last one's optimizer state) and a journal line."""
    files = [(f"steps/{s:06d}.safetensors", theta) for s in range(first, first + n)]
    files.append((f"optimizer/state-{first % 2}.safetensors", state))
    dirs = [root / "steps", root / "optimizer"]
    if together:
        staged: list = []
        for relpath, tensors in files:
            writer.write(root, relpath, tensors, {"step": relpath}, staged=staged)
        writer.settle(staged)
        writer.flush_directories(dirs)
    else:
        for relpath, tensors in files:
            writer.write(root, relpath, tensors, {"step": relpath}, fsync=True, fsync_dir=False)
        for d in dirs:
            fsync_directory(d)
    with open(root / "journal.jsonl", "ab") as fh:
        fh.write(b'{"steps": %d}\n' % n)
        fh.flush()
        os.fsync(fh.fileno())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4], help="steps per committed group")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--root", default=None, help="directory on the disk to measure (default: a temp dir)")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    theta = {f"param.{k}": torch.randn(shape, generator=g) for k, shape in SHAPES.items()}
    state = {f"state.{i}.momentum_buffer": torch.randn(shape, generator=g) for i, shape in enumerate(SHAPES.values())}
    mb = sum(t.numel() * t.element_size() for t in theta.values()) / 1e6
    base = Path(tempfile.mkdtemp(prefix="explaind-commit-", dir=args.root))
    print(f"root={base}  repeats={args.repeats} (median)  step file {mb:.2f} MB  load average={os.getloadavg()[0]:.1f}")
    print(f"{'steps/group':>11} {'one by one ms (min)':>20} {'per step':>9} {'together ms (min)':>18} {'per step':>9} "
          f"{'ratio (of min)':>15}")
    writer = TensorFileWriter()
    try:
        for n in args.groups:
            times: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.repeats):
                for together in (False, True):  # alternated, so both see the same load
                    root = base / f"g{n}-{r}-{int(together)}"
                    (root / "steps").mkdir(parents=True)
                    (root / "optimizer").mkdir()
                    start = time.perf_counter()
                    _group(root, writer, theta, state, 0, n, together)
                    times[together].append(time.perf_counter() - start)
                    shutil.rmtree(root)
            old, new = (statistics.median(times[k]) * 1e3 for k in (False, True))
            old_min, new_min = (min(times[k]) * 1e3 for k in (False, True))
            print(f"{n:>11} {f'{old:.1f} ({old_min:.1f})':>20} {old / n:>9.1f} {f'{new:.1f} ({new_min:.1f})':>18} "
                  f"{new / n:>9.1f} {f'{new / old:.2f} ({new_min / old_min:.2f})':>15}")
    finally:
        writer.close()
        shutil.rmtree(base, ignore_errors=True)
    print(f"load average at the end={os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
