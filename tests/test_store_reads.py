"""How often the engine reads a stored run, and the cheaper checks of what it reads (docs/recording.md, "The store").

Planning a window reads each step file once (it used to read it three times: for the endpoint values, for the
stacked parameters and for the stacked updates); the result is bit-identical to the stack read step by step. The
shape test of a tensor coefficient and the finiteness test of a file's parameters are done without
``torch.broadcast_shapes`` and with one ``isfinite``; forged files are refused as before, naming the tensor.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import classification_data, mlp
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import explaind
import explaind.trajectory.disk as disk
from explaind.exceptions import TrajectoryError
from explaind.trajectory._io import broadcasts_to

STEPS = 40


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A stored AdamW run of a 4-16-3 tanh MLP, 40 steps of 6 samples."""
    path = tmp_path_factory.mktemp("reads") / "run"
    X, y = classification_data(n=24, d=4, classes=3, seed=1)
    model = mlp(d=4, o=3, hidden=16, seed=2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path)
    with rec:
        for s in range(STEPS):
            idx = torch.arange(6 * (s % 4), 6 * (s % 4) + 6)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return path, X


def _counting(monkeypatch) -> collections.Counter:
    reads: collections.Counter = collections.Counter()
    original = disk.read_tensors

    def counted(root, record, step=None):
        reads[step] += 1
        return original(root, record, step)

    monkeypatch.setattr(disk, "read_tensors", counted)
    return reads


@pytest.mark.parametrize("quadrature, nodes", [("adaptive", None), ("midpoint", 5), ("gauss-legendre", 3)])
def test_planning_a_window_reads_each_step_file_once(store, monkeypatch, quadrature, nodes):
    path, X = store
    traj = explaind.Trajectory.load(path, model=mlp(d=4, o=3, hidden=16))
    est = explaind.KernelReplica(quadrature=quadrature, nodes=nodes, device="cpu").fit(traj)
    reads = _counting(monkeypatch)
    est.fidelity_report(X[:3])
    assert sorted(k for k in reads if k is not None) == list(range(STEPS))
    assert set(reads[s] for s in range(STEPS)) == {1}, dict(reads)


def test_the_stack_of_held_points_is_bit_identical_to_the_stack_read_step_by_step(store):
    path, X = store
    traj = explaind.Trajectory.load(path, model=mlp(d=4, o=3, hidden=16))
    engine = explaind.KernelReplica(device="cpu").fit(traj).engine_
    Xt = engine.inputs(X[:2])
    explained = engine.explained(Xt, None, None, "test")
    lo, hi = 3, 19  # more steps than the engine's cache holds
    read = engine.stack(lo, hi, Xt, explained)
    engine.clear()
    points = [engine.params(s) for s in range(lo, hi + 1)]
    held = engine.stack(lo, hi, Xt, explained, points)
    for name in engine.names:
        assert torch.equal(read.base[name], held.base[name])
        assert torch.equal(read.delta[name], held.delta[name])
        # an independent reference: theta_s and theta_{s+1} - theta_s straight from the trajectory
        ref_base = torch.stack([traj.params(s)[name] for s in range(lo, hi)])
        ref_delta = torch.stack([traj.params(s + 1)[name] - traj.params(s)[name] for s in range(lo, hi)])
        assert torch.equal(held.base[name], ref_base)
        assert torch.equal(held.delta[name], ref_delta)


def test_broadcasts_to_agrees_with_torch_broadcast_shapes():
    shapes = [()] + [s for r in (1, 2, 3) for s in itertools.product((0, 1, 2, 3), repeat=r)]
    for shape, target in itertools.product(shapes, shapes):
        try:
            expected = tuple(torch.broadcast_shapes(shape, target)) == target
        except RuntimeError:
            expected = False
        assert broadcasts_to(shape, target) == expected, (shape, target)


def _forge_step(path, step, edit):
    """Rewrite one step file with ``edit`` applied to its tensors; the manifest's checksum is updated to match."""
    import json

    import xxhash

    manifest = json.loads((path / "manifest.json").read_text())
    record = manifest["steps"][step]["file"]
    raw = (path / record["path"]).read_bytes()
    header = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    tensors = {k: v.clone() for k, v in st_load(raw).items()}
    edit(tensors)
    data = st_save(tensors, metadata=header.get("__metadata__"))
    (path / record["path"]).write_bytes(data)
    record.update(checksum="xxh3-128:" + xxhash.xxh3_128(data).hexdigest(), nbytes=len(data))
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("name", ["0.weight", "0.bias", "2.weight", "2.bias"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_parameter_anywhere_in_a_step_file_is_refused_by_name(store, tmp_path, name, value):
    import shutil

    path = tmp_path / "run"
    shutil.copytree(store[0], path)
    _forge_step(path, 5, lambda t: t[f"param.{name}"].view(-1).__setitem__(-1, value))
    traj = explaind.Trajectory.load(path, model=mlp(d=4, o=3, hidden=16))
    traj.params(5)  # the steps around it read
    with pytest.raises(TrajectoryError, match=rf"000005\.safetensors' \(step 5\): 'param\.{name}' holds NaN or "
                                              r"infinite values"):
        traj.params(6)


def test_a_tensor_coefficient_of_a_larger_rank_is_refused(store, tmp_path):
    import shutil

    path = tmp_path / "run"
    shutil.copytree(store[0], path)
    # the bias of 3 outputs (shape [3]) with its P as [1, 3]: torch broadcasts it to [1, 3], not to [3]
    _forge_step(path, 2, lambda t: t.update({"update.2.bias.P": t["update.2.bias.P"][None]}))
    traj = explaind.Trajectory.load(path, model=mlp(d=4, o=3, hidden=16))
    with pytest.raises(TrajectoryError, match=r"'update\.2\.bias\.P' is float64 of shape \[1, 3\], allowed: a "
                                              r"floating tensor broadcasting to the shape \[3\]"):
        traj.updates(2)
