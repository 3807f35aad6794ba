"""Lightning as people configure it, round 12: exact, or loud naming the cause and the fix.

The float64 MLP of tests/test_lightning_options.py (``self.model(batch["x"])``, the callback given
``train_data=(X, y)``), 25 samples in shuffled batches of 4, accumulation 2 unless a case says otherwise, gradient
check off (``_fit`` of tests/test_stranger_lightning_round5.py), so that nothing it measures hides a wrong weight.
"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9,
``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference (tests/reference.py). The figures go to
``_hf_stranger_kit.MEASURED`` (``python tests/frameworks_round12_table.py`` prints them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule
from _hf_stranger_kit import note
from lightning.pytorch.callbacks import StochasticWeightAveraging
from test_lightning_options import _mlp, _sgd
from test_stranger_lightning_round5 import _assert_exact, _fit, _sizes

from explaind.exceptions import ExplaindWarning

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:.*(does not have many workers|training_step. returned .None).*"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning")]


def _adamw(params):
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


class Restarts(CrossEntropyModule):
    """AdamW with a ``CosineAnnealingWarmRestarts(T_0=2)`` in a scheduler dict stepped per step; the rate of every
    step in ``rates``."""

    def __init__(self):
        super().__init__(_mlp(), _adamw)
        self.rates: list[float] = []

    def configure_optimizers(self):
        opt = _adamw(self.parameters())
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, eta_min=0.005)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_before_optimizer_step(self, optimizer):
        self.rates.append(optimizer.param_groups[0]["lr"])


def test_accumulation_3_with_a_per_step_restart_schedule_and_clipping_is_exact(tmp_path):
    """``accumulate_grad_batches=3`` over two epochs of 7 batches (steps of 3, 3 and 1 micro-batches, the last
    of 1 sample; Lightning divides the lone one by 3 too), the warm-restart schedule stepped per optimizer
    step, ``gradient_clip_val=0.05`` clipping by norm."""
    module = Restarts()
    callback, trainer = _fit(tmp_path, module, max_steps=-1, max_epochs=2, accumulate=3, gradient_clip_val=0.05)
    traj = callback.trajectory
    assert _sizes(traj) == [12, 12, 1] * 2 and trainer.global_step == 6
    assert module.rates[0] == module.rates[2] == 0.05 and module.rates[1] < 0.05  # restarted every 2 steps
    _assert_exact(module.model, traj)


def test_bf16_mixed_on_a_float64_module_is_exact(tmp_path):
    """``precision="bf16-mixed"`` runs ``training_step`` under bfloat16 autocast on the CPU, which casts float32
    operands only: the float64 module trains in float64, recorded with its autocast dtype and replayed so."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, _ = _fit(tmp_path, module, precision="bf16-mixed")
    assert {r.autocast for r in callback.trajectory.manifest.steps} == {"bfloat16"}
    _assert_exact(module.model, callback.trajectory)


def test_max_steps_inside_an_epoch_cut_by_a_fraction_of_batches_is_exact(tmp_path):
    """``limit_train_batches=0.6`` (4 of 7 batches an epoch) with accumulation 3: steps of 3 and 1 micro-batches,
    and ``max_steps=3`` ends the run inside the second epoch."""
    module = CrossEntropyModule(_mlp(), _sgd)
    callback, trainer = _fit(tmp_path, module, max_steps=3, max_epochs=5, accumulate=3, limit_train_batches=0.6)
    assert _sizes(callback.trajectory) == [12, 4, 12] and trainer.global_step == 3
    _assert_exact(module.model, callback.trajectory)


def test_fit_twice_with_adamw_and_a_per_step_schedule_records_the_second_run_from_the_first_ones_end(tmp_path):
    """``fit`` again on the same module with a new callback (continued training): Lightning builds a new AdamW and
    schedule, so the second run starts from the first one's weights with no optimizer state; exact."""
    module = Restarts()
    _fit(tmp_path, module, max_steps=3)
    after_first = {k: v.clone() for k, v in module.model.state_dict().items()}
    callback, _ = _fit(tmp_path, module, max_steps=3)
    traj = callback.trajectory
    assert all(torch.equal(traj.params(0)[k], after_first[k]) for k in after_first)
    assert not traj.initial_state()
    _assert_exact(module.model, traj)


class ManualAdamW(CrossEntropyModule):
    """Manual optimization: AdamW, two micro-batches a step each backpropagated undivided (the sum of the means),
    ``clip_gradients`` by norm and the scheduler stepped by hand after every optimizer step."""

    automatic_optimization = False

    def __init__(self):
        super().__init__(_mlp(), _adamw)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
        self.manual_backward(loss)
        if batch_idx % 2 == 1:
            self.clip_gradients(opt, gradient_clip_val=0.05, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
            self.lr_schedulers().step()
        return loss

    def configure_optimizers(self):
        opt = _adamw(self.parameters())
        return [opt], [torch.optim.lr_scheduler.ExponentialLR(opt, 0.8)]


def test_manual_optimization_with_adamw_undivided_means_and_clipping_is_exact_with_the_check(tmp_path):
    """The step trains on the sum of two means where the callback logs their mean (weights ``1 / (n_1 + n_2)``); the
    factor 2 and the clipping are one ``c_s`` the gradient check measures (on, as the callback's docs say)."""
    module = ManualAdamW()
    callback, _ = _fit(tmp_path, module, max_steps=4, accumulate=1, callback_kwargs={"check_gradients": "auto"})
    traj = callback.trajectory
    # the epoch's lone last batch (1 sample) is accumulated into the next epoch's first step, as the loop makes it
    assert traj.n_steps == 4 and _sizes(traj) == [8, 8, 8, 9]
    assert [len(traj.micro_batches(s)) for s in range(4)] == [2, 2, 2, 3]
    assert all(traj.grad_scale(s) < 3 for s in range(4))  # 2 or 3 means summed, times the clipping
    _assert_exact(module.model, traj)


def test_stochastic_weight_averaging_with_its_swalr_schedule_is_warned_and_the_trajectory_exact(tmp_path):
    """``StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)`` over three epochs: SWALR
    moves the rate from the second epoch (recorded as it is), and the average written into the model at the end is no
    step of the run: the recorder's warning names the callback, and the trajectory is exact at its last step."""
    module = CrossEntropyModule(_mlp(), _sgd)
    swa = StochasticWeightAveraging(swa_lrs=0.02, swa_epoch_start=1, annealing_epochs=1)
    with pytest.warns(ExplaindWarning, match=r"StochasticWeightAveraging"):
        callback, _ = _fit(tmp_path, module, max_steps=-1, max_epochs=3, callbacks=[swa])
    traj = callback.trajectory
    final = _mlp()
    final.load_state_dict({k.removeprefix("model."): v for k, v in traj.params(traj.n_steps).items()}, strict=False)
    assert not torch.equal(final[0].weight, module.model[0].weight)  # the model holds the average
    _assert_exact(final, traj, outcome="exact at traj.params(n_steps); SWA's average warned")
    note(outcome="loud: ExplaindWarning (SWA average) + exact at the last step")
