"""Sparse checkpoints (``checkpoint_every=k``): replayed steps against the dense store of the same run.

The dense store (every ``theta_{s+1}`` and coefficient as the optimizer produced them) is the
independent reference: the sparse store rebuilds the steps between checkpoints by replaying the
optimizer on recomputed batch gradients. The runs use two micro-batches and gradient clipping, so
the recomputed gradient is not bitwise the loop's and "equal" is a measured float64 tolerance.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from _fault_injection import Injector, Killed
from _recording_helpers import (
    RESUME_STEPS,
    classification_data,
    kill_after,
    mlp,
    resumable_reference,
    resumable_setup,
    resumable_step,
)
from safetensors import safe_open
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory import Trajectory
from explaind.trajectory import replay as replay_module
from explaind.trajectory._io import write_tensors
from explaind.trajectory.lock import _ACTIVE

HERE = Path(__file__).parent
STEPS = 10
K = 4

pytestmark = pytest.mark.usefixtures("one_thread")


def _optimizer(name: str, model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    if name == "sgd_momentum":
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        return opt, None
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=0.02), None
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)


def _record(name: str, store: Path | None, k: int = 1, steps: int = STEPS, dtype=torch.float64, **kw):
    """A classification run: two micro-batches per step, clipping, the optimizer ``name``."""
    X, y = classification_data(n=30, d=4, classes=3, dtype=dtype, seed=3)
    model = mlp(d=4, o=3, hidden=6, dtype=dtype, seed=3)
    opt, sched = _optimizer(name, model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      checkpoint_every=k, **kw)
    with rec:
        for s in range(steps):
            idx = torch.randperm(30, generator=torch.Generator().manual_seed(100 + s))[:10]
            opt.zero_grad()
            for part in (idx[:6], idx[6:]):
                (nn.functional.cross_entropy(model(X[part]), y[part]) * (len(part) / 10)).backward()
                rec.log_batch(part, torch.full((len(part),), 0.1, dtype=dtype))
            nn.utils.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            if sched is not None:
                sched.step()
    return rec.trajectory, X


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


#: Steps keeping theta and steps keeping the optimizer state too, for 14 steps with k = 4 (docs/recording.md,
#: "Sparse checkpoints"): SGD with momentum stores theta + momentum (2 theta-sized tensors) where a dense store
#: keeps 2k thetas, so both every 2k steps; Adam's state (m, v) fits in 3 slots of theta + P: theta every k, the
#: state every 3k steps; the last step is always a full checkpoint.
LAYOUTS = {"sgd_momentum": ([7, 13], [7, 13]), "adam": ([3, 7, 11, 13], [11, 13]),
           "adamw_schedule": ([3, 7, 11, 13], [11, 13])}


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "adamw_schedule"])
def test_replayed_steps_equal_the_dense_store(tmp_path, name):
    steps = 14
    memory, _ = _record(name, None, steps=steps)
    dense, _ = _record(name, tmp_path / "dense", k=1, steps=steps)
    sparse, _ = _record(name, tmp_path / "sparse", k=K, steps=steps)
    assert not dense.sparse and sparse.sparse and sparse.n_steps == dense.n_steps == steps
    checkpoints = [s for s, r in enumerate(sparse.manifest.steps) if r.has_params]
    states = [s for s, r in enumerate(sparse.manifest.steps) if r.optimizer_state is not None]
    assert (checkpoints, states) == LAYOUTS[name]
    worst = 0.0
    for s in range(steps + 1):
        for n in dense.param_names:
            assert torch.equal(dense.params(s)[n], memory.params(s)[n])  # k=1 is the dense store
            worst = max(worst, _rel(sparse.params(s)[n], dense.params(s)[n]))
            if s == 0 or s - 1 in checkpoints:
                assert torch.equal(sparse.params(s)[n], dense.params(s)[n])  # stored, not replayed
    for s in range(steps):
        assert torch.equal(sparse.batch(s)[0], dense.batch(s)[0]) and sparse.grad_scale(s) == dense.grad_scale(s)
        for n, u in dense.updates(s).items():
            v = sparse.updates(s)[n]
            for field in ("a", "b", "q", "n", "lambda_c", "lambda_d"):
                assert getattr(v, field) == getattr(u, field), (s, n, field)
            assert _rel(v.P, u.P) <= 1e-12, (s, n)
    assert worst <= 1e-12
    gaps = sparse.replay_error()
    assert np.isnan(gaps[[s for s in range(steps) if s not in checkpoints]]).all()
    assert (gaps[checkpoints] <= 1e-12).all()
    assert np.isnan(dense.replay_error()).all()
    sparse.verify()


def test_attributions_and_replica_equal_the_dense_store(tmp_path):
    dense, X = _record("adamw_schedule", tmp_path / "dense", k=1)
    sparse, _ = _record("adamw_schedule", tmp_path / "sparse", k=K)
    keep = ("step", "group", "train")
    atts = [explaind.InfluenceEstimator(keep=keep, quadrature="gauss-legendre", nodes=4).fit(t).transform(X[:4])
            for t in (dense, sparse)]
    for term in ("values", "regularization", "residual", "initial"):
        got, want = np.asarray(getattr(atts[1], term)), np.asarray(getattr(atts[0], term))
        assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(np.asarray(atts[0].values)), term
    reps = [explaind.KernelReplica(quadrature="gauss-legendre", nodes=4).fit(t).predict(X[:4]) for t in (dense, sparse)]
    assert _rel(torch.as_tensor(np.asarray(reps[1])), torch.as_tensor(np.asarray(reps[0]))) <= 1e-12


def test_float32_replay_gap_is_small_but_reported(tmp_path):
    sparse, _ = _record("adam", tmp_path / "sparse", k=K, dtype=torch.float32)
    dense, _ = _record("adam", tmp_path / "dense", k=1, dtype=torch.float32)
    gaps = sparse.replay_error()
    assert np.nanmax(gaps) <= 1e-4 and np.isfinite(gaps[[7, 9]]).all()
    theta = max(_rel(sparse.params(s)[n], dense.params(s)[n]) for s in range(STEPS + 1) for n in dense.param_names)
    assert theta <= 1e-5


def _store_bytes(root: Path) -> int:
    """Bytes that grow with the run: step files and checkpoint states (not the two resume slots both stores keep)."""
    files = [*(root / "steps").iterdir(), *(root / "optimizer").glob("checkpoint-*")]
    return sum(p.stat().st_size for p in files)


@pytest.mark.parametrize("name", ["sgd", "sgd_momentum", "adam"])
def test_sparse_store_bytes(tmp_path, name):
    """theta and optimizer states of a sparse store <= 1/k of the dense store's bytes, plus the per-step records."""
    sizes, steps = {}, 6 * K
    for k in (1, K):
        torch.manual_seed(0)
        X, y = torch.randn(64, 32, dtype=torch.float64), torch.randint(0, 10, (64,))
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).double()
        opt = {"sgd": lambda ps: torch.optim.SGD(ps, lr=0.1), "adam": torch.optim.Adam,
               "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)}[name](model.parameters())
        store = tmp_path / f"k{k}"
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                          checkpoint_every=k, fsync=False)
        with rec:
            for s in range(steps):
                idx = torch.arange(8 * (s % 8), 8 * (s % 8) + 8)
                opt.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
        sizes[k] = _store_bytes(store)
    traj = rec.trajectory
    theta = 8 * sum(p.numel() for p in model.parameters())
    # per step: the file less theta where it holds one (batch, scalars, replay record, header)
    records = sum((traj.root / r.file.path).stat().st_size - (theta if r.has_params else 0)
                  for r in traj.manifest.steps)
    assert records <= steps * 4096
    assert sizes[K] - records <= sizes[1] / K
    assert sizes[K] - records > 0.7 * sizes[1] / K  # the bound is not loose by a whole checkpoint


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import explaind
    from _recording_helpers import RESUME_STEPS, resumable_setup, resumable_step

    model, opt, X, y = resumable_setup()
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store={store!r},
                                      checkpoint_every={k})
    with rec:
        for s in range(RESUME_STEPS):
            resumable_step(model, opt, X, y, s, rec)
            print(s, flush=True)
            time.sleep(0.02)
    """
)


def test_sigkill_mid_segment_loses_only_the_open_segment_and_resumes(tmp_path):
    k = 4
    store = tmp_path / "run"
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(HERE), store=str(store), k=k))
    seen = kill_after(script, 10)  # inside the segment of steps 8..11
    reference = resumable_reference()
    model, opt, X, y = resumable_setup()
    crashed = Trajectory.load(store, model=mlp(seed=1), train_data=(X, y))
    n = crashed.n_steps
    # the store ends at its last checkpoint: lost are the open segment (< k steps), the deferred step and the
    # at most 4 + 1 steps the background writer had not committed
    assert n % k == 0 and seen + 1 - (k - 1) - 6 <= n <= seen + 1 and n >= k
    assert not crashed.manifest.complete
    crashed.verify()
    for s in range(n + 1):
        for name, t in reference.params(s).items():
            assert _rel(crashed.params(s)[name], t) <= 1e-12
    # Adam (theta every k, the state every 3k): resuming continues from the last stored optimizer state
    full = max((s + 1 for s, r in enumerate(crashed.manifest.steps) if r.optimizer_state is not None), default=0)
    assert n - 3 * k < full <= n and full % (3 * k) == 0
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, resume=True,
                                      checkpoint_every=k)
    assert rec.restore() == full  # theta and the optimizer state of that checkpoint
    with rec:
        for s in range(full, RESUME_STEPS):
            resumable_step(model, opt, X, y, s, rec)
    traj = Trajectory.load(store, model=mlp(seed=1), train_data=(X, y))
    assert traj.n_steps == RESUME_STEPS and traj.manifest.complete
    for s in range(RESUME_STEPS + 1):
        for name, t in reference.params(s).items():
            assert _rel(traj.params(s)[name], t) <= 1e-12
    for s in range(RESUME_STEPS):
        for name, u in reference.updates(s).items():
            assert _rel(traj.updates(s)[name].P, u.P) <= 1e-12
    assert np.nanmax(traj.replay_error()) <= 1e-12
    traj.verify()


def test_a_kill_at_any_write_point_keeps_every_committed_checkpoint(tmp_path, monkeypatch):
    """In-process kills (tests/_fault_injection.py) at every write of a 7-step recording with k=2, then resume.

    Adam: theta every 2 steps, the optimizer state every 6 and at the end, so a kill after step 5 leaves
    a checkpoint with theta only after the last state (resuming starts at that state).
    """
    steps, k = 7, 2
    reference = resumable_reference()
    if Path("/dev/shm").is_dir():  # tmpfs: fsync costs nothing there, the kill points are the same
        tmp_path = Path(tempfile.mkdtemp(prefix="explaind-sparse-faults-", dir="/dev/shm"))
        request_cleanup = True
    else:
        request_cleanup = False

    def record(store, start, progress, **kw):
        model, opt, X, y = resumable_setup()
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store, checkpoint_every=k,
                                          background_writes=False, **kw)
        if kw.get("resume"):  # from the last stored optimizer state: at or before the last checkpoint
            full = max((s + 1 for s, r in enumerate(Trajectory.load(store, model=mlp(seed=1)).manifest.steps)
                        if r.optimizer_state is not None), default=0)
            start = rec.restore()
            assert start == full <= progress[1]
            behind.append(start < progress[1])
        with rec:
            for s in range(start, steps):
                resumable_step(model, opt, X, y, s, rec)
                progress[0] = s + 1

    behind: list[bool] = []
    try:
        _kill_everywhere(tmp_path, monkeypatch, record, reference, steps, k)
        assert any(behind) and not all(behind)  # some resumes start before the last checkpoint, some at it
    finally:
        if request_cleanup:
            shutil.rmtree(tmp_path, ignore_errors=True)


def _kill_everywhere(tmp_path, monkeypatch, record, reference, steps, k):
    inj = Injector(monkeypatch, tmp_path)
    inj.start()
    record(tmp_path / "clean", 0, [0])
    inj.stop()
    total = len(inj.events)
    assert total > 30
    for point in range(total):
        store, progress = tmp_path / f"k{point}", [0]
        inj.start(kill_at=point)
        with pytest.raises(Killed):
            record(store, 0, progress)
        inj.stop()
        _ACTIVE.clear()  # the killed writer's lock is stale
        try:
            kept = Trajectory.load(store, model=mlp(seed=1)).n_steps
        except TrajectoryError:
            kept = 0  # killed before the store existed
        # the store ends at a checkpoint (every k-th step or the last); lost: the open segment, the waiting step
        assert (kept % k == 0 or kept == steps) and kept >= progress[0] - k - 1, (point, inj.events[-1], kept)
        record(store, kept, [0, kept], resume=kept > 0, overwrite=kept == 0)
        traj = Trajectory.load(store, model=mlp(seed=1))
        assert traj.n_steps == steps and traj.manifest.complete
        for s in range(steps + 1):
            for name, t in reference.params(s).items():
                assert _rel(traj.params(s)[name], t) <= 1e-12, (point, s)
        traj.verify()
        shutil.rmtree(store)


def _rewrite_step(root: Path, s: int, edit) -> None:
    """Rewrite step ``s``'s file through ``edit(tensors, metadata)`` and record its new checksum in the manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    rel = manifest["steps"][s]["file"]["path"]
    with safe_open(str(root / rel), framework="pt") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = dict(f.metadata())
    tensors, meta = edit(tensors, meta)
    record = write_tensors(root, rel, tensors, meta, fsync=False)
    manifest["steps"][s]["file"] = record.model_dump()
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_tampered_checkpoints_are_detected(tmp_path):
    store = tmp_path / "sparse"
    _record("adam", store, k=K)
    X, y = classification_data(n=30, d=4, classes=3, dtype=torch.float64, seed=3)
    model = mlp(d=4, o=3, hidden=6, seed=3)
    # bytes changed behind the checksum
    path = store / "steps" / "000007.safetensors"
    data = bytearray(path.read_bytes())
    data[-9] ^= 0xFF
    original = path.read_bytes()
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryError, match=r"000007\.safetensors' \(step 7\) is corrupted: its xxh3-128 checksum"):
        Trajectory.load(store, model=model, train_data=(X, y)).params(8)
    path.write_bytes(original)

    # a checkpoint rewritten with a valid checksum: the replay ends away from it, warned and reported
    def nudge(tensors, meta):
        tensors["param.0.weight"] = tensors["param.0.weight"] + 1e-3
        return tensors, meta

    _rewrite_step(store, 7, nudge)
    traj = Trajectory.load(store, model=model, train_data=(X, y))
    with pytest.warns(ExplaindWarning, match=r"steps 4\.\.7 .* away from the stored checkpoint theta_8"):
        gaps = traj.replay_error()
    # both segments touching theta_8 are off (the next one starts from it); the first one is not
    assert gaps[7] > 1e-3 and gaps[9] > 1e-3 and gaps[3] <= 1e-12
    # each segment ends on the stored checkpoint: the gaps are the residuals of steps 7 and 9, the sum stays complete
    att = explaind.InfluenceEstimator(keep=("step",), quadrature="gauss-legendre", nodes=4).fit(traj).transform(X[:3])
    residual = np.abs(np.asarray(att.residual)).max(axis=(0, 2))
    assert residual[[7, 9]].min() > 1e-4 and np.delete(residual, [7, 9]).max() <= 1e-12
    final = torch.func.functional_call(model, {**traj.params(STEPS)}, (X[:3],))
    assert _rel(torch.as_tensor(np.asarray(att.total())), final) <= 1e-12

    # a replay record edited with a valid checksum: the replayed coefficients differ from the recorded ones
    def other_beta(tensors, meta):
        body = json.loads(meta["replay"])
        body["groups"][0]["betas"] = [0.5, 0.999]  # Adam's a = beta1 is a recorded scalar coefficient
        return tensors, dict(meta, replay=json.dumps(body))

    _rewrite_step(store, 5, other_beta)
    with pytest.raises(TrajectoryError, match=r"Step 5 .* replayed optimizer coefficients"):
        Trajectory.load(store, model=model, train_data=(X, y)).params(6)


def test_missing_train_data_is_refused_with_the_fix(tmp_path):
    store = tmp_path / "sparse"
    _record("sgd_momentum", store, k=K, store_data=False)
    traj = Trajectory.load(store, model=mlp(d=4, o=3, hidden=6, seed=3))
    assert traj.params(8) is not None  # a checkpoint is read without data
    with pytest.raises(TrajectoryError, match=r"sparse store \(checkpoint_every=4\).*train_data=\(X, y\)"):
        traj.params(2)
    with pytest.raises(TrajectoryError, match="sparse store"):
        traj.updates(0)


def test_invalid_settings_are_refused(tmp_path):
    X, y = classification_data(n=30, d=4, classes=3, seed=3)
    model = mlp(d=4, o=3, hidden=6, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for bad in (0, -2, 1.5, "4", True):
        with pytest.raises(ConfigError, match=rf"checkpoint_every={bad!r} is not allowed.*positive int"):
            explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", store=tmp_path / "a", checkpoint_every=bad)
    with pytest.raises(ConfigError, match=r"checkpoint_every=4 needs a store directory.*store=<path>"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", checkpoint_every=4)
    dropout = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    with pytest.raises(ConfigError, match=r"active dropout or batch norm \(1\) and capture_random=False.*"
                                          r"capture_random='auto'"):
        explaind.TrajectoryRecorder(dropout, torch.optim.SGD(dropout.parameters(), lr=0.1), loss="cross_entropy",
                                    store=tmp_path / "b", checkpoint_every=4, capture_random=False)
    _record("sgd_momentum", tmp_path / "run", k=K, steps=5)
    model = mlp(d=4, o=3, hidden=6, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True)
    with pytest.raises(ConfigError, match=r"recorded with checkpoint_every=4\. Pass checkpoint_every=4"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", store=tmp_path / "run", resume=True,
                                    checkpoint_every=2)


def test_sweeps_replay_each_segment_a_bounded_number_of_times(tmp_path, monkeypatch):
    """Forward and reverse sweeps walk segment by segment: replays per segment do not grow with the run's length."""
    counts: dict[int, int] = {}
    original = replay_module.SegmentReplay._replay

    def counted(self, lo, hi):
        counts[lo] = counts.get(lo, 0) + 1
        return original(self, lo, hi)

    monkeypatch.setattr(replay_module.SegmentReplay, "_replay", counted)
    most = []
    for steps in (12, 36):
        counts.clear()
        traj, X = _record("adam", tmp_path / f"run{steps}", k=K, steps=steps)
        explaind.InfluenceEstimator(keep=("step", "train"), quadrature="gauss-legendre", nodes=2).fit(traj).transform(
            X[:2])
        assert sorted(counts) == list(range(0, steps, K))
        most.append(max(counts.values()))
    assert most[1] == most[0] <= 6


@pytest.mark.parametrize(("theta", "state", "extra"), [(100, 0, 0), (100, 100, 0), (100, 201, 100), (100, 200, 100),
                                                        (100, 350, 0), (100, 2000, 0), (7, 5, 3)])
def test_layout_stays_within_one_kth_of_dense(theta, state, extra):
    """Counting the stored thetas and states of a long run: at most 1/k of the dense bytes (+ the final checkpoint)."""
    from explaind.trajectory._sparse import SparseLayout

    k, steps = 5, 2400
    layout = SparseLayout.choose(k, theta, state, extra)
    stored = [(layout.stores_params(s), layout.stores_state(s)) for s in range(steps)]
    assert all(p for p, st in stored if st)  # a stored state always comes with theta
    kept = sum(theta * p + state * st for p, st in stored) + theta + state  # the last step is a full checkpoint
    assert kept <= steps * (theta + extra) / k + theta + state
    gaps = np.diff([-1] + [s for s, (p, _) in enumerate(stored) if p])
    assert gaps.max() == (layout.d + 1) * k and (state > extra or gaps.max() == k)  # k when the state costs nothing
    states = np.diff([-1] + [s for s, (_, st) in enumerate(stored) if st])
    assert (states == layout.m * k).all()


@pytest.mark.parametrize("steps", [8, 9])
def test_the_last_step_keeps_the_optimizer_state_so_a_resume_goes_on_from_it(tmp_path, steps):
    """A run ending at a theta checkpoint of the layout (8 = 2k) or between checkpoints (9) keeps its last step's
    optimizer state: resuming goes on after the last step. Before, a run of 8 steps resumed at step 0 (its last
    full checkpoint, the optimizer state kept every m k steps) and the 8 steps were recorded again."""
    traj, _ = _record("adamw", tmp_path / "run", k=K, steps=steps)
    X, y = classification_data(n=30, d=4, classes=3, seed=3)
    model = mlp(d=4, o=3, hidden=6, seed=3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run",
                                      checkpoint_every=K, resume=True)
    assert rec.restore() == steps
    assert all(torch.equal(p, traj.params(steps)[n]) for n, p in model.named_parameters())
    assert all(float(opt.state[p]["step"]) == steps for p in model.parameters())  # AdamW's state of that step
