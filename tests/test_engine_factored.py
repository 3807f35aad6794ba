"""The layer-factored evaluator (explaind.kernel.layers) against per-entry jacrev/jvp/grad loops in float64."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from engine_testkit import rel
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import explaind
from explaind.exceptions import ConfigError
from explaind.kernel.autograd import AutogradEvaluator
from explaind.kernel.evaluate import Batch, Rows, Segment, StepStack
from explaind.kernel.explained import Explained, FunctionalModel
from explaind.kernel.layer_rules import covered_parameters
from explaind.kernel.layers import LayerEvaluator
from explaind.kernel.layout import ParamLayout
from explaind.kernel.quadrature import NodePlan
from explaind.losses import resolve_loss
from explaind.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


class TokenNet(nn.Module):
    """Token + position embeddings, one Linear applied twice (shared), a frozen-bias read-out."""

    def __init__(self, vocab: int = 7, length: int = 3, d: int = 4, n_out: int = 5):
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(length, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, n_out)
        self.head.bias.requires_grad_(False)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        h = self.tok(tokens) + self.pos(positions)
        h = torch.tanh(self.mix(h))
        h = h + torch.tanh(self.mix(h))  # the same layer twice
        return self.head(h.mean(1))


class BareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x) * self.scale


class TiedReadout(nn.Module):
    """The embedding table is also read directly (weight tying), outside its module."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(6, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        return F.linear(torch.tanh(self.tok(tokens)).sum(1), self.tok.weight)


class FlattensBatch(nn.Module):
    """A Linear that sees (batch * positions) rows: the batch axis is not first."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        n, length, _ = x.shape
        return torch.tanh(self.lin(x.reshape(n * length, 3))).reshape(n, length * 2)


def _setup(model: nn.Module, X: Tensor, seed: int = 0):
    model = model.to(DT)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fm = FunctionalModel(model, constants, resolve_loss("cross_entropy").implementation, torch.device("cpu"), DT)
    gen = torch.Generator().manual_seed(seed)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    delta = {n: 0.3 * torch.randn(v.shape, generator=gen, dtype=DT) for n, v in base.items()}
    with torch.no_grad():
        n_out = fm(base, X[:1]).reshape(1, -1).shape[1]
    explained = Explained("outputs", torch.zeros(X.shape[0], 1, dtype=DT), n_out)
    return fm, names, base, delta, explained


def _layers(fm, names, rows_chunk=None) -> LayerEvaluator:
    return LayerEvaluator(AutogradEvaluator(fm, 256, rows_chunk=rows_chunk), tuple(names))


def _step_jacobian(ev, base, delta, X, explained, t, w, names, chunk, out=None) -> Tensor:
    """Phi of one step through the evaluator; the factored path must have been used."""
    plan = NodePlan(t, w, torch.zeros(X.shape[0], explained.n_outputs, dtype=DT), None,
                    (w != 0).sum(1))
    got = ev.jacobian(Segment(base, delta, X, explained), plan, ParamLayout.from_tensors(base, names), chunk, out)
    assert "jacobian" in ev.used, ev.state["jacobian"]
    return got


def _loop_reference(fm, names, base, delta, explained, X, t, w) -> Tensor:
    """sum_q w_iq * jacrev(g)(theta_s + t_iq delta) per input, by explicit Python loops."""
    rows = []
    for i in range(X.shape[0]):
        total = None
        for q in range(t.shape[1]):
            if float(w[i, q]) == 0.0:
                continue
            point = {n: base[n] + t[i, q] * delta[n] for n in base}

            def g(p, i=i, point=point):
                return explained(fm, {**point, **p}, X[i:i + 1], explained.aux[i:i + 1])[0]

            jac = jacrev(g)({n: point[n] for n in names})
            flat = torch.cat([jac[n].reshape(jac[n].shape[0], -1) for n in names], dim=1) * w[i, q]
            total = flat if total is None else total + flat
        rows.append(total)
    return torch.stack(rows)


def _ragged_plan(T: int, Q: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    t = torch.rand(T, Q, generator=gen, dtype=DT)
    w = torch.rand(T, Q, generator=gen, dtype=DT)
    counts = torch.tensor([1 + (i * 3) % Q for i in range(T)])  # inputs with 1..Q entries
    w[torch.arange(Q)[None, :] >= counts[:, None]] = 0.0
    return t, w


def _tokens(T: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 7, (T, 3), generator=gen)
    tokens[0, 1] = 0  # a padding token
    return tokens


class ConvNet(nn.Module):
    """Conv2d + GroupNorm + ReLU, a strided convolution without bias, a linear read-out."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 3, 3, stride=2, bias=False)
        self.head = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.norm(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(h)).flatten(1))


class Conv1DNet(nn.Module):
    """GPT-2's Conv1D (weight stored (in, out)) on token sequences, applied twice, a Conv1D read-out."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.proj = Conv1D(4, 3)  # nf (out), nx (in)
        self.mix = Conv1D(4, 4)
        self.head = Conv1D(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(x))
        h = h + torch.tanh(self.mix(torch.tanh(self.mix(h))))
        return self.head(h).mean(1)


class BatchNormNet(nn.Module):
    """Eval-mode BatchNorm2d after a convolution and BatchNorm1d after a linear layer, non-trivial statistics."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3)
        self.bn2 = nn.BatchNorm2d(3)
        self.lin = nn.Linear(3 * 4 * 4, 4)
        self.bn1 = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5)
        gen = torch.Generator().manual_seed(9)
        for bn in (self.bn2, self.bn1):
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            nn.init.normal_(bn.weight, 1.0, 0.3)
            nn.init.normal_(bn.bias, 0.0, 0.3)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn2(self.conv(x))).flatten(1)
        return self.head(torch.tanh(self.bn1(self.lin(h))))


class TiedTokens(nn.Module):
    """A read-out nn.Linear sharing the token table (GPT-2's tied weights), positions broadcast as (1, L)."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.pos = nn.Embedding(3, 4)
        self.read = nn.Linear(4, 7, bias=False)
        self.read.weight = self.tok.weight

    def forward(self, tokens: Tensor) -> Tensor:
        h = torch.tanh(self.tok(tokens) + self.pos(torch.arange(tokens.shape[1])[None]))
        return self.read(h.mean(1))


class DepthwiseNet(nn.Module):
    """Grouped and depthwise Conv2d (groups 2 and 4, one strided, one without bias), a pointwise one, a read-out."""

    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(2, 4, 3, padding=1, groups=2)
        self.depthwise = nn.Conv2d(4, 4, 3, stride=2, groups=4, bias=False)
        self.pointwise = nn.Conv2d(4, 3, 1)
        self.head = nn.Linear(3 * 2 * 2, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.grouped(x))
        return self.head(torch.tanh(self.pointwise(torch.tanh(self.depthwise(h)))).flatten(1))


class AttentionNet(nn.Module):
    """nn.MultiheadAttention every way it is called: self-attention (sequence first, padding mask), one module
    for cross-attention with shared keys and values (float mask, averaged weights used) and with three inputs,
    and one without biases; the out-projection's own forward is never called by the block."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.tok = nn.Embedding(7, d)
        self.self_attn = nn.MultiheadAttention(d, 2)  # sequence first
        self.cross = nn.MultiheadAttention(d, 2, batch_first=True)
        self.plain = nn.MultiheadAttention(d, 1, bias=False, batch_first=True)
        self.head = nn.Linear(d, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        pad = tokens == 0
        pad[:, 0] = False  # no row masked entirely
        x = self.tok(tokens)
        h = self.self_attn(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), key_padding_mask=pad,
                           need_weights=False)[0].transpose(0, 1)
        h = torch.tanh(h + x)
        L = tokens.shape[1]
        mask = torch.linspace(-1.0, 0.0, L * L, dtype=x.dtype).reshape(L, L)
        c, w = self.cross(h, x, x, attn_mask=mask)
        c = c + (w @ torch.linspace(0.5, 1.5, L, dtype=x.dtype)).unsqueeze(-1)
        c = c + self.cross(c, h, torch.tanh(x), need_weights=False)[0]
        c = c + self.plain(c, c, c, need_weights=False)[0]
        return self.head(torch.tanh(c).mean(1))


class EncoderNet(nn.Module):
    """Token embeddings into an nn.TransformerEncoderLayer (pre-norm, GELU, causal mask), a linear read-out."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(7, 4)
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, activation="gelu", batch_first=True,
                                                norm_first=True)
        self.head = nn.Linear(4, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=self.head.weight.dtype)
        return self.head(self.layer(self.tok(tokens), src_mask=mask, is_causal=True)[:, -1])


class PaddedConvNet(nn.Module):
    """Conv2d with every kind of padding: "same" (odd kernel; even kernel, whose sides differ, reflected),
    "valid", numeric replicate padding with different heights and widths, circular, a read-out."""

    def __init__(self):
        super().__init__()
        self.same = nn.Conv2d(1, 2, 3, padding="same")
        self.even = nn.Conv2d(2, 2, 2, padding="same", padding_mode="reflect", dilation=2)
        self.replicate = nn.Conv2d(2, 3, 3, padding=(1, 2), padding_mode="replicate", stride=2)
        self.circular = nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular", groups=1, bias=False)
        self.valid = nn.Conv2d(2, 2, 2, padding="valid")
        self.head = nn.Linear(2 * 3 * 4, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.even(torch.tanh(self.same(x))))
        h = torch.tanh(self.circular(torch.tanh(self.replicate(h))))
        return self.head(torch.tanh(self.valid(h)).flatten(1))


class SequenceFirstNet(nn.Module):
    """Token embeddings into sequence-first blocks (``(length, batch, features)``): a post-norm ReLU and a pre-norm
    GELU nn.TransformerEncoderLayer and an nn.TransformerDecoderLayer attending to the encoder's output."""

    def __init__(self, d: int = 4):
        super().__init__()
        self.tok = nn.Embedding(7, d)
        self.enc1 = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0)
        self.enc2 = nn.TransformerEncoderLayer(d, 2, 6, dropout=0.0, activation="gelu", norm_first=True)
        self.dec = nn.TransformerDecoderLayer(d, 2, 5, dropout=0.0)
        self.head = nn.Linear(d, 5)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.tok(tokens).transpose(0, 1)  # (length, batch, d)
        h = self.enc2(self.enc1(x))
        return self.head(self.dec(torch.tanh(x), h).mean(0))


class WideAxesNet(nn.Module):
    """nn.Linear on 4-D inputs (batch, 2, 3, features), nn.LayerNorm over the last two axes and, without bias,
    over the last three."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.norm2 = nn.LayerNorm((3, 5))
        self.norm3 = nn.LayerNorm((2, 3, 5), bias=False)
        self.head = nn.Linear(2 * 3 * 5, 5)
        with torch.no_grad():  # affine parameters away from their initial ones and zeros
            for norm in (self.norm2, self.norm3):
                norm.weight.normal_(1.0, 0.3, generator=torch.Generator().manual_seed(3))
            self.norm2.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm3(torch.tanh(self.norm2(self.lin(x))))
        return self.head(torch.tanh(h).flatten(1))


CASES = {
    "conv_padding": (PaddedConvNet, lambda T: torch.randn(T, 1, 7, 7, generator=torch.Generator().manual_seed(5),
                                                          dtype=DT)),
    "sequence_first": (SequenceFirstNet, lambda T: _tokens(T, 10)),
    "wide_axes": (WideAxesNet, lambda T: torch.randn(T, 2, 3, 4, generator=torch.Generator().manual_seed(5),
                                                     dtype=DT)),
    "attention": (AttentionNet, lambda T: _tokens(T, 8)),
    "encoder": (EncoderNet, lambda T: _tokens(T, 9)),
    "depthwise": (DepthwiseNet, lambda T: torch.randn(T, 2, 5, 5, generator=torch.Generator().manual_seed(5),
                                                      dtype=DT)),
    "tied": (TiedTokens, lambda T: _tokens(T, 7)),
    "batchnorm": (BatchNormNet, lambda T: torch.randn(T, 1, 6, 6, generator=torch.Generator().manual_seed(5),
                                                      dtype=DT)),
    "conv1d": (Conv1DNet, lambda T: torch.randn(T, 2, 3, generator=torch.Generator().manual_seed(5), dtype=DT)),
    "conv": (ConvNet, lambda T: torch.randn(T, 1, 6, 6, generator=torch.Generator().manual_seed(5), dtype=DT)),
    "mlp": (lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)),
            lambda T: torch.randn(T, 3, generator=torch.Generator().manual_seed(5), dtype=DT)),
    "layernorm": (lambda: nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 4),
                                        nn.LayerNorm(4, bias=False)),
                  lambda T: torch.randn(T, 3, generator=torch.Generator().manual_seed(5), dtype=DT)),
    "transformer_ln": (lambda: build_model("modular_transformer", {"p": 5, "d_model": 8, "n_heads": 2, "d_mlp": 12,
                                                                   "layer_norm": True}, seed=1, dtype=DT),
                       lambda T: torch.tensor([[i % 5, 5, (2 * i + 1) % 5, 6] for i in range(T)])),
    "tokens": (TokenNet, lambda T: _tokens(T, 6)),
    "transformer": (lambda: build_model("modular_transformer", {"p": 5, "d_model": 8, "n_heads": 2, "d_mlp": 12},
                                        seed=1, dtype=DT),
                    lambda T: torch.tensor([[i % 5, 5, (2 * i + 1) % 5, 6] for i in range(T)])),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("chunk", [2, 64])
def test_step_jacobian_matches_loop_reference(case, chunk):
    make, inputs = CASES[case]
    torch.manual_seed(0)
    X = inputs(5)
    fm, names, base, delta, explained = _setup(make(), X)
    t, w = _ragged_plan(5, 4, seed=3)
    got = _step_jacobian(_layers(fm, names), base, delta, X, explained, t, w, names, chunk=chunk)
    want = _loop_reference(fm, names, base, delta, explained, X, t, w)
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-13


def test_step_jacobian_overwrites_out_buffer():
    make, inputs = CASES["mlp"]
    X = inputs(4)
    fm, names, base, delta, explained = _setup(make(), X)
    t, w = _ragged_plan(4, 3, seed=8)
    buf = torch.full((4, explained.n_outputs, sum(base[n].numel() for n in names)), 123.0, dtype=DT)
    got = _step_jacobian(_layers(fm, names), base, delta, X, explained, t, w, names, chunk=3, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert rel(got, _loop_reference(fm, names, base, delta, explained, X, t, w)) <= 1e-13


def test_covered_parameters_lists_linear_and_embedding_roles():
    net = TokenNet()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert covered_parameters(net, names) == {
        "tok.weight": ("tok", "table"), "pos.weight": ("pos", "table"), "mix.weight": ("mix", "weight"),
        "mix.bias": ("mix", "bias"), "head.weight": ("head", "weight"),
    }
    capped = nn.Embedding(4, 2, max_norm=1.0)
    assert covered_parameters(capped, ["weight"]) == {}


REFUSED = [
    (BareParameter, lambda: torch.randn(3, 3, dtype=DT), "outside layers with a rule: scale"),
    (TiedReadout, lambda: torch.randint(0, 6, (3, 2)), "start-up check failed"),
    (FlattensBatch, lambda: torch.randn(3, 2, 3, dtype=DT), "batched rows failed"),
]


@pytest.mark.parametrize("builder", ["jacobian", "rows"])
@pytest.mark.parametrize("model, inputs, why", REFUSED)
def test_factored_paths_refuse_models_they_cannot_handle(builder, model, inputs, why):
    X = inputs()
    fm, names, base, delta, explained = _setup(model(), X)
    ev = _layers(fm, names)
    if builder == "jacobian":
        t, w = _ragged_plan(X.shape[0], 2, seed=2)
        plan = NodePlan(t, w, torch.zeros(X.shape[0], explained.n_outputs, dtype=DT), None, (w != 0).sum(1))
        ev.jacobian(Segment(base, delta, X, explained), plan, ParamLayout.from_tensors(base, names), 4)
    else:
        stack = StepStack({n: torch.stack([v, v + 0.1]) for n, v in base.items()},
                          {n: torch.stack([v, 2 * v]) for n, v in delta.items()}, X, explained)
        ev.slopes(stack, Rows(torch.tensor([0, 1]), torch.tensor([0, 1]), torch.tensor([0.2, 0.7], dtype=DT)))
    reason = ev.state[builder]
    assert reason is not True and builder not in ev.used
    assert why in reason


@functools.cache
def _transformer_run(steps: int = 5):
    p = 5
    model = build_model("modular_transformer", {"p": p, "d_model": 8, "n_heads": 2, "d_mlp": 12}, seed=2, dtype=DT)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    X = torch.stack([a.reshape(-1), torch.full((p * p,), p), b.reshape(-1), torch.full((p * p,), p + 1)], 1)
    y = (a + b).reshape(-1) % p
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:16], y[:16]))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randperm(16, generator=gen)[:6]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X[16:21]


@pytest.mark.parametrize("keep, momentum", [(("train",), "reverse"), (("train",), "forward"), (("param",), "auto"),
                                            (("step", "group", "train"), "forward")])
def test_estimator_factored_equals_autograd(keep, momentum):
    traj, X = _transformer_run()
    results = {}
    for jac in ("always", "never"):
        est = explaind.InfluenceEstimator(keep=keep, momentum=momentum, factored=jac, device="cpu").fit(traj)
        att = est.transform(X)
        assert est.sweep_["jacobian"] == {"always": "factored", "never": "autograd"}[jac]
        assert att.completeness_error() <= 1e-10
        results[jac] = att
    assert rel(results["always"].values, results["never"].values) <= 1e-12
    # the quadrature error is exact - estimate (a difference of O(1) numbers): compare on the outputs' scale
    scale = float(results["never"].total().abs().max())
    diff = (results["always"].quadrature_error - results["never"].quadrature_error).abs().max()
    assert float(diff) <= 1e-13 * scale


def test_estimator_auto_falls_back_and_factored_refuses_unsupported_model():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(8, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 2, (8,), generator=gen)
    model = BareParameter().to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for s in range(2):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    est = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(rec.trajectory)
    est.transform(X[:2])
    assert est.sweep_["jacobian"] == "autograd"
    bad = explaind.InfluenceEstimator(keep=("train",), factored="always", device="cpu").fit(rec.trajectory)
    with pytest.raises(ConfigError, match=r"'factored'.*'always' does not apply.*scale.*factored='auto'"):
        bad.transform(X[:2])


def test_invalid_jacobian_value_is_refused_at_fit():
    traj, _ = _transformer_run()
    with pytest.raises(ConfigError, match="factored"):
        explaind.InfluenceEstimator(factored="fast", device="cpu").fit(traj)


def test_functional_call_of_hooked_model_is_restored():
    """After the factored path ran, the model's plain forward is unchanged (hooks removed)."""
    make, inputs = CASES["tokens"]
    X = inputs(3)
    fm, names, base, delta, explained = _setup(make(), X)
    before = functional_call(fm.module, {**fm.constants, **base}, (X,))
    t, w = _ragged_plan(3, 2, seed=1)
    _step_jacobian(_layers(fm, names), base, delta, X, explained, t, w, names, chunk=8)
    after = functional_call(fm.module, {**fm.constants, **base}, (X,))
    assert torch.equal(before, after)


# ---------------------------------------------------------------------------------------------- row evaluator
def _rows_reference(fm, explained, bases, deltas, X, sidx, idx, t):
    """h and dh/dt per row by a Python loop of torch.func.jvp at each row's own parameters."""
    from torch.func import jvp

    prim, tang = [], []
    for s, i, tt in zip(sidx.tolist(), idx.tolist(), t):
        point = {n: bases[n][s] + tt * deltas[n][s] for n in bases}
        direction = {n: deltas[n][s] for n in bases}

        def g(p, i=i):
            return explained(fm, p, X[i:i + 1], explained.aux[i:i + 1])[0]

        p, d = jvp(g, (point,), (direction,))
        prim.append(p)
        tang.append(d)
    return torch.stack(prim), torch.stack(tang)


@pytest.mark.parametrize("case", sorted(CASES))
def test_row_evaluator_matches_per_row_jvp_loop(case):
    make, inputs = CASES[case]
    X = inputs(4)
    fm, names, base, delta, explained = _setup(make(), X)
    gen = torch.Generator().manual_seed(11)
    S = 5  # stacked steps with different parameters
    bases = {n: base[n] + 0.2 * torch.randn((S, *base[n].shape), generator=gen, dtype=DT) for n in base}
    deltas = {n: 0.3 * torch.randn((S, *base[n].shape), generator=gen, dtype=DT) for n in base}
    # unsorted rows, uneven counts per step (step 3 absent), repeated (step, input) pairs
    sidx = torch.tensor([4, 0, 0, 2, 4, 4, 1, 0, 4, 2, 4, 4, 0])
    idx = torch.tensor([0, 1, 3, 2, 2, 0, 3, 0, 1, 1, 3, 3, 2])
    t = torch.rand(sidx.shape[0], generator=gen, dtype=DT)
    want_h, want_d = _rows_reference(fm, explained, bases, deltas, X, sidx, idx, t)
    for chunk in (3, 64):
        ev = _layers(fm, names, rows_chunk=chunk)
        h, d = ev.slopes(StepStack(bases, deltas, X, explained), Rows(sidx, idx, t))
        assert "rows" in ev.used, ev.state["rows"]
        assert rel(h, want_h) <= 1e-13
        assert rel(d, want_d) <= 1e-13


@pytest.mark.parametrize("rule", ["adaptive", "gauss-legendre"])
def test_replica_factored_equals_generic(rule):
    traj, X = _transformer_run()
    out = {}
    for mode in ("always", "never"):
        rep = explaind.KernelReplica(quadrature=rule, factored=mode, device="cpu").fit(traj)
        out[mode] = rep.predict(X)
        assert ("rows" in rep.engine_.factored_used) == (mode == "always" and rule == "adaptive")
        if rule == "adaptive":  # refinement ran (more than the first 4 nodes per step and input)
            assert rep.fidelity_report(X)["total_evals"] > 4 * X.shape[0] * traj.n_steps
    assert rel(out["always"], out["never"]) <= 1e-13


@pytest.mark.parametrize("case", sorted(CASES))
def test_sample_grads_match_per_sample_loop(case):
    from torch.func import grad

    make, inputs = CASES[case]
    X = inputs(6)
    fm, names, base, delta, explained = _setup(make(), X)
    ev = _layers(fm, names, rows_chunk=4)
    t, w = _ragged_plan(6, 2, seed=1)
    _step_jacobian(ev, base, delta, X, explained, t, w, names, chunk=6)  # per-sample gradients follow the Jacobians
    gen = torch.Generator().manual_seed(4)
    Y = torch.randint(0, explained.n_outputs, (6,), generator=gen)
    weights = torch.rand(6, generator=gen, dtype=DT)
    got = ev.sample_grads(base, ParamLayout.from_tensors(base, names), Batch(X, Y, weights))
    want = []
    for k in range(6):
        def loss(p, k=k):
            return fm.sample_loss(p, X[k:k + 1], Y[k:k + 1]).sum() * weights[k]

        g = grad(loss)({n: base[n] for n in names})
        want.append(torch.cat([g[n].reshape(-1) for n in names]))
    assert rel(got, torch.stack(want)) <= 1e-13


# ---------------------------------------------------------------------------------------------- step products
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("block_elements", [1, 2**24])
def test_factor_products_match_jacobian_products(case, block_elements):
    """sum_s Phi_s * v_s from layer factors (blocked over steps) equals the per-step Jacobians' products."""
    from explaind.kernel.products import FactorProducts

    make, inputs = CASES[case]
    X = inputs(5)
    fm, names, base, delta, explained = _setup(make(), X)
    layout = ParamLayout.from_tensors(base, names)
    gen = torch.Generator().manual_seed(21)
    ev = _layers(fm, names, rows_chunk=2)  # inputs in chunks of 2
    fast = FactorProducts(ev, layout, 5, explained.n_outputs, 2, DT, torch.device("cpu"), block_elements=block_elements)
    slow = AutogradEvaluator(fm, 256).products(layout, 5, explained.n_outputs, 3)
    O = explained.n_outputs
    for s in range(3):
        b = {n: base[n] + 0.1 * s * torch.randn(base[n].shape, generator=gen, dtype=DT) for n in names}
        d = {n: 0.3 * torch.randn(base[n].shape, generator=gen, dtype=DT) for n in names}
        if s == 1:  # inputs with different numbers of nodes: through Phi_s
            t, w = _ragged_plan(5, 3, seed=s)
        else:
            t, w = torch.rand(5, 2, generator=gen, dtype=DT), torch.rand(5, 2, generator=gen, dtype=DT)
        plan = NodePlan(t, w, torch.zeros(5, O, dtype=DT), None, (w != 0).sum(1))
        v = torch.randn(layout.size, generator=gen, dtype=DT)
        seg = Segment(b, d, X, explained)
        fast.add(seg, plan, v)
        slow.add(seg, plan, v)
    assert "jacobian" in ev.used, ev.state["jacobian"]
    assert rel(fast.result(), slow.result()) <= 1e-13


def test_register_layer_rule_checks_the_rule():
    from explaind.kernel.layer_rules import register_layer_rule

    with pytest.raises(ConfigError, match="lacks moved, at_steps, reduce"):
        register_layer_rule(nn.PReLU, type("Half", (), {"roles": lambda self, m: {}})())
    with pytest.raises(ConfigError, match="must be an nn.Module subclass"):
        register_layer_rule(int, object())
