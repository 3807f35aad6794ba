"""Fused convolution JVPs: the primal and the kernel's tangent from one convolution, equal to plain forward mode.

References written here: the JVP of a convolution as three separate ``F.conv2d`` calls
(:math:`W \\star a + b` and :math:`\\dot W \\star a + \\dot b + W \\star \\dot a`), and, for whole models, a loop of
plain forward-mode derivatives (``torch.autograd.forward_ad``, no torch function mode) one input at a time. A
fused convolution that swapped the primal and tangent halves of its stacked kernel, or mixed the groups, fails
the first; a model whose convolutions were not routed through it fails the call count.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from explaind.kernel.fused_jvp import conv2d_dual, fused_jvp

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _three_convs(a, da, w, dw, b, db, **kw):
    """The reference JVP of ``conv2d``: three separate convolutions."""
    z = F.conv2d(a, w, b, **kw)
    dz = F.conv2d(a, dw, db, **kw)
    if da is not None:
        dz = dz + F.conv2d(da, w, None, **kw)
    return z, dz


@pytest.mark.parametrize("kw", [dict(padding=1), dict(padding=1, groups=2), dict(stride=2, dilation=2, padding=2),
                                dict(padding="same", groups=6), dict(padding="valid")],
                         ids=["plain", "groups2", "stride-dilation", "depthwise-same", "valid"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_conv_equals_three_convolutions(kw, with_bias):
    groups = kw.get("groups", 1)
    a, da = _randn(3, 6, 7, 7, seed=0), _randn(3, 6, 7, 7, seed=1)
    w, dw = _randn(6, 6 // groups, 3, 3, seed=2), _randn(6, 6 // groups, 3, 3, seed=3)
    b, db = (_randn(6, seed=4), _randn(6, seed=5)) if with_bias else (None, None)
    z_ref, dz_ref = _three_convs(a, da, w, dw, b, db, **kw)
    with fwAD.dual_level():
        out = conv2d_dual(fwAD.make_dual(a, da), fwAD.make_dual(w, dw),
                          fwAD.make_dual(b, db) if with_bias else None, **kw)
        z, dz = fwAD.unpack_dual(out)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-12)


def test_fused_conv_keeps_primal_and_tangent_halves_apart():
    """Primal and kernel tangent far apart in size: a swap of the stacked kernel's halves cannot pass."""
    a = _randn(2, 4, 5, 5, seed=0)
    w, dw = _randn(4, 4, 3, 3, seed=1), 1e3 * _randn(4, 4, 3, 3, seed=2)
    b, db = _randn(4, seed=3), -1e3 * _randn(4, seed=4)
    with fwAD.dual_level():
        z, dz = fwAD.unpack_dual(conv2d_dual(a, fwAD.make_dual(w, dw), fwAD.make_dual(b, db), padding=1))
    torch.testing.assert_close(z, F.conv2d(a, w, b, padding=1), rtol=0, atol=1e-12)
    torch.testing.assert_close(dz, F.conv2d(a, dw, db, padding=1), rtol=0, atol=1e-9)


def test_bias_without_tangent_and_kernel_without_tangent():
    a, da = _randn(2, 4, 5, 5, seed=0), _randn(2, 4, 5, 5, seed=1)
    w, dw, b = _randn(4, 4, 3, 3, seed=2), _randn(4, 4, 3, 3, seed=3), _randn(4, seed=4)
    with fwAD.dual_level():
        z, dz = fwAD.unpack_dual(conv2d_dual(fwAD.make_dual(a, da), fwAD.make_dual(w, dw), b, padding=1))
        assert conv2d_dual(fwAD.make_dual(a, da), w, b, padding=1) is None  # no kernel tangent: not fused
        assert conv2d_dual(fwAD.make_dual(a[0], da[0]), fwAD.make_dual(w, dw)) is None  # unbatched input
    z_ref, dz_ref = _three_convs(a, da, w, dw, b, None, padding=1)
    torch.testing.assert_close(z, z_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(dz, dz_ref, rtol=0, atol=1e-12)


class Net(nn.Module):
    """Convolutions of every kind the mode meets: zero and reflect padding, groups, a frozen one, GroupNorm, BN."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 6, 3, padding=1)
        self.norm = nn.GroupNorm(3, 6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=3, padding_mode="reflect")
        self.frozen = nn.Conv2d(6, 6, 1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.norm(self.stem(x)))
        x = F.relu(self.bn(self.frozen(self.grouped(x)) + x))
        return self.head(x.mean((2, 3)))


def _model():
    torch.manual_seed(0)
    model = Net().double().eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    return model


def test_fused_jvp_of_a_model_equals_plain_forward_mode_input_by_input():
    model = _model()
    X = _randn(5, 2, 6, 6, seed=7)
    point = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    point = {n: v.detach() for n, v in point.items()}
    tangent = {n: _randn(*v.shape, seed=10 + i) for i, (n, v) in enumerate(model.named_parameters())
               if not n.startswith("frozen")}
    h, dh = fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent)
    for i in range(X.shape[0]):  # the reference: plain forward mode, one input, no torch function mode
        with fwAD.dual_level():
            dual = {n: fwAD.make_dual(v, tangent[n]) if n in tangent else v for n, v in point.items()}
            want, want_dot = fwAD.unpack_dual(functional_call(model, dual, (X[i:i + 1],)))
        torch.testing.assert_close(h[i], want[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(dh[i], want_dot[0], rtol=0, atol=1e-12)


def test_every_convolution_with_a_kernel_tangent_runs_fused():
    """Two convolutions per fused layer (the stacked kernel, then the input's tangent), one for the stem."""
    calls = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.conv2d:
                calls.append(args[1].shape[0])
            return func(*args, **(kwargs or {}))

    model = _model()
    X = _randn(2, 2, 6, 6, seed=1)
    point = {n: v.detach() for n, v in [*model.named_parameters(), *model.named_buffers()]}
    tangent = {n: torch.ones_like(v) for n, v in model.named_parameters() if not n.startswith("frozen")}
    with Count():
        fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent)
    # stem: [W; W dot] (12 channels), input without tangent; grouped: 12, then W (6) on the input tangent;
    # frozen (no kernel tangent): one call, its ordinary derivative inside autograd
    assert calls == [12, 12, 6, 6]


def test_a_model_without_tangents_gives_zero_derivatives():
    model = _model()
    X = _randn(2, 2, 6, 6, seed=1)
    point = {n: v.detach() for n, v in model.named_parameters()}
    h, dh = fused_jvp(lambda p: functional_call(model, p, (X,)), point, {})
    torch.testing.assert_close(h, model(X), rtol=0, atol=1e-13)
    assert bool((dh == 0).all())
