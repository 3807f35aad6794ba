"""transformers' ``Adafactor`` (``TrainingArguments(optim="adafactor")``) through the ``hf_adafactor`` adapter.

Float64 runs of the tanh, ReLU and dropout MLPs of tests/_rmsprop_adagrad_kit.py: replica <= 1e-6 relative to the
trained model, residual share <= 1e-9, and ``keep=("train",)`` scores <= 1e-9 relative to a slow loop reference
whose coefficients come from transformers' documented algorithm (written here per parameter tensor, in float64, from
the reference's own per-sample gradients; its residual <= 1e-12 checks them against the optimizer's real updates).
Also: the conformance suites (and ``warmup_init`` in float64, with the tolerance its small steps allow), a sparse
store replayed bit for bit, the Trainer's ``optim="adafactor"``, the Trainer with transformers' documented
``warmup_init`` recipe (``AdafactorSchedule``, which writes a tensor into the unused ``lr``), and the registration,
which must not import transformers.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from _rmsprop_adagrad_kit import DT, MODELS, assert_exact, assert_metagradients_match_retraining, data, record
from transformers.optimization import Adafactor

import explaind
from explaind.exceptions import ConfigError
from explaind.testing import AdapterScenario, check_adapter_start_state, check_optimizer_adapter
from explaind.trajectory import Trajectory

pytestmark = pytest.mark.usefixtures("one_thread")


class HFAdafactorMath:
    """Mixin for a reference class: transformers' Adafactor coefficients from its algorithm (set ``hp``, ``lrs``)."""

    hp: dict
    lrs: list[float]

    def _compute_decomposition(self) -> None:
        hp = {"eps": (1e-30, 1e-3), "clip_threshold": 1.0, "decay_rate": -0.8, "beta1": None, "weight_decay": 0.0,
              "scale_parameter": True, "relative_step": True, "warmup_init": False, **self.hp}
        eps1, eps2 = hp["eps"]
        factors: list[list[torch.Tensor]] = [[] for _ in self.shapes]
        for s, c in enumerate(self.coef):
            t = s + 1
            new_weight = t ** hp["decay_rate"]  # 1 - beta2_t
            size = min(1e-2, 1 / math.sqrt(t)) if hp["relative_step"] else self.lrs[s]
            g_all, theta_all = self.G[s].sum(0), self.theta[s]
            gains, decays, offset = [], [], 0
            for i, (shape, n) in enumerate(zip(self.shapes, self.sizes)):
                g = g_all[offset:offset + n].reshape(shape)
                theta = theta_all[offset:offset + n]
                offset += n
                square = g * g + eps1
                if len(shape) >= 2:
                    row, col = factors[i] or [torch.zeros(shape[:-1], dtype=DT), torch.zeros(shape[:-2] + shape[-1:],
                                                                                               dtype=DT)]
                    row = (1 - new_weight) * row + new_weight * square.mean(-1)
                    col = (1 - new_weight) * col + new_weight * square.mean(-2)
                    factors[i] = [row, col]
                    r = (row / row.mean(-1, keepdim=True)).unsqueeze(-1) ** -0.5 * col.unsqueeze(-2) ** -0.5
                else:
                    v = factors[i][0] if factors[i] else torch.zeros(shape, dtype=DT)
                    v = (1 - new_weight) * v + new_weight * square
                    factors[i] = [v]
                    r = v ** -0.5
                delta = max(1.0, float((r * g).pow(2).mean().sqrt()) / hp["clip_threshold"])
                scale = max(eps2, float(theta.pow(2).mean().sqrt())) if hp["scale_parameter"] else 1.0
                gains.append((scale * size / delta * r).reshape(-1))
                decays.append(torch.full((n,), hp["weight_decay"] * scale * size, dtype=DT))
            gain, beta1 = torch.cat(gains), hp["beta1"]
            if beta1 is None:
                a, b, P = torch.zeros(self.D, dtype=DT), torch.ones(self.D, dtype=DT), gain
            else:
                a, b, P = torch.full((self.D,), beta1, dtype=DT), (1 - beta1) * gain, torch.ones(self.D, dtype=DT)
            c.update(a=a, b=b, P=P, q=torch.ones(self.D, dtype=DT), n=torch.zeros(self.D, dtype=DT),
                     lambda_c=torch.zeros(self.D, dtype=DT), lambda_d=torch.cat(decays))
        super()._compute_decomposition()


def _reference(base: type, hp: dict, lrs: list[float]) -> type:
    return type(f"HFAdafactor{base.__name__}", (HFAdafactorMath, base), {"hp": dict(hp), "lrs": list(lrs)})


OPTIONS = {
    "trainer_default": {"lr": 0.05, "relative_step": False, "scale_parameter": False},
    "beta1_scaled_wd_clip": {"lr": 0.3, "relative_step": False, "scale_parameter": True, "beta1": 0.9,
                             "weight_decay": 0.1, "clip_threshold": 0.5},
    "relative_step": {"lr": None, "relative_step": True, "scale_parameter": True, "decay_rate": -0.5},
}


@pytest.mark.parametrize("options", sorted(OPTIONS))
def test_each_option_set_on_the_tanh_mlp_is_exact(options):
    build, base, quad = MODELS["tanh"]
    model = build()
    hp = OPTIONS[options]
    traj, lrs, _ = record(model, Adafactor(model.parameters(), **hp), steps=5)
    assert traj.manifest.adapter == "hf_adafactor"
    assert traj.manifest.optimizer_class == "transformers.optimization.Adafactor"
    _, _, X_test = data()
    assert_exact(model, traj, X_test, _reference(base, hp, lrs), quad)


@pytest.mark.parametrize("kind", ["relu", "dropout"])
def test_relu_and_dropout_models_are_exact(kind):
    build, base, quad = MODELS[kind]
    model = build()
    hp = OPTIONS["beta1_scaled_wd_clip"]
    traj, lrs, _ = record(model, Adafactor(model.parameters(), **hp), steps=4)
    _, _, X_test = data()
    assert_exact(model, traj, X_test, _reference(base, hp, lrs), quad)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_conformance_suites(dtype, tol):
    record_ = explaind.get_entry("optimizer_adapter", "hf_adafactor")
    assert record_.optimizer_classes == () and record_.optimizer_class_names == ("transformers.optimization.Adafactor",)
    report = check_optimizer_adapter(record_, dtype=dtype, tol=tol)
    assert len(report.residuals) == 12 and "hf_adafactor_fixed_beta1" in report.residuals
    assert len(check_adapter_start_state(record_, dtype=dtype, tol=tol)) == 7  # every distinct option set


def test_a_sparse_store_replays_every_step_bit_for_bit(tmp_path):
    build, _, _ = MODELS["tanh"]
    hp = OPTIONS["beta1_scaled_wd_clip"]
    memory_model = build()
    memory, _, _ = record(memory_model, Adafactor(memory_model.parameters(), **hp), steps=5)
    model = build()
    record(model, Adafactor(model.parameters(), **hp), steps=5, store=tmp_path / "run", checkpoint_every=2)
    sparse = Trajectory.load(tmp_path / "run", model=build())
    sparse.verify()
    assert sparse.sparse
    for s in (3, 0, 4, 1, 2):
        assert all(torch.equal(sparse.params(s)[n], memory.params(s)[n]) for n in memory.param_names), s
        for n, u in memory.updates(s).items():
            v = sparse.updates(s)[n]
            for f in ("a", "b", "P", "lambda_d"):
                assert torch.equal(torch.as_tensor(getattr(u, f)), torch.as_tensor(getattr(v, f))), (s, n, f)


@pytest.mark.parametrize("options", ["beta1_scaled_wd_clip", "relative_step"])
def test_counterfactual_metagradients_match_retraining_with_a_reweighted_sample(options):
    """The pure update replays the run and its derivative in one sample's weight matches central differences of
    re-training with that weight scaled by 1 +- h (through RMS(theta), the clipping and the first moment)."""
    build, _, _ = MODELS["tanh"]
    hp = OPTIONS[options]
    model = build()
    traj, _, _ = record(model, Adafactor(model.parameters(), **hp), steps=4)
    assert_metagradients_match_retraining(build, lambda params: Adafactor(params, **hp), traj, steps=4)


def test_the_pure_update_refuses_groups_that_differ_in_beta1():
    build, _, _ = MODELS["tanh"]
    model = build()
    groups = [{"params": [model[0].weight, model[0].bias]}, {"params": [model[2].weight, model[2].bias], "beta1": 0.9}]
    traj, _, _ = record(model, Adafactor(groups, **OPTIONS["trainer_default"]), steps=2)
    with pytest.raises(ConfigError, match=r"transformers' Adafactor pure update: the parameter groups differ in "
                                          r"decay_rate, eps1, eps2, clip_threshold, beta1, scale_parameter"):
        explaind.CounterfactualEstimator(device="cpu").fit(traj)


def test_registering_the_adapters_does_not_import_transformers():
    code = ("import sys, explaind; from explaind.plugins import get_entry; "
            "r = get_entry('optimizer_adapter', 'hf_adafactor'); explaind.plugins.list_entries('optimizer_adapter'); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_options_the_recurrence_cannot_express_are_refused_naming_the_fix():
    model = MODELS["tanh"][0]()
    X, y, _ = data()
    opt = Adafactor(model.parameters(), lr=0.05, relative_step=False, scale_parameter=False)
    opt.param_groups[0]["clip_threshold"] = torch.tensor(1.0)
    with pytest.raises(ConfigError, match=r"\['clip_threshold'\].*is a tensor.*Fix: pass clip_threshold=float"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))


def test_a_subclass_is_not_taken_for_transformers_adafactor():
    class Mine(Adafactor):
        pass

    model = MODELS["tanh"][0]()
    with pytest.raises(ConfigError, match=r"handles exactly transformers.optimization.Adafactor, got .*Mine"):
        explaind.get_entry("optimizer_adapter", "hf_adafactor").implementation.from_optimizer(
            Mine(model.parameters(), lr=0.05, relative_step=False))


WARMUP = {"lr": None, "relative_step": True, "scale_parameter": True, "warmup_init": True}
WARMUP_SCENARIOS = [
    AdapterScenario("warmup_init_scaled", WARMUP),
    AdapterScenario("warmup_init", {**WARMUP, "scale_parameter": False}),
    AdapterScenario("warmup_init_beta1_decay", {**WARMUP, "beta1": 0.9, "weight_decay": 0.1}),
    AdapterScenario("warmup_init_two_groups", WARMUP, second_group={"weight_decay": 0.01}),
    AdapterScenario("warmup_init_accumulation_3", WARMUP, micro_batches=3),
]


def test_warmup_init_conforms_in_float64_down_to_the_rounding_of_its_small_steps():
    """``warmup_init`` caps the relative step at 1e-6 t: |Delta theta| / |theta| is about 2e-6 at the first step
    (2e-7 with beta1's 1 - beta1), so the float64 rounding of theta_{s+1} (1.1e-16 relative) alone bounds the
    residual ulp(theta) / |Delta theta| at a few 1e-10; tol 1e-9 sits above that and below any modelling error
    (a wrong coefficient shows at its own relative size, 1e-3 and more). The residual is rounding: it falls as the
    steps grow (about 1/t; the twelfth step's at most a third of the first's), and the pure update replays torch's
    steps to 1e-9 too. In float32 the rounding of theta (6e-8) exceeds the steps' relative size, so the scenario is
    not in the default (dtype-independent) sweep."""
    record_ = explaind.get_entry("optimizer_adapter", "hf_adafactor")
    report = check_optimizer_adapter(record_, scenarios=WARMUP_SCENARIOS, dtype=torch.float64, tol=1e-9)
    assert set(report.residuals) == {s.name for s in WARMUP_SCENARIOS} and not report.pure_refused
    for name, residuals in report.residuals.items():
        assert residuals[-1] <= residuals[0] / 3, (name, residuals)
    assert max(float(r.max()) for r in report.pure_residuals.values()) <= 1e-9


@pytest.mark.parametrize("hp", [{}, {"scale_parameter": False, "beta1": 0.9}], ids=["scaled", "beta1"])
def test_the_trainer_with_the_warmup_init_recipe_and_adafactor_schedule_is_exact(tmp_path, hp):
    """transformers' recipe: ``Adafactor(scale_parameter=True, relative_step=True, warmup_init=True, lr=None)`` with
    ``AdafactorSchedule`` in ``Trainer(optimizers=...)`` (``optim="adafactor"`` itself builds relative_step=False
    and takes no ``warmup_init``). The schedule writes ``_get_lr``'s value, a tensor with scale_parameter, into
    ``group["lr"]``, which the step does not read: before, the adapter refused the tensor at the second step. The
    parameters move by about 1e-6 relative per step, so the replica is measured against the change of the model's
    outputs over the run (<= 1e-9 of it), not against the outputs."""
    from test_trainer_options import DT as TRAINER_DT
    from test_trainer_options import MappingReference, OwnLossMLP, _train
    from torch.func import functional_call
    from transformers.optimization import AdafactorSchedule

    model = OwnLossMLP()
    optimizer = Adafactor(model.parameters(), **{**WARMUP, **hp})
    model, traj, _ = _train(tmp_path, model, optimizers=(optimizer, AdafactorSchedule(optimizer)))
    assert traj.manifest.adapter == "hf_adafactor" and traj.n_steps == 4
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=TRAINER_DT)}
    with torch.no_grad():
        truth = model(**X).logits
        start = functional_call(model, {n: traj.params(0)[n] for n in traj.param_names}, (), X).logits
    change = float((truth - start).abs().max())
    assert 1e-7 <= change / float(truth.abs().max()) <= 1e-4  # warm-up sized steps
    predicted = torch.as_tensor(explaind.KernelReplica(device="cpu").fit(traj).predict(X))
    assert float((predicted - truth).abs().max()) <= 1e-9 * change
    scores = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    assert scores.meta["residual_share"] <= 1e-9
    reference = MappingReference(traj, X, loss_fn=lambda out, t: torch.nn.functional.cross_entropy(
        out, t, reduction="none"))
    expected = torch.as_tensor(reference.kept(("train",)))
    assert float((torch.as_tensor(scores.values) - expected).abs().max()) <= 1e-9 * float(expected.abs().max())


def test_a_tensor_lr_is_refused_where_the_step_reads_it():
    """With relative_step=False the step multiplies by group["lr"]: a tensor there stays refused."""
    model = MODELS["tanh"][0]()
    X, y, _ = data()
    opt = Adafactor(model.parameters(), lr=0.05, relative_step=False, scale_parameter=False)
    opt.param_groups[0]["lr"] = torch.tensor(0.05, dtype=DT)
    with pytest.raises(ConfigError, match=r"\['lr'\].*is a tensor.*Fix: pass lr=float"):
        explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
