"""A plain torch model that takes keyword arguments and returns a dataclass, recorded with mapping inputs.

``forward(self, x, *, keep)`` is called as ``model(**batch)`` with ``train_data=({"x": X, "keep": K}, y)`` and
returns a dataclass with ``logits``. Its twin takes the same two tensors concatenated into one and returns the
logits; both are built from one seed and trained by the same loop, so their runs are the same run written two
ways. The twin is checked against the slow loop reference (tests/hard_models_kit.py); the keyword model's replica,
residual share and ``keep=("train",)`` scores must then equal the twin's.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hard_models_kit import assert_exact, data, measure, seeded
from reference import rel_err
from torch import nn

import explaind

pytestmark = pytest.mark.usefixtures("one_thread")

X, Y = data(14, (4,), 5)
KEEP = (torch.arange(14 * 4).reshape(14, 4) % 3 != 0).to(torch.float64)  # a per-sample feature mask


@dataclass
class Output:
    logits: torch.Tensor
    hidden: torch.Tensor


class Keywords(nn.Module):
    """``forward(x, *, keep)``: the features ``x * keep`` through a GELU MLP; a dataclass out."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x, *, keep):
        hidden = F.gelu(self.a(x * keep))
        return Output(logits=self.b(hidden), hidden=hidden)


class Twin(Keywords):
    """The same function of one tensor ``[x, keep]`` ``(n, 8)``, returning the logits."""

    def forward(self, xk):  # type: ignore[override]
        return super().forward(xk[:, :4], keep=xk[:, 4:]).logits


def train(model: nn.Module, inputs, steps: int = 3):
    """SGD 0.5, batches of 4 drawn as tests/hard_models_kit.py draws them; ``inputs(idx)`` is the model's call."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    inputs_data = torch.cat([X[:12], KEEP[:12]], 1) if isinstance(model, Twin) else {"x": X[:12], "keep": KEEP[:12]}
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(inputs_data, Y[:12]))
    gen = torch.Generator().manual_seed(0)
    copies = []
    with rec:
        for _ in range(steps):
            copies.append({n: p.detach().clone() for n, p in model.named_parameters()})
            idx = torch.randperm(12, generator=gen)[:4]
            opt.zero_grad()
            out = inputs(idx)
            F.cross_entropy(out.logits if isinstance(out, Output) else out, Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    copies.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return rec.trajectory, copies


def test_keyword_arguments_and_a_dataclass_output_are_exact_as_their_tensor_twin():
    twin = seeded(Twin)
    joined = torch.cat([X, KEEP], 1)
    twin_traj, copies = train(twin, lambda idx: twin(joined[idx]))
    assert_exact(measure(twin, twin_traj, copies, joined[12:]))

    model = seeded(Keywords)
    traj, _ = train(model, lambda idx: model(x=X[idx], keep=KEEP[idx]))
    test = {"x": X[12:], "keep": KEEP[12:]}
    model.eval()
    with torch.no_grad():
        trained = model(**test).logits
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    assert rel_err(replica.predict(test), trained.numpy()) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(test)
    twin_att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(twin_traj).transform(joined[12:])
    assert att.meta["residual_share"] <= 1e-9
    assert rel_err(att.values.numpy(), twin_att.values.numpy()) <= 1e-12
