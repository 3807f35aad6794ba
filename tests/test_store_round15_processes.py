"""Other processes, round 15
(docs/recording.md, "What tools do to a store, round 15"): real SIGKILLs of a sparse store's writer at its phases,
and two readers in other processes while a third resumes the store.

Every store left behind is read as a prefix of the uninterrupted run bit for bit (``resumable_reference``, recorded in
memory) and resumed to its end, bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from _kill_chain import STEPS as CHAIN_STEPS
from _kill_chain import run_chain
from _recording_helpers import resumable_reference
from _round12_kit import LONG, STEPS, record, same_run

HERE = Path(__file__).parent


# --------------------------------------------------------------------------- SIGKILL of a sparse store's writer
#: kill points of one chain on a sparse store (checkpoint_every=3): just before a step file is renamed into place,
#: inside a journal append, and just after the final manifest is renamed into place (tests/_kill_child.py)
SPARSE_PHASES = [("before:steps/", 2), ("journal", 2), ("after:manifest.json", 1)]


def test_sigkills_of_a_sparse_stores_writer_at_each_phase_lose_nothing(tmp_path):
    """Real SIGKILLs of a sparse recording (and of the resumes after each) at each phase of its writer: after each
    kill the store holds every step a reader had, verifies and equals the uninterrupted run; resumed to the end, bit
    for bit. Round 10 tried the checkpoint state's background write and a resume's ``restore()`` only."""
    run_chain(tmp_path / "run", resumable_reference(CHAIN_STEPS), 3, SPARSE_PHASES)


# --------------------------------------------------------------------------- readers beside a resume
_READER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from _recording_helpers import resumable_reference, resumable_setup
from test_store_faults import _assert_same
import explaind
ref = resumable_reference(int(sys.argv[3]))
seen = [0]
while True:
    traj = explaind.Trajectory.load(sys.argv[1], model=resumable_setup()[0])
    _assert_same(ref, traj)
    assert traj.n_steps >= seen[-1], (traj.n_steps, seen[-1])
    seen.append(traj.n_steps)
    if traj.n_steps == len(ref.manifest.steps) and traj.manifest.complete:
        break
print("reads", len(seen) - 1, "steps", seen[1], seen[-1], flush=True)
"""


def _python(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE.parent / "plugins")]))
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


_RESUMER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from _recording_helpers import resumable_setup, resumable_step
import explaind
model, opt, X, y = resumable_setup()
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=sys.argv[1], resume=True)
start = rec.restore()
time.sleep(float(sys.argv[4]))  # the readers have started
with rec:
    for s in range(start, int(sys.argv[3])):
        resumable_step(model, opt, X, y, s, rec)
        time.sleep(0.05)
"""


def test_two_readers_in_other_processes_while_a_third_resumes(tmp_path):
    """A store of ``STEPS`` steps; one process resumes it to 30 steps while two others load it in a loop until it is
    complete. Every load of either reader is a prefix of the uninterrupted run bit for bit, never shorter than the
    one before; the final store is the run bit for bit."""
    steps = 30
    store = tmp_path / "run"
    record(store)
    resumer = _python(_RESUMER, store, HERE, steps, 8.0)
    readers = [_python(_READER, store, HERE, steps) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in [resumer, *readers]]
    for p, (_, err) in zip([resumer, *readers], outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    for out, _ in outputs[1:]:
        reads, first, last = (int(out.split()[i]) for i in (1, 3, 4))
        assert first >= STEPS and last == steps and reads >= 2, out
    assert same_run(store, resumable_reference(steps)) == steps
    assert LONG < steps
