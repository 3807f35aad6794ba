"""A dense store stores an optimizer-state tensor from the audit's momentum instead of a copy where the two hold the
same bytes (``explaind/trajectory/_state_share.py``): the store is the same file for file, byte for byte, as with
every state tensor copied; its states equal those of a plain loop without a recorder after their steps; with SGD
momentum no copy of the state is made at all; where the bytes differ (a signed zero, Adam's ``lerp_``), the state's
own bytes are stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _recording_helpers import classifier_setup, classifier_step
from safetensors import safe_open
from torch import nn

import explaind
from explaind.trajectory import _recorder_store, _state_share, store
from explaind.trajectory._background import CopyPool
from explaind.trajectory._io import read_tensors
from explaind.trajectory._state_share import StateCopy
from explaind.trajectory.store import read_manifest

STEPS = 7
OPTIMIZERS = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "sgd-nesterov-decay": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
}


def _setup(name: str, dtype: torch.dtype):
    return classifier_setup(*OPTIMIZERS[name], dtype)


_step = classifier_step


def _by_hand(name: str, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """The optimizer's state tensors after each step of a plain loop (no recorder), as deep copies."""
    model, opt, X, y = _setup(name, dtype)
    out = []
    for s in range(STEPS):
        _step(model, opt, X, y, s)
        out.append({f"state.{i}.{k}": v.clone() for i, entry in opt.state_dict()["state"].items()
                    for k, v in entry.items() if isinstance(v, torch.Tensor)})
    return out


def _record(store: Path, name: str, dtype: torch.dtype, background: bool, monkeypatch, share: bool):
    """Record the run into ``store``; returns the recorder and how many state tensors came from the audit."""
    shared: list[int] = []
    resolve = StateCopy.resolve

    def counted(self, tensors):
        out = resolve(self, tensors)
        pooled = {id(t) for t in self.pooled.values()}
        shared.append(sum(1 for k, t in out.items() if k.startswith("state.") and id(t) not in pooled))
        return out

    with monkeypatch.context() as m:
        m.setattr(StateCopy, "resolve", counted)
        if not share:  # every state tensor copied, as before the sharing
            m.setattr(_recorder_store, "momentum_by_state_index", lambda *args: {})
        model, opt, X, y = _setup(name, dtype)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                          fsync=False, background_writes=background)
        with rec:
            for s in range(STEPS):
                _step(model, opt, X, y, s, rec)
    return rec, sum(shared)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t`` (signed zeros and NaN payloads told apart)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _journal(files: dict[str, bytes]) -> list[dict]:
    return [json.loads(line) for line in files["journal.jsonl"].splitlines()]


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "optimizer_state"}


def _slot_step(root: Path, path: str) -> str:
    """The ``n_steps`` an optimizer slot file was written after (its checksummed metadata)."""
    with safe_open(str(root / path), "pt") as fh:
        return fh.metadata()["n_steps"]


@pytest.mark.parametrize("background", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_the_store_is_byte_identical_to_copying_every_state_tensor(tmp_path, monkeypatch, name, dtype, background):
    monkeypatch.setattr(store, "new_run_id", lambda: "7" * 32)  # one identity for both: each store draws its own
    rec, shared = _record(tmp_path / "shared", name, dtype, background, monkeypatch, share=True)
    copied_rec, copied = _record(tmp_path / "copied", name, dtype, background, monkeypatch, share=False)
    assert copied == 0
    n_params = len(list(rec.model.parameters()))
    if name == "sgd-momentum":  # torch's buf.mul_(momentum).add_(g) is the audit's a * m + u, bit for bit
        assert shared == n_params * STEPS
        assert not [k for k in rec._pool._free if k.startswith("state.")]  # no copy of the state was ever made
        assert [k for k in copied_rec._pool._free if k.startswith("state.")]
    a, b = _files(tmp_path / "shared"), _files(tmp_path / "copied")
    assert a.keys() == b.keys() and any(k.startswith("optimizer/") for k in a)
    # the background writer writes only the newest state of the steps it finds queued together, so which steps'
    # states the two slots hold (and the journal says) depends on timing there; inline, every file is compared
    # (the manifest's creation time aside)
    timing = {"journal.jsonl"} | {k for k in a if k.startswith("optimizer/")} if background else set()
    for path in a.keys() - timing - {"manifest.json"}:
        assert a[path] == b[path], path
    ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
    assert ma.pop("created") and mb.pop("created")
    if background:
        assert [_untimed(r) for r in _journal(a)] == [_untimed(r) for r in _journal(b)]
        ma["steps"], mb["steps"] = [_untimed(r) for r in ma["steps"]], [_untimed(r) for r in mb["steps"]]
        held = {_slot_step(tmp_path / "copied", k): b[k] for k in b if k.startswith("optimizer/")}
        for k in a:
            if k.startswith("optimizer/") and _slot_step(tmp_path / "shared", k) in held:
                assert a[k] == held[_slot_step(tmp_path / "shared", k)], k
    assert ma == mb
    # and the stored states are the optimizer's own after their steps (a plain loop without a recorder)
    reference = _by_hand(name, dtype)
    m = read_manifest(tmp_path / "shared")
    latest = {r.path: (s, r) for s, r in enumerate(step.optimizer_state for step in m.steps) if r is not None}
    assert len(latest) == 2
    for s, record in latest.values():
        tensors, meta = read_tensors(tmp_path / "shared", record)
        assert meta["n_steps"] == str(s + 1)
        own = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
        assert own.keys() == reference[s].keys()
        for k, v in reference[s].items():
            assert torch.equal(_bits(own[k]), _bits(v)), (s, k)


def _run(copy: StateCopy, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for dst, src in copy.pairs:
        dst.copy_(src)
    job = copy.compare()
    if job is not None:
        job()
    return copy.resolve(encoded)


def test_a_state_tensor_is_taken_from_the_momentum_only_when_every_byte_agrees():
    gen = torch.Generator().manual_seed(0)
    m = torch.randn(4, 3, generator=gen)
    state = {
        "state.0.momentum_buffer": m.clone(),  # equal: stored from m
        "state.1.momentum_buffer": torch.zeros(5),  # -0.0 in the candidate: equal by value, not by bytes
        "state.2.momentum_buffer": m.t().contiguous().t(),  # same values, another layout: copied
        "state.3.exp_avg": m.double(),  # another dtype: copied
        "state.4.step": torch.tensor(3.0),  # no candidate of its shape
        "group.0.lr": torch.tensor(0.1),  # not a parameter's state
    }
    momentum = {"state.0.": m, "state.1.": -torch.zeros(5), "state.2.": m, "state.3.": m, "state.4.": m}
    pool = CopyPool()
    copy = StateCopy(pool, momentum)
    encoded = {k: copy.take(k, v) for k, v in state.items()}
    out = _run(copy, encoded)
    assert out["state.0.momentum_buffer"] is m
    assert copy.shared == 1
    for key, value in state.items():  # every stored tensor holds the state's own bytes
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        assert torch.equal(_bits(out[key]), _bits(value)), key
        if key != "state.0.momentum_buffer":
            assert out[key] is not value and out[key].data_ptr() != value.data_ptr(), key  # a copy, not the live one
    assert torch.signbit(out["state.1.momentum_buffer"]).logical_not().all()
    pooled = copy.pooled
    assert set(pooled) == set(state) - {"state.0.momentum_buffer"}
    copy.release()
    free = [t for bufs in pool._free.values() for t in bufs]
    assert len(free) == len(pooled) and all(t is not m for t in free)  # the audit's tensor never goes to the pool


def test_state_keys_map_to_the_recorded_parameters_across_groups():
    a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
    opt = torch.optim.SGD([{"params": [a, b]}, {"params": [c], "lr": 0.5}], lr=0.1, momentum=0.9)
    ma, mc = torch.ones(2), torch.full((2,), 2.0)
    got = _state_share.momentum_by_state_index(opt, {id(a): "a", id(c): "c"}, {"a": ma, "c": mc, "b": ma})
    assert got.keys() == {"state.0.", "state.2."}  # b is not recorded (no name): no candidate
    assert got["state.0."] is ma and got["state.2."] is mc
