"""The update audit in bounded chunks: the same momentum bit for bit, the same value to float64 rounding.

The reference is independent of explaind: the recurrence written out per element in float32 with numpy,
the two sums of squares added exactly (``math.fsum``) in float64.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from explaind.recurrence import LinearUpdate
from explaind.trajectory import _audit
from explaind.trajectory._audit import UpdateAudit

SHAPES = {"w": (37, 11), "b": (5,), "v": (3, 50)}


def _coefficients(step: int, gen: torch.Generator) -> dict[str, LinearUpdate]:
    """SGD-momentum-like for ``w``, Adam-like (elementwise ``P``, broadcast ``q``) for ``v``, plain for ``b``."""
    return {
        "w": LinearUpdate(a=0.0 if step == 0 else 0.9, b=1.0, P=0.05, q=1.0, n=0.0, lambda_c=1e-3),
        "b": LinearUpdate(a=0.5, b=1.0, P=0.1, q=0.5, n=0.5),
        "v": LinearUpdate(a=0.8, b=0.2, P=torch.rand(3, 50, generator=gen) * 1e-2,
                          q=torch.rand(1, 50, generator=gen), n=0.1, lambda_d=1e-4),
    }


def _run(chunk: int, steps: int = 3, seed: int = 0):
    """Audit ``steps`` steps of an update that is the modelled one plus noise; returns values, momenta, inputs."""
    gen = torch.Generator().manual_seed(seed)
    audit = UpdateAudit(chunk=chunk)
    theta = {n: torch.randn(s, generator=gen) for n, s in SHAPES.items()}
    values, momenta, inputs = [], [], []
    for s in range(steps):
        grads = {n: torch.randn(sh, generator=gen) for n, sh in SHAPES.items()}
        grads["b"] = None if s == 1 else grads["b"]  # a step where the parameter got no gradient
        updates = _coefficients(s, gen)
        theta_next = {n: t + 0.01 * torch.randn(t.shape, generator=gen) for n, t in theta.items()}
        inputs.append((theta, theta_next, grads, updates))
        values.append(audit.step(theta, theta_next, grads, updates))
        momenta.append({n: m.clone() for n, m in audit.momentum.items()})
        theta = theta_next
    return values, momenta, inputs


def _f32(x) -> np.ndarray:
    return np.asarray(x.numpy() if isinstance(x, torch.Tensor) else x, dtype=np.float32)


def _reference(inputs) -> list[float]:
    """The audit per step, element by element (float32 recurrence, exact float64 sums)."""
    momentum: dict[str, np.ndarray] = {}
    out = []
    for theta, theta_next, grads, updates in inputs:
        err, delta = [], []
        for name, u in updates.items():
            t, tn = _f32(theta[name]).ravel(), _f32(theta_next[name]).ravel()
            g = np.zeros_like(t) if grads[name] is None else _f32(grads[name]).ravel()
            co = {k: np.broadcast_to(_f32(getattr(u, k)), theta[name].shape).ravel()
                  for k in ("a", "b", "P", "q", "n", "lambda_c", "lambda_d")}
            prev = momentum.get(name)
            m_new = np.empty_like(t)
            for i in range(t.size):
                ui = np.float32(g[i] + co["lambda_c"][i] * t[i])
                bu = np.float32(co["b"][i] * ui)
                mi = bu if prev is None else np.float32(np.float32(co["a"][i] * prev[i]) + bu)
                inner = np.float32(np.float32(co["q"][i] * mi) + np.float32(co["n"][i] * ui))
                model = np.float32(np.float32(-co["P"][i] * inner) - np.float32(co["lambda_d"][i] * t[i]))
                actual = np.float32(tn[i] - t[i])
                m_new[i] = mi
                err.append(float(np.float32(actual - model)) ** 2)
                delta.append(float(actual) ** 2)
            momentum[name] = m_new
        out.append(math.sqrt(math.fsum(err) / math.fsum(delta)))
    return out


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 17])
def test_chunked_audit_matches_an_elementwise_reference(chunk):
    values, _, inputs = _run(chunk)
    for got, want in zip(values, _reference(inputs)):
        assert got == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunks_change_no_momentum_bit_and_the_value_only_by_float64_rounding(chunk):
    whole_values, whole_momenta, _ = _run(1 << 30)
    values, momenta, _ = _run(chunk)
    for a, b in zip(whole_momenta, momenta):
        assert a.keys() == b.keys()
        for n in a:
            assert a[n].shape == b[n].shape == SHAPES[n]
            assert torch.equal(a[n], b[n])
    for a, b in zip(whole_values, values):
        assert b == pytest.approx(a, rel=1e-14)


def test_float64_copies_are_at_most_one_chunk(monkeypatch):
    seen: list[int] = []
    real = _audit._sq64

    def spy(a):
        seen.append(a.numel())
        return real(a)

    monkeypatch.setattr(_audit, "_sq64", spy)
    _run(64)
    # "v" (150 elements, a broadcast coefficient: audited alone) in chunks; "w" and "b" are audited in their
    # groups, whose buffers tests/test_audit_grouped.py bounds the same way
    assert sorted(set(seen)) == [22, 64]  # 150 = 64 + 64 + 22


def test_a_coefficient_not_laid_out_like_the_parameter_is_audited_whole():
    # a coefficient that broadcasts to a larger shape than the parameter: computed whole, as before chunking
    gen = torch.Generator().manual_seed(3)
    t, g = torch.randn(4, 1, generator=gen), torch.randn(4, 1, generator=gen)
    u = LinearUpdate(b=torch.rand(4, 3, generator=gen), P=0.1)
    chunked, whole = UpdateAudit(chunk=2), UpdateAudit(chunk=1 << 30)
    values = [a.step({"p": t}, {"p": t - 0.1 * g}, {"p": g}, {"p": u}) for a in (chunked, whole)]
    assert chunked.momentum["p"].shape == (4, 3)
    assert torch.equal(chunked.momentum["p"], whole.momentum["p"])
    assert values[0] == values[1] and values[0] > 0
