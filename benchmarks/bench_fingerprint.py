"""Cost of the training-data fingerprint that a store records and ``Trajectory.load`` checks.

Workload: an MNIST-sized training set, ``X`` of shape (50000, 784) float32 (157 MB) and int64
labels, as ``(X, y)`` tensors (hashed whole: under ``FULL_HASH_BYTES``), the same data forced
onto the sampled scheme (a tenth of the rows, evenly spaced), and the same data behind a
``torch.utils.data.Dataset`` (``DATASET_ROWS`` items fetched). Next to each fingerprint: one bare
pass over the same bytes (``X.sum()``), and the SHA-256 of the bytes in one ``hashlib`` call (no
chunks, no torch), so the fingerprint's overhead over the hashing itself is a ratio of one run.

Run: ``python benchmarks/bench_fingerprint.py [--n 50000] [--d 784] [--repeats 3]``

Every time is the fastest of ``--repeats`` runs; a fresh ``TrainData`` is used each time (the
fingerprint is cached per object).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable

import torch

from explaind.trajectory import fingerprint as fp
from explaind.trajectory._common import TrainData


class _Items(torch.utils.data.Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


def _best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=784)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    X = torch.rand(args.n, args.d, generator=g)
    y = torch.randint(0, 10, (args.n,), generator=g)
    nbytes = X.numel() * X.element_size() + y.numel() * y.element_size()
    raw = _best(lambda: (hashlib.sha256(X.numpy()).hexdigest(), hashlib.sha256(y.numpy()).hexdigest()),
                args.repeats)
    bare = _best(lambda: float(X.sum()), args.repeats)
    rows: list[tuple[str, int, float]] = []
    full = _best(lambda: fp.data_fingerprint(TrainData((X, y))), args.repeats)
    rows.append(("(X, y) tensors, all rows", fp.data_fingerprint(TrainData((X, y))).rows, full))
    sampled_rows = max(2, args.n // 10)  # the scheme of data over FULL_HASH_BYTES, here on a tenth of the rows
    sampled = _best(lambda: fp.data_fingerprint(TrainData((X, y)), rows=sampled_rows), args.repeats)
    rows.append(("(X, y) tensors, sampled scheme", sampled_rows, sampled))
    items = _best(lambda: fp.data_fingerprint(TrainData(_Items(X, y))), args.repeats)
    rows.append(("Dataset object", fp.data_fingerprint(TrainData(_Items(X, y))).rows, items))
    print(f"training data: X {tuple(X.shape)} float32 + y {tuple(y.shape)} int64 = {nbytes / 1e6:.0f} MB; "
          f"best of {args.repeats}; torch threads {torch.get_num_threads()}\n")
    print(f"| what | time (s) | vs one hashlib.sha256 call over all bytes ({raw:.3f} s) | vs X.sum() ({bare:.3f} s) |")
    print("|---|---|---|---|")
    print(f"| hashlib.sha256 of all bytes | {raw:.3f} | 1.00 | {raw / bare:.2f} |")
    for label, n_rows, seconds in rows:
        print(f"| fingerprint: {label} ({n_rows} rows) | {seconds:.3f} | {seconds / raw:.2f} | {seconds / bare:.2f} |")


if __name__ == "__main__":
    main()
