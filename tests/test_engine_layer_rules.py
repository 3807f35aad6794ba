"""Layer rules for GPT-2's Conv1D and eval-mode BatchNorm: registry, per-step statistics, whole models.

Rule-level exactness against per-entry ``jacrev``/``jvp`` loops runs in tests/test_engine_factored.py
(cases ``conv1d`` and ``batchnorm``); here: the registry by qualified name, rows of several steps each
with its own running statistics, and estimators with ``factored="always"`` against ``"never"``.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from engine_testkit import rel
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.pytorch_utils import Conv1D

import explaind
from explaind.exceptions import ConfigError
from explaind.kernel.autograd import AutogradEvaluator
from explaind.kernel.conv_rules import BatchNormRule
from explaind.kernel.evaluate import Batch, Rows, Segment, StepStack
from explaind.kernel.explained import Explained, FunctionalModel
from explaind.kernel.layer_rules import (
    NAMED_LAYER_RULES,
    TransposedLinearRule,
    covered_parameters,
    layer_rule,
    register_layer_rule,
)
from explaind.kernel.layers import LayerEvaluator
from explaind.kernel.layout import ParamLayout
from explaind.kernel.quadrature import NodePlan
from explaind.losses import resolve_loss

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64


# ---------------------------------------------------------------------------------------------- registry
def test_conv1d_rule_is_found_by_its_qualified_name():
    assert "transformers.pytorch_utils.Conv1D" in NAMED_LAYER_RULES
    layer = Conv1D(4, 3)
    assert isinstance(layer_rule(layer), TransposedLinearRule)
    assert covered_parameters(layer, ["weight", "bias"]) == {"weight": ("", "weight"), "bias": ("", "bias")}

    class Conv1DSubclass(Conv1D):  # overrides nothing: matched through its MRO by name
        pass

    assert isinstance(layer_rule(Conv1DSubclass(4, 3)), TransposedLinearRule)

    class Conv1DOwnForward(Conv1D):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2

    assert layer_rule(Conv1DOwnForward(4, 3)) is None


class InitOnlyLinear(nn.Linear):
    """A subclass with its own constructor only (like nn.MultiheadAttention's out_proj)."""

    def __init__(self, n: int):
        super().__init__(n, n)
        nn.init.eye_(self.weight)


class OwnForwardLinear(nn.Linear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, 2 * self.weight, self.bias)


class OwnConvForward(nn.Conv2d):
    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # a helper of forward
        return super()._conv_forward(x, weight.flip(-1), bias)


class HookedLinear(nn.Linear):
    """Overrides no method, but changes the output through a hook installed by its constructor."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__(n_in, n_out)
        self.register_forward_hook(lambda module, args, out: 2 * out)


def test_subclasses_use_their_bases_rule_unless_they_redefine_a_method():
    from explaind.kernel.conv_rules import Conv2dRule
    from explaind.kernel.layer_rules import LinearRule, overridden

    assert isinstance(layer_rule(InitOnlyLinear(3)), LinearRule)
    assert isinstance(layer_rule(nn.MultiheadAttention(4, 2).out_proj), LinearRule)
    assert isinstance(layer_rule(type("Deeper", (InitOnlyLinear,), {})(3)), LinearRule)
    assert layer_rule(OwnForwardLinear(3, 2)) is None
    assert overridden(OwnForwardLinear, nn.Linear) == ["forward"]
    assert isinstance(layer_rule(nn.Conv2d(1, 2, 3)), Conv2dRule)
    assert layer_rule(OwnConvForward(1, 2, 3)) is None
    assert overridden(OwnConvForward, nn.Conv2d) == ["_conv_forward"]
    assert covered_parameters(nn.Sequential(OwnForwardLinear(3, 2)), ["0.weight", "0.bias"]) == {}


def test_register_layer_rule_none_takes_a_class_off_the_rules(monkeypatch):
    monkeypatch.setattr("explaind.kernel.layer_rules.LAYER_RULES", dict(explaind.kernel.layer_rules.LAYER_RULES))
    assert layer_rule(HookedLinear(3, 2)) is not None
    register_layer_rule(HookedLinear, None)
    assert layer_rule(HookedLinear(3, 2)) is None
    assert layer_rule(type("Sub", (HookedLinear,), {})(3, 2)) is None  # its subclasses too
    assert layer_rule(nn.Linear(3, 2)) is not None
    assert "HookedLinear" not in explaind.kernel.layer_rules.rule_names()


def _subclass_run(layer: type[nn.Module]):
    gen = torch.Generator().manual_seed(6)
    X = torch.randn(12, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 2, (12,), generator=gen)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), layer(4, 2)).to(DT)
    return _record(model, X[:10], y[:10], steps=2, batch=5, opt="sgd"), X[10:]


@pytest.mark.parametrize("layer, why", [(OwnForwardLinear, "outside layers with a rule: 2.weight, 2.bias"),
                                        (HookedLinear, "start-up check failed")])
def test_a_subclass_computing_otherwise_never_gets_a_silent_rule(layer, why):
    """A redefined forward gets no rule; a hook that overrides nothing is caught by the start-up check."""
    traj, X = _subclass_run(layer)
    auto = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", residual_tol=1.0,
                                       device="cpu").fit(traj)
    got = auto.transform(X)
    assert auto.sweep_["jacobian"] == "autograd"
    assert why in auto.engine_.evaluator.state["jacobian"]
    never = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", factored="never",
                                        residual_tol=1.0, device="cpu").fit(traj).transform(X)
    assert rel(got.values, never.values) == 0.0
    assert got.completeness_error() <= 1e-10


def test_explaind_imports_without_transformers():
    """The Conv1D rule is keyed by name: nothing imports transformers (blocked here in a fresh process)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['transformers'] = None; import explaind, explaind.kernel.layers; "
            "from explaind.kernel.layer_rules import NAMED_LAYER_RULES; "
            "assert 'transformers.pytorch_utils.Conv1D' in NAMED_LAYER_RULES; print('imported')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "imported" in done.stdout, done.stderr


def test_register_layer_rule_by_name_and_its_errors(monkeypatch):
    monkeypatch.setattr("explaind.kernel.layer_rules.NAMED_LAYER_RULES", dict(NAMED_LAYER_RULES))
    rule = BatchNormRule()
    register_layer_rule("torch.nn.modules.activation.PReLU", rule)
    assert layer_rule(nn.PReLU()) is rule
    with pytest.raises(ConfigError, match=r"'PReLU' is not a qualified class name.*'package.module.Class'"):
        register_layer_rule("PReLU", rule)
    with pytest.raises(ConfigError, match=r"the rule for a.b.C lacks at_steps, reduce"):
        register_layer_rule("a.b.C", type("Half", (), {"roles": lambda self, m: {}, "moved": lambda self: 0})())
    with pytest.raises(ConfigError, match=r"the rule for a.b.C lacks reduce; .*roles, forward and reduce"):
        register_layer_rule("a.b.C", type("Composite", (), {"roles": lambda self, m: {}, "forward": lambda self: 0})())
    assert "a.b.C" not in NAMED_LAYER_RULES


def test_batchnorm_rule_covers_only_eval_mode_with_running_statistics():
    rule = BatchNormRule()
    assert rule.roles(nn.BatchNorm1d(3).eval()) == {"weight": "scale", "bias": "shift"}
    assert rule.roles(nn.BatchNorm2d(3).train()) == {}  # batch statistics couple the rows
    assert rule.roles(nn.BatchNorm2d(3, track_running_stats=False).eval()) == {}  # batch statistics in eval too
    assert rule.roles(nn.BatchNorm2d(3, affine=False).eval()) == {}


# ---------------------------------------------------------------------------------------------- statistics per step
class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.bn(self.conv(x))).flatten(1))


def test_rows_use_each_steps_running_statistics():
    """Rows of steps with different running statistics (buffers beta_s) against a per-row jvp loop."""
    torch.manual_seed(0)
    model = BNNet().to(DT).eval()
    names = [n for n, _ in model.named_parameters()]
    buffers = ("bn.running_mean", "bn.running_var")
    constants = {n: b.detach() for n, b in model.named_buffers()}
    fm = FunctionalModel(model, constants, resolve_loss("cross_entropy").implementation, torch.device("cpu"), DT)
    gen = torch.Generator().manual_seed(1)
    S, X = 4, torch.randn(3, 1, 5, 5, generator=gen, dtype=DT)
    bases = {n: p.detach() + 0.2 * torch.randn((S, *p.shape), generator=gen, dtype=DT)
             for n, p in model.named_parameters()}
    bases["bn.running_mean"] = torch.randn(S, 2, generator=gen, dtype=DT)
    bases["bn.running_var"] = 0.3 + torch.rand(S, 2, generator=gen, dtype=DT)
    deltas = {n: 0.3 * torch.randn(bases[n].shape, generator=gen, dtype=DT) for n in names}
    explained = Explained("outputs", torch.zeros(3, 1, dtype=DT), 3)
    sidx = torch.tensor([3, 0, 2, 0, 3, 1, 2])
    idx = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    t = torch.rand(7, generator=gen, dtype=DT)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256, rows_chunk=4), tuple(names))
    h, d = ev.slopes(StepStack(bases, deltas, X, explained), Rows(sidx, idx, t))
    assert "rows" in ev.used, ev.state["rows"]
    want_h, want_d = [], []
    for s, i, tt in zip(sidx.tolist(), idx.tolist(), t):
        stats = {b: bases[b][s] for b in buffers}

        def g(p, i=i, stats=stats):
            return functional_call(model, {**constants, **stats, **p}, (X[i:i + 1],))[0]

        value, slope = jvp(g, ({n: bases[n][s] + tt * deltas[n][s] for n in names},),
                           ({n: deltas[n][s] for n in names},))
        want_h.append(value)
        want_d.append(slope)
    assert rel(h, torch.stack(want_h)) <= 1e-13
    assert rel(d, torch.stack(want_d)) <= 1e-13


# ---------------------------------------------------------------------------------------------- whole models
class TinyGPT2(nn.Module):
    """GPT-2 from a config (no download), dropout 0; explains the last position's logits."""

    def __init__(self, vocab: int = 11, tie: bool = False):
        super().__init__()
        config = GPT2Config(vocab_size=vocab, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                            embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tie, bos_token_id=0,
                            eos_token_id=0)
        torch.manual_seed(0)
        self.gpt = GPT2LMHeadModel(config)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.gpt(input_ids=tokens).logits[:, -1]


class BatchNormCNN(nn.Module):
    """Conv-BatchNorm-ReLU stem, one residual block, global pooling, a linear read-out."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.bn1(self.stem(x)))
        h = torch.relu(h + self.bn2(self.conv(h)))
        return self.head(h.mean(dim=(2, 3)))


class ScaledHead(nn.Module):
    """A layer type with no rule: its parameter goes through the generic path."""

    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, n))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gain


def _record(model: nn.Module, X: Tensor, y: Tensor, steps: int, batch: int, opt: str = "adamw"):
    optim = (torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1) if opt == "adamw"
             else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    rec = explaind.TrajectoryRecorder(model, optim, loss="cross_entropy", train_data=(X, y))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(steps):
            idx = torch.randperm(X.shape[0], generator=gen)[:batch]
            optim.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            optim.step()
    return rec.trajectory


@functools.cache
def _gpt2_run(tie: bool = False):
    gen = torch.Generator().manual_seed(3)
    X = torch.randint(1, 11, (20, 5), generator=gen)
    X[:, 0] = 0
    y = torch.randint(0, 11, (20,), generator=gen)
    return _record(TinyGPT2(tie=tie).to(DT), X[:16], y[:16], steps=3, batch=4), X[16:]


@functools.cache
def _bn_run(unknown: bool = False):
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(20, 1, 5, 5, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (20,), generator=gen)
    torch.manual_seed(1)
    model = BatchNormCNN()
    if unknown:
        model.head = nn.Sequential(model.head, ScaledHead(3))
    return _record(model.to(DT), X[:16], y[:16], steps=3, batch=5, opt="sgd"), X[16:]


def _both(traj, X, **kw):
    out = {}
    for mode in ("always", "never"):
        est = explaind.InfluenceEstimator(keep=("train",), factored=mode, residual_tol=1.0, device="cpu",
                                          **kw).fit(traj)
        att = est.transform(X)
        assert est.sweep_["jacobian"] == {"always": "factored", "never": "autograd"}[mode]
        assert att.completeness_error() <= 1e-10
        out[mode] = att
    return out


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_gpt2_factored_equals_generic(tie):
    traj, X = _gpt2_run(tie)
    att = _both(traj, X, quadrature="gauss-legendre")
    assert rel(att["always"].values, att["never"].values) <= 1e-10
    replica = {}
    for mode in ("always", "never"):  # the adaptive rule's refinement rows through the rules too
        rep = explaind.KernelReplica(quadrature="adaptive", factored=mode, device="cpu").fit(traj)
        replica[mode] = rep.predict(X)
        assert ("rows" in rep.engine_.factored_used) == (mode == "always")
    assert rel(replica["always"], replica["never"]) <= 1e-10


def test_batchnorm_cnn_factored_equals_generic():
    """Trained with batch statistics (atoms through the replayed batched forward), explained in eval mode."""
    traj, X = _bn_run()
    assert "bn1.running_mean" in traj.buffer_names
    att = _both(traj, X, quadrature="gauss-legendre")
    assert rel(att["always"].values, att["never"].values) <= 1e-10
    assert float(att["always"].buffers.abs().max()) > 1e-6  # the running statistics moved the outputs
    assert rel(att["always"].buffers, att["never"].buffers) <= 1e-10



def test_auto_keeps_a_convolutional_model_on_the_generic_path_on_the_cpu():
    """Measured slower with the Conv2d rule on the CPU (docs/engine.md): "auto" takes torch.func there."""
    traj, X = _bn_run()
    auto = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", device="cpu").fit(traj)
    auto.transform(X)
    assert auto.sweep_["jacobian"] == "autograd"
    always = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", factored="always",
                                         device="cpu").fit(traj)
    always.transform(X)
    assert always.sweep_["jacobian"] == "factored"

def test_unknown_layer_type_goes_through_the_generic_path():
    traj, X = _bn_run(unknown=True)
    auto = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", residual_tol=1.0,
                                       device="cpu").fit(traj)
    got = auto.transform(X)
    assert auto.sweep_["jacobian"] == "autograd"
    never = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", factored="never",
                                        residual_tol=1.0, device="cpu").fit(traj).transform(X)
    assert rel(got.values, never.values) == 0.0
    with pytest.raises(ConfigError, match=r"'always' does not apply.*head\.1\.gain"):
        explaind.InfluenceEstimator(keep=("train",), factored="always", device="cpu").fit(traj).transform(X)


# ---------------------------------------------------------------------------------------------- padding rows
class PaddedTokens(nn.Module):
    def __init__(self, padding_idx: int | None):
        super().__init__()
        self.tok = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.head = nn.Linear(4, 3)
        with torch.no_grad():
            self.tok.weight[0].normal_(generator=torch.Generator().manual_seed(2))  # a padding row that matters

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.tok(tokens)).mean(1))


def _padded_run():
    gen = torch.Generator().manual_seed(0)
    X = torch.randint(0, 7, (20, 3), generator=gen)
    X[:, 0] = 0  # every sequence holds a padding token
    y = torch.randint(0, 3, (20,), generator=gen)
    torch.manual_seed(0)
    return _record(PaddedTokens(0).to(DT), X[:16], y[:16], steps=4, batch=4), X[16:]


@pytest.mark.parametrize("mode", ["always", "never"])
def test_padding_row_moved_by_weight_decay_is_explained(mode):
    """AdamW's decay moves the padding row, whose torch gradient is zero: the Jacobian must still see it."""
    traj, X = _padded_run()
    assert float((traj.params(4)["tok.weight"][0] - traj.params(0)["tok.weight"][0]).abs().max()) > 1e-3
    est = explaind.InfluenceEstimator(keep=("train",), quadrature="adaptive", factored=mode, device="cpu").fit(traj)
    att = est.transform(X)
    assert est.sweep_["jacobian"] == {"always": "factored", "never": "autograd"}[mode]
    change = float((att.final - att.initial).abs().max())
    assert float(att.quadrature_error.abs().max()) <= 1e-10 * change  # the row's share, were it left out
    assert att.completeness_error() <= 1e-10


def test_padding_jacobian_is_the_true_derivative_and_atoms_keep_torchs_gradient():
    """Phi at the padding row equals jacrev of the same model without padding_idx; atoms stay zero there."""
    torch.manual_seed(0)
    padded = PaddedTokens(0).to(DT)
    plain = PaddedTokens(None).to(DT)
    plain.load_state_dict(padded.state_dict())
    names = [n for n, _ in padded.named_parameters()]
    params = {n: p.detach() for n, p in padded.named_parameters()}
    X = torch.tensor([[0, 3, 5], [2, 0, 0]])
    fm = FunctionalModel(padded, {}, resolve_loss("cross_entropy").implementation, torch.device("cpu"), DT)
    explained = Explained("outputs", torch.zeros(2, 1, dtype=DT), 3)
    layout = ParamLayout.from_tensors(params, names)
    ev = LayerEvaluator(AutogradEvaluator(fm, 256), tuple(names))
    zero = {n: torch.zeros_like(v) for n, v in params.items()}
    plan = NodePlan(torch.zeros(2, 1, dtype=DT), torch.ones(2, 1, dtype=DT), torch.zeros(2, 3, dtype=DT), None,
                    torch.ones(2, dtype=torch.long))
    seg = Segment(params, zero, X, explained)
    for evaluator in (ev, ev.fallback):
        phi = evaluator.jacobian(seg, plan, layout, 2)
        for i in range(2):
            jac = jacrev(lambda p, i=i: functional_call(plain, p, (X[i:i + 1],))[0])(params)
            want = torch.cat([jac[n].reshape(3, -1) for n in names], dim=1)
            assert rel(phi[i], want) <= 1e-13
    assert "jacobian" in ev.used
    assert float(phi[:, :, :4].abs().max()) > 1e-3  # the padding row's block is not zero
    Y = torch.tensor([1, 2])
    for evaluator in (ev, ev.fallback):
        atoms = evaluator.sample_grads(params, layout, Batch(X, Y, torch.ones(2, dtype=DT)))
        for k in range(2):
            g = grad(lambda p, k=k: F.cross_entropy(functional_call(padded, p, (X[k:k + 1],)), Y[k:k + 1]))(params)
            assert rel(atoms[k], torch.cat([g[n].reshape(-1) for n in names])) <= 1e-13
        assert float(atoms[:, :4].abs().max()) == 0.0  # torch's gradient: nothing at the padding row


# ---------------------------------------------------------------------------------------------- attention, depthwise
class EncoderClassifier(nn.Module):
    """Token embeddings, two nn.TransformerEncoderLayer (post-norm ReLU, causal mask; pre-norm GELU), a read-out."""

    def __init__(self, d: int = 8):
        super().__init__()
        self.tok = nn.Embedding(7, d)
        self.pos = nn.Embedding(4, d)
        self.layers = nn.ModuleList([
            nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True),
            nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)])
        self.head = nn.Linear(d, 3)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1])[None])
        causal = nn.Transformer.generate_square_subsequent_mask(tokens.shape[1], dtype=h.dtype)
        h = self.layers[1](self.layers[0](h, src_mask=causal, is_causal=True))
        return self.head(h.mean(1))


class DepthwiseCNN(nn.Module):
    """A MobileNet-style block: 3x3 stem, depthwise 3x3 (groups = channels), pointwise 1x1, pooling, a read-out."""

    def __init__(self, width: int = 4):
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.depthwise = nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False)
        self.pointwise = nn.Conv2d(width, width, 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.stem(x))
        h = torch.relu(h + self.pointwise(torch.relu(self.depthwise(h))))
        return self.head(h.mean(dim=(2, 3)))


@functools.cache
def _model_run(kind: str):
    gen = torch.Generator().manual_seed(5)
    if kind == "encoder":
        X = torch.randint(0, 7, (20, 4), generator=gen)
        model = EncoderClassifier
    else:
        X = torch.randn(20, 1, 5, 5, generator=gen, dtype=DT)
        model = DepthwiseCNN
    y = torch.randint(0, 3, (20,), generator=gen)
    torch.manual_seed(2)
    return _record(model().to(DT), X[:16], y[:16], steps=3, batch=4), X[16:]


def test_encoder_layer_parameters_are_the_attention_rules():
    """in_proj_* and out_proj.* belong to the block's rule (out_proj's own forward never runs)."""
    layer = nn.TransformerEncoderLayer(4, 2, 6, batch_first=True).eval()  # dropout off
    names = [n for n, _ in layer.named_parameters()]
    covered = covered_parameters(layer, names)
    assert set(covered) == set(names)
    assert covered["self_attn.in_proj_weight"] == ("self_attn", "in_weight")
    assert covered["self_attn.out_proj.weight"] == ("self_attn", "out_weight")
    assert covered["self_attn.out_proj.bias"] == ("self_attn", "out_bias")
    assert covered["linear1.weight"] == ("linear1", "weight")
    assert "self_attn.in_proj_weight" not in covered_parameters(layer.train(), names)  # active dropout: no rule
    kv_bias = nn.MultiheadAttention(4, 2, add_bias_kv=True)
    assert "in_proj_weight" not in covered_parameters(kv_bias, [n for n, _ in kv_bias.named_parameters()])


@pytest.mark.parametrize("kind", ["encoder", "depthwise"])
def test_attention_and_depthwise_models_factored_equal_generic(kind):
    traj, X = _model_run(kind)
    att, replica = {}, {}
    for mode in ("always", "never"):
        est = explaind.InfluenceEstimator(keep=("step", "group", "train"), quadrature="gauss-legendre",
                                          factored=mode, residual_tol=1.0, device="cpu").fit(traj)
        att[mode] = est.transform(X)
        assert est.sweep_["jacobian"] == {"always": "factored", "never": "autograd"}[mode]
        assert att[mode].completeness_error() <= 1e-10
        rep = explaind.KernelReplica(quadrature="adaptive", factored=mode, device="cpu").fit(traj)
        replica[mode] = torch.as_tensor(rep.predict(X))
        assert ("rows" in rep.engine_.factored_used) == (mode == "always")
    assert float(att["never"].values.abs().max()) > 1e-6
    assert rel(att["always"].values, att["never"].values) <= 1e-10
    assert rel(replica["always"], replica["never"]) <= 1e-10


def test_every_registered_layer_rule_is_documented():
    """docs/engine.md's table of rules names every layer type with a rule (by class or qualified name)."""
    from pathlib import Path

    from explaind.kernel.layer_rules import LAYER_RULES

    text = (Path(__file__).resolve().parents[1] / "docs" / "engine.md").read_text()
    table = [line for line in text.splitlines() if line.startswith("| `nn.") or line.startswith("| `transformers.")]
    for layer in LAYER_RULES:
        name = "BatchNorm1d/2d/3d" if layer.__name__.startswith("BatchNorm") else layer.__name__
        assert any(f"`nn.{name}`" in line for line in table), layer
    for qualified in NAMED_LAYER_RULES:
        assert any(f"`{qualified}`" in line for line in table), qualified


def test_auto_keeps_narrow_attention_on_the_generic_path_on_the_cpu():
    """Measured slower with the attention rule at width 32, faster at 128 (docs/engine.md): "auto" follows."""
    from explaind.kernel.engine import NARROW_ATTENTION, make_evaluator

    def evaluator(width: int, mode: str = "auto"):
        model = nn.Sequential(nn.TransformerEncoderLayer(width, 2, 8, dropout=0.0, batch_first=True)).to(DT)
        fm = FunctionalModel(model, {}, resolve_loss("cross_entropy").implementation, torch.device("cpu"), DT)
        return make_evaluator(fm, tuple(n for n, _ in model.named_parameters()), mode, None)

    assert type(evaluator(NARROW_ATTENTION - 2)) is AutogradEvaluator
    assert type(evaluator(NARROW_ATTENTION)) is LayerEvaluator
    assert type(evaluator(8, "always")) is LayerEvaluator
    traj, X = _model_run("encoder")  # width 8
    auto = explaind.InfluenceEstimator(keep=("train",), quadrature="gauss-legendre", residual_tol=1.0,
                                       device="cpu").fit(traj)
    auto.transform(X)
    assert auto.sweep_["jacobian"] == "autograd"
