"""Prints one row per case of tests/_batch_coupled_kit.py (the losses of tests/test_batch_coupled_losses.py, declared
with ``explaind.batch_coupled_loss``; not collected by pytest): the replica's error relative to the trained model in
evaluation mode, the residual share, the train scores' error relative to the slow per-term loop reference, and that
reference's own residual relative to the largest update. The cases of ``SHOWN`` follow (a bias the loss cannot see,
trained by Adam: its rounding-level gradient rescaled to an update lands in the residual).

Run ``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/batch_coupled_losses_table.py [case ...]``
from the repository root. The load average comes first; no figure is a timing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _batch_coupled_kit import CASES, SHOWN, figures


def main(names: list[str]) -> None:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["n/a"]
    print(f"load average: {' '.join(load)}")
    print("| case | replica error | residual share | train-score error | reference residual | warnings |")
    print("|---|---|---|---|---|---|")
    every = {**CASES, **SHOWN}
    for name in names or list(every):
        got = figures(every[name]())
        print(f"| {name} | {got['replica']:.1e} | {got['share']:.1e} | {got['scores']:.1e} | "
              f"{got['reference_residual']:.1e} | {len(got['warnings'])} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
