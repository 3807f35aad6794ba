"""A forward that switches the gradient off for part of its computation (issue 11, "never silently wrong").

``torch.no_grad()``, ``torch.set_grad_enabled(False)`` (a block or a call) and a method decorated with
``@torch.no_grad()`` stop the training gradient as ``.detach()`` does but leave no call to name. Measured on a cosine
head whose weight rows are divided by their norms taken with the gradient off (float64, SGD 0.5, 3 steps of 4 of 12
samples, tests/_round5_kit.py): forward-mode derivatives run through ``no_grad``, so the replica and the JVP path
(``keep=("step",)``) are exact against the trained model and a slow reference whose path derivative is that of the
same function without the switch (``_TwinReference``); the reverse-mode Jacobians of ``keep=("train",)`` stop there as
the training gradient did (the scores equal tests/reference.py on the model itself) and miss 8.8% of the change. The
engine now finds the switch in its probe forward (explaind/kernel/jumps.py), names its module, method, file and line
in the quadrature-share warning with the explanations that are exact (before: "Use a smaller tol"), and takes the
forward-mode path for axes that allow it (``keep=("group",)``). ``torch.inference_mode()`` stops forward mode too:
the replica misses by 0.13, and the warnings name the site and the fix, ``torch.no_grad()`` instead (before: float32
casts and a smaller tol). A ``torch.enable_grad()`` block nested inside ``no_grad`` is no stop and is not named.
"""

from __future__ import annotations

import re
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch
from _round5_kit import N_TRAIN, XV, YV, fit
from reference import Reference, rel_err
from torch import nn
from torch.func import functional_call

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel.jumps import find_jumps

pytestmark = pytest.mark.usefixtures("one_thread")

QUAD = {"quadrature": "adaptive", "tol": 1e-9, "device": "cpu"}
SWITCHES = ("no_grad", "set_grad_enabled", "set_grad_enabled_call", "decorated")


class NormHead(nn.Module):
    """``tanh(a x) @ (w / |w|).T * 3`` with the row norms ``|w|`` taken as ``mode`` says."""

    def __init__(self, mode: str = "plain"):
        super().__init__()
        self.mode = mode
        self.a, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8))

    @torch.no_grad()
    def frozen_norm(self):
        return self.w.norm(dim=1, keepdim=True)  # site: decorated

    def forward(self, x):
        if self.mode == "no_grad":
            with torch.no_grad():
                n = self.w.norm(dim=1, keepdim=True)  # site: no_grad
        elif self.mode == "set_grad_enabled":
            with torch.set_grad_enabled(False):
                n = self.w.norm(dim=1, keepdim=True)  # site: set_grad_enabled
        elif self.mode == "set_grad_enabled_call":
            before = torch.is_grad_enabled()
            torch.set_grad_enabled(False)
            n = self.w.norm(dim=1, keepdim=True)  # site: set_grad_enabled_call
            torch.set_grad_enabled(before)
        elif self.mode == "decorated":
            n = self.frozen_norm()
        elif self.mode == "nested_enable_grad":
            with torch.no_grad(), torch.enable_grad():
                n = self.w.norm(dim=1, keepdim=True)
        else:
            n = self.w.norm(dim=1, keepdim=True)
        return torch.tanh(self.a(x)) @ (self.w / n).T * 3


class CentredHead(nn.Module):
    """``tanh(a x) @ (w - mean(w)).T * 3`` with the row means taken as ``mode`` says (a division by a value made
    in inference mode cannot train: torch refuses to save it for backward)."""

    def __init__(self, mode: str = "plain"):
        super().__init__()
        self.mode = mode
        self.a, self.w = nn.Linear(4, 8), nn.Parameter(torch.randn(3, 8))

    def forward(self, x):
        if self.mode == "inference_mode":
            with torch.inference_mode():
                c = self.w.mean(dim=1, keepdim=True)  # site: inference_mode
        elif self.mode == "no_grad":
            with torch.no_grad():
                c = self.w.mean(dim=1, keepdim=True)
        else:
            c = self.w.mean(dim=1, keepdim=True)
        return torch.tanh(self.a(x)) @ (self.w - c).T * 3


def _line(mark: str) -> int:
    """The line of this file that ends with ``# site: mark``."""
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if text.endswith(f"# site: {mark}"))


def _site(cls: str, call: str, how: str, method: str, mark: str) -> str:
    return f"<root> ({cls}): {call} under {how} ({cls}.{method}, {__file__}:{_line(mark)})"


class _TwinReference(Reference):
    """tests/reference.py with the path derivative of the same function written without the switch (the
    ``twin``); the per-sample training gradients are the model's own, stopped as the loop's were."""

    twin: nn.Module

    def forward(self, vec, xi):
        params = {**self.constants, **self._unflat(vec)}
        return functional_call(self.twin, params, (self.X[xi: xi + 1],))[0]


def twin_reference(traj, X, twin: nn.Module) -> Reference:
    ref = _TwinReference.__new__(_TwinReference)
    ref.twin = twin.double().eval()
    Reference.__init__(ref, traj, X)
    return ref


@cache
def trained(cls: type, mode: str):
    return fit(lambda: cls(mode), XV, YV)


def explain(model, traj, *, replica: bool = True, **kw):
    """``(replica's relative error against the trained model or None, attribution or None, estimator, warnings)``."""
    X = XV[N_TRAIN:]
    with torch.no_grad():
        truth = model.eval()(X).numpy()
    rep = att = inf = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        if replica:
            rep = rel_err(explaind.KernelReplica(**QUAD).fit(traj).predict(X), truth)
        if kw:
            inf = explaind.InfluenceEstimator(**QUAD, **kw).fit(traj)
            att = inf.transform(X)
    return rep, att, inf, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def _values(att, expected):
    return np.asarray(att.values.detach()).reshape(expected.shape)


@pytest.mark.parametrize("mode", [*SWITCHES, "nested_enable_grad", "plain"])
def test_the_probe_names_each_gradient_switch_at_the_users_line(mode):
    """One call reads the weight with the gradient off: named with its module, method, file and line; a nested
    ``enable_grad`` and the plain forward give no site."""
    net = NormHead(mode).double()
    params = dict(net.named_parameters())
    x = XV[:2]
    sites = find_jumps(net, lambda p: functional_call(net, p, (x,)), params, tuple(params))
    if mode in ("nested_enable_grad", "plain"):
        assert sites == (), sites
    else:
        method = "frozen_norm" if mode == "decorated" else "forward"
        assert sites == (_site("NormHead", "Tensor.norm", "no_grad", method, mode),), sites


def test_inference_mode_is_named_as_such():
    net = CentredHead("inference_mode").double()
    params = dict(net.named_parameters())
    sites = find_jumps(net, lambda p: functional_call(net, p, (XV[:2],)), params, tuple(params))
    assert sites == (_site("CentredHead", "Tensor.mean", "inference_mode", "forward", "inference_mode"),), sites


@pytest.mark.parametrize("mode", SWITCHES)
def test_the_replica_and_the_step_scores_are_exact_through_a_gradient_switch(mode):
    """Forward mode runs through ``no_grad``: the replica is exact against the trained model and the per-step scores
    against the reference of the same function without the switch, with no warning."""
    model, traj = trained(NormHead, mode)
    rep, att, _, caught = explain(model, traj, keep=("step",))
    ref = twin_reference(traj, XV[N_TRAIN:], NormHead("plain"))
    expected = ref.kept(("step",))
    assert rep <= 1e-8 and not caught, (rep, caught)
    assert float(ref.quad_error.abs().max()) <= 1e-10  # the twin's derivative is the function's
    assert rel_err(_values(att, expected), expected) <= 1e-8
    assert att.completeness_error() <= 1e-12


@pytest.mark.parametrize("mode", SWITCHES)
def test_the_train_scores_warn_naming_the_switch_and_the_exact_explanations(mode):
    """The Jacobian of ``keep=("train",)`` stops at the switch (the scores equal the reference on the model itself,
    reverse mode); the share warning names the site and what is exact, not a smaller tol."""
    model, traj = trained(NormHead, mode)
    _, att, _, caught = explain(model, traj, replica=False, keep=("train",))
    expected = Reference(traj, XV[N_TRAIN:]).kept(("train",))
    assert rel_err(_values(att, expected), expected) <= 1e-8
    assert att.meta["quadrature_share"] > 0.05 and len(caught) == 1, caught
    method = "frozen_norm" if mode == "decorated" else "forward"
    site = _site("NormHead", "Tensor.norm", "no_grad", method, mode)
    assert site in caught[0] and "smaller tol" not in caught[0], caught
    assert re.search(r"KernelReplica and keep=\(\) or \('step',\) are exact on this model; for exact 'param' or "
                     r"'train' scores, a forward without torch.no_grad\(\)", caught[0]), caught


def test_group_scores_take_forward_mode_where_the_forward_switches_the_gradient_off(monkeypatch):
    """``keep=("group",)`` may take the Jacobian path when it is cheaper (here forced): not on a forward with a
    ``no_grad`` site, where forward mode is exact and the Jacobian is not."""
    monkeypatch.setattr(explaind.InfluenceEstimator, "_jvp_tangent_ratio", 0.0)
    _, _, plain, _ = explain(*trained(NormHead, "plain"), replica=False, keep=("group",))
    assert plain.sweep_["path"] == "jacobian"
    model, traj = trained(NormHead, "no_grad")
    _, att, inf, caught = explain(model, traj, replica=False, keep=("group",))
    expected = twin_reference(traj, XV[N_TRAIN:], NormHead("plain")).kept(("group",))
    assert inf.sweep_["path"] == "jvp" and not caught, caught
    assert rel_err(_values(att, expected), expected) <= 1e-8


def test_enable_grad_nested_in_no_grad_is_exact_on_every_path():
    model, traj = trained(NormHead, "nested_enable_grad")
    rep, att, _, caught = explain(model, traj, keep=("train",))
    expected = Reference(traj, XV[N_TRAIN:]).kept(("train",))
    assert rep <= 1e-8 and not caught, (rep, caught)
    assert rel_err(_values(att, expected), expected) <= 1e-8


def test_inference_mode_is_named_with_no_grad_as_the_fix():
    """No derivative passes through inference mode: the replica misses the trained model, every quadrature warning
    names the site and ``torch.no_grad()`` as the fix (before: float32 casts, a smaller tol), and the fix is exact."""
    model, traj = trained(CentredHead, "inference_mode")
    rep, _, _, caught = explain(model, traj, keep=("step",))
    site = _site("CentredHead", "Tensor.mean", "inference_mode", "forward", "inference_mode")
    assert rep > 1e-3 and len(caught) == 3, (rep, caught)
    assert all(site in w and "torch.no_grad() instead of torch.inference_mode()" in w for w in caught), caught
    assert not any("float32 whatever its dtype" in w or "smaller tol" in w for w in caught), caught
    rep, _, _, caught = explain(*trained(CentredHead, "no_grad"))
    assert rep <= 1e-8 and not caught, (rep, caught)
