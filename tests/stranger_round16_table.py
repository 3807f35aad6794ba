"""Print the table of docs/guide_own_model.md,
"Round 16: metric-learning heads, LoRA, losses from papers, edits between steps".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_round16_table.py [NAME ...]

One row per case of tests/_round16_cases.py, printed by ``row`` of tests/stranger_loops_round9_table.py, whose
docstring says what its columns and classes mean; the load average comes first and last (no figure is a timing).
"""

from __future__ import annotations

from _round16_cases import CASES, DEFAULT_RULE, figures
from stranger_loops_round9_table import print_table

if __name__ == "__main__":
    print_table(CASES, DEFAULT_RULE, figures)
