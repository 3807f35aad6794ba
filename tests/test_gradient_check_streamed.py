"""The recorder's gradient check, reduced parameter by parameter during its backward (explaind/trajectory/_checks.py).

Each test builds the loop's raw gradient and the gradient of the logged batch independently (a
float64 loop over samples, whole tensors) and checks what the recorder stored or raised against
them: the loss scale sigma, the relative mismatch, the parameter named first in the error.
"""

from __future__ import annotations

import math
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import classification_data, regression_data, slow_batch_gradient
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _checks


def _deep_mlp(layers=6, width=5, d=3, o=2, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    sizes = [d] + [width] * (layers - 1) + [o]
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < layers - 1:
            mods.append(nn.Tanh())
    return nn.Sequential(*mods).to(dtype)


def _reference(raw, ref):
    """(sigma, mismatch) from whole float64 tensors: ||g - sigma r|| / max(||g||, |sigma| ||r||)."""
    g = torch.cat([raw[n].reshape(-1).double() for n in raw])
    r = torch.cat([ref[n].reshape(-1).double() for n in raw])
    sigma = float(g @ r / (r @ r))
    return sigma, float((g - sigma * r).norm() / max(float(g.norm()), abs(sigma) * float(r.norm())))


def _per_parameter(raw, ref, sigma):
    """||g_n - sigma r_n|| / ||g|| per parameter, largest first."""
    total = math.sqrt(sum(float(raw[n].double().pow(2).sum()) for n in raw))
    share = {n: float((raw[n].double() - sigma * ref[n].double()).norm()) / total for n in raw}
    return sorted(share, key=share.get, reverse=True)


def _train(rec, model, opt, X, y, steps, size, loss_fn=F.mse_loss):
    """``steps`` steps on consecutive batches of ``size``; the raw gradient of each, cloned after backward."""
    raws = []
    with rec:
        for s in range(steps):
            idx = torch.arange(size * s, size * s + size)
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            raws.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            rec.log_batch(idx)
            opt.step()
    return raws


def _reported(message):
    return float(re.search(r"relative difference ([0-9.e+-]+)", message).group(1)), \
        float(re.search(r"best scale ([0-9.e+-]+)", message).group(1)), \
        re.search(r"largest differences: ([^ ]+) \(", message).group(1)


def test_stored_scale_and_mismatch_equal_a_float64_loop_reference():
    """A loss scale of 2.5 and a small undeclared penalty on one bias: sigma and mismatch as the reference has them."""
    X, y = regression_data(n=24, d=3, o=2, seed=3)
    model = _deep_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True,
                                      gradient_tolerance=1.0)
    penalised = lambda out, target: 2.5 * F.mse_loss(out, target) + 1e-3 * model[4].bias.pow(2).sum()  # noqa: E731
    raws = _train(rec, model, opt, X, y, 4, 6, penalised)
    traj = rec.trajectory
    checked = traj.gradient_check()
    for s in range(4):
        idx, w = traj.batch(s)
        ref = slow_batch_gradient(_deep_mlp(), traj.params(s), F.mse_loss, X, y, idx, w)
        sigma, mismatch = _reference(raws[s], ref)
        assert 1e-5 < mismatch < 1e-1 and sigma == pytest.approx(2.5, rel=0.1)
        assert traj.manifest.steps[s].loss_scale == pytest.approx(sigma, rel=1e-10)
        assert checked[s] == pytest.approx(mismatch, rel=1e-7)


@pytest.mark.parametrize("wrong", ["8.bias", "6.weight", "0.weight"])
def test_one_wrong_parameter_among_many_is_named_first(wrong):
    """One of 18 parameters gets twice its gradient (a tensor hook): the error names it and the right size."""
    X, y = regression_data(n=16, d=3, o=2, seed=4)
    model = _deep_mlp(layers=9)
    params = dict(model.named_parameters())
    params[wrong].register_hook(lambda g: 2 * g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    theta = {n: p.detach().clone() for n, p in params.items()}
    idx = torch.arange(8)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with pytest.raises(TrajectoryError, match="does not match the gradient of the logged batch") as info:
        with rec:
            opt.zero_grad()
            F.mse_loss(model(X[idx]), y[idx]).backward()
            raw = {n: p.grad.detach().clone() for n, p in params.items()}
            rec.log_batch(idx)
            opt.step()
    ref = slow_batch_gradient(_deep_mlp(layers=9), theta, F.mse_loss, X, y, idx, torch.full((8,), 1 / 8,
                                                                                              dtype=torch.float64))
    sigma, mismatch = _reference(raw, ref)
    rel, scale, first = _reported(str(info.value))
    assert first == wrong == _per_parameter(raw, ref, sigma)[0]
    assert rel == pytest.approx(mismatch, rel=5e-3) and scale == pytest.approx(sigma, rel=5e-3)  # printed to 3 digits


def test_a_loss_scale_that_differs_between_micro_batches_is_caught():
    """Accumulation where only the first micro-batch is divided by 2: no single sigma fits, the check raises."""
    X, y = regression_data(n=24, seed=5)
    model = _deep_mlp(layers=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y))
    with pytest.raises(TrajectoryError, match="relative difference"):
        with rec:
            opt.zero_grad()
            for m, idx in enumerate((torch.arange(0, 4), torch.arange(4, 8))):
                (F.mse_loss(model(X[idx]), y[idx]) / (2 if m == 0 else 1)).backward()
                rec.log_batch(idx)
            opt.step()


class _Branchy(nn.Module):
    """A batch-norm MLP whose ``extra`` layer runs only on micro-batches of more than two samples.

    Batch norm couples the samples of a micro-batch, so the recorder replays each micro-batch as its
    own forward (docs/recording.md), which is what makes the branch differ between them.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 2)).double()
        self.extra = nn.Linear(2, 2).double()

    def forward(self, x):
        out = self.body(x)
        return out + self.extra(out) if x.shape[0] > 2 else out


@pytest.mark.parametrize("tamper", [False, True])
def test_a_parameter_reached_by_an_earlier_micro_batch_only(tamper):
    """Micro-batches of 4, 4 and 2 samples; ``extra`` is not reached by the last one, its products come at the end."""
    X, y = regression_data(n=24, seed=6)
    model = _Branchy()
    if tamper:
        model.extra.weight.register_hook(lambda g: 3 * g)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True,
                                      gradient_tolerance=1e-7 if not tamper else 1.0)
    micro = (torch.arange(0, 4), torch.arange(4, 8), torch.arange(8, 10))
    with rec:
        for _ in range(2):
            opt.zero_grad()
            for idx in micro:
                (F.mse_loss(model(X[idx]), y[idx]) / 3).backward()
                rec.log_batch(idx)
            raw = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            theta = {n: p.detach().clone() for n, p in model.named_parameters()}
            opt.step()
    ref = {n: torch.zeros_like(t) for n, t in theta.items()}
    for idx in micro:  # each micro-batch through its own forward (the branch depends on its size)
        p = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
        out = torch.func.functional_call(_Branchy(), p, (X[idx],))
        per = [F.mse_loss(out[i], y[k]) for i, k in enumerate(idx.tolist())]
        grads = torch.autograd.grad(sum(per) / len(idx), list(p.values()), allow_unused=True)
        for n, g in zip(p, grads):
            if g is not None:
                ref[n] += g
    sigma, mismatch = _reference(raw, ref)
    traj = rec.trajectory
    assert traj.manifest.steps[1].loss_scale == pytest.approx(sigma, rel=1e-10)
    assert traj.gradient_check()[1] == pytest.approx(mismatch, rel=1e-6, abs=1e-13)
    if tamper:
        assert mismatch > 1e-2 and _per_parameter(raw, ref, sigma)[0] == "extra.weight"
    else:
        assert sigma == pytest.approx(1 / 3, rel=1e-12) and mismatch < 1e-12


def _autocast_case():
    X, y = classification_data(n=32, d=6, classes=4, dtype=torch.float32, seed=7)
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 4))
    return model, torch.optim.SGD(model.parameters(), lr=0.05), X, y


def test_bf16_autocast_mismatch_equals_the_reference():
    """Forward under bfloat16 autocast: the stored mismatch is the reference's, loop gradient against float64."""
    model, opt, X, y = _autocast_case()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    raws, thetas = [], []
    with rec:
        for s in range(3):
            idx = torch.arange(8 * s, 8 * s + 8)
            opt.zero_grad()
            thetas.append({n: p.detach().double() for n, p in model.named_parameters()})
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            raws.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
            rec.log_batch(idx)
            opt.step()
    traj = rec.trajectory
    template = _autocast_case()[0].double()
    for s in range(3):
        idx = torch.arange(8 * s, 8 * s + 8)
        ref = slow_batch_gradient(template, thetas[s], F.cross_entropy, X.double(), y, idx,
                                  torch.full((8,), 1 / 8, dtype=torch.float64))
        sigma, mismatch = _reference(raws[s], ref)
        assert mismatch > 1e-4  # bfloat16 rounding is visible ...
        assert traj.gradient_check()[s] == pytest.approx(mismatch, rel=1e-3)  # ... and measured as the reference has it
        assert traj.manifest.steps[s].loss_scale == pytest.approx(sigma, rel=1e-5)


def test_bf16_autocast_wrong_indices_are_caught_with_the_autocast_hint():
    model, opt, X, y = _autocast_case()
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"torch.autocast\(dtype=torch.bfloat16\)"):
        with rec:
            idx = torch.arange(8)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(X[idx]), y[idx])
            loss.backward()
            rec.log_batch(idx + 8)  # the next eight samples, not the ones trained on
            opt.step()


def test_the_check_holds_one_recomputed_gradient_at_a_time(monkeypatch):
    """Each recomputed gradient is reduced and freed before the next one exists (no second gradient set)."""
    X, y = regression_data(n=16, seed=8)
    model = _deep_mlp(layers=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: list[weakref.ref] = []
    alive_at_call: list[int] = []
    products = _checks._products64

    def tracked(raw, ref, pivot):
        if not any(r() is ref for r in seen):  # the first tensor is reduced twice (its pivot first)
            alive_at_call.append(sum(r() is not None for r in seen))
            seen.append(weakref.ref(ref))
        return products(raw, ref, pivot)

    monkeypatch.setattr(_checks, "_products64", tracked)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=True)
    _train(rec, model, opt, X, y, 2, 8)
    assert len(seen) == 2 * len(list(model.parameters()))
    assert alive_at_call == [0] * len(seen)
    assert all(r() is None for r in seen)
    assert rec.trajectory.gradient_check().max() < 1e-12


def test_products_are_float64_sums_over_chunks(monkeypatch):
    """A tensor larger than one chunk: the four sums equal whole-tensor float64 products."""
    monkeypatch.setattr(_checks, "_CHUNK", 7)
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    got = _checks._products64(a, b, 0.75)
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    d = a64 - 0.75 * b64
    want = (float(a64 @ b64), float(b64 @ b64), float(a64 @ a64), float(d @ d))
    assert got == pytest.approx(want, rel=1e-14)


def test_pivoted_distances_equal_direct_ones_for_any_scale():
    """||g_n - sigma r_n||^2 from the pivoted sums against direct float64 norms, sigma near and far from the pivot."""
    g = torch.Generator().manual_seed(10)
    r = {f"p{i}": torch.randn(4, 3, generator=g, dtype=torch.float64) for i in range(4)}
    raw = {n: 0.3 * t + (1e-9 if n == "p2" else 0.0) * torch.randn(4, 3, generator=g, dtype=torch.float64)
           for n, t in r.items()}
    sums = _checks.StreamedSums()
    for n in r:
        sums.add(n, raw[n], r[n])
    assert sums.pivot == pytest.approx(0.3, rel=1e-14)
    for sigma in (0.3, 0.3 + 1e-12, 1.7, -2.0):
        got = sums.distance_sq(sigma)
        for n in r:
            want = float((raw[n] - sigma * r[n]).norm())  # float64 resolution: 1e-14 of ||g_n||, not 1e-8
            assert math.sqrt(got[n]) == pytest.approx(want, rel=1e-9, abs=1e-14 * float(raw[n].norm()))


def test_products_accumulate_chunk_by_chunk_in_float64(monkeypatch):
    """The chunk sums add up in chunk order in float64: bit-equal to a plain loop of Python floats over the chunks."""
    monkeypatch.setattr(_checks, "_CHUNK", 5)
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(3, 13, generator=g), torch.randn(3, 13, generator=g)
    want = [0.0, 0.0, 0.0, 0.0]
    flat_a, flat_b = a.reshape(-1).tolist(), b.reshape(-1).tolist()
    for lo in range(0, len(flat_a), 5):
        xs, ys = flat_a[lo:lo + 5], flat_b[lo:lo + 5]
        ds = [x - 1.25 * y for x, y in zip(xs, ys)]
        for k, (u, v) in enumerate(((xs, ys), (ys, ys), (xs, xs), (ds, ds))):
            want[k] += float(torch.dot(torch.tensor(u, dtype=torch.float64), torch.tensor(v, dtype=torch.float64)))
    assert _checks._products64(a, b, 1.25) == tuple(want)
