"""Conversions below the replay dtype inside a model's forward: found by behaviour, evaluated in the replay dtype.

A hand-written RMS norm that computes in float32 whatever its input (as Hugging Face's do) is the model under
test; its float64 twin is ``torch.nn.RMSNorm`` with the same weight and eps, an independent implementation of the
same function without the float32 rounding. Replays with ``casts="auto"`` must match the twin's function, with
training gradients rounded as in the run; ``casts="as_written"`` names the module path in its warning; a model with
no casts gives the same numbers bit for bit whatever ``casts`` says.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _recording_helpers import batches, classification_data
from reference import Reference, rel_err
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

import explaind
import explaind.kernel.adaptive as adaptive
from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.kernel.casts import KeepReplayDtype, find_casts

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64


class Float32Norm(nn.Module):
    """RMS norm computed in float32, converted back to the input's dtype (the Hugging Face pattern)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class Net(nn.Module):
    """Linear -> tanh -> norm -> linear; the norm computes in float32 (``cast``) or is ``nn.RMSNorm``."""

    def __init__(self, cast: bool = True):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.body = nn.Sequential(nn.Tanh(), Float32Norm(8) if cast else nn.RMSNorm(8, eps=1e-6))
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        return self.out(self.body(self.inp(x)))


def twin_of(model: Net) -> Net:
    """The float64 twin: the same parameters, ``nn.RMSNorm`` for the float32 norm."""
    twin = Net(cast=False).to(DT)
    twin.load_state_dict(model.state_dict())
    return twin


def _record(model: nn.Module, steps: int = 4):
    """Adam in float64 on 16 samples in shuffled batches of 4, cross entropy; the trained model and the run."""
    X, y = classification_data(n=16)
    model = model.to(DT)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    with rec:
        for idx in batches(16, 4)[:steps]:
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory


@pytest.fixture(scope="module")
def cast_run():
    torch.manual_seed(1)
    return _record(Net())


def _x(n: int = 3, seed: int = 5) -> torch.Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=DT)


class Casts(nn.Module):
    """Every kind of conversion the detection names, in nested modules."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = nn.Sequential(nn.Identity(), Float32Norm(4))
        self.low = torch.zeros(1, dtype=torch.float32)  # a plain attribute: model.to(float64) leaves it

    def forward(self, x):
        h = self.inner(self.lin(x))
        a = torch.softmax(h, -1, dtype=torch.float32).to(x.dtype) + F.softmax(h, -1, dtype=torch.float32).double()
        b = h.type(torch.float32).double() + h.type("torch.FloatTensor").double() + h.half().double()
        c = h.to(self.low).double() + h.type_as(self.low).double()
        pos = torch.arange(4).float()  # of the positions only: does not move with the parameters
        return a + b + c + pos.to(x.dtype) + x.to(torch.bfloat16).double()


def test_find_casts_names_each_module_path_class_call_and_dtype_and_which_move_with_the_parameters():
    model = Casts().to(DT)
    params = dict(model.named_parameters())
    sites = find_casts(model, lambda p: functional_call(model, p, (_x(2),)), params, tuple(params), DT)
    got = {(s.module, s.cls, s.op, s.dtype, s.moving, s.count) for s in sites}
    assert got == {
        ("inner.1", "Float32Norm", "Tensor.float", "torch.float32", True, 1),
        ("", "Casts", "torch.softmax", "torch.float32", True, 1),
        ("", "Casts", "torch.nn.functional.softmax", "torch.float32", True, 1),
        ("", "Casts", "Tensor.type", "torch.float32", True, 2),
        ("", "Casts", "Tensor.half", "torch.float16", True, 1),
        ("", "Casts", "Tensor.to", "torch.float32", True, 1),
        ("", "Casts", "Tensor.type_as", "torch.float32", True, 1),
        ("", "Casts", "Tensor.float", "torch.float32", False, 1),
        ("", "Casts", "Tensor.to", "torch.bfloat16", False, 1),
    }
    assert [s.moving for s in sites] == sorted((s.moving for s in sites), reverse=True)  # moving ones first
    assert "inner.1 (Float32Norm): Tensor.float -> float32" in [s.describe() for s in sites]


def test_every_kind_of_conversion_keeps_float64_under_the_mode():
    """Casts' forward with no rounding, written out by hand in float64: what the mode must compute."""
    torch.manual_seed(4)
    model = Casts().to(DT)
    x = _x(3)
    with torch.no_grad():
        h = model.lin(x)
        h = model.inner[1].weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        want = 2 * torch.softmax(h, -1) + 5 * h + torch.arange(4, dtype=DT) + x
        with KeepReplayDtype(DT):
            got = model(x)
        as_written = model(x)
    assert got.dtype == DT
    assert rel_err(got, want) <= 1e-15
    assert rel_err(as_written, want) > 1e-6  # half and bfloat16 round that much


def test_a_float32_replay_finds_half_casts_and_not_float_ones():
    model = Casts().float()
    params = dict(model.named_parameters())
    x = _x(2).float()
    sites = find_casts(model, lambda p: functional_call(model, p, (x,)), params, tuple(params), torch.float32)
    assert {s.dtype for s in sites} == {"torch.float16", "torch.bfloat16"}


def test_kept_replay_dtype_is_the_float64_twin_under_jvp_vmap_grad_and_jacrev():
    torch.manual_seed(2)
    model = Net().to(DT)
    twin = twin_of(model)
    P = {k: v.detach() for k, v in model.named_parameters()}
    V = {k: torch.randn_like(v) for k, v in P.items()}
    x = _x(5)

    def f(m):
        return lambda p, xx: functional_call(m, p, (xx,))

    def loss(m):
        return lambda p, xx: f(m)(p, xx[None]).logsumexp(-1).sum()

    # without the mode the float32 norm rounds: the outputs differ from the twin's at float32 level
    assert rel_err(f(model)(P, x), f(twin)(P, x)) > 1e-10
    with KeepReplayDtype(DT):
        got = [f(model)(P, x), jvp(lambda p: f(model)(p, x), (P,), (V,))[1],
               vmap(jacrev(loss(model)), in_dims=(None, 0))(P, x)["inp.weight"],
               vmap(lambda xx: jvp(lambda p: f(model)(p, xx[None]), (P,), (V,))[1])(x)]
    want = [f(twin)(P, x), jvp(lambda p: f(twin)(p, x), (P,), (V,))[1],
            vmap(jacrev(loss(twin)), in_dims=(None, 0))(P, x)["inp.weight"],
            vmap(lambda xx: jvp(lambda p: f(twin)(p, xx[None]), (P,), (V,))[1])(x)]
    for g, w in zip(got, want):
        assert g.dtype == DT
        assert rel_err(g, w) <= 1e-13


class TwinReference(Reference):
    """The loop reference with g through the float64 twin and training gradients through the model as written."""

    def __init__(self, traj, X, twin, **kwargs):
        self.twin = twin
        super().__init__(traj, X, **kwargs)

    def forward(self, vec, xi):
        return functional_call(self.twin, {**self.constants, **self._unflat(vec)}, (self.X[xi:xi + 1],))[0]


def test_a_float32_norm_is_replayed_in_float64_by_default_exact_against_the_twin_reference(cast_run, caplog):
    model, traj = cast_run
    X = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        rep = explaind.KernelReplica(device="cpu", tol=1e-11).fit(traj)
        report = rep.fidelity_report(X, model=model)
        att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    ref = TwinReference(traj, X, twin_of(model), panels=4)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    with torch.no_grad():
        truth = model(X)
    assert report["model_max_rel_error"] <= 1e-6  # against the model as written (float32 rounding)
    assert report["model_max_rel_error"] > 1e-12  # ... which the replica does not reproduce
    assert rel_err(rep.predict(X), twin_of(model)(X).detach()) <= 1e-10
    assert report["promoted_casts"] == att.meta["promoted_casts"] == ["body.1 (Float32Norm): Tensor.float -> float32"]
    assert att.meta["residual_share"] <= 1e-9
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
    assert rel_err(att.total(), torch.as_tensor(ref.values_at[-1])) <= 1e-10
    assert rel_err(truth, torch.as_tensor(ref.values_at[-1])) > 1e-12
    assert "body.1 (Float32Norm): Tensor.float -> float32" in caplog.text and "casts='auto'" in caplog.text


def test_as_written_warns_naming_the_module_path_class_and_fix_and_its_cap_warning_names_them(cast_run, monkeypatch):
    _, traj = cast_run
    monkeypatch.setattr(adaptive, "MAX_EVALS", 200)
    with pytest.warns(ExplaindWarning) as seen:
        rep = explaind.KernelReplica(device="cpu", tol=1e-11, casts="as_written").fit(traj)
        report = rep.fidelity_report(_x())
    messages = [str(w.message) for w in seen]
    upfront = [m for m in messages if "casts='as_written' replays that rounding" in m]
    assert len(upfront) == 1
    assert "body.1 (Float32Norm): Tensor.float -> float32" in upfront[0] and "casts='auto'" in upfront[0]
    capped = [m for m in messages if "stopped at the cap" in m]
    assert len(capped) == 1 and "body.1 (Float32Norm)" in capped[0]
    assert report["promoted_casts"] == []
    assert max(report["relative_quadrature_error"]) > 1e-10  # the rounding the replay kept


def test_replay_dtype_and_auto_agree_on_a_model_with_moving_casts(cast_run):
    _, traj = cast_run
    X = _x()
    auto = explaind.KernelReplica(device="cpu").fit(traj).predict(X)
    forced = explaind.KernelReplica(device="cpu", casts="replay_dtype").fit(traj).predict(X)
    assert (auto == forced).all()


def test_a_model_without_casts_gives_identical_numbers_whatever_casts_says():
    torch.manual_seed(1)
    _, traj = _record(Net(cast=False), steps=3)
    X = _x()
    reps, atts = [], []
    for casts in ("auto", "as_written", "replay_dtype"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ExplaindWarning)
            rep = explaind.KernelReplica(device="cpu", casts=casts).fit(traj)
            reps.append(rep.predict(X))
            est = explaind.InfluenceEstimator(keep=("step", "group"), device="cpu", casts=casts).fit(traj)
            atts.append(est.transform(X))
        assert atts[-1].meta["promoted_casts"] == []
    for r, a in zip(reps[1:], atts[1:]):
        assert (r == reps[0]).all()
        assert torch.equal(a.values, atts[0].values) and torch.equal(a.residual, atts[0].residual)


class Normalised(nn.Module):
    """Two linear layers around a parameter-free norm computed in float32: every parameter has a layer rule."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h * torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype))


def test_the_layer_factored_path_keeps_the_replay_dtype_like_the_generic_one():
    torch.manual_seed(3)
    _, traj = _record(Normalised(), steps=3)
    X = _x()
    out = {}
    for factored in ("always", "never"):
        est = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu", factored=factored).fit(traj)
        out[factored] = est.transform(X)
        assert out[factored].meta["promoted_casts"] == ["<root> (Normalised): Tensor.float -> float32"]
        assert est.sweep_["jacobian"] == ("factored" if factored == "always" else "autograd")
    assert rel_err(out["always"].values, out["never"].values) <= 1e-10
    assert out["always"].meta["residual_share"] <= 1e-9


def test_an_unknown_casts_value_is_refused_naming_the_allowed_ones(cast_run):
    _, traj = cast_run
    for est in (explaind.KernelReplica(casts="keep"), explaind.InfluenceEstimator(casts="keep")):
        with pytest.raises(ConfigError) as info:
            est.fit(traj)
        assert "casts" in str(info.value) and "'as_written'" in str(info.value) and "'keep'" in str(info.value)
