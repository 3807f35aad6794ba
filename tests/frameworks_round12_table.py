"""Print the measured figures of the round-12 framework tests (Trainer, Lightning, accelerate) as a table.

Run from the repository root::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/frameworks_round12_table.py

It runs tests/test_frameworks_round12.py and tests/test_frameworks_round12_more.py through
tests/hf_strangers_table.py, which prints per test the replica against the trained model in evaluation mode, the
residual share and the ``keep=("train",)`` scores against the slow float64 loop reference (relative errors), and
the outcome (``exact``, or ``loud: ...``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_strangers_table  # noqa: E402

FILES = ["test_frameworks_round12.py", "test_frameworks_round12_more.py"]

if __name__ == "__main__":
    sys.argv[1:] = FILES
    raise SystemExit(hf_strangers_table.main())
