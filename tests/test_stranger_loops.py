"""Plain loops a new user writes that no other test contains, each exact or refused naming the fix.

Float64 runs of a small tanh MLP (smooth, so the slow loop reference of ``reference.py`` integrates exactly):
OneCycleLR and CyclicLR over per-group learning rates (they cycle SGD's momentum and Adam's beta1 every step),
a per-sample weighted mean of ``reduction="none"`` losses, gradient accumulation with an uneven last
micro-batch and a loss callable; and what is refused: a batch-norm or dropout module left in another mode
than the model. Activation checkpointing (``torch.utils.checkpoint``, either ``use_reentrant``) is exact without
switching it off, Hugging Face's too (its input hook calling ``requires_grad_`` included).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from reference import Reference, rel_err
from replay_reference import assert_replay_exact
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError, UnsupportedModelError

DT = torch.float64
N, STEPS, BATCH = 30, 6, 10


def _data(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 5, generator=gen, dtype=DT)
    return X, torch.randint(0, 3, (N,), generator=gen), torch.randn(4, 5, generator=gen, dtype=DT)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _groups(model: nn.Module) -> list[dict]:
    return [{"params": model[0].parameters(), "lr": 0.1}, {"params": model[2].parameters(), "lr": 0.3}]


def _optimizer(kind: str, model: nn.Module):
    """The optimizer and the per-step scheduler of a case (None: constant)."""
    if kind == "onecycle_sgd_nesterov":
        opt = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.2, 0.5], total_steps=STEPS)
    if kind == "onecycle_adam":
        opt = torch.optim.Adam(_groups(model), lr=0.01)
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.02, 0.05], total_steps=STEPS)
    if kind == "cyclic_sgd":
        opt = torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9)
        return opt, torch.optim.lr_scheduler.CyclicLR(opt, base_lr=0.05, max_lr=0.3, step_size_up=2)
    return torch.optim.SGD(_groups(model), lr=0.1, momentum=0.9), None


def _run(kind: str, batch_loss: str, loss="cross_entropy"):
    """Train STEPS steps of BATCH random samples; ``batch_loss`` says how the loop forms each step's loss.

    ``"mean"``: one mean cross entropy. ``"weighted"``: per-sample losses (``reduction="none"``) averaged with
    fixed per-sample weights ``v``. ``"accumulate_mean"``: micro-batches of 4, 4 and 2, each mean divided by 3.
    ``"accumulate_count"``: the same micro-batches, each summed loss divided by the step's 10 samples.
    """
    X, y, X_test = _data()
    model = _mlp()
    opt, sched = _optimizer(kind, model)
    v = torch.rand(N, generator=torch.Generator().manual_seed(1), dtype=DT) + 0.5
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=True)
    gen = torch.Generator().manual_seed(2)
    with rec:
        for _ in range(STEPS):
            idx = torch.randperm(N, generator=gen)[:BATCH]
            opt.zero_grad()
            if batch_loss == "mean":
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
            elif batch_loss == "weighted":
                per_sample = F.cross_entropy(model(X[idx]), y[idx], reduction="none")
                ((per_sample * v[idx]).sum() / v[idx].sum()).backward()
                rec.log_batch(idx, v[idx] / v[idx].sum())
            else:
                for part in (idx[:4], idx[4:8], idx[8:]):
                    out = model(X[part])
                    if batch_loss == "accumulate_mean":
                        (F.cross_entropy(out, y[part]) / 3).backward()
                        rec.log_batch(part, torch.full((len(part),), 1 / (3 * len(part)), dtype=DT))
                    else:
                        (F.cross_entropy(out, y[part], reduction="sum") / BATCH).backward()
                        rec.log_batch(part, torch.full((len(part),), 1 / BATCH, dtype=DT))
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval(), rec.trajectory, X_test


def _assert_exact(model, traj, X_test) -> None:
    """Replica <= 1e-6 against the trained model, residual share <= 1e-9, train scores <= 1e-9 against the loop."""
    with torch.no_grad():
        truth = model(X_test)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    ref = Reference(traj, X_test)
    assert float(ref.E.abs().max()) <= 1e-12 * max(float(torch.stack(ref.delta).abs().max()), 1.0)
    assert float(ref.quad_error.abs().max()) <= 1e-12
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


@pytest.mark.parametrize("kind", ["onecycle_sgd_nesterov", "onecycle_adam", "cyclic_sgd"])
def test_cycled_momentum_and_per_group_learning_rates_are_exact(kind):
    model, traj, X_test = _run(kind, "mean")
    a = [float(torch.as_tensor(traj.updates(s)["2.weight"].a).reshape(-1)[0]) for s in range(STEPS)]
    if kind != "cyclic_sgd":  # OneCycleLR cycles the momentum (Adam's beta1) too: the recorded a_s moves
        assert max(a[1:]) - min(a[1:]) > 1e-3
    _assert_exact(model, traj, X_test)


def test_weighted_mean_of_unreduced_losses_is_exact():
    _assert_exact(*_run("constant", "weighted"))


@pytest.mark.parametrize("batch_loss", ["accumulate_mean", "accumulate_count"])
def test_loss_callable_with_uneven_gradient_accumulation_is_exact(batch_loss):
    """Before the fix the loss-callable check compared the first micro-batch's mean with weights summing to 1/3."""
    _assert_exact(*_run("constant", batch_loss, loss=lambda out, t: F.cross_entropy(out, t)))


def test_class_weighted_loss_callable_is_still_refused_with_accumulation():
    weight = torch.tensor([0.2, 1.0, 3.0], dtype=DT)
    with pytest.raises(TrajectoryError, match=r"Loss 'custom:.*<lambda>'.*normalised to sum to 1.*class-weighted"):
        _run("constant", "accumulate_mean", loss=lambda out, t: F.cross_entropy(out, t, weight=weight))


def _bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)


@pytest.mark.parametrize("switched", ["1", "3"])  # frozen batch norm; one dropout turned off with .eval()
def test_a_module_left_in_another_mode_than_the_model_is_refused(switched):
    """Before the fix: the gradient check passed (it ran the model as it was) and the residual share was 1.03
    (frozen batch norm) or 0.25 (dropout), because the engine replays every module in training mode."""
    X, y, _ = _data()
    model = _bn_dropout_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=rf"training mode with the module\(s\) \['{switched}'\] in evaluation "
                                              rf"mode.*FrozenBatchNorm2d.*p=0 rather than \.eval\(\)"), rec:
        model.train()
        dict(model.named_modules())[switched].eval()
        opt.zero_grad()
        F.cross_entropy(model(X[:8]), y[:8]).backward()


def _three_steps(model: nn.Module, X, y, training=(True, True, True)):
    """Three SGD-momentum steps of 8 random samples, the whole model in ``training[s]`` mode at step ``s``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    gen = torch.Generator().manual_seed(2)
    with rec:
        for mode in training:
            model.train(mode)
            idx = torch.randperm(N, generator=gen)[:8]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def test_whole_model_evaluation_steps_stay_exact():
    """The model switched to evaluation mode as a whole for one step is replayed in evaluation mode."""
    X, y, X_test = _data()
    model = _bn_dropout_model()
    with torch.no_grad():
        model.train()(X * 2 + 1)  # running statistics that differ from the batch's
    traj = _three_steps(model, X, y, training=(True, False, True))
    with torch.no_grad():
        truth = model.eval()(X_test)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_its_input_hook_is_exact_without_switching_it_off(reentrant):
    """Hugging Face's gradient checkpointing leaves a hook calling requires_grad_ on the embeddings' output.

    Before: a raw functorch error, then an UnsupportedModelError asking for disable_input_require_grads(); now the
    hook is inert inside explaind's calls (explaind._checkpointing) and the model keeps it.
    """
    transformers = pytest.importorskip("transformers")
    from _hf_testkit import lm_data, tiny_gpt2

    ids, labels = lm_data(8)
    model = tiny_gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    assert isinstance(model, transformers.PreTrainedModel)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": ids}, labels))
    model.train()
    with rec:
        for idx in (torch.arange(4), torch.arange(4, 8)):
            opt.zero_grad()
            logits = model(input_ids=ids[idx]).logits
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[idx, 1:].reshape(-1)).backward()
            rec.log_batch(idx)
            opt.step()
    X_test = {"input_ids": lm_data(2, seed=9)[0]}
    with torch.no_grad():
        truth = model.eval()(**X_test).logits.reshape(2, -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        replica = explaind.KernelReplica(device="cpu").fit(rec.trajectory).predict(X_test)
    assert rel_err(replica, truth) <= 1e-6
    assert model.is_activation_checkpointing and len(model._require_grads_hooks) == 1  # left as the user set it


def _dropout_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 3)).to(DT)


@pytest.mark.parametrize("how", ["torch.compile", "module.compile"])
def test_compiled_dropout_model_with_inductor_is_refused(how):
    """Before: the gradient check (running the compiled model) passed and the residual share was 0.40."""
    X, y, _ = _data()
    net = _dropout_net()
    model = torch.compile(net) if how == "torch.compile" else net
    if how == "module.compile":
        net.compile()
    _refused(model, X, y, r"compiled code draws random numbers with the compiler's own generator: the model "
                          r"\(torch.compile\(backend='inductor'\)\)\. .*Fix: torch\._inductor\.config\."
                          r"fallback_random = True before compiling.*backend='aot_eager'\) or 'eager'.*; or record "
                          r"the uncompiled model")


def _refused(model, X, y, match):
    """A recorder over ``model`` is refused with a ConfigError matching ``match``."""
    with pytest.raises(ConfigError, match=match):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.2), loss="cross_entropy",
                                    train_data=(X, y))


def test_a_submodule_compiled_with_inductor_under_an_uncompiled_root_is_refused():
    """Before: only the root was looked at, so a compiled submodule with dropout recorded a silently inexact run."""
    X, y, _ = _data()
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3)).to(DT)
    model = nn.Sequential(torch.compile(inner), nn.Linear(8, 3)).to(DT)
    assert explaind.models.compile_backend(model) is None and explaind.models.compile_backend(model[0]) == "inductor"
    _refused(model, X, y, r"compiled code draws random numbers with the compiler's own generator: the submodule '0' "
                          r"\(torch.compile\(backend='inductor'\)\)\. .*Fix: torch\._inductor\.config\.fallback_random")


def test_compiled_dropout_model_with_aot_eager_is_exact():
    X, y, X_test = _data()
    net = _dropout_net()
    traj = _three_steps(torch.compile(net, backend="aot_eager"), X, y)
    assert_replay_exact(traj, net, X_test)


def test_parameters_stored_in_bfloat16_warn_naming_the_update_rounding():
    """Pure bfloat16 training (no float32 master weights): before, the warning blamed only the adapter."""
    X, y, X_test = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(torch.bfloat16)
    X = X.to(torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in torch.arange(24).reshape(3, 8):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    with pytest.warns(ExplaindWarning, match=r"residual share .*\(1\) the parameters themselves are stored in "
                                             r"bfloat16.*float32 master weights"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(rec.trajectory).transform(
            X_test.to(torch.bfloat16))
    assert att.meta["residual_share"] > 1e-3


class _Checkpointed(nn.Module):
    """Token ids -> mean embedding -> a block run under torch.utils.checkpoint -> logits."""

    def __init__(self, reentrant: bool | None, sparse: bool = False):
        super().__init__()
        self.emb = nn.Embedding(20, 6, sparse=sparse)
        self.block = nn.Sequential(nn.Linear(6, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.reentrant = reentrant  # None: no checkpointing (the same function)

    def forward(self, x):
        h = self.emb(x).mean(1)
        if self.reentrant is not None:
            h = torch.utils.checkpoint.checkpoint(self.block, h, use_reentrant=self.reentrant)
        else:
            h = self.block(h)
        return self.head(h)


def _token_data():
    gen = torch.Generator().manual_seed(3)
    return torch.randint(0, 20, (N, 4), generator=gen), torch.randint(0, 3, (N,), generator=gen)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_is_exact_without_switching_it_off(reentrant):
    """Before: refused (use_reentrant=True at the first checked step, False when explaining) until the user switched
    checkpointing off with a flag of their own; explaind now runs torch.utils.checkpoint as a plain call."""
    X, y = _token_data()
    torch.manual_seed(0)
    model = _Checkpointed(reentrant=reentrant).to(DT)
    traj = _three_steps(model, X, y)
    X_test = X[:3]
    replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X_test)
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X_test)
    model.reentrant = None  # the independent reference runs the plain function
    with torch.no_grad():
        truth = model.eval()(X_test)
    assert rel_err(replica, truth) <= 1e-6
    assert att.meta["residual_share"] <= 1e-9
    ref = Reference(traj, X_test)
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


class _SavedOnCpu(_Checkpointed):
    def forward(self, x):
        with torch.autograd.graph.save_on_cpu():
            return self.head(self.block(self.emb(x).mean(1)))


def test_another_saved_tensor_hook_is_refused_when_explaining_naming_the_fix():
    X, y = _token_data()
    torch.manual_seed(0)
    traj = _three_steps(_SavedOnCpu(reentrant=None).to(DT), X, y)
    with pytest.raises(UnsupportedModelError, match=r"another saved-tensor hook \(such as "
                                                    r"torch\.autograd\.graph\.save_on_cpu.*switch them off"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[:3])


def test_sparse_embedding_gradients_are_refused_naming_the_fix():
    """Before: a raw NotImplementedError (a norm of a sparse gradient) in rec.log_batch."""
    X, y = _token_data()
    model = _Checkpointed(reentrant=None, sparse=True).to(DT)
    with pytest.raises(UnsupportedModelError, match=r"\['emb'\] have sparse=True.*Fix: build them with sparse=False"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy",
                                    train_data=(X, y))
