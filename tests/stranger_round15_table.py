"""Print the table of docs/guide_own_model.md,
"Round 15: popular training code as its authors write it".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round15_table.py [NAME ...]

One row per case of tests/_round15_cases.py, printed by ``row`` of tests/stranger_loops_round9_table.py, whose
docstring says what its columns and classes mean; the load average comes first and last (no figure is a timing).
The GAN's discriminator explained from its saved parameters (``gan_discriminator_checkpoints``) has no train axis:
its row gives the replica alone.
"""

from __future__ import annotations

import sys

from _round15_cases import CASES, DEFAULT_RULE, figures
from stranger_loops_round9_table import print_table

MACRO = "gan_discriminator_checkpoints"

if __name__ == "__main__":
    names = sys.argv[1:] or list(CASES)
    sys.argv[1:] = [n for n in names if n != MACRO]
    if sys.argv[1:]:
        print_table({n: c for n, c in CASES.items() if n != MACRO}, DEFAULT_RULE, figures)
    if MACRO in names:
        model, traj = CASES[MACRO]()
        got = figures(MACRO, model, traj)
        print(f"| {MACRO} (Trajectory.from_checkpoints, no train axis) | {got['replica']:.1e} | | | | exact replica |")
