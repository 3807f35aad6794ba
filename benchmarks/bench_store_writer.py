"""What one recorded step costs the store's writer thread, piece by piece, next to the plain training step.

For the ~1M-parameter MLP of ``bench_recording.py`` (784-1024-256-10, batch 64) and SGD with
momentum or Adam, the step file (``theta_{s+1}``, the update coefficients, the batch) and the
optimizer state are built as the recorder hands them to the writer; then each piece of the
former writer's work is timed on its own: safetensors serialisation to ``bytes``, SHA-256, the
atomic write through the page cache without and with ``fsync``, and their sum; then the whole
durable write (fsync) as the store's writer does it now (``TensorFileWriter``: one reused buffer,
``O_DIRECT`` where the file system allows it), and the same writer through the page cache.
Last, the checksums on the SGD step file, ms and GB/s: the store's XXH3-128 (``xxhash``, since
manifest schema 2), and those hashlib offers (SHA-256 was the store's before).
Every write makes a new file, as the store does. Printed as ms per file, wall time and, in
brackets, the CPU time of the writing thread (what competes with the training loop for a core),
and as a ratio to the plain training step: when the writer's time exceeds the plain step,
recording to disk is bound by it, whatever the loop's thread does (``bench_recording.py``'s
``disk`` columns).

Run: ``python benchmarks/bench_store_writer.py [--repeats R] [--threads T] [--root DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import xxhash

from explaind._io import atomic_write
from explaind.models import build_model
from explaind.recurrence import LinearUpdate
from explaind.trajectory._filewrite import TensorFileWriter
from explaind.trajectory._io import encode_optimizer_state, encode_tensors
from explaind.trajectory.store import pack_updates

CONFIG = {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}


def _best(fn, repeats: int) -> tuple[float, float]:
    """Best wall and thread-CPU milliseconds of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    best, cpu = float("inf"), float("inf")
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.thread_time()
        fn()
        best, cpu = min(best, time.perf_counter() - start), min(cpu, time.thread_time() - cpu_start)
    return best * 1e3, cpu * 1e3


class _Names:
    """A new file name per call (the store writes a new file per step)."""

    def __init__(self, root: Path):
        self.root, self.i = root, 0

    def __call__(self) -> str:
        self.i += 1
        return f"f{self.i:06d}.safetensors"


def _files(opt_name: str):
    """The plain step (a closure) and the step file's and optimizer state's tensors after one step."""
    model = build_model("mlp", CONFIG, seed=0)
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=1e-3) if opt_name == "adam" else torch.optim.SGD(params, lr=0.05,
                                                                                        momentum=0.9)
    X, y = torch.randn(64, 784), torch.randint(0, 10, (64,))

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()

    step()
    names = tuple(n for n, _ in model.named_parameters())
    if opt_name == "adam":  # Adam's preconditioner P is a tensor per parameter
        updates = {n: LinearUpdate(a=0.9, b=0.1, P=torch.rand_like(p), q=1.0, n=0.0)
                   for n, p in model.named_parameters()}
    else:
        updates = {n: LinearUpdate(a=0.9, b=1.0, P=0.05, q=1.0, n=0.0) for n in names}
    tensors = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    tensors.update(pack_updates(names, updates))
    tensors["batch.indices"] = torch.arange(64)
    tensors["batch.weights"] = torch.full((64,), 1 / 64)
    state, meta = encode_optimizer_state(opt.state_dict())
    return step, tensors, (state, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--root", default=None, help="directory to write into (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root or tempfile.mkdtemp(prefix="explaind-writer-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"torch threads={torch.get_num_threads()}  repeats={args.repeats} (best of)  load average="
          f"{os.getloadavg()[0]:.1f}  root={root}")
    cols = ("MB", "encode", "sha256", "write", "write+fsync", "sum", "now", "now, no O_DIRECT")
    header = f"{'optim':<6}{'file':<10}{'plain ms':>10}" + "".join(f"{c:>19}" for c in cols)
    print("ms per file: wall (thread CPU) and the wall ratio to the plain training step; 'sum': the pieces before "
          "(encode, sha256, write+fsync), 'now'/'now, no O_DIRECT': TensorFileWriter.write with fsync")
    print(header)
    print("-" * len(header))
    name = _Names(root)
    direct, buffered = TensorFileWriter(), TensorFileWriter(direct=False)
    for opt_name in ("sgd", "adam"):
        step, tensors, state = _files(opt_name)
        plain = _best(step, args.repeats)[0]
        for label, (data, meta) in (("step", (tensors, None)), ("opt-state", state)):
            blob = encode_tensors(data, meta)
            encode = _best(lambda data=data, meta=meta: encode_tensors(data, meta), args.repeats)
            digest = _best(lambda blob=blob: hashlib.sha256(blob).hexdigest(), args.repeats)
            write = _best(lambda blob=blob: atomic_write(root / name(), blob, fsync=False), args.repeats)
            synced = _best(lambda blob=blob: atomic_write(root / name(), blob, fsync=True), args.repeats)
            total = tuple(a + b + c for a, b, c in zip(encode, digest, synced))
            now = _best(lambda data=data, meta=meta: direct.write(root, name(), data, meta), args.repeats)
            cached = _best(lambda data=data, meta=meta: buffered.write(root, name(), data, meta), args.repeats)
            cells = [f"{len(blob) / 1e6:.2f}"] + [f"{w:.2f} ({c:.2f}) {w / plain:.2f}" for w, c in
                                                   (encode, digest, write, synced, total, now, cached)]
            print(f"{opt_name:<6}{label:<10}{plain:>10.2f}" + "".join(f"{c:>19}" for c in cells))
    blob = encode_tensors(_files("sgd")[1])
    speeds = {"xxh3-128": _best(lambda: xxhash.xxh3_128(blob).hexdigest(), args.repeats)[0]}
    speeds.update({algo: _best(lambda algo=algo: hashlib.new(algo, blob).hexdigest(), args.repeats)[0]
                   for algo in ("sha256", "sha1", "blake2b", "md5")})
    print(f"\nchecksums of the SGD step file ({len(blob) / 1e6:.2f} MB), ms (GB/s): "
          + "  ".join(f"{algo} {ms:.2f} ({len(blob) / ms / 1e6:.1f})" for algo, ms in speeds.items()))
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
