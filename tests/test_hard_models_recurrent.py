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

import explaind
from explaind.exceptions import UnsupportedModelError
from explaind.kernel.rewrites import FusedKernelRewrite, needs_rewrite
from explaind.trajectory._gradients import has_stochastic_layers
from explaind.trajectory._random import coupled_modules, draws_masks

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


@pytest.mark.slow
def test_torch_compile_default_backend_is_exact():
    """Inductor's generated code (``out=`` kernels) cannot carry forward-mode dual tensors: a convolutional model's
    per-node JVPs then run through ``torch.func.jvp`` (before: ``NotImplementedError`` from ``addmm_out``)."""
    torch._dynamo.reset()
    X, y = data(14, (2, 9), 2)
    model = seeded(lambda: torch.compile(Conv1dNet()))
    traj, copies = train(model, "sgd", X[:12], y[:12])
    assert explaind.models.compile_backend(model) == "inductor"
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


def test_recurrent_dropout_is_found_as_a_random_draw():
    """The recorder captures (and, uncaptured, the gradient check schedule skips) recurrent layers with dropout."""
    model = nn.Sequential(nn.LSTM(3, 4, num_layers=2, dropout=0.2), nn.GRU(4, 4, dropout=0.0, num_layers=2),
                          nn.RNN(4, 4, num_layers=1))
    assert coupled_modules(model) == ["0"] and has_stochastic_layers(model) == ["0"]
    assert draws_masks(nn.GRU(3, 4, num_layers=3, dropout=0.1)) and not draws_masks(nn.Dropout(0.0))


def test_fused_dropout_is_off_in_evaluation_mode():
    deep = nn.GRU(3, 4, num_layers=2, dropout=0.3).to(DT).eval().requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=DT)
    with FusedKernelRewrite():
        assert float((deep(x)[0] - deep.train()(x)[0]).abs().max()) > 1e-3  # the masks change the output
        assert float((deep.eval()(x)[0] - nn.GRU.forward(deep, x)[0]).abs().max()) <= 1e-14


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fused_dropout_draws_torchs_masks(kind):
    """In training mode the unrolled layers draw the masks torch's CPU kernel draws from the same generator state."""
    torch.manual_seed(0)
    deep = (nn.LSTM if kind == "lstm" else nn.GRU)(3, 4, num_layers=3, dropout=0.4, bidirectional=True)
    deep = deep.to(DT).train().requires_grad_(False)
    x = torch.randn(5, 2, 3, dtype=DT)
    packed = nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    for inp in (x, packed):
        state = torch.get_rng_state()
        want = deep(inp)
        torch.set_rng_state(state)
        with FusedKernelRewrite():
            got = deep(inp)
        a, b = (want[0], got[0]) if inp is x else (want[0].data, got[0].data)
        assert float((a - b).abs().max()) <= 1e-14
        assert not torch.equal(torch.get_rng_state(), state)  # masks were drawn


def test_fused_dropout_one_input_at_a_time_is_refused():
    deep = nn.LSTM(3, 4, num_layers=2, dropout=0.3).to(DT).train()

    def one(xi, li):
        return deep(nn.utils.rnn.pack_padded_sequence(xi.unsqueeze(1), li.unsqueeze(0)))[1][0]

    with FusedKernelRewrite(), pytest.raises(UnsupportedModelError,
                                             match=r"dropout=0.3 between its layers.*one input at a time.*Fix"):
        vmap(one, in_dims=(1, 0))(torch.randn(5, 2, 3, dtype=DT), torch.tensor([5, 3]))


class DeepRecurrentHead(RecurrentHead):
    """:class:`RecurrentHead` with a two-layer ``cell`` and ``dropout=0.3`` between its layers."""

    def __init__(self, cell: type[nn.RNNBase], batch_first: bool):
        super().__init__(cell, batch_first)
        self.rnn = cell(3, 5, num_layers=2, dropout=0.3, batch_first=batch_first)


@pytest.mark.parametrize(("cell", "opt"), [(nn.LSTM, "sgd"), (nn.GRU, "adam")])
def test_dropout_between_recurrent_layers_is_exact(cell, opt):
    """The recorder captures the random state of each training forward; the engine replays the masks."""
    X, y = data(14, (4, 3), 1)
    model = seeded(lambda: DeepRecurrentHead(cell, batch_first=cell is nn.GRU))
    traj, copies = train(model, opt, X[:12], y[:12])
    assert traj.manifest.coupled == ["rnn"]
    assert_exact(measure(model, traj, copies, X[12:]))
