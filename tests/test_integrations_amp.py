"""The dropout MLP under autocast through the Lightning and Trainer callbacks, the loss scaler handed to the recorder.

The workload and checks of tests/test_amp_dropout.py (tests/_real_loop_testkit.py), trained by the frameworks with
gradient accumulation over two micro-batches:

* Lightning ``precision="bf16-mixed"`` on the CPU;
* Lightning float16 + ``GradScaler`` on the CPU. ``precision="16-mixed"`` with ``accelerator="cpu"`` is turned
  into ``"bf16-mixed"`` by Lightning, so the run passes the plugin itself,
  ``plugins=[MixedPrecision("16-mixed", "cpu", scaler)]``: the same plugin class, autocast and ``GradScaler``
  Lightning uses on a GPU. Once with a scale that never overflows, once with one that overflows the float16
  gradients, so ``GradScaler`` skips steps;
* the Hugging Face Trainer: ``bf16=True``, and ``fp16=True``. On the CPU accelerate runs ``fp16=True`` without
  autocast and without a scaler (in float32); the fp16 test sets the two attributes accelerate sets on a GPU,
  ``accelerator.native_amp = True`` and ``accelerator.scaler = torch.amp.GradScaler(...)``, after which
  accelerate's own fp16 path runs unchanged (autocast around ``model.forward``, ``scaler.scale(loss).backward()``,
  ``unscale_`` before clipping, ``scaler.step`` and ``scaler.update`` in its optimizer wrapper).

In every float16 run the callback hands the framework's scaler to the recorder, so each step is recorded with
the unscaled gradient's factor ``c_s`` (1 without clipping) and the loss scale as ``amp_scale``; without the
hand-off the recorder refuses the first ``scaler.step``.
"""

from __future__ import annotations

import pytest
import torch
from _framework_testkit import CrossEntropyModule, KeywordInput, fit_lightning, hf_trainer, indexed
from _real_loop_testkit import MLP_LR, MLP_N_TRAIN, assert_autocast_run_exact, dropout_mlp, mlp_data, mlp_optimizer
from lightning.pytorch.plugins import MixedPrecision

from explaind.exceptions import ConfigError
from explaind.integrations import ExplaindLightningCallback, ExplaindTrainerCallback

pytestmark = pytest.mark.usefixtures("one_thread")

N_STEPS, BATCH, ACCUMULATE = 6, 4, 2


def _data():
    X, y = mlp_data(torch.Generator().manual_seed(2))
    return (X[:MLP_N_TRAIN], y[:MLP_N_TRAIN]), X[MLP_N_TRAIN:]


def record_lightning_amp(tmp_path, **precision):
    data, X_test = _data()
    module = CrossEntropyModule(dropout_mlp(), mlp_optimizer)
    callback = ExplaindLightningCallback(data, loss="cross_entropy", module="model", check_gradients=True)
    fit_lightning(tmp_path, module, callback, indexed(*data), max_steps=N_STEPS, batch=BATCH, accumulate=ACCUMULATE,
                  **precision)
    return module.model.eval(), callback, X_test


def test_lightning_bf16_mixed_is_recorded_and_exact_up_to_its_rounding(tmp_path):
    model, callback, X_test = record_lightning_amp(tmp_path, precision="bf16-mixed")
    traj = callback.trajectory
    assert traj.n_steps == N_STEPS and all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))
    assert all(r.amp_scale is None for r in traj.manifest.steps)  # bf16-mixed has no scaler
    assert_autocast_run_exact(model, traj, X_test, "bfloat16")


def test_lightning_float16_steps_are_recorded_with_the_plugins_loss_scale(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model, callback, X_test = record_lightning_amp(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    traj = callback.trajectory
    assert traj.n_steps == N_STEPS and callback.recorder.skipped_batches == 0
    assert all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))  # the unscaled gradient, not 1024 x it
    assert [r.amp_scale for r in traj.manifest.steps] == [1024.0] * N_STEPS
    assert_autocast_run_exact(model, traj, X_test, "float16")


def test_lightning_float16_steps_the_scaler_skips_are_not_recorded(tmp_path):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # overflows the float16 logits' gradients at first
    model, callback, X_test = record_lightning_amp(tmp_path, plugins=[MixedPrecision("16-mixed", "cpu", scaler)])
    traj = callback.trajectory
    skipped = N_STEPS - traj.n_steps
    assert skipped >= 1 and callback.recorder.skipped_batches == ACCUMULATE * skipped
    scales = [r.amp_scale for r in traj.manifest.steps]
    assert scales[0] <= 2.0**19 and all(s in {2.0**k for k in range(10, 20)} for s in scales)  # halved per skip
    assert all(traj.grad_scale(s) == 1.0 for s in range(traj.n_steps))
    assert_autocast_run_exact(model, traj, X_test, "float16")


def _trainer(tmp_path, precision: str, **overrides):
    data, X_test = _data()
    model = KeywordInput(dropout_mlp())
    callback = ExplaindTrainerCallback(data, loss="cross_entropy", check_gradients=True)
    settings = {"max_steps": N_STEPS, "fp16": precision == "float16", "bf16": precision == "bfloat16", **overrides}
    trainer = hf_trainer(tmp_path, model, callback, indexed(*data), batch=BATCH, accumulate=ACCUMULATE, lr=MLP_LR,
                         **settings)
    return trainer, model, callback, X_test


def _trained_copy(model: KeywordInput) -> KeywordInput:
    """The trained parameters in a fresh module: accelerate leaves its autocast wrapped around ``model.forward``.

    The recorded module itself goes to evaluation mode too (the Trainer leaves it training): the reference
    evaluates the recorded model along each step's path.
    """
    model.eval()
    final = KeywordInput(dropout_mlp())
    final.load_state_dict(model.state_dict())
    return final.eval()


def test_trainer_fp16_on_the_cpu_is_float32_without_a_scaler(tmp_path):
    """What accelerate does with ``fp16=True`` on the CPU: no scaler to hand over, and no autocast to record."""
    trainer, _, callback, _ = _trainer(tmp_path, "float16", max_steps=2)
    trainer.train()
    assert trainer.accelerator.scaler is None
    assert [(r.autocast, r.amp_scale) for r in callback.trajectory.manifest.steps] == [(None, None)] * 2


def record_trainer_amp(tmp_path, precision: str):
    """The Trainer run in ``precision``: ``bf16=True``, or ``fp16=True`` with accelerate's GPU settings and
    ``max_grad_norm=0.5``; the trained parameters in a fresh module, the trajectory, the test inputs."""
    trainer, model, callback, X_test = _trainer(tmp_path, precision,
                                                **({"max_grad_norm": 0.5} if precision == "float16" else {}))
    if precision == "float16":
        trainer.accelerator.native_amp = True  # what accelerate sets on a GPU (see the module docstring)
        trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    trainer.train()
    return _trained_copy(model), callback.trajectory, X_test


def test_trainer_fp16_steps_are_recorded_with_accelerates_loss_scale(tmp_path):
    model, traj, X_test = record_trainer_amp(tmp_path, "float16")
    assert traj.n_steps == N_STEPS and [len(traj.micro_batches(s)) for s in range(N_STEPS)] == [2] * N_STEPS
    assert [r.amp_scale for r in traj.manifest.steps] == [1024.0] * N_STEPS
    assert all(0 < traj.grad_scale(s) < 1 for s in range(N_STEPS))  # max_grad_norm=0.5 on the unscaled gradient
    assert_autocast_run_exact(model, traj, X_test, "float16")


def test_trainer_bf16_is_recorded_and_exact_up_to_its_rounding(tmp_path):
    model, traj, X_test = record_trainer_amp(tmp_path, "bfloat16")
    assert traj.n_steps == N_STEPS and all(traj.grad_scale(s) == 1.0 for s in range(N_STEPS))
    assert_autocast_run_exact(model, traj, X_test, "bfloat16")


@pytest.mark.parametrize("callback", [ExplaindLightningCallback, ExplaindTrainerCallback])
def test_a_grad_scaler_argument_is_refused(callback):
    with pytest.raises(ConfigError, match=r"grad_scaler=\.\.\.\) is not allowed.*Fix: remove grad_scaler="):
        callback(indexed(*_data()[0]), loss="cross_entropy", grad_scaler=torch.amp.GradScaler("cpu"))
