"""Real SIGKILLs at seeded points of a sparse store's recordings and of the resumption of a schema-1 (SHA-256)
store: nothing complete before a kill is lost, and the store resumed after the last kill is
bit-identical to an uninterrupted run (the chain: tests/_kill_chain.py; the recording:
tests/_kill_child.py).

The points and K come from a fixed seed, so a failure reruns as it was.
"""

from __future__ import annotations

import pytest
from _kill_chain import STEPS, draw, run_chain, schema_1_store
from _recording_helpers import resumable_reference

#: per chain: checkpoint_every and the kill points, each with the largest K drawn (1..K_max)
KILLS = draw({"sparse": (3, [("write", 4), ("after:optimizer/checkpoint-", 1)]),
              "schema-1": (1, [("before:manifest.json", 1), ("journal", 2)])}, seed=20261207)


@pytest.fixture(scope="module")
def reference():
    return resumable_reference(STEPS)


@pytest.mark.parametrize("chain", list(KILLS), ids=[f"{n}:{KILLS[n][1]}" for n in KILLS])
def test_sigkills_in_sparse_and_schema_1_stores_lose_nothing_complete_and_resume_bit_identically(tmp_path, reference,
                                                                                                   chain):
    every, kills = KILLS[chain]
    held = 0
    if chain == "schema-1":
        schema_1_store(tmp_path / "run")
        held = 3
    run_chain(tmp_path / "run", reference, every, kills, held)
