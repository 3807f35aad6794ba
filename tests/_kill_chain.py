"""The kill chains of tests/test_store_kill_points*.py: recordings that SIGKILL themselves, one after another.

A chain of recordings (tests/_kill_child.py) works on one store: each opens it (resuming what the kills
before it left), records, and kills itself with SIGKILL at the K-th arrival at its kill point: a torn
tensor-file write on the file-I/O thread, a torn journal append, inside the optimizer-state copier
thread, or just before or after a file of the store is renamed into place. It prints how many steps
the store held for a reader at that moment; after each kill the store must still hold them, verify,
and equal the uninterrupted run bit for bit; after the last kill the store is resumed to the end and
must equal the uninterrupted run bit for bit.
"""

from __future__ import annotations

import functools
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from _recording_helpers import resumable_setup, resumable_step
from test_store_checksum import _as_schema_1
from test_store_faults import _assert_same

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _recorder_store
from explaind.trajectory._layout import TEMP_FILE
from explaind.trajectory.store import StoreWriter, read_manifest

HERE = Path(__file__).parent
STEPS = 14


Chains = dict[str, tuple[int, list[tuple[str, int]]]]


def draw(chains: Chains, seed: int) -> Chains:
    """Per chain ``(checkpoint_every, [(point, K_max), ...])``: the same with each K drawn from 1..K_max."""
    rng = random.Random(seed)
    return {name: (every, [(point, rng.randint(1, k_max)) for point, k_max in points])
            for name, (every, points) in chains.items()}


def schema_1_store(store: Path, steps: int = 3) -> None:
    """A store of ``steps`` steps as an older explaind wrote it: SHA-256 checksums, schema 1."""
    real, _recorder_store.StoreWriter = _recorder_store.StoreWriter, functools.partial(StoreWriter, checksum="sha256")
    try:
        model, opt, X, y = resumable_setup()
        with explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store) as rec:
            for s in range(steps):
                resumable_step(model, opt, X, y, s, rec)
    finally:
        _recorder_store.StoreWriter = real
    _as_schema_1(store)
    assert read_manifest(store).schema_version == 1


def _kill(store: Path, every: int, point: str, k: int) -> int:
    """Run one recording of the chain until it kills itself; returns the steps its store held at the kill."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE.parent / "plugins")]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(HERE / "_kill_child.py"), str(store), str(every), str(STEPS), point,
                           str(k)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == -9, (point, k, done.returncode, done.stdout, done.stderr[-2000:])  # it got there
    kept = [int(line.split()[1]) for line in done.stdout.split("\n") if line.startswith("kept ")]
    assert len(kept) == 1, done.stdout
    return kept[0]


def run_chain(store: Path, reference, every: int, kills: list[tuple[str, int]], held: int = 0) -> None:
    """Kill recordings on ``store`` at ``kills`` in turn (checking it after each), then resume it to the end.

    ``held``: the steps the store holds before the first recording of the chain.
    """
    for point, k in kills:
        kept = _kill(store, every, point, k)
        assert kept >= held or held == 0  # the steps a reader saw before this recording started are all there
        if kept < 0:  # killed before the store's manifest existed: a reader says there is no store
            with pytest.raises(TrajectoryError, match="not an explaind trajectory store"):
                explaind.Trajectory.load(store, model=resumable_setup()[0])
            continue
        traj = explaind.Trajectory.load(store, model=resumable_setup()[0])
        assert traj.n_steps >= kept  # nothing a reader saw at the kill is lost
        traj.verify()
        _assert_same(reference, traj)
        held = traj.n_steps
    resume_to_the_end(store, reference, STEPS, every)


def resume_to_the_end(store: Path, reference, steps: int, every: int = 1) -> None:
    """Resume the store to ``steps`` steps; it must then be complete, verify, equal ``reference`` bit for bit and hold
    no temporary file."""
    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True,
                                      checkpoint_every=every)
    start = rec.restore()
    with rec:
        for s in range(start, steps):
            resumable_step(model, opt, X, y, s, rec)
    final = explaind.Trajectory.load(store, model=resumable_setup()[0])
    assert final.n_steps == steps and final.manifest.complete
    final.verify()
    _assert_same(reference, final)
    assert not [p.name for p in store.rglob("*") if TEMP_FILE.fullmatch(p.name)]
