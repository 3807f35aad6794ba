"""Rewritten functions reached on a branch the census did not take (explaind/kernel/rewrite_scan.py).

Before, a model without a rewritten module ran its first forward in the rewrite mode (the census) and no mode after
it when that forward rewrote nothing; a later forward taking another branch that calls ``F.hardsigmoid`` ran it with
torch's derivative ``float32(1/6)``: the adaptive rule stopped at its cap (replica 9.6e-10 and a warning at
tol 1e-11 on the model below). Now the forward code is scanned before the first forward and the mode stays on for a
model that can reach such a call. Tests: what the scan finds (and that models without such calls, GPT-2 and BERT
among them, keep the no-mode path), the exact slope on a later branch, and end to end against a float64 slope-exact
slow reference.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _round5_kit import DT, QUAD, XV, YV, KinkMarks, KinkReference, _flat, fit
from reference import rel_err
from test_functional_rewrites import Switch
from torch import nn
from torch.func import jvp
from torch.nn.functional import hardsigmoid as gate_function

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel.explained import FunctionalModel
from explaind.kernel.rewrite_scan import reachable_rewrite
from explaind.kernel.rewrites import FusedKernelRewrite

pytestmark = pytest.mark.usefixtures("one_thread")


def _late_distance(h):
    return torch.cdist(h[None], h[None])[0]


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.late = nn.Linear(4, 2), False


class InForward(Base):
    def forward(self, x):
        h = self.lin(x)
        return F.hardsigmoid(h) if self.late else torch.tanh(h)


class ThroughAMethod(Base):
    def gate(self, h):
        return torch.nn.functional.prelu(h, torch.full((1,), 0.25))

    def forward(self, x):
        h = self.lin(x)
        return self.gate(h) if self.late else h


class ThroughAGlobalHelper(Base):
    def forward(self, x):
        h = self.lin(x)
        return _late_distance(h) if self.late else h


class ThroughAnAlias(Base):
    def forward(self, x):
        h = self.lin(x)
        return gate_function(h) if self.late else h


class HeldAsAnAttribute(Base):
    def __init__(self):
        super().__init__()
        self.act = functools.partial(F.hardsigmoid, inplace=False)

    def forward(self, x):
        h = self.lin(x)
        return self.act(h) if self.late else h


class InALambda(Base):
    def forward(self, x):
        pick = lambda h: F.rrelu(h, training=False)  # noqa: E731 - a lambda on purpose
        h = self.lin(x)
        return pick(h) if self.late else h


class ByName(Base):
    def forward(self, x):
        h = self.lin(x)
        return getattr(F, "grid_sample")(h[:, None, None, :], h[:, None, None, :]) if self.late else h  # noqa: B009


def _decorated(forward):
    @functools.wraps(forward)
    def wrapper(self, x):
        return forward(self, x)
    return wrapper


class Decorated(Base):
    @_decorated
    def forward(self, x):
        h = self.lin(x)
        return F.embedding_bag(torch.zeros(1, 1, dtype=torch.long), h) if self.late else h


class Outer(nn.Module):
    """A container of torch's own modules holding one of the above deep inside."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Identity(), nn.ModuleList([InForward()]))


FOUND = {InForward: "hardsigmoid", ThroughAMethod: "prelu", ThroughAGlobalHelper: "cdist",
         ThroughAnAlias: "hardsigmoid", HeldAsAnAttribute: "hardsigmoid", InALambda: "rrelu", ByName: "grid_sample",
         Decorated: "embedding_bag", Outer: "hardsigmoid"}


@pytest.mark.parametrize("cls", list(FOUND), ids=lambda c: c.__name__)
def test_the_scan_finds_a_rewritten_function_on_a_branch_not_taken(cls):
    assert reachable_rewrite(cls()) == FOUND[cls]


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))


def _bert():
    from transformers import BertConfig, BertForSequenceClassification
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=20))


QUIET = {"mlp": lambda: nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
         "cnn": lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.MaxPool2d(2), nn.Flatten()),
         "gpt2": _gpt2, "bert": _bert,
         "functions held in a dict (the census finds them)": Switch}


@pytest.mark.parametrize("name", list(QUIET))
def test_models_without_such_calls_keep_the_census_and_its_no_mode_path(name):
    model = QUIET[name]()
    assert reachable_rewrite(model) is None
    assert FunctionalModel(model, {}, None, torch.device("cpu"), DT)._rewrite is None


def test_a_later_branch_calling_hardsigmoid_gets_the_exact_slope():
    """The first forward takes the tanh branch; the later one F.hardsigmoid: its slope is 1/6 in float64 (before:
    the census had turned the mode off, and torch's slope float32(1/6) = 0.16666667163 came out)."""
    fm = FunctionalModel(InForward(), {}, None, torch.device("cpu"), DT)
    params = {n: p.detach().clone() for n, p in fm.module.named_parameters()}
    x = torch.randn(3, 4, dtype=DT)
    fm(params, x)
    assert isinstance(fm.rewritten(), FusedKernelRewrite)
    fm.module.late = True
    bias = params["lin.bias"]
    _, slope = jvp(lambda b: fm({**params, "lin.bias": b}, x), (bias,), (torch.ones_like(bias),))
    inside = fm.module.lin(x).abs() < 3
    assert inside.any() and torch.all(slope[inside] == 1 / 6)


class WideGate(nn.Module):
    """Inputs of 4 features (the training data): ``tanh``; inputs with a 5th feature: an ``F.hardsigmoid`` gate
    shifted by it. ``exact``: the gate as ``relu6(h + 3) / 6`` (torch's value, slope 1/6 exactly), for the slow
    reference. ``marks``: the gate's kinks at -3 and 3 (tests/_round5_kit.py)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.marks, self.exact = nn.Linear(4, 8), nn.Linear(8, 3), KinkMarks(), False

    def forward(self, x):
        h = self.a(x[..., :4])
        if x.shape[-1] > 4:
            h = h + x[..., 4:5]
        self.marks(torch.cat([h - 3, h + 3], -1))
        if x.shape[-1] == 4:
            return self.b(torch.tanh(h))
        return self.b(F.relu6(h + 3) / 6 if self.exact else F.hardsigmoid(h))


def test_inputs_that_take_the_hardsigmoid_branch_after_others_did_not_are_explained_exactly():
    """Explained on 4-feature inputs first (the census: tanh), then on 5-feature ones (F.hardsigmoid), by the same
    fitted replica and estimator: replica <= 1e-11 against the trained model and train scores <= 1e-11 against the
    float64 slow reference with the gate's exact slope, with no warning at tol 1e-11 (before: 9.6e-10 and 1.4e-9,
    each (step, input) pair stopped at the cap, with a warning)."""
    model, traj = fit(WideGate, XV, YV)
    X4 = XV[12:]
    X5 = torch.cat([X4, torch.tensor([[0.3], [-0.2]], dtype=DT)], 1)
    with torch.no_grad():
        truth = model.eval()(X5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        replica = explaind.KernelReplica(**QUAD).fit(traj)
        replica.predict(X4)
        got = replica.predict(X5)
        estimator = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj)
        estimator.transform(X4)
        scores = estimator.transform(X5)
    assert rel_err(_flat(got), _flat(truth)) <= 1e-11
    traj.model.exact = True
    reference = KinkReference(traj, X5, panels=2)
    expected = reference.kept(("train",))
    assert float(reference.E.abs().max()) <= 1e-12 * float(torch.stack(reference.delta).abs().max())
    assert rel_err(np.asarray(scores.values.detach()).reshape(expected.shape), expected) <= 1e-11
