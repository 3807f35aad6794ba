"""Print the table of docs/guide_own_model.md,
"Round 10: per-sample clipping, gradient surgery, teachers, loaders, padding, user schedulers".

Run from the repository root (not collected by pytest)::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/stranger_loops_round10_table.py [NAME ...]

Each row records a case of tests/_loops10_kit.py (float64, 6 steps of 6 samples of a small tanh model unless the
case names another) and prints, as tests/stranger_loops_round9_table.py does, the replica's relative error against
the trained model in evaluation mode, the residual share, the train scores' relative error against the slow float64
loop reference (tests/reference.py) and that reference's own largest per-step residual relative to its largest
update, and the class: ``exact`` (replica <= 1e-6, share <= 1e-9, scores <= 1e-9, reference residual <= 1e-12, no
warning), ``loud`` (an ExplaindWarning, or an error: its type and the sentences naming cause and fix) or ``SILENT``.
The ReLU cases show the default replica's error and the default estimator's residual share instead; the float32
model (``float32_model_under_default_float64``) the same, on the test inputs in float32, ``exact at float32 level``
when both are <= 1e-6 without a warning. The load average is printed first and last: no figure is a timing.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch
from _loops10_kit import CASES, DEFAULT_RULE, figures
from _round4_kit import estimator_warnings
from _stranger_loops_kit import data
from reference import rel_err
from stranger_loops_round9_table import row

import explaind
from explaind.exceptions import ExplaindWarning

FLOAT32 = "float32_model_under_default_float64"


def float32_row() -> str:
    """The float32 model's row: the default replica on the test inputs in float32 against the model, the default
    estimator's residual share, ``exact`` at float32 level when both are <= 1e-6 without a warning."""
    model, traj = CASES[FLOAT32]()
    _, _, X_test = data()
    with torch.no_grad():
        truth = model.eval()(X_test.float())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test.float()), truth)
    share, more = estimator_warnings(traj)
    said = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)] + more
    cls = "exact at float32 level" if replica <= 1e-6 and share <= 1e-6 and not said else "SILENT or warned"
    return f"| {FLOAT32} (default estimators) | {replica:.1e} | {share:.1e} | | | {cls} |"


def main() -> None:
    torch.set_num_threads(1)
    print(f"load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    print("| case | replica | residual share | scores vs reference | reference residual | class |")
    print("|---|---|---|---|---|---|")
    for name in sys.argv[1:] or CASES:
        print(float32_row() if name == FLOAT32 else row(name, CASES, DEFAULT_RULE, figures), flush=True)
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
