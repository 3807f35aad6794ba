"""The closed-form JVP of a group normalisation (``explaind.kernel.norm_jvp``) against ``torch.func.jvp``.

References: :func:`torch.func.jvp` of ``F.group_norm`` (torch's own derivative of ``native_group_norm``) and of a
group normalisation written here from elementary operations (mean, centring, variance, square root), each in float64.
A tangent that dropped the mean of the input's tangent, the projection on the normalised input, or the scale's or
the shift's part fails them by far more than the 1e-12 relative tolerance: each part is of the size of the whole.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

from explaind.kernel import fused_jvp as fused_module
from explaind.kernel.fused_jvp import fused_jvp
from explaind.kernel.norm_jvp import group_norm_dual

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _randn(*shape, seed, scale=1.0, shift=0.0):
    return shift + scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _dual(p, dp):
    return p if p is None or dp is None else fwAD.make_dual(p, dp)


def _closed(x, dx, G, w, dw, b, db, eps):
    with fwAD.dual_level():
        out = group_norm_dual(_dual(x, dx), G, _dual(w, dw), _dual(b, db), eps)
        assert out is not None
        return fwAD.unpack_dual(out)


def _elementary(x, G, w, b, eps):
    """Group normalisation from elementary operations: per sample and group, centred, divided by the root."""
    B, C = x.shape[:2]
    g = x.reshape(B, G, -1)
    c = g - g.mean(-1, keepdim=True)
    y = (c / torch.sqrt((c * c).mean(-1, keepdim=True) + eps)).reshape(x.shape)
    shape = (1, C) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.reshape(shape)
    return y if b is None else y + b.reshape(shape)


def _relative(got, want):
    return float((got - want).abs().max() / want.abs().max())


CASES = {  # name: (input shape, groups, affine, eps)
    "4d-groups4": ((5, 8, 4, 3), 4, True, 1e-5),
    "groups1": ((3, 6, 5, 5), 1, True, 1e-5),
    "groups-channels": ((3, 6, 5, 5), 6, True, 1e-5),
    "no-affine": ((4, 8, 3, 3), 2, False, 1e-5),
    "3d-eps": ((4, 6, 7), 3, True, 1e-2),
    "2d": ((7, 6), 3, True, 1e-5),
    "5d": ((2, 4, 3, 2, 2), 2, True, 1e-6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_group_norm_jvp_equals_torch_func_jvp(name):
    shape, G, affine, eps = CASES[name]
    C = shape[1]
    x, dx = _randn(*shape, seed=0), _randn(*shape, seed=1)
    w, dw, b, db = (_randn(C, seed=2), _randn(C, seed=3), _randn(C, seed=4), _randn(C, seed=5)) if affine \
        else (None, None, None, None)
    y, dy = _closed(x, dx, G, w, dw, b, db, eps)
    if affine:
        want, want_dot = jvp(lambda x, w, b: F.group_norm(x, G, w, b, eps), (x, w, b), (dx, dw, db))
        elem, elem_dot = jvp(lambda x, w, b: _elementary(x, G, w, b, eps), (x, w, b), (dx, dw, db))
    else:
        want, want_dot = jvp(lambda x: F.group_norm(x, G, None, None, eps), (x,), (dx,))
        elem, elem_dot = jvp(lambda x: _elementary(x, G, None, None, eps), (x,), (dx,))
    assert torch.equal(y, F.group_norm(x, G, w, b, eps))  # the primal is torch's own, bit for bit
    assert _relative(dy, want_dot) <= 1e-12
    assert _relative(dy, elem_dot) <= 1e-12
    assert _relative(want, elem) <= 1e-12  # the two references agree with each other


def test_group_norm_jvp_with_a_scale_and_no_shift():
    x, dx = _randn(3, 8, 4, 4, seed=0), _randn(3, 8, 4, 4, seed=1)
    w, dw = _randn(8, seed=2), _randn(8, seed=3)
    y, dy = _closed(x, dx, 2, w, dw, None, None, 1e-5)
    want, want_dot = jvp(lambda x, w: F.group_norm(x, 2, w, None, 1e-5), (x, w), (dx, dw))
    assert torch.equal(y, want)
    assert _relative(dy, want_dot) <= 1e-12


@pytest.mark.parametrize("moving", ["weight", "bias", "input", "weight-bias"])
def test_group_norm_jvp_with_some_tangents_only(moving):
    """Only some of input, scale and shift move; the others are plain tensors."""
    x, dx = _randn(3, 8, 4, 4, seed=0), _randn(3, 8, 4, 4, seed=1)
    w, dw, b, db = _randn(8, seed=2), _randn(8, seed=3), _randn(8, seed=4), _randn(8, seed=5)
    dx = dx if "input" in moving else None
    dw = dw if "weight" in moving else None
    db = db if "bias" in moving else None
    zero = torch.zeros
    _, dy = _closed(x, dx, 4, w, dw, b, db, 1e-5)
    _, want = jvp(lambda x, w, b: F.group_norm(x, 4, w, b, 1e-5), (x, w, b),
                  (zero(x.shape, dtype=DT) if dx is None else dx, zero(8, dtype=DT) if dw is None else dw,
                   zero(8, dtype=DT) if db is None else db))
    assert _relative(dy, want) <= 1e-12


def test_group_norm_jvp_of_an_input_far_from_zero_mean():
    """Mean 1e4, spread 1e-1: every formula rounds at about 1e-16 |x| / spread; no worse than torch's own."""
    x, dx = _randn(4, 6, 5, 5, seed=0, scale=0.1, shift=1e4), _randn(4, 6, 5, 5, seed=1)
    w, dw, b, db = _randn(6, seed=2), _randn(6, seed=3), _randn(6, seed=4), _randn(6, seed=5)
    _, dy = _closed(x, dx, 3, w, dw, b, db, 1e-5)
    _, want = jvp(lambda x, w, b: _elementary(x, 3, w, b, 1e-5), (x, w, b), (dx, dw, db))
    _, torch_own = jvp(lambda x, w, b: F.group_norm(x, 3, w, b, 1e-5), (x, w, b), (dx, dw, db))
    assert _relative(dy, want) <= 1e-10
    assert _relative(dy, want) <= 2 * _relative(torch_own, want)


def test_group_norm_dual_declines_what_it_does_not_compute():
    x, dx = _randn(2, 6, 3, 3, seed=0), _randn(2, 6, 3, 3, seed=1)
    with fwAD.dual_level():
        assert group_norm_dual(x, 3, _randn(6, seed=2), None) is None  # nothing moves
        assert group_norm_dual(fwAD.make_dual(x, dx), 4) is None  # 4 groups do not divide 6 channels
        assert group_norm_dual(fwAD.make_dual(x, dx), 3, torch.ones(6, dtype=torch.float32)) is None  # dtypes
        assert group_norm_dual(fwAD.make_dual(x[0, 0, 0], dx[0, 0, 0]), 1) is None  # no channel axis
        half = x.to(torch.bfloat16)
        assert group_norm_dual(fwAD.make_dual(half, dx.to(torch.bfloat16)), 3) is None  # statistics in float32


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.n1, self.n2 = nn.GroupNorm(3, 6), nn.GroupNorm(6, 6, affine=False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.n1(self.conv(x)))
        return self.head(torch.group_norm(self.n2(x) + x, 1).mean((2, 3)))


def test_fused_jvp_routes_every_group_norm_and_equals_plain_forward_mode(monkeypatch):
    calls = []

    def counted(*args, **kwargs):
        out = group_norm_dual(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setitem(fused_module._RULES, F.group_norm, counted)
    monkeypatch.setitem(fused_module._RULES, torch.group_norm, counted)
    torch.manual_seed(0)
    model = Norms().double().eval()
    X = _randn(3, 2, 5, 5, seed=7)
    point = {n: v.detach() for n, v in model.named_parameters()}
    tangent = {n: _randn(*v.shape, seed=10 + i) for i, (n, v) in enumerate(model.named_parameters())}
    h, dh = fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent)
    assert calls == [True, True, True]  # n1, n2 (no affine) and torch.group_norm, each in closed form
    with fwAD.dual_level():  # the reference: plain forward mode, no torch function mode
        dual = {n: fwAD.make_dual(v, tangent[n]) for n, v in point.items()}
        want, want_dot = fwAD.unpack_dual(functional_call(model, dual, (X,)))
    torch.testing.assert_close(h, want, rtol=0, atol=1e-13)
    assert _relative(dh, want_dot) <= 1e-12
