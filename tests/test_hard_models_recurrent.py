"""Sequence models the repository does not ship: nn.LSTM / nn.GRU with a Linear head, a 1-D CNN, torch.compile.

torch's fused recurrent kernels have no ``vmap`` rule for one-input-at-a-time evaluation; explaind runs them
unrolled over time (explaind/kernel/rewrites.py). Every run is checked end to end against the trained model and
the slow loop reference (tests/hard_models_kit.py); the unrolled forms are checked against torch's kernels.
"""

from __future__ import annotations

import pytest
import torch
from hard_models_kit import DT, assert_exact, data, measure, seeded, train
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from explaind.exceptions import UnsupportedModelError
from explaind.kernel.rewrites import FusedKernelRewrite, needs_rewrite

pytestmark = pytest.mark.usefixtures("one_thread")


class RecurrentHead(nn.Module):
    """``cell(3 -> 5)`` over a sequence ``(n, T, 3)``, ReLU, ``Linear(5, 3)`` on the last time step."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.rnn = cell(3, 5, batch_first=batch_first)
        self.act = nn.ReLU()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        out, _ = self.rnn(x if self.batch_first else x.transpose(0, 1))
        return self.head(self.act(out[:, -1] if self.batch_first else out[-1]))


class Conv1dNet(nn.Module):
    """Two ReLU ``Conv1d`` layers over ``(n, 2, 9)`` sequences, mean over time, ``Linear(4, 3)``."""

    def __init__(self):
        super().__init__()
        self.c1, self.r1 = nn.Conv1d(2, 4, 3, padding=1), nn.ReLU()
        self.c2, self.r2 = nn.Conv1d(4, 4, 3, stride=2), nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.r2(self.c2(self.r1(self.c1(x)))).mean(-1))


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize(("batch_first", "opt"), [(True, "sgd"), (False, "adam")])
def test_recurrent_head_is_exact(cell, batch_first, opt):
    X, y = data(14, (4, 3), 1)
    model = seeded(lambda: RecurrentHead(cell, batch_first))
    traj, copies = train(model, opt, X[:12], y[:12])
    assert_exact(measure(model, traj, copies, X[12:]))


def test_conv1d_relu_sequence_model_is_exact():
    X, y = data(14, (2, 9), 2)
    model = seeded(Conv1dNet)
    traj, copies = train(model, "sgd", X[:12], y[:12])
    assert_exact(measure(model, traj, copies, X[12:]))


def test_torch_compile_eager_backend_is_exact():
    """``torch.compile`` wraps the model (parameters named ``_orig_mod.*``); the engine evaluates it like any module."""
    torch._dynamo.reset()
    X, y = data(14, (2, 9), 2)
    model = seeded(lambda: torch.compile(Conv1dNet(), backend="eager"))
    traj, copies = train(model, "adam", X[:12], y[:12])
    assert traj.param_names[0].startswith("_orig_mod.")
    assert_exact(measure(model, traj, copies, X[12:]))


@pytest.mark.parametrize("module", [
    nn.LSTM(6, 5, num_layers=2, bidirectional=True),
    nn.LSTM(6, 5, proj_size=3, bias=False, batch_first=True),
    nn.GRU(6, 5, num_layers=2, batch_first=True, bidirectional=True),
    nn.RNN(6, 5, nonlinearity="relu"),
    nn.RNN(6, 5, bias=False),
], ids=["lstm-2layer-bidir", "lstm-proj-nobias", "gru-2layer-bidir", "rnn-relu", "rnn-tanh-nobias"])
def test_unrolled_recurrent_kernels_equal_torchs(module):
    torch.manual_seed(0)
    module = module.to(DT).eval()
    X = torch.randn(3, 4, 6, dtype=DT)
    with torch.no_grad():
        want = module(X)
        with FusedKernelRewrite():
            got = module(X)
    hidden = [t for t in (want[1] if isinstance(want[1], tuple) else (want[1],))]
    got_hidden = [t for t in (got[1] if isinstance(got[1], tuple) else (got[1],))]
    for a, b in zip([want[0], *hidden], [got[0], *got_hidden]):
        assert a.shape == b.shape and float((a - b).abs().max()) <= 1e-14
    # one input at a time under vmap, reverse and forward mode: what the fused kernels refuse
    params = {n: p.detach() for n, p in module.named_parameters()}

    def out(p, x):
        return functional_call(module, p, (x.unsqueeze(1),))[0].sum()

    with FusedKernelRewrite():
        jac = vmap(jacrev(out), in_dims=(None, 1))(params, X)
        tangent = vmap(lambda x: jvp(lambda p: out(p, x), (params,), (params,))[1], in_dims=1)(X)
    for i in range(X.shape[1]):  # against plain autograd, one input (column of the time-major batch) at a time
        p = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        grads = torch.autograd.grad(out(p, X[:, i]), list(p.values()))
        for (n, _), g in zip(p.items(), grads):
            assert float((jac[n][i] - g).abs().max()) <= 1e-12
        assert abs(float(tangent[i]) - sum(float((g * params[n]).sum()) for n, g in zip(p, grads))) <= 1e-12


def test_only_models_with_fused_kernels_are_rewritten():
    assert needs_rewrite(nn.Sequential(nn.Linear(2, 2), nn.GRU(2, 2)))
    assert not needs_rewrite(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))


def test_packed_sequences_and_fused_dropout_are_refused():
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3, dtype=DT), [5, 3])
    for module in (nn.LSTM(3, 4).to(DT), nn.GRU(3, 4).to(DT)):
        with FusedKernelRewrite(), pytest.raises(UnsupportedModelError, match=r"packed sequence.*Fix: pad"):
            module(packed)
    deep = nn.GRU(3, 4, num_layers=2, dropout=0.3).to(DT).train()
    with FusedKernelRewrite(), pytest.raises(UnsupportedModelError,
                                             match=r"dropout=0.3 between its 2 layers.*Fix: .*nn.Dropout"):
        deep(torch.randn(5, 2, 3, dtype=DT))
    with FusedKernelRewrite():  # in evaluation mode the dropout is off and nothing is refused
        assert deep.eval()(torch.randn(5, 2, 3, dtype=DT))[0].shape == (5, 2, 4)
