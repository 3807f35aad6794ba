"""Real SIGKILLs at seeded points of a dense store's recordings, one after another on the same store: nothing
complete before a kill is lost, and the store resumed after the last kill is bit-identical to an
uninterrupted run (the chain: tests/_kill_chain.py; the recording: tests/_kill_child.py).

The points and K come from a fixed seed, so a failure reruns as it was.
"""

from __future__ import annotations

import pytest
from _kill_chain import STEPS, draw, run_chain
from _recording_helpers import resumable_reference

#: checkpoint_every and the kill points, each with the largest K drawn (1..K_max), chosen so that a
#: recording reaches it within its first steps however its background writer groups them
KILLS = draw({"dense": (1, [("write", 6), ("journal", 2), ("copy", 3), ("before:optimizer/state-", 2)])},
             seed=20261206)


@pytest.fixture(scope="module")
def reference():
    return resumable_reference(STEPS)


@pytest.mark.parametrize("chain", list(KILLS), ids=[f"{n}:{KILLS[n][1]}" for n in KILLS])
def test_sigkills_in_a_dense_store_lose_nothing_complete_and_resume_bit_identically(tmp_path, reference, chain):
    every, kills = KILLS[chain]
    run_chain(tmp_path / "run", reference, every, kills)
