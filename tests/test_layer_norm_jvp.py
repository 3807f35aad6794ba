"""Closed-form JVPs of layer and RMS normalisation (``explaind.kernel.layer_norm_jvp``).

References, each in float64: :func:`torch.func.jvp` of the torch function (torch's own derivative of
``native_layer_norm``, ``_fused_rms_norm``) and of the normalisation written here from
elementary operations (mean, centring, mean square, square root). A tangent that dropped the mean of the input's
tangent, the projection on the normalised input, the scale, or the scale's or shift's tangent fails them by far
more than the 1e-12 relative tolerance: each part is of the size of the whole. The routing tests count the rule's
calls inside :func:`~explaind.kernel.fused_jvp.fused_jvp` and the layer-factored rows, against plain forward mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from _recording_helpers import classifier_step
from torch import nn
from torch.func import functional_call, jvp

import explaind
from explaind.kernel import fused_jvp as fused_module
from explaind.kernel import layer_norm_jvp, layer_rules
from explaind.kernel.fused_jvp import fused_jvp
from explaind.kernel.layer_norm_jvp import layer_norm_dual, rms_norm_dual

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64
DEFAULT_MIN_ELEMENTS = layer_norm_jvp.MIN_ELEMENTS


@pytest.fixture(autouse=True)
def closed_form_at_every_size(monkeypatch):
    """The rules take inputs of any size here (by default only from ``MIN_ELEMENTS`` values on, where they are
    faster than forward mode), so that small inputs test the formula."""
    monkeypatch.setattr(layer_norm_jvp, "MIN_ELEMENTS", 0)


def _randn(*shape, seed, dtype=DT, scale=1.0, shift=0.0):
    return shift + scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _dual(p, dp):
    return p if p is None or dp is None else fwAD.make_dual(p, dp)


def _closed(rule, x, dx, *args):
    """``rule`` on ``x`` (a dual when ``dx`` is given) and ``args``, each parameter a list ``[value, tangent]``."""
    with fwAD.dual_level():
        out = rule(_dual(x, dx), *[_dual(*a) if isinstance(a, list) else a for a in args])
        assert out is not None
        y, dy = fwAD.unpack_dual(out)
        return y, dy


def _elementary_layer_norm(x, shape, w, b, eps):
    dims = tuple(range(-len(shape), 0))
    c = x - x.mean(dims, keepdim=True)
    y = c / torch.sqrt((c * c).mean(dims, keepdim=True) + eps)
    y = y if w is None else y * w
    return y if b is None else y + b


def _elementary_rms_norm(x, shape, w, eps):
    dims = tuple(range(-len(shape), 0))
    y = x / torch.sqrt((x * x).mean(dims, keepdim=True) + (torch.finfo(x.dtype).eps if eps is None else eps))
    return y if w is None else y * w


def _relative(got, want):
    return float((got - want).abs().max() / want.abs().max())


def _references(fn, primals, tangents):
    """``torch.func.jvp`` of ``fn`` over the primals that are not ``None`` (the others held as ``None``)."""
    keep = [i for i, p in enumerate(primals) if p is not None]

    def call(*given):
        args = list(primals)
        for i, g in zip(keep, given):
            args[i] = g
        return fn(*args)

    zero = [torch.zeros_like(primals[i]) if tangents[i] is None else tangents[i] for i in keep]
    return jvp(call, tuple(primals[i] for i in keep), tuple(zero))


LAYER_CASES = {  # name: (input shape, normalized_shape, weight, bias, eps)
    "last-axis": ((4, 7, 12), (12,), True, True, 1e-5),
    "int-shape": ((5, 9), 9, True, True, 1e-5),
    "two-axes": ((3, 5, 6, 4), (6, 4), True, True, 1e-5),
    "three-axes": ((2, 3, 4, 5), (3, 4, 5), True, True, 1e-6),
    "whole-input": ((3, 4), (3, 4), True, True, 1e-5),
    "no-affine": ((4, 7, 12), (12,), False, False, 1e-5),
    "weight-only": ((4, 7, 12), (12,), True, False, 1e-5),
    "bias-only": ((4, 7, 12), (12,), False, True, 1e-5),
    "large-eps": ((6, 10), (10,), True, True, 0.5),
}


@pytest.mark.parametrize("name", list(LAYER_CASES))
def test_layer_norm_jvp_equals_torch_func_jvp(name):
    shape, normalized, has_w, has_b, eps = LAYER_CASES[name]
    trailing = (normalized,) if isinstance(normalized, int) else normalized
    x, dx = _randn(*shape, seed=0), _randn(*shape, seed=1)
    w, dw = (_randn(*trailing, seed=2), _randn(*trailing, seed=3)) if has_w else (None, None)
    b, db = (_randn(*trailing, seed=4), _randn(*trailing, seed=5)) if has_b else (None, None)
    y, dy = _closed(layer_norm_dual, x, dx, normalized, [w, dw], [b, db], eps)
    want, want_dot = _references(lambda x, w, b: F.layer_norm(x, trailing, w, b, eps), (x, w, b), (dx, dw, db))
    elem, elem_dot = _references(lambda x, w, b: _elementary_layer_norm(x, trailing, w, b, eps), (x, w, b),
                                 (dx, dw, db))
    assert torch.equal(y, F.layer_norm(x, trailing, w, b, eps))  # the primal is torch's own, bit for bit
    assert _relative(dy, want_dot) <= 1e-12
    assert _relative(dy, elem_dot) <= 1e-12
    assert _relative(want, elem) <= 1e-12  # the two references agree with each other


@pytest.mark.parametrize("moving", ["input", "weight", "bias", "weight-bias", "zero-input"])
def test_layer_norm_jvp_with_some_tangents_only(moving):
    """Only some of input, scale and shift move (the others plain tensors); or the input's tangent is zero."""
    x, w, b = _randn(3, 5, 8, seed=0), _randn(8, seed=2), _randn(8, seed=4)
    dx = torch.zeros_like(x) if moving == "zero-input" else _randn(3, 5, 8, seed=1) if "input" in moving else None
    dw = _randn(8, seed=3) if "weight" in moving or moving == "zero-input" else None
    db = _randn(8, seed=5) if "bias" in moving else None
    _, dy = _closed(layer_norm_dual, x, dx, (8,), [w, dw], [b, db], 1e-5)
    _, want = _references(lambda x, w, b: F.layer_norm(x, (8,), w, b, 1e-5), (x, w, b), (dx, dw, db))
    assert _relative(dy, want) <= 1e-12
    if moving == "bias":
        assert torch.equal(dy, db.expand_as(dy))  # a shift alone moves every row by its tangent, exactly


def test_layer_norm_jvp_of_an_input_far_from_zero_mean():
    """Mean 1e4, spread 1e-1: every formula rounds at about 1e-16 |x| / spread; no worse than torch's own."""
    x, dx = _randn(6, 16, seed=0, scale=0.1, shift=1e4), _randn(6, 16, seed=1)
    w, dw, b, db = _randn(16, seed=2), _randn(16, seed=3), _randn(16, seed=4), _randn(16, seed=5)
    _, dy = _closed(layer_norm_dual, x, dx, (16,), [w, dw], [b, db], 1e-5)
    _, want = jvp(lambda x, w, b: _elementary_layer_norm(x, (16,), w, b, 1e-5), (x, w, b), (dx, dw, db))
    _, torch_own = jvp(lambda x, w, b: F.layer_norm(x, (16,), w, b, 1e-5), (x, w, b), (dx, dw, db))
    assert _relative(dy, want) <= 1e-10
    assert _relative(dy, want) <= 2 * _relative(torch_own, want)


def test_layer_norm_jvp_in_float32_and_of_a_strided_input():
    """float32: the primal bit for bit torch's, the tangent within float32 rounding of the float64 one; a
    transposed (non-contiguous) input and tangent give the same result as their contiguous copies."""
    x, dx = _randn(6, 4, 10, seed=0), _randn(6, 4, 10, seed=1)
    w, dw = _randn(10, seed=2), _randn(10, seed=3)
    y32, dy32 = _closed(layer_norm_dual, x.float(), dx.float(), (10,), [w.float(), dw.float()], None, 1e-5)
    _, dy64 = _closed(layer_norm_dual, x, dx, (10,), [w, dw], None, 1e-5)
    assert y32.dtype == dy32.dtype == torch.float32
    assert torch.equal(y32, F.layer_norm(x.float(), (10,), w.float(), None, 1e-5))
    assert _relative(dy32.double(), dy64) <= 1e-5
    xt, dxt = x.transpose(0, 1), dx.transpose(0, 1)
    _, dyt = _closed(layer_norm_dual, xt, dxt, (10,), [w, dw], None, 1e-5)
    _, want = jvp(lambda x, w: F.layer_norm(x, (10,), w, None, 1e-5), (xt.contiguous(), w), (dxt.contiguous(), dw))
    assert _relative(dyt, want) <= 1e-12


RMS_CASES = {  # name: (input shape, normalized_shape, weight, eps)
    "last-axis": ((4, 7, 12), (12,), True, 1e-6),
    "two-axes": ((3, 5, 6, 4), (6, 4), True, 1e-5),
    "three-axes": ((2, 3, 4, 5), (3, 4, 5), False, 1e-5),
    "no-weight": ((5, 9), (9,), False, 1e-6),
    "default-eps": ((5, 9), (9,), True, None),
}


@pytest.mark.parametrize("name", list(RMS_CASES))
def test_rms_norm_jvp_equals_torch_func_jvp(name):
    shape, normalized, has_w, eps = RMS_CASES[name]
    x, dx = _randn(*shape, seed=0, shift=0.5), _randn(*shape, seed=1)
    w, dw = (_randn(*normalized, seed=2), _randn(*normalized, seed=3)) if has_w else (None, None)
    y, dy = _closed(rms_norm_dual, x, dx, normalized, [w, dw], eps)
    want, want_dot = _references(lambda x, w: F.rms_norm(x, normalized, w, eps), (x, w), (dx, dw))
    elem, elem_dot = _references(lambda x, w: _elementary_rms_norm(x, normalized, w, eps), (x, w), (dx, dw))
    assert torch.equal(y, F.rms_norm(x, normalized, w, eps))
    assert _relative(dy, want_dot) <= 1e-12
    assert _relative(dy, elem_dot) <= 1e-12
    assert _relative(want, elem) <= 1e-12


def test_rms_norm_jvp_of_the_weight_alone():
    x, w, dw = _randn(4, 6, seed=0), _randn(6, seed=2), _randn(6, seed=3)
    _, dy = _closed(rms_norm_dual, x, None, (6,), [w, dw], 1e-6)
    _, want = jvp(lambda w: _elementary_rms_norm(x, (6,), w, 1e-6), (w,), (dw,))
    assert _relative(dy, want) <= 1e-12


def test_the_rules_decline_what_they_do_not_compute():
    x, dx, w = _randn(4, 6, seed=0), _randn(4, 6, seed=1), _randn(6, seed=2)
    with fwAD.dual_level():
        xd = fwAD.make_dual(x, dx)
        assert layer_norm_dual(x, (6,), w) is None  # nothing moves
        assert layer_norm_dual(xd, (3, 6)) is None  # not the trailing shape
        assert layer_norm_dual(xd, (5,)) is None
        assert layer_norm_dual(xd, (6,), w.float()) is None  # dtypes differ
        assert layer_norm_dual(xd, (6,), _randn(3, seed=5)) is None  # weight of another shape
        half = fwAD.make_dual(x.to(torch.bfloat16), dx.to(torch.bfloat16))
        assert layer_norm_dual(half, (6,)) is None  # statistics in float32: left to torch
        assert rms_norm_dual(half, (6,)) is None
        assert rms_norm_dual(xd, (3,)) is None
        assert rms_norm_dual(x, (6,), w) is None


def test_small_inputs_are_left_to_forward_mode_by_default(monkeypatch):
    """Below ``MIN_ELEMENTS`` values the rules decline (forward mode is as fast there); from it on they compute."""
    monkeypatch.setattr(layer_norm_jvp, "MIN_ELEMENTS", DEFAULT_MIN_ELEMENTS)
    n = 256
    rows = -(-DEFAULT_MIN_ELEMENTS // n)
    small, large = _randn(rows - 1, n, seed=0), _randn(rows, n, seed=1)
    with fwAD.dual_level():
        for rule in (layer_norm_dual, rms_norm_dual):
            assert rule(fwAD.make_dual(small, torch.ones_like(small)), (n,)) is None
            assert rule(fwAD.make_dual(large, torch.ones_like(large)), (n,)) is not None


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3, padding=1)
        self.bn, self.bn_plain = nn.BatchNorm2d(6), nn.BatchNorm2d(6, affine=False)
        self.ln = nn.LayerNorm((5, 5))
        self.rms = nn.RMSNorm(6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.ln(self.bn_plain(F.relu(self.bn(self.conv(x)))))
        h = self.rms((h * h).mean((2, 3)))  # the maps' mean square: their mean is 0 after the layer norm
        return self.head(torch.layer_norm(h, (6,)) + F.rms_norm(h, (6,)))


def test_fused_jvp_routes_every_normalisation_and_equals_plain_forward_mode(monkeypatch):
    calls = []

    def counted(rule):
        def call(*args, **kwargs):
            out = rule(*args, **kwargs)
            calls.append(out is not None)
            return out
        return call

    for f in (F.layer_norm, torch.layer_norm, F.rms_norm, torch.rms_norm):
        monkeypatch.setitem(fused_module._RULES, f, counted(fused_module._RULES[f]))
    torch.manual_seed(0)
    model = Norms().double()
    model.train()(_randn(8, 2, 5, 5, seed=9))  # running statistics that are not the initial 0 and 1
    model.eval()
    X = _randn(3, 2, 5, 5, seed=7)
    point = {n: v.detach() for n, v in model.named_parameters()}
    point.update({n: v for n, v in model.named_buffers()})
    tangent = {n: _randn(*v.shape, seed=10 + i) for i, (n, v) in enumerate(model.named_parameters())}
    h, dh = fused_jvp(lambda p: functional_call(model, p, (X,)), point, tangent)
    assert calls == [True] * 4  # ln, rms, torch.layer_norm, F.rms_norm: each in closed form (batch norms: torch's)
    with fwAD.dual_level():  # the reference: plain forward mode, no torch function mode
        dual = {n: fwAD.make_dual(v, tangent[n]) if n in tangent else v for n, v in point.items()}
        want, want_dot = fwAD.unpack_dual(functional_call(model, dual, (X,)))
    assert _relative(h, want) <= 1e-12  # the fused convolution rounds its own way
    assert _relative(dh, want_dot) <= 1e-12


def test_the_layer_factored_rows_take_the_closed_form(monkeypatch):
    """The adaptive replica of a LayerNorm network on the layer-factored rows: its normalisations' tangents in t
    come from ``layer_norm_dual``, and the replica equals the one on the generic path (``factored="never"``)."""
    calls = []

    def counted(*args, **kwargs):
        out = layer_norm_dual(*args, **kwargs)
        calls.append(out is not None)
        return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8),
                          nn.Linear(8, 3)).double()
    X, y = _randn(24, 5, seed=1), torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(3):
            classifier_step(model, opt, X, y, s, rec)
    X_test = _randn(4, 5, seed=3)
    monkeypatch.setattr(layer_rules, "layer_norm_dual", counted)
    fast = explaind.KernelReplica(quadrature="adaptive", factored="always", device="cpu").fit(rec.trajectory)
    got = torch.as_tensor(fast.predict(X_test))
    assert "rows" in fast.engine_.factored_used and any(calls)
    generic = explaind.KernelReplica(quadrature="adaptive", factored="never", device="cpu").fit(rec.trajectory)
    want = torch.as_tensor(generic.predict(X_test))
    with torch.no_grad():
        trained = model.eval()(X_test)
    assert _relative(got, want) <= 1e-10
    assert _relative(got, trained) <= 1e-6


@pytest.mark.parametrize("kind", ["gpt2", "bert"])
def test_gpt2_and_bert_stay_exact_with_the_closed_form(kind, tmp_path, monkeypatch):
    """A tiny GPT-2 LM and a tiny BERT classifier recorded by the Trainer (tests/_hf_testkit.py): the replica takes
    the layer-factored rows (whose start-up check against the generic path turns them off where they differ), their
    layer norms' tangents come from ``layer_norm_dual``, and the replica (<= 1e-6 against the trained model), the
    residual share (<= 1e-9) and the train scores (<= 1e-9 against the slow loop reference) hold."""
    from _hf_testkit import (
        classifier_figures,
        cls_data,
        lm_data,
        lm_figures,
        mask_4d,
        record_trainer_bert,
        record_trainer_gpt2,
    )

    calls = []

    def counted(*args, **kwargs):
        out = layer_norm_dual(*args, **kwargs)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(layer_rules, "layer_norm_dual", counted)
    if kind == "gpt2":
        model, traj = record_trainer_gpt2(tmp_path)
        X = {"input_ids": lm_data(3, seed=9)[0]}
    else:
        model, traj = record_trainer_bert(tmp_path)
        ids, mask, _ = cls_data(3, seed=7)
        X = {"input_ids": ids, "attention_mask": mask_4d(mask)}
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    replica.predict(X)
    assert "rows" in replica.engine_.factored_used and sum(calls) >= 3  # each layer norm of a batch of rows
    got = lm_figures(model, traj) if kind == "gpt2" else classifier_figures(model, traj)
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9
