"""torch.optim.Adafactor recorded through the first-party adapter: exact against the maths, or refused naming the fix.

Float64 runs of a tanh MLP, a ReLU MLP, a dropout MLP (tests/_rmsprop_adagrad_kit.py) and a small CNN (4-D
convolution weights take the factored second moment over their last two axes): replica <= 1e-6 relative to the
trained model, residual share <= 1e-9, and ``keep=("train",)`` scores <= 1e-9 relative to a slow loop reference
whose Adafactor coefficients come from torch's documented algorithm, written here per parameter tensor in float64
from the reference's own per-sample gradients (its residual <= 1e-12 checks them against torch's updates).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _rmsprop_adagrad_kit import DT, MODELS, assert_exact, assert_metagradients_match_retraining, data, record
from engine_compare import as_numpy
from reference import rel_err
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning
from explaind.testing import check_optimizer_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


class AdafactorMath:
    """Mixin for a reference class: Adafactor's coefficients from the maths (set ``hp`` and ``lrs`` first)."""

    hp: dict
    lrs: list[float]

    def _compute_decomposition(self) -> None:
        hp = self.hp
        sign = -1.0 if hp.get("maximize", False) else 1.0
        decay, d, wd = hp.get("beta2_decay", -0.8), hp.get("d", 1.0), hp.get("weight_decay", 0.0)
        eps1, eps2 = hp.get("eps", (None, 1e-3))
        eps1 = torch.finfo(DT).eps if eps1 is None else eps1
        moments: list[list[torch.Tensor]] = [[] for _ in self.shapes]
        for s, c in enumerate(self.coef):
            t = s + 1
            rho = min(self.lrs[s], 1.0 / math.sqrt(t))
            g_all, theta_all = self.G[s].sum(0), self.theta[s]
            P_parts, offset = [], 0
            for i, (shape, size) in enumerate(zip(self.shapes, self.sizes)):
                g = g_all[offset:offset + size].reshape(shape)
                theta = theta_all[offset:offset + size]
                offset += size
                w = t ** decay  # weight of the new squared gradient in the running means
                if len(shape) > 1:
                    if not moments[i]:
                        moments[i] = [torch.zeros((*shape[:-1], 1), dtype=DT), torch.zeros((*shape[:-2], 1, shape[-1]),
                                                                                          dtype=DT)]
                    row, col = moments[i]
                    row = (1 - w) * row + w * (g * g).mean(-1, keepdim=True)
                    col = (1 - w) * col + w * (g * g).mean(-2, keepdim=True)
                    moments[i] = [row, col]
                    v_hat = row * col / row.mean(-2, keepdim=True).clamp(min=eps1)
                else:
                    v = moments[i][0] if moments[i] else torch.zeros(shape, dtype=DT)
                    v_hat = (1 - w) * v + w * g * g
                    moments[i] = [v_hat]
                inv_root = 1.0 / v_hat.clamp(min=eps1 * eps1).sqrt()
                rms_update = float((inv_root * g).pow(2).mean().sqrt())
                delta = max(1.0, rms_update / d)
                alpha = max(eps2, float(theta.pow(2).mean().sqrt())) * rho
                P_parts.append((sign * alpha / delta * inv_root).reshape(-1))
            c.update(a=torch.zeros(self.D, dtype=DT), b=torch.ones(self.D, dtype=DT), P=torch.cat(P_parts),
                     q=torch.ones(self.D, dtype=DT), n=torch.zeros(self.D, dtype=DT),
                     lambda_c=torch.zeros(self.D, dtype=DT), lambda_d=torch.full((self.D,), self.lrs[s] * wd, dtype=DT))
        super()._compute_decomposition()


def _reference(base: type, hp: dict, lrs: list[float]) -> type:
    return type(f"Adafactor{base.__name__}", (AdafactorMath, base), {"hp": dict(hp), "lrs": list(lrs)})


OPTIONS = {
    "plain": {"lr": 0.05},
    "decay_eps_wd": {"lr": 0.05, "beta2_decay": -0.5, "eps": (1e-4, 1e-2), "weight_decay": 0.2},
    "no_clip_maximize": {"lr": 0.05, "d": 1e6, "maximize": True, "weight_decay": 0.1},
    "foreach_tight_clip": {"lr": 0.2, "d": 1.0, "foreach": True},
}


def _exponential(opt):
    return torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.7)


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_each_option_set_on_the_tanh_mlp_is_exact(options):
    build, base, quad = MODELS["tanh"]
    model = build()
    hp = OPTIONS[options]
    traj, lrs, _ = record(model, torch.optim.Adafactor(model.parameters(), **hp), steps=5, schedule=_exponential)
    assert traj.manifest.adapter == "adafactor" and len(set(lrs)) == 5
    _, _, X_test = data()
    assert_exact(model, traj, X_test, _reference(base, hp, lrs), quad)


@pytest.mark.parametrize("kind", ["relu", "dropout"])
def test_relu_and_dropout_models_are_exact(kind):
    build, base, quad = MODELS[kind]
    model = build()
    hp = OPTIONS["decay_eps_wd"]
    traj, lrs, _ = record(model, torch.optim.Adafactor(model.parameters(), **hp), steps=4)
    _, _, X_test = data()
    assert_exact(model, traj, X_test, _reference(base, hp, lrs), quad)


def test_update_clipping_is_exercised_and_modelled():
    """With d = 1 the first steps clip (RMS(U) > 1 on a factored weight) and later ones do not; both are exact."""
    build, base, quad = MODELS["tanh"]
    model = build()
    hp = {"lr": 0.2, "d": 1.0}
    opt = torch.optim.Adafactor(model.parameters(), **hp)
    clipped = []

    def watch(optimizer, args, kwargs):  # RMS(U) / d of the first weight from torch's own state after its step
        p = optimizer.param_groups[0]["params"][0]
        st = optimizer.state[p]
        v_hat = st["row_var"] @ st["col_var"] / st["row_var"].mean(-2, keepdim=True).clamp(min=torch.finfo(DT).eps)
        clipped.append(float((p.grad * v_hat.clamp(min=torch.finfo(DT).eps ** 2).rsqrt()).pow(2).mean().sqrt()) > 1)

    opt.register_step_post_hook(watch)
    traj, lrs, _ = record(model, opt, steps=6)
    assert any(clipped) and not all(clipped), clipped
    _, _, X_test = data()
    assert_exact(model, traj, X_test, _reference(base, hp, lrs), quad)


class _SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.conv(x.view(-1, 1, 4, 4))).flatten(1))


def test_a_cnn_with_factored_four_dimensional_weights_is_exact():
    gen = torch.Generator().manual_seed(5)
    X, y = torch.randn(24, 16, generator=gen, dtype=DT), torch.randint(0, 3, (24,), generator=gen)
    model = _SmallCNN().to(DT)
    opt = torch.optim.Adafactor(model.parameters(), lr=0.1, weight_decay=0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:16], y[:16]))
    with rec:
        for s in range(5):
            idx = torch.arange(16)[(s * 4 + torch.arange(6)) % 16]
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    assert opt.state[model.conv.weight]["row_var"].shape == (3, 1, 3, 1)  # factored over the kernel's axes
    model.eval()
    X_test = X[16:]
    with torch.no_grad():
        trained = model(X_test)
    quad = {"quadrature": "gauss-legendre", "nodes": 8}
    replica = explaind.KernelReplica(device="cpu", **quad).fit(rec.trajectory).predict(X_test)
    assert rel_err(as_numpy(replica), as_numpy(trained)) <= 1e-6
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quad).fit(rec.trajectory).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9
    assert np.isfinite(as_numpy(att.values)).all()


def test_a_recording_opened_after_unrecorded_steps_is_exact():
    build, base, quad = MODELS["tanh"]
    model = build()
    hp = OPTIONS["plain"]
    traj, lrs, start = record(model, torch.optim.Adafactor(model.parameters(), **hp), steps=4, before=3)
    assert start["state"] and not traj.initial_state()  # torch built the factors; no first moment to carry
    _, _, X_test = data()
    with torch.no_grad():
        trained = model(X_test)
    replica = explaind.KernelReplica(device="cpu", **quad).fit(traj).predict(X_test)
    assert rel_err(as_numpy(replica), as_numpy(trained)) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quad).fit(traj).transform(X_test)
    assert att.meta["residual_share"] <= 1e-9


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conformance_suites(dtype, tol):
    report = check_optimizer_adapter(explaind.get_entry("optimizer_adapter", "adafactor"), dtype=dtype, tol=tol)
    assert len(report.residuals) == 11 and report.clipped_steps["adafactor_clip_grad_norm"] > 0
    assert set(report.pure_refused) == {"adafactor_two_groups"}  # the groups differ in d: named in the refusal
    assert "differ in beta2_decay" in report.pure_refused["adafactor_two_groups"]
    assert max(float(v.max()) for v in report.pure_residuals.values()) <= tol


def test_options_the_recurrence_cannot_express_are_refused_naming_the_fix():
    model = MODELS["tanh"][0]()
    X, y, _ = data()
    opt = torch.optim.Adafactor(model.parameters(), lr=torch.tensor(0.05))
    with pytest.raises(ConfigError, match=r"\['lr'\].*is a tensor.*Fix: pass lr=float"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    opt = torch.optim.Adafactor(model.parameters(), lr=0.05)
    opt.param_groups[0]["eps"] = 1e-3  # torch checks the pair only when the optimizer is built
    with pytest.raises(ConfigError, match=r"\['eps'\]=0.001 is not a pair.*Fix: pass eps=\(None, 1e-3\)"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))


def test_counterfactual_metagradients_match_retraining_with_a_reweighted_sample():
    """The pure update drives CounterfactualEstimator: its replay reproduces the run, and its derivative with respect
    to one sample's weight matches central differences of re-training with that weight scaled by 1 +- h."""
    build, _, _ = MODELS["tanh"]
    hp = {"lr": 0.05, "weight_decay": 0.1, "d": 1.0}
    model = build()
    traj, _, _ = record(model, torch.optim.Adafactor(model.parameters(), **hp), steps=4)
    assert_metagradients_match_retraining(build, lambda params: torch.optim.Adafactor(params, **hp), traj, steps=4)


def test_the_cli_training_run_records_adafactor_at_rounding_level():
    from explaind.studies.runs import train_run

    config = {"architecture": "mlp", "dataset": "digits", "data": {"classes": [0, 1]}, "model": {"hidden_sizes": [4]},
              "optimizer": "adafactor", "lr": 0.01, "weight_decay": 0.01, "steps": 3, "eval_every": 3,
              "dtype": "float64"}
    traj = train_run(config, None, progress=False).trajectory
    assert traj.manifest.adapter == "adafactor" and traj.n_steps == 3
    group = traj.manifest.adapter_hyperparameters["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group["eps1_used"] == torch.finfo(torch.float64).eps
    assert float(torch.as_tensor(traj.audit()).max()) <= 1e-12
