"""Lightning as people configure it, round 10: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, SGD momentum 0.9, accumulation 2 (``_fit`` of
tests/test_stranger_lightning_round5.py). The dropout runs (p=0.3) check every step's gradient and compare with the
loop reference that replays the recorded masks (tests/replay_reference.py). "Exact": replica <= 1e-6 relative to the
trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64
loop reference. The figures go to ``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py
test_stranger_lightning_round10.py`` prints them).

Fixed here: manual optimization with several optimizer steps on one batch (one per parameter subset, as a GAN loop
steps its generator and its critic) failed at the second step with a ``TrajectoryError`` telling the user to call
``rec.log_batch`` (which a Lightning user does not call): the callback logged each batch once. A backward after an
optimizer step on the same batch now logs the batch again; the run is exact.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, indexed
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import GradientAccumulationScheduler, StochasticWeightAveraging
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import CombinedLoader
from reference import rel_err
from replay_reference import ReplayReference
from test_lightning_options import Validated, _data, _mlp, _sgd
from test_stranger_lightning_round5 import X_TEST, _assert_exact, _fit, _sizes
from test_stranger_lightning_round6 import Loaders, Tunable
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.integrations import ExplaindLightningCallback

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _assert_replayed_exact(model: nn.Module, traj) -> None:
    """The exactness bounds of the module docstring, against the reference replaying the recorded masks."""
    with torch.no_grad():
        truth = model.eval()(X_TEST)
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_TEST), truth)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X_TEST)
    train = rel_err(att.values, ReplayReference(traj, X_TEST).kept(("train",)))
    note(replica=replica, share=att.meta["residual_share"], train=train)
    assert max(traj.gradient_check()) <= 1e-12
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-9 and train <= 1e-9


DROPOUT = {  # pl.Trainer settings and callbacks, each with dropout 0.3 and the gradient check at every step
    "accumulation_scheduler": dict(max_steps=-1, max_epochs=2, accumulate=1,
                                   callbacks=[GradientAccumulationScheduler({0: 1, 1: 3})]),
    "val_check_interval_half_epoch": dict(max_steps=-1, max_epochs=1, val_check_interval=0.5, val=True),
    "detect_anomaly": dict(detect_anomaly=True),
    "reload_dataloaders_every_epoch": dict(reload_dataloaders_every_n_epochs=1, max_steps=-1, max_epochs=2),
    "overfit_batches_quarter": dict(overfit_batches=0.25, max_steps=-1, max_epochs=2),
}


@pytest.mark.parametrize("option", sorted(DROPOUT))
def test_dropout_runs_with_trainer_options_are_exact(tmp_path, option):
    settings = dict(DROPOUT[option])
    val = settings.pop("val", False)
    module = (Validated if val else CrossEntropyModule)(_mlp(0.3), _sgd)
    callback, trainer = _fit(tmp_path, module, val=val, callback_kwargs={"check_gradients": True}, **settings)
    traj = callback.trajectory
    assert traj.n_steps == trainer.global_step >= 2
    if option == "accumulation_scheduler":
        assert _sizes(traj) == [4] * 6 + [1] + [12, 12, 1]  # epoch 0: 1 batch a step; epoch 1: 3 (7 batches)
    if option == "overfit_batches_quarter":  # the same unshuffled batch (a quarter of 7 batches: 1) every step
        assert all(traj.batch(s)[0].tolist() == [0, 1, 2, 3] for s in range(traj.n_steps))
    _assert_replayed_exact(module.model, traj)


class DropoutTunable(Tunable):
    """The learning-rate finder's module with dropout 0.3."""

    def __init__(self):
        super().__init__()
        self.model = _mlp(0.3)


def test_lr_find_before_fit_with_dropout_is_exact(tmp_path):
    """``Tuner.lr_find`` trains 20 steps (drawing masks) and restores the weights; the callback records only the
    real run, whose masks it captured."""
    module = DropoutTunable()
    start = {k: v.clone() for k, v in module.model.state_dict().items()}
    X, y = _data()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model", check_gradients=True)
    trainer = pl.Trainer(max_steps=4, precision="64-true", accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], default_root_dir=str(tmp_path))
    data = Loaders()
    Tuner(trainer).lr_find(module, datamodule=data, num_training=20, min_lr=1e-3, max_lr=0.5,
                           early_stop_threshold=None)
    trainer.fit(module, datamodule=data)
    traj = callback.trajectory
    assert module.lr != 0.2 and traj.n_steps == 4
    assert all(torch.equal(traj.params(0)[k], start[k]) for k in start)
    _assert_replayed_exact(module.model, traj)


def test_swa_starting_after_the_last_epoch_still_writes_into_the_model_and_is_warned(tmp_path):
    """``StochasticWeightAveraging(swa_epoch_start=5)`` in a 2-epoch run still writes weights into the model when
    training ends (a relative change of 0.3 and more): the recorder's warning names the callback and the fix."""
    module = CrossEntropyModule(_mlp(), _sgd)
    with pytest.warns(ExplaindWarning, match=r"changed outside optimizer.step\(\).*Here StochasticWeightAveraging "
                                             r"wrote the average.*Fix: explain the model at traj.params"):
        callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=2,
                           callbacks=[StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=5)])
    assert callback.trajectory.n_steps == 8
    note(outcome="loud: ExplaindWarning (SWA wrote weights although it never started)")


def test_gradient_clip_algorithm_value_without_a_clip_value_is_exact(tmp_path):
    """``gradient_clip_algorithm="value"`` with no ``gradient_clip_val`` clips nothing: not refused (the refusal of
    clipping by value is tests/test_lightning_options.py's)."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, gradient_clip_algorithm="value")
    _assert_exact(module.model, callback.trajectory)


class StopsAtOnce(CrossEntropyModule):
    """Asks to stop at every batch (as an early-stopping rule would); ``min_steps`` overrides it."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)

    def training_step(self, batch, batch_idx):
        self.trainer.should_stop = True
        return super().training_step(batch, batch_idx)


def test_min_steps_overriding_a_stop_request_is_exact(tmp_path):
    module = StopsAtOnce()
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=3, min_steps=5)
    assert trainer.global_step == 5 and _sizes(callback.trajectory) == [8, 8, 8, 1, 8]  # into the second epoch
    _assert_exact(module.model, callback.trajectory)


def test_combined_loader_in_sequential_mode_is_refused_by_lightning(tmp_path):
    """``CombinedLoader(mode="sequential")`` is refused by Lightning's fit loop itself, before any batch."""
    X, y = _data()
    loaders = {k: torch.utils.data.DataLoader(indexed(X, y), batch_size=4) for k in "ab"}
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")
    with pytest.raises(ValueError, match=r"does not support the `CombinedLoader\(mode=\"sequential\"\)` mode"):
        pl.Trainer(max_steps=2, precision="64-true", accelerator="cpu", devices=1, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[callback], default_root_dir=str(tmp_path)).fit(
            CrossEntropyModule(_mlp(), _sgd), CombinedLoader(loaders, "sequential"))
    note(outcome="loud: Lightning's ValueError (sequential mode)")


class GanShaped(CrossEntropyModule):
    """Manual optimization with ONE recorded optimizer over ``self.model``: per batch one step of each parameter
    subset (the first layer, then the last, the other's gradients set to ``None``); a critic ``nn.Linear(3, 1)``
    (not recorded) is trained by its own optimizer on the detached outputs."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.automatic_optimization = False
        torch.manual_seed(1)
        self.critic = nn.Linear(3, 1).double()
        self.critic_opt = torch.optim.SGD(self.critic.parameters(), lr=0.1)

    def configure_optimizers(self):
        return _sgd(self.model.parameters())

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for part in (self.model[0], self.model[3]):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.model(batch["x"]), batch["labels"]))
            for p in self.model.parameters():
                if all(p is not q for q in part.parameters()):
                    p.grad = None
            opt.step()
        self.critic_opt.zero_grad()
        (-self.critic(self.model(batch["x"]).detach()).mean()).backward()
        self.critic_opt.step()


def test_several_optimizer_steps_per_batch_in_manual_mode_are_exact(tmp_path):
    """Before: ``TrajectoryError`` "Step 1: optimizer.step() was called without a logged batch: call
    rec.log_batch(indices)"."""
    module = GanShaped()
    callback, trainer = _fit(tmp_path, module, accumulate=1, max_steps=6, callback_kwargs={"check_gradients": True})
    traj = callback.trajectory
    assert traj.n_steps == trainer.global_step == 6 and _sizes(traj) == [4] * 6
    assert traj.batch(0)[0].tolist() == traj.batch(1)[0].tolist()  # both subsets' steps on the batch
    moved = [sorted(n for n in traj.param_names if not torch.equal(traj.params(s)[n], traj.params(s + 1)[n]))
             for s in range(2)]
    assert moved == [["0.bias", "0.weight"], ["3.bias", "3.weight"]]
    assert max(traj.gradient_check()) <= 1e-12
    _assert_exact(module.model, traj)


class GradientNormAfterStep(CrossEntropyModule):
    """Manual optimization: one step per batch, then a backward on the batch only to log a gradient norm, zeroed."""

    def __init__(self):
        super().__init__(_mlp(), _sgd)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        for stepped in (True, False):
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.model(batch["x"]), batch["labels"]))
            if stepped:
                opt.step()
        self.log("grad_norm", sum(p.grad.norm() for p in self.model.parameters()))
        opt.zero_grad()


@pytest.mark.parametrize("check", [True, False])
def test_a_backward_after_the_step_whose_gradients_no_step_uses_is_not_recorded(tmp_path, check):
    """The batch logged again at the second backward is dropped when the batch ends without another step (as the
    run dropped those gradients)."""
    module = GradientNormAfterStep()
    callback, trainer = _fit(tmp_path, module, accumulate=1, callback_kwargs={"check_gradients": check})
    assert callback.trajectory.n_steps == trainer.global_step == 4 and _sizes(callback.trajectory) == [4] * 4
    _assert_exact(module.model, callback.trajectory)


class CompiledFloat32Loss(CrossEntropyModule):
    """``training_step`` through a compiled function whose loss casts the float64 outputs to float32."""

    def __init__(self, fullgraph: bool = False):
        super().__init__(_mlp(), _sgd)
        self._loss = torch.compile(self._float32_loss, backend="aot_eager", fullgraph=fullgraph)

    def _float32_loss(self, x, labels):
        return F.cross_entropy(self.model(x).float(), labels)

    def training_step(self, batch, batch_idx):
        return self._loss(batch["x"], batch["labels"])


def test_a_float32_cast_inside_a_compiled_training_function_is_warned_and_kept(tmp_path):
    """Under ``torch.compile`` the output-gradient probe still sees the gradient (its hooks break the graph): the
    float32 rounding is warned about once and noted in ``manifest.extras["output_rounding"]``."""
    module = CompiledFloat32Loss()
    with pytest.warns(ExplaindWarning, match=r"rounded to float32"):
        callback, _ = _fit(tmp_path, module, callback_kwargs={"check_gradients": True})
    traj = callback.trajectory
    assert "rounded to float32" in traj.manifest.extras["output_rounding"]
    assert 1e-10 < max(traj.gradient_check()) < 1e-7
    note(outcome="loud: ExplaindWarning (float32 loss inside a compiled function)")


def test_a_full_graph_compile_around_the_recorded_model_is_refused_by_torch_with_a_note_naming_the_fix(tmp_path):
    """``torch.compile(..., fullgraph=True)``: the recorder's forward hooks on the model break the graph, which a
    full graph forbids; torch refuses it (``Unsupported``) at the first training forward. Before, its message named
    a ctypes array and no fix; now the exception carries a note naming the recorder's hooks and the fix (compile
    without ``fullgraph``, the test above)."""
    torch._dynamo.reset()  # forget the frames the test above compiled from the same code without fullgraph
    with pytest.raises(torch._dynamo.exc.Unsupported) as caught:
        _fit(tmp_path, CompiledFloat32Loss(fullgraph=True))
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and "hook explaind's recorder placed on the recorded model" in notes[0]
    assert "Fix: compile without fullgraph=True" in notes[0]
    note(outcome="loud: torch's Unsupported with a note naming the recorder's hooks and the fix")


def test_a_compiled_model_inside_the_module_is_exact(tmp_path):
    """``self.model = torch.compile(mlp, backend="aot_eager")``: the callback records the ``OptimizedModule``,
    whose parameters are named ``_orig_mod.*``; every step's gradient check passes."""
    module = CrossEntropyModule(torch.compile(_mlp(), backend="aot_eager"), _sgd)
    callback, _ = _fit(tmp_path, module, callback_kwargs={"check_gradients": True})
    traj = callback.trajectory
    assert traj.param_names[0] == "_orig_mod.0.weight" and max(traj.gradient_check()) <= 1e-12
    _assert_exact(module.model, traj)
