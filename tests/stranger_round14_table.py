"""Print the table of docs/guide_own_model.md,
"Round 14: training recipes from papers, written as their authors write them".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round14_table.py [NAME ...]

One row per case of tests/_round14_cases.py, printed by ``row`` of tests/stranger_loops_round9_table.py, whose
docstring says what its columns and classes mean; the load average comes first and last (no figure is a timing).
"""

from __future__ import annotations

import os
import sys

import torch
from _round14_cases import CASES, DEFAULT_RULE, figures
from stranger_loops_round9_table import row


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or CASES:
        print(row(name, CASES, DEFAULT_RULE, figures), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
