"""Four gaps of the real-loops issue, closed (round 14).

1. ``CounterfactualEstimator`` on a gradient reversal layer (DANN: a custom ``torch.autograd.Function`` whose backward
   is ``-g``, or ``Tensor.register_hook(lambda g: -g)``): exact against central finite differences of retraining in
   float64 with each sample's weight scaled by ``1 +- h`` (before: relative errors 0.65 with SGD momentum and 1.13
   with Adam, with a warning). A dropout step on such a model keeps a warning naming the cause.
2. The optimizer's carried momentum edited through ``.data`` in fewer entries than the watch's stride, between its
   strided samples: refused at the next step by the sum of the buffer's 64-bit words (before: recorded silently).
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from _round9_functions import GradientReversal, HookReversal, dann_loss
from _stranger_loops_kit import train
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError
from explaind.trajectory._optimizer_state_watch import SAMPLE, sampled_bits, word_sum

pytestmark = pytest.mark.usefixtures("one_thread")

M, H = 8, 1e-5
BATCHES = [[0, 1, 2, 3], [4, 5, 6, 1], [2, 7, 0, 5], [3, 6, 1, 4], [0, 2, 4, 6]]
_GEN = torch.Generator().manual_seed(3)
X = torch.randn(M + 3, 4, generator=_GEN, dtype=torch.float64)
Y = torch.stack([torch.randint(0, 3, (M + 3,), generator=_GEN), (X[:, 0] > 0).long()], 1)
OPTIMIZERS = {"sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9),
              "adam": lambda p: torch.optim.Adam(p, lr=0.05)}


def _dann_train(build, optimizer: str, scale: torch.Tensor | None = None, record: bool = False):
    """DANN trained from the same theta_0 on BATCHES, sample k's loss weighted ``scale[k] / |B|``; with ``record``,
    ``(model, trajectory)``."""
    torch.manual_seed(0)
    model = build().double()
    opt = OPTIMIZERS[optimizer](model.parameters())
    rec = explaind.TrajectoryRecorder(model, opt, loss=dann_loss, train_data=(X[:M], Y[:M])) if record else None
    scale = torch.ones(M, dtype=torch.float64) if scale is None else scale
    if rec is not None:
        rec.__enter__()
    for batch in BATCHES:
        idx = torch.tensor(batch)
        opt.zero_grad()
        out = model(X[idx])
        losses = (F.cross_entropy(out[:, :3], Y[idx, 0], reduction="none")
                  + F.cross_entropy(out[:, 3:], Y[idx, 1], reduction="none"))
        (losses * scale[idx] / len(batch)).sum().backward()
        if rec is not None:
            rec.log_batch(idx)
        opt.step()
    if rec is not None:
        rec.__exit__(None, None, None)
        return model, rec.trajectory
    return model


def _retrained_differences(build, optimizer: str) -> torch.Tensor:
    """The slow reference: central differences of the retrained model's test outputs, ``(T, M, O)``."""
    cols = []
    for k in range(M):
        outs = []
        for sign in (1.0, -1.0):
            scale = torch.ones(M, dtype=torch.float64)
            scale[k] += sign * H
            model = _dann_train(build, optimizer, scale)
            with torch.no_grad():
                outs.append(model.eval()(X[M:]))
        cols.append((outs[0] - outs[1]) / (2 * H))
    return torch.stack(cols, 1)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("build", [GradientReversal, HookReversal], ids=["function", "hook"])
def test_counterfactual_on_a_gradient_reversal_layer_matches_retraining(build, optimizer, caplog):
    _, traj = _dann_train(build, optimizer, record=True)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="explaind.estimators.counterfactual"):
        warnings.simplefilter("error", ExplaindWarning)
        est = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj)
        att = est.transform(X[M:])
    assert any("forward mode (torch.func.jacfwd)" in r.message for r in caplog.records), caplog.text
    reference = _retrained_differences(build, optimizer)
    err = float((att.values - reference).abs().max() / reference.abs().max())
    assert err <= 1e-6, err
    assert est.replay_residual_ <= 1e-12


class _DroppedReversal(GradientReversal):
    """DANN with dropout on the features (a training-mode replay)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(torch.tanh(self.f(x)))
        return torch.cat([self.c(h), self.d(self.reverse.apply(h))], 1)


def test_a_dropout_step_on_a_reversal_still_warns_naming_the_cause():
    torch.manual_seed(0)
    model = _DroppedReversal().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = explaind.TrajectoryRecorder(model, opt, loss=dann_loss, train_data=(X[:M], Y[:M]))
    with rec:
        for batch in BATCHES[:2]:
            idx = torch.tensor(batch)
            opt.zero_grad()
            dann_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    with pytest.warns(ExplaindWarning, match=r"backward is not the derivative.*_ReverseGrad.*step 1 is replayed "
                                             r"through its training forward.*Fix: InfluenceEstimator"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory).transform(X[M:])


def test_a_plain_model_keeps_reverse_mode(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:M], Y[:M, 0]))
    with rec:
        for batch in BATCHES[:2]:
            idx = torch.tensor(batch)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx, 0]).backward()
            rec.log_batch(idx)
            opt.step()
    with caplog.at_level(logging.WARNING, logger="explaind.estimators.counterfactual"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory).transform(X[M:])
    assert "forward mode" not in caplog.text


def _wide_mlp() -> nn.Module:
    """Buffers of 2400 and 1800 entries: strides 3 and 2, so entry 1 of each is between two sampled entries."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 600), nn.Tanh(), nn.Linear(600, 3)).double()


EDITS = {"one_entry": lambda b: b.view(-1)[1].add_(1e-3), "last_bit_of_one_entry":
         lambda b: b.view(-1).view(torch.int64)[1].add_(1), "run_shorter_than_the_stride":
         lambda b: b.view(-1)[1:3].mul_(0.5)}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize(("optimizer", "key"), [("sgd", "momentum_buffer"), ("adam", "exp_avg")])
def test_an_edit_between_the_sampled_entries_is_refused_at_the_next_step(optimizer, key, edit):
    model = _wide_mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    buf = None

    def after(s: int) -> None:
        nonlocal buf
        if s == 2:
            buf = opt.state[model[0].weight][key]
            assert buf.numel() > SAMPLE and 1 % -(-buf.numel() // SAMPLE) != 0  # entry 1 is not sampled
            EDITS[edit](buf.data)

    with pytest.raises(TrajectoryError, match=rf"Step 3: the optimizer's momentum buffers of 0\.weight \({key}: "
                                              rf"changed through \.data\)"):
        train(model, opt, after=after)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_word_sum_sees_every_single_entry_edit_the_sample_misses(dtype):
    """Each of the 3001 entries of a buffer changed in its last bit, one at a time: the sum moves every time (an odd
    count leaves trailing bytes out of the 64-bit words), while the sample misses all but the strided ones."""
    buf = torch.linspace(-1, 1, 3001, dtype=dtype)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[buf.element_size()]
    total, sample = word_sum(buf), sampled_bits(buf).clone()
    missed_by_sample = 0
    for i in range(buf.numel()):
        edited = buf.clone()
        edited.view(ints)[i] += 1
        assert not torch.equal(word_sum(edited), total), (dtype, i)
        missed_by_sample += torch.equal(sampled_bits(edited), sample)
    assert missed_by_sample == 3001 - 1001, missed_by_sample  # stride 3: the entries 0, 3, ..., 3000 are sampled
