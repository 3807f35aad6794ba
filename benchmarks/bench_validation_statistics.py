"""How much does leaving samples out of the batch statistics move a batch-norm run, by batch size?

For the ``batchnorm`` setting at a reduced size (``--n-train``, ``--n-test``, ``--epochs``, seed 0) and each batch
size of ``--batch-size``, removes ``--removed`` random samples (``--draws`` draws) in two ways and compares the
retrained explained outputs (true-class logits in evaluation mode):

* ``weighted``: the removed samples weighted 0 (their loss terms dropped; they stay in the batch statistics);
* ``left out``: the removed samples taken out of their batches (:func:`explaind.validation.leave_out.leave_out_logits`).

Columns: the mean over draws and test points of ``|weighted - full|`` (what removing the samples does) and of
``|left out - weighted|`` (what taking them out of the statistics adds), and their ratio.

Run: ``python benchmarks/bench_validation_statistics.py [--batch-size 4 8 25] [--removed 10] [--draws 5]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from explaind.validation.leave_out import leave_out_logits
from explaind.validation.settings import make_problem, setting_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[4, 8, 25])
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--n-test", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--removed", type=int, default=10, help="samples removed per draw")
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args()
    print("| batch size | steps | mean abs(weighted - full) | mean abs(left out - weighted) | ratio |")
    print("|---|---|---|---|---|")
    for batch_size in args.batch_size:
        start = time.perf_counter()
        config = setting_config("batchnorm", seeds=1, n_train=args.n_train, n_test=args.n_test, epochs=args.epochs,
                                batch_size=batch_size)
        problem = make_problem(config)
        full = problem.retrain_logits()
        rng = np.random.default_rng(0)
        removal, statistics = [], []
        for _ in range(args.draws):
            keep = torch.ones(config.n_train, dtype=torch.bool)
            keep[torch.as_tensor(rng.choice(config.n_train, size=args.removed, replace=False))] = False
            weighted = problem.retrain_logits(keep.double())
            removal.append(float((weighted - full).abs().mean()))
            statistics.append(float((leave_out_logits(problem, keep) - weighted).abs().mean()))
        a, b = float(np.mean(removal)), float(np.mean(statistics))
        print(f"| {batch_size} | {config.n_steps} | {a:.4f} | {b:.4f} | {b / a:.3f} |  "
              f"<!-- {time.perf_counter() - start:.0f}s -->", flush=True)


if __name__ == "__main__":
    main()
