"""The grouped update audit against a slow reference: same value to float64 rounding, same momentum.

The reference replays each parameter on its own with :meth:`LinearUpdate.step` (the recurrence as
docs/maths.md §3 writes it, every operation applied, in the parameter's dtype) and adds the squares
element by element in Python floats with ``math.fsum`` (each square of a float32 or float64 value
rounded once, the sum exact). It covers mixed dtypes, 0-d parameters, 0-d and broadcast tensor
coefficients, parameters without a gradient, frozen parameters, the first step of a buffer, and the
coefficients the Adam, AdamW and SGD (momentum, nesterov) adapters produce on a real run.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.recurrence import LinearUpdate
from explaind.trajectory import _audit
from explaind.trajectory._audit import UpdateAudit

FROZEN = LinearUpdate(a=1.0, b=0.0, P=0.0)  # what the recorder gives a parameter the optimizer does not step


def _squares(x: torch.Tensor) -> list[float]:
    return [v * v for v in x.detach().double().reshape(-1).tolist()]


def _reference(steps, momentum=None):
    """Per step: (audit value, momentum after it), every parameter replayed alone with LinearUpdate.step."""
    momentum = dict(momentum or {})
    out = []
    for theta, theta_next, grads, updates in steps:
        err, delta = [], []
        for name, u in updates.items():
            t = theta[name]
            g = grads.get(name)
            g = torch.zeros_like(t) if g is None else g.to(t.dtype)
            modelled, m = u.step(g, momentum.get(name), t)
            momentum[name] = m
            actual = theta_next[name] - t
            err.extend(_squares(actual - modelled))
            delta.extend(_squares(actual))
        e, d = math.fsum(err), math.fsum(delta)
        out.append((0.0 if e == 0.0 else math.inf) if d == 0.0 else math.sqrt(e / d))
        out[-1] = (out[-1], {n: m.clone() for n, m in momentum.items()})
    return out


SHAPES = {"big": ((37, 11), torch.float32), "mid": ((60,), torch.float32), "b1": ((5,), torch.float32),
          "b2": ((3, 4), torch.float32), "s": ((), torch.float32), "d": ((9, 7), torch.float64),
          "d2": ((4,), torch.float64), "h": ((6, 5), torch.bfloat16), "frozen": ((8,), torch.float32),
          "nograd": ((10,), torch.float32), "zd": ((7,), torch.float32), "bc": ((3, 6), torch.float32)}


def _coefficients(s: int, gen: torch.Generator) -> dict[str, LinearUpdate]:
    def rand(name):
        shape, dtype = SHAPES[name]
        return (torch.rand(shape, generator=gen, dtype=torch.float64) * 1e-2 + 1e-3).to(dtype)

    first = s == 0
    return {
        # Adam-like: elementwise P, a = 1 - b, decoupled decay (AdamW) or coupled (Adam)
        "big": LinearUpdate(a=0.1 if first else 0.9, b=0.1, P=rand("big"), lambda_d=1e-4),
        "mid": LinearUpdate(a=0.9, b=0.1, P=rand("mid"), lambda_c=1e-2),
        # SGD momentum (first step: a = 0, b = 1) and nesterov, in two groups with their own lr
        "b1": LinearUpdate(a=0.0 if first else 0.9, b=1.0, P=0.05, lambda_c=1e-3),
        "b2": LinearUpdate(a=0.0 if first else 0.9, b=1.0, P=0.05, lambda_c=1e-3),
        "s": LinearUpdate(a=0.0 if first else 0.9, b=1.0, P=0.05, lambda_c=1e-3),
        "d": LinearUpdate(a=0.9, b=0.5, P=0.1, q=0.9, n=1.0),
        "d2": LinearUpdate(a=0.9, b=0.5, P=0.1, q=0.9, n=1.0),
        "h": LinearUpdate(a=0.9, b=0.1, P=rand("h"), lambda_d=1e-3),
        "frozen": FROZEN,
        "nograd": LinearUpdate(a=0.5, b=1.0, P=0.1, lambda_c=1e-2),  # weight decay moves it without a gradient
        "zd": LinearUpdate(a=0.9, b=1.0, P=torch.tensor(0.05)),  # a 0-d tensor coefficient: audited alone
        "bc": LinearUpdate(a=0.8, b=0.2, P=0.01, q=torch.rand(1, 6, generator=gen)),  # broadcast: alone
    }


def _steps(n_steps: int, seed: int = 0, wrong: dict[int, str] | None = None):
    """Audit inputs of ``n_steps`` steps: the modelled update plus rounding-level noise (and a wrong one)."""
    gen = torch.Generator().manual_seed(seed)
    theta = {n: torch.randn(shape, generator=gen, dtype=torch.float64).to(dt) for n, (shape, dt) in SHAPES.items()}
    momentum: dict[str, torch.Tensor] = {}
    steps = []
    for s in range(n_steps):
        grads = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype) for n, t in theta.items()}
        grads["nograd"] = grads["frozen"] = None
        updates = _coefficients(s, gen)
        theta_next = {}
        for n, u in updates.items():
            g = torch.zeros_like(theta[n]) if grads[n] is None else grads[n]
            delta, momentum[n] = u.step(g, momentum.get(n), theta[n])
            theta_next[n] = theta[n] + delta
        if wrong and s in wrong:
            theta_next[wrong[s]] = theta_next[wrong[s]] + 1e-2
        steps.append((theta, theta_next, grads, updates))
        theta = theta_next
    return steps


@pytest.mark.parametrize("chunk", [1, 5, 16, 64, 1 << 17])
def test_grouped_audit_equals_the_per_parameter_reference(chunk):
    steps = _steps(4)
    audit = UpdateAudit(chunk=chunk)
    for (theta, theta_next, grads, updates), (want, want_m) in zip(steps, _reference(steps)):
        got = audit.step(theta, theta_next, grads, updates)
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)
        assert audit.momentum.keys() == want_m.keys()
        for n, m in want_m.items():
            assert audit.momentum[n].shape == m.shape and audit.momentum[n].dtype == m.dtype, n
            assert torch.equal(audit.momentum[n], m), n


def test_a_wrong_update_is_flagged_wherever_it_is():
    # a small packed tensor, the large sliced one, a float64 one and a frozen one, each moved by 1e-2 once; the
    # clean run's audit is not 0 (bfloat16 rounds theta + delta), so each step is compared with the clean one
    wrong = {1: "b1", 2: "big", 3: "d", 4: "frozen"}
    clean = [v for v, _ in _reference(_steps(6, seed=1))]
    steps = _steps(6, seed=1, wrong=wrong)
    audit = UpdateAudit(chunk=64)
    for s, ((theta, theta_next, grads, updates), (want, _)) in enumerate(zip(steps, _reference(steps))):
        got = audit.step(theta, theta_next, grads, updates)
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)
        assert (got > 3 * clean[s]) == (s in wrong), (s, got, clean[s])


def test_the_audit_never_writes_into_a_momentum_it_handed_out():
    steps = _steps(3)
    audit = UpdateAudit(chunk=16)
    audit.step(*steps[0])
    handed = dict(audit.momentum)
    values = {n: m.clone() for n, m in handed.items()}
    audit.step(*steps[1])
    audit.step(*steps[2])
    for n, m in handed.items():
        assert torch.equal(m, values[n]), n
    assert audit.momentum["frozen"] is handed["frozen"]  # m_s = m_{s-1}: kept, not copied


def test_small_tensors_of_a_group_share_one_pass(monkeypatch):
    calls: list[int] = []
    real = _audit._piece

    def spy(grp, piece, work):
        calls.append(piece.t.numel())
        return real(grp, piece, work)

    monkeypatch.setattr(_audit, "_piece", spy)
    gen = torch.Generator().manual_seed(0)
    theta = {f"p{i}": torch.randn(20 + i, generator=gen) for i in range(30)}
    grads = {n: torch.randn(t.shape, generator=gen) for n, t in theta.items()}
    updates = {n: LinearUpdate(a=0.0, b=1.0, P=0.1) for n in theta}
    theta_next = {n: t - 0.1 * grads[n] for n, t in theta.items()}
    assert UpdateAudit().step(theta, theta_next, grads, updates) < 1e-6
    assert calls == [sum(t.numel() for t in theta.values())]  # 30 tensors, one piece


def test_buffers_are_at_most_one_chunk(monkeypatch):
    made: list[tuple[int, int]] = []
    real = _audit._Work

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, dtype, device, length, packed, coefs):
            made.append((length, packed))
            super().__init__(dtype, device, length, packed, coefs)

    monkeypatch.setattr(_audit, "_Work", Spy)
    audit = UpdateAudit(chunk=64)
    for step in _steps(2):
        audit.step(*step)
    assert made and max(max(m) for m in made) == 64  # "big" has 407 elements, the packed tensors 94


def _run(opt_factory, steps=5, tamper=None):
    """Record a small model whose parameters are float32 with one frozen; returns per-step (value, reference)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.LayerNorm(9), nn.Linear(9, 3))
    model[2].bias.requires_grad_(False)
    opt = opt_factory([p for p in model.parameters() if p.requires_grad])
    X, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    step = [0]

    def edit(o, args, kwargs):  # registered before the recorder's hook: the audit of this step sees it
        if step[0] == tamper:
            with torch.no_grad():
                model[0].bias[0] += 1e-3

    opt.register_step_post_hook(edit)
    pairs: list[tuple[float, float]] = []
    real = UpdateAudit.step
    momentum: dict[str, torch.Tensor] = {}

    def checked(self, theta, theta_next, grads, updates):
        (want, m), = _reference([(theta, theta_next, grads, updates)], momentum)
        momentum.clear()
        momentum.update(m)
        got = real(self, theta, theta_next, grads, updates)
        pairs.append((got, want))
        return got

    UpdateAudit.step = checked
    try:
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False,
                                          background_writes=False)
        with rec:
            for s in range(steps):
                step[0] = s
                idx = torch.arange(8 * s, 8 * s + 8) % 32
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
    finally:
        UpdateAudit.step = real
    return pairs


OPTIMIZERS = {
    "adam": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-2),
    "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_real_adapters_coefficients_match_the_reference(name):
    pairs = _run(OPTIMIZERS[name])
    assert len(pairs) == 5
    for got, want in pairs:
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)
        assert got < 1e-5  # the adapter is faithful: the audit is at float32 rounding level


def test_an_update_the_adapter_does_not_model_is_flagged():
    pairs = _run(OPTIMIZERS["adamw"], tamper=2)
    for s, (got, want) in enumerate(pairs):
        assert got == pytest.approx(want, rel=1e-12, abs=0.0)
        assert (got > 1e-4) == (s == 2), (s, got)
