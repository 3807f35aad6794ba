"""A sparse store with the update audit off stores no tensor coefficient and nothing reads one, so the recorder
does not have the adapter compute them (Adam's ``P``: four passes over the parameters per step on the loop's
thread); they are replayed when read (docs/recording.md, "Sparse checkpoints").

Checked: no ``P`` is computed while recording such a store (a dense store computes one per parameter and step);
the replayed ``P`` equals the ``P`` a plain loop derives from torch's own state after each step; the replica on the
sparse store equals the trained model and the slow float64 loop reference (tests/reference.py, run on the dense
store of the same run), and so do its train-axis scores; its step files hold the same tensors as those of a
sparse store recorded with the audit on (where ``P`` is computed at the step).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _recording_helpers import classifier_setup, classifier_step
from explaind_optimizers import _pooled
from reference import Reference, rel_err
from safetensors.torch import load_file

import explaind

STEPS, K = 10, 4
VARIANTS = {
    "adam": (torch.optim.Adam, {"lr": 0.02}),
    "adamw-amsgrad": (torch.optim.AdamW, {"lr": 0.02, "weight_decay": 0.1, "amsgrad": True}),
}

pytestmark = pytest.mark.usefixtures("one_thread")


def _count_fills(monkeypatch) -> list[int]:
    """One entry per tensor coefficient an adapter computes from now on (at the step or in a deferred job)."""
    fills: list[int] = []
    tensor = _pooled.StepSlots.tensor

    def counted(self, param, pending):
        def fill(out, inner=pending.fill):
            fills.append(1)
            return inner(out)

        return tensor(self, param, _pooled.Pending(pending.like, fill))

    monkeypatch.setattr(_pooled.StepSlots, "tensor", counted)
    return fills


def _record(variant: str, store, **options):
    model, opt, X, y = classifier_setup(*VARIANTS[variant], torch.float64)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=store,
                                      fsync=False, check_gradients=False, **options)
    with rec:
        for s in range(STEPS):
            classifier_step(model, opt, X, y, s, rec)
    return rec.trajectory, model, opt, X


def _preconditioners(opt: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``P`` of the last step from torch's own state, in float64 (the definition in docs/maths.md §3)."""
    group = opt.param_groups[0]
    beta1, beta2 = group["betas"]
    out = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        t = float(state["step"])
        v = state["max_exp_avg_sq"] if group["amsgrad"] else state["exp_avg_sq"]
        out[name] = group["lr"] / (1 - beta1**t) / (v.sqrt() / (1 - beta2**t) ** 0.5 + group["eps"])
    return out


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_sparse_store_without_audit_computes_no_coefficient_and_replays_P(tmp_path, monkeypatch, variant):
    fills = _count_fills(monkeypatch)
    _record(variant, tmp_path / "dense", audit=False)
    dense_fills = len(fills)
    assert dense_fills == STEPS * 4  # the spy sees every P: one per parameter and step (4 tensors)
    fills.clear()
    sparse, model, opt, _ = _record(variant, tmp_path / "sparse", audit=False, checkpoint_every=K)
    assert fills == []  # before: one new P per parameter and step, which the sparse store never kept
    assert sparse.sparse and sparse.n_steps == STEPS
    want = _preconditioners(opt, model)
    got = sparse.updates(STEPS - 1)
    for name, P in want.items():
        assert rel_err(got[name].P, P) <= 1e-12, name  # replayed (step 9 is in the segment after a checkpoint)
    for s in range(STEPS):
        assert all(torch.isfinite(u.P).all() for u in sparse.updates(s).values()), s
    assert np.nanmax(sparse.replay_error()) <= 1e-12


FIVE = {
    "rmsprop-momentum-centered": (torch.optim.RMSprop, {"lr": 0.01, "momentum": 0.5, "centered": True}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.05}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01}),
}


@pytest.mark.parametrize("variant", list(FIVE))
def test_the_other_adapters_that_defer_compute_none_and_replay_the_dense_stores_coefficients(tmp_path, monkeypatch,
                                                                                            variant):
    """Every adapter that takes ``defer`` gets the unread buffers; the replayed coefficients equal the dense store's
    (which tests/test_recorder_coefficient_buffers_five.py compares with torch's state bit for bit)."""
    monkeypatch.setitem(VARIANTS, variant, FIVE[variant])
    fills = _count_fills(monkeypatch)
    dense = _record(variant, tmp_path / "dense", audit=False)[0]
    assert fills  # the spy sees them (RAdam has a tensor coefficient only once its rectification is on)
    fills.clear()
    sparse = _record(variant, tmp_path / "sparse", audit=False, checkpoint_every=K)[0]
    assert fills == []
    for s in range(STEPS):
        for name, u in dense.updates(s).items():
            v = sparse.updates(s)[name]
            for field in ("a", "b", "P", "q", "n", "lambda_c", "lambda_d"):
                want, got = getattr(u, field), getattr(v, field)
                assert rel_err(torch.as_tensor(got), torch.as_tensor(want)) <= 1e-12, (s, name, field)
    assert np.nanmax(sparse.replay_error()) <= 1e-12


def test_the_replica_and_train_scores_on_it_equal_the_model_and_the_loop_reference(tmp_path):
    sparse, model, _, X = _record("adam", tmp_path / "sparse", audit=False, checkpoint_every=K)
    dense = _record("adam", tmp_path / "dense", audit=False)[0]
    X_test = X[:5]
    with torch.no_grad():
        truth = model(X_test)
    ref = Reference(dense, X_test)  # independent of the sparse store's replay
    replica = explaind.KernelReplica(device="cpu").fit(sparse).predict(X_test)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(sparse).transform(X_test)
    figures = {"replica vs model": rel_err(replica, truth), "replica vs reference": rel_err(replica, ref.replica()),
               "train vs reference": rel_err(att.values, ref.kept(("train",))),
               "residual share": att.meta["residual_share"]}
    print("  ".join(f"{k} {v:.1e}" for k, v in figures.items()))  # pytest -s shows the measured figures
    assert max(figures.values()) <= 1e-9, figures
    assert att.completeness_error() <= 1e-12


def test_its_step_files_hold_what_a_sparse_store_with_the_audit_on_holds(tmp_path):
    _record("adam", tmp_path / "off", audit=False, checkpoint_every=K)
    _record("adam", tmp_path / "on", audit=True, checkpoint_every=K)
    off, on = (sorted([*(tmp_path / run).glob("steps/*"), *(tmp_path / run).glob("optimizer/checkpoint-*")])
               for run in ("off", "on"))  # the audit's momentum (optimizer/state-*) only with the audit on
    assert [p.relative_to(tmp_path / "off") for p in off] == [p.relative_to(tmp_path / "on") for p in on]
    assert len(off) == STEPS + 1  # the step files and the final checkpoint's optimizer state
    for a, b in zip(off, on):
        ta, tb = load_file(a), load_file(b)
        assert ta.keys() == tb.keys() and not any(k.endswith(".P") for k in ta), a.name
        for key in ta:
            assert torch.equal(ta[key].nan_to_num(7.0), tb[key].nan_to_num(7.0)), (a.name, key)
