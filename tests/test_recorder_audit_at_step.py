"""The update audit run at the step (store on) and the gradient check's schedule and memory.

With a store the audit runs inside the optimizer's post-step hook, on the previous copy of theta,
the live parameters and the tap's gradient snapshot, so one copy of theta and one snapshot are
held instead of two of each. Each test compares the recorded audit with a slow float64 reference
written here (a Python loop over the parameters replaying SGD with momentum from the loop's own
clones), on runs whose update or momentum is tampered with, and checks the buffers the recorder
holds.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.recurrence import LinearUpdate
from explaind.trajectory import store
from explaind.trajectory._audit import _modelled
from explaind.trajectory._background import CopyPool, Handoff
from explaind.trajectory._optimizer_state_watch import OptimizerStateWatch

LR, MU, STEPS = 0.1, 0.9, 7


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MU)
    X = torch.randn(40, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (40,))
    return model, opt, X, y


def _record(path, *, steps=STEPS, tamper=None, before_step=None, logged=None, **kwargs):
    """Record ``steps`` steps; returns the trajectory and the loop's clones ``(theta_s, g_s, theta_{s+1})`` per step.

    ``tamper(s, model, opt)`` runs as an optimizer post-step hook registered before the recorder's (so
    the recorder sees what it did); ``before_step(s, model, opt)`` runs just before ``opt.step()``;
    ``logged(s, idx)`` gives the indices logged for the batch ``idx`` (default: ``idx``).
    """
    model, opt, X, y = _setup()
    step = [0]
    if tamper is not None:
        opt.register_step_post_hook(lambda o, a, k: tamper(step[0], model, o))
    kwargs.setdefault("check_gradients", False)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path, fsync=False,
                                      **kwargs)
    clones = []
    with rec:
        for s in range(steps):
            step[0] = s
            idx = torch.arange(4 * s, 4 * s + 4) % 40
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx if logged is None else logged(s, idx))
            if before_step is not None:
                before_step(s, model, opt)
            theta = {n: p.detach().clone() for n, p in model.named_parameters()}
            grad = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            opt.step()
            clones.append((theta, grad, {n: p.detach().clone() for n, p in model.named_parameters()}))
    traj = rec.trajectory if path is None else explaind.Trajectory.load(path, model=_setup()[0])
    return traj, clones


def _reference_audit(clones):
    r"""Per step: :math:`\|\Delta\theta - \widehat{\Delta\theta}\| / \|\Delta\theta\|` of SGD with momentum, in float64.

    :math:`b_0 = g_0`, :math:`b_s = \mu b_{s-1} + g_s`, :math:`\widehat{\Delta\theta}_s = -\mathrm{lr}\, b_s`
    (torch's SGD without dampening), element by element, from the loop's clones.
    """
    out, momentum = [], {}
    for s, (theta, grad, theta_next) in enumerate(clones):
        err = delta = 0.0
        for name in theta:
            g = grad[name].reshape(-1).tolist()
            b = g if s == 0 else [MU * m + gi for m, gi in zip(momentum[name], g)]
            momentum[name] = b
            for t0, t1, bi in zip(theta[name].reshape(-1).tolist(), theta_next[name].reshape(-1).tolist(), b):
                actual, modelled = t1 - t0, -LR * bi
                err += (actual - modelled) ** 2
                delta += actual ** 2
        out.append(math.sqrt(err / delta))
    return np.array(out)


def _small_queue(monkeypatch):
    """A queue of one step at a time, as for a model whose step is larger than the writer's byte budget."""
    monkeypatch.setattr(store, "MAX_QUEUE_BYTES", 1)


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_audit_at_the_step_equals_the_in_memory_audit_bit_for_bit(tmp_path, opt_name, clip):
    def make(model):
        if opt_name == "adam":
            return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MU, weight_decay=1e-3)

    audits = []
    for path in (None, tmp_path / "run"):
        model, _, X, y = _setup()
        opt = make(model)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path,
                                          fsync=False, check_gradients=False)
        with rec:
            for s in range(STEPS):
                idx = torch.arange(4 * s, 4 * s + 4) % 40
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                if clip is not None:  # p.grad differs from the snapshot: the audit reads p.grad
                    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                rec.log_batch(idx)
                opt.step()
        traj = rec.trajectory if path is None else explaind.Trajectory.load(path, model=_setup()[0])
        audits.append(traj.audit())
    in_memory, on_disk = audits
    assert np.isfinite(on_disk).all() and np.array_equal(in_memory, on_disk)
    assert on_disk.max() < 1e-12


def test_the_audit_equals_a_slow_reference_on_a_clean_run(tmp_path, monkeypatch):
    _small_queue(monkeypatch)
    traj, clones = _record(tmp_path / "run")
    ref = _reference_audit(clones)
    assert ref.max() < 1e-13  # the reference replays torch's SGD
    assert traj.audit().max() < 1e-13


def test_the_audit_at_the_step_catches_an_update_the_adapter_does_not_model(tmp_path, monkeypatch):
    _small_queue(monkeypatch)

    def double(s, model, opt):  # step 3 moves twice as far, as a learning rate twice the recorded one would
        if s == 3:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(-LR * opt.state[p]["momentum_buffer"])

    traj, clones = _record(tmp_path / "run", tamper=double)
    ref = _reference_audit(clones)
    audit = traj.audit()
    assert abs(ref[3] - 0.5) < 1e-12  # the extra half of the move
    np.testing.assert_allclose(audit, ref, rtol=1e-9, atol=1e-14)
    assert audit[3] > 0.49 and np.delete(audit, 3).max() < 1e-12


def test_the_audit_at_the_step_catches_an_edited_momentum(tmp_path, monkeypatch):
    """An edit the optimizer-state watch does not see (here the watch switched off: it compares a sample of each
    buffer's bits and refuses this one, tests/test_optimizer_state_data_edits.py) is found by the audit."""
    _small_queue(monkeypatch)
    monkeypatch.setattr(OptimizerStateWatch, "check", lambda self, optimizer, args=(), kwargs=None: None)

    def halve(s, model, opt):  # the optimizer's state changed by hand through .data: its update leaves the
        if s == 2:  # recurrence
            for p in model.parameters():
                opt.state[p]["momentum_buffer"].data.mul_(0.5)

    traj, clones = _record(tmp_path / "run", before_step=halve)
    ref = _reference_audit(clones)
    audit = traj.audit()
    np.testing.assert_allclose(audit, ref, rtol=1e-9, atol=1e-14)
    assert audit[:2].max() < 1e-12 and audit[2] > 1e-2  # found at the step it happened


def test_a_momentum_edited_in_place_between_steps_is_refused_at_that_step(tmp_path, monkeypatch):
    _small_queue(monkeypatch)

    def halve(s, model, opt):
        if s == 2:
            for p in model.parameters():
                opt.state[p]["momentum_buffer"].mul_(0.5)

    with pytest.raises(TrajectoryError, match=r"Step 2: the optimizer's momentum buffers of 0\.weight "
                                              r"\(momentum_buffer: changed in place\).*changed outside "
                                              r"optimizer\.step\(\)"):
        _record(tmp_path / "run", before_step=halve)


def test_a_parameter_edited_between_steps_is_refused_with_the_store_on(tmp_path, monkeypatch):
    _small_queue(monkeypatch)

    def edit(s, model, opt):
        if s == 3:
            with torch.no_grad():
                model[2].bias.add_(1e-3)

    with pytest.raises(TrajectoryError, match=r"2\.bias"):
        _record(tmp_path / "run", before_step=edit)


def test_a_dense_store_holds_one_copy_of_theta_and_one_gradient_snapshot(tmp_path, monkeypatch):
    _small_queue(monkeypatch)
    handed = {}

    def counting(real):  # the pool's copies (CopyPool.copy) and its buffers to copy into (CopyPool.buffer, theta's)
        def hand_out(self, key, src):
            out = real(self, key, src)
            handed.setdefault(key, set()).add(out.data_ptr())
            return out
        return hand_out

    monkeypatch.setattr(CopyPool, "copy", counting(CopyPool.copy))
    monkeypatch.setattr(CopyPool, "buffer", counting(CopyPool.buffer))
    traj, clones = _record(tmp_path / "run")
    params = [n for n, _ in _setup()[0].named_parameters()]
    # theta_s's buffer holds theta_{s+1} next (the audit of step s ran before the copy); the tap keeps its buffer
    assert all(len(handed[f"param.{n}"]) == 1 for n in params)
    assert all(len(handed[f"grad.{n}"]) == 1 for n in params)
    for s in range(STEPS + 1):  # and every stored theta is the loop's
        want = clones[s][0] if s < STEPS else clones[-1][2]
        assert all(torch.equal(t, want[n]) for n, t in traj.params(s).items()), s
    assert traj.audit().max() < 1e-13


def test_the_default_check_finds_a_fault_from_the_start_and_one_that_starts_later(tmp_path):
    def wrong_from(t):  # from step t on, the logged indices are not the samples the loop trained on
        return lambda s, idx: (idx + 1) % 40 if s >= t else idx

    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match"):
        _record(tmp_path / "a", logged=wrong_from(0), check_gradients="auto", steps=3)
    # a fault from step 5 on: the schedule alone checks it at the next power of 4 (16 <= 4 * 5); since round 16 the
    # loss's derivative at the outputs, compared at every step, moves with the wrong targets and checks step 5
    with pytest.raises(TrajectoryError, match=r"Step 5: the gradient from backward\(\) does not match"):
        _record(tmp_path / "b", logged=wrong_from(5), check_gradients="auto", steps=20)
    traj, _ = _record(tmp_path / "c", check_gradients="auto", steps=17)
    checked = np.flatnonzero(~np.isnan(traj.gradient_check()))
    assert checked.tolist() == [0, 1, 4, 16] and traj.gradient_check()[checked].max() < 1e-12


def test_handoff_releases_once_after_every_reader_and_trim_drops_free_buffers():
    pool = CopyPool()
    src = {"w": torch.arange(6.0)}
    copy = pool.copies("param.", src)
    handoff = Handoff(pool, "param.", copy, readers=2)
    handoff.done()
    assert pool.copy("param.w", src["w"]).data_ptr() != copy["w"].data_ptr()  # one reader left: not free
    handoff.done()
    handoff.done()  # a further call changes nothing
    again = pool.copy("param.w", src["w"] + 1)
    assert again.data_ptr() == copy["w"].data_ptr() and torch.equal(again, src["w"] + 1)
    pool.release("param.", {"w": again})
    assert pool.trim() == 6 * 4
    assert pool.copy("param.w", src["w"]).data_ptr() != again.data_ptr()


def test_the_audit_shortcuts_equal_the_full_recurrence_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    g, t, prev = (torch.randn(300, generator=gen) for _ in range(3))
    choices = {"a": [0.0, 0.9], "b": [1.0, 0.1], "P": [0.05, torch.rand(300, generator=gen)], "q": [1.0, 0.5],
               "n": [0.0, 0.3], "lambda_c": [0.0, 1e-3], "lambda_d": [0.0, 1e-2]}
    for combo in itertools.product(*choices.values()):
        u = LinearUpdate(**dict(zip(choices, combo)))
        for p in (None, prev):
            # the recurrence written out here, every operation applied
            x = g + u.lambda_c * t
            m = u.b * x if p is None else u.a * p + u.b * x
            delta = -u.P * (u.q * m + u.n * x) - u.lambda_d * t
            got_delta, got_m = _modelled(u, g, p, t)
            assert torch.equal(got_delta, delta) and torch.equal(got_m, m), combo
            assert got_m.data_ptr() != g.data_ptr()  # m_s is kept by the audit: never the gradient's buffer
