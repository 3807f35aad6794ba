"""Hugging Face ``Trainer`` as people configure it, round 6: exact, or loud naming the cause and the fix.

Most runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: an epoch of 7 micro-batches has steps of 3, 3 and 1; SGD momentum 0.9, gradient check off
unless a case needs it, through ``_train`` and ``_quiet`` of tests/test_stranger_hf_round5.py). The token runs use
the tiny GPT-2 of tests/_hf_testkit.py. "Exact": replica <= 1e-6 relative to the trained model in evaluation mode,
residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference
(``MappingReference``). The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_hf_round6.py`` prints them).
"""

from __future__ import annotations

import pytest
import torch
from _framework_testkit import indexed
from _hf_stranger_kit import note
from _hf_testkit import N_TRAIN, lm_data, lm_figures, tiny_gpt2, trainer_args
from test_stranger_hf_round5 import _assert_exact, _quiet
from test_trainer_options import OwnLossMLP, _data, _train
from torch import Tensor, nn

from explaind.exceptions import TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _sizes(traj) -> list[int]:
    return [traj.batch(s)[0].numel() for s in range(traj.n_steps)]


OPTIONS = {  # TrainingArguments no other test sets
    "include_num_input_tokens_seen": dict(include_num_input_tokens_seen=True),
    "torch_empty_cache_steps_1": dict(torch_empty_cache_steps=1),
    "average_tokens_across_devices": dict(average_tokens_across_devices=True),
    "label_names": dict(label_names=["labels"]),
    "prediction_loss_only_with_evaluation": dict(prediction_loss_only=True, eval_strategy="steps", eval_steps=1),
}


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_trainer_options_are_exact(tmp_path, option):
    settings = dict(OPTIONS[option])
    model, traj, trainer = _train(tmp_path, callback_kwargs={"check_gradients": False},
                                  evaluate="eval_strategy" in settings, **settings)
    assert traj.n_steps == trainer.state.global_step == 4 and _sizes(traj) == [12, 12, 1, 12]
    _assert_exact(model, traj)


def test_an_optimizer_and_scheduler_passed_to_the_trainer_are_exact(tmp_path):
    X, y = _data()
    model = OwnLossMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    transformers.Trainer(model=model, args=_quiet(tmp_path), train_dataset=indexed(X, y), callbacks=[callback],
                         optimizers=(opt, schedule)).train()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 16)  # the scheduler stepped after every step
    _assert_exact(model, callback.trajectory)


class LoRALinear(nn.Module):
    """``base(x) + (x A^T) B^T * scale`` with ``base`` frozen and ``B`` zero at the start (a hand-written LoRA)."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 2.0):
        super().__init__()
        self.base, self.scale = base, scale
        base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.3)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + (x @ self.A.T) @ self.B.T * self.scale


def test_a_hand_written_lora_adapter_on_a_frozen_base_is_exact(tmp_path):
    model = OwnLossMLP()
    torch.manual_seed(1)
    model.net[0], model.net[3] = LoRALinear(model.net[0]), LoRALinear(model.net[3])
    model, traj, _ = _train(tmp_path, model, callback_kwargs={"check_gradients": True},
                            optim="adamw_torch", optim_args=None, learning_rate=0.05)
    assert set(traj.param_names) == {"net.0.A", "net.0.B", "net.3.A", "net.3.B"}  # the frozen base: constants
    _assert_exact(model, traj)


class Items(torch.utils.data.IterableDataset):
    """The indexed items in a seeded random order, as an iterable dataset (no ``__len__``)."""

    def __init__(self):
        self.items = indexed(*_data())

    def __iter__(self):
        for i in torch.randperm(len(self.items), generator=torch.Generator().manual_seed(5)).tolist():
            yield self.items[i]


def test_an_iterable_dataset_is_refused_on_the_models_mean_then_exact_with_the_callbacks_loss(tmp_path):
    """Without a length the Trainer runs every step on 3 micro-batches, across the end of the data: the step that
    holds the 7th (last) batch has 4, each divided by 3. Refused naming ``compute_loss_func``, then exact with it."""
    X, y = _data()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    with pytest.raises(TrajectoryError, match=r"Step 2: the Trainer ran 4 micro-batches.*Fix: pass "
                                              r"compute_loss_func=callback.compute_loss"):
        transformers.Trainer(model=OwnLossMLP(), args=_quiet(tmp_path, max_steps=3), train_dataset=Items(),
                             callbacks=[callback]).train()
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    transformers.Trainer(model=model, args=_quiet(tmp_path, max_steps=3), train_dataset=Items(),
                         callbacks=[callback], compute_loss_func=callback.compute_loss).train()
    traj = callback.trajectory
    order = torch.randperm(25, generator=torch.Generator().manual_seed(5))
    assert traj.batch(0)[0].tolist() == order[:12].tolist()
    _assert_exact(model, traj, outcome="loud: TrajectoryError; exact with compute_loss_func=callback.compute_loss")


class HalveRate(transformers.TrainerCallback):
    """Set the learning rate of every group to ``0.1 / 2**step`` right before each optimizer step (a hand-made
    schedule over the Trainer's constant one)."""

    def __init__(self):
        self.rates: list[float] = []

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            group["lr"] = 0.1 / 2 ** state.global_step
        self.rates.append(optimizer.param_groups[0]["lr"])


class ShrinkWeights(transformers.TrainerCallback):
    """Multiply the first layer's weight by 0.9 after step 2 (an edit of the model outside the optimizer)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == 2:
            with torch.no_grad():
                model.net[0].weight.mul_(0.9)


def test_a_callback_that_changes_the_learning_rate_mid_run_is_exact(tmp_path):
    rates = HalveRate()
    model, traj, _ = _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[rates])
    assert rates.rates == [0.1, 0.05, 0.025, 0.0125]
    _assert_exact(model, traj)


def test_a_callback_that_edits_the_weights_mid_run_is_refused_at_the_next_step(tmp_path):
    with pytest.raises(TrajectoryError, match=r"Step 2: .*net.0.weight.*changed outside optimizer.step"):
        _train(tmp_path, callback_kwargs={"check_gradients": False}, extra_callbacks=[ShrinkWeights()])
    note(outcome="loud: TrajectoryError")


def test_early_stopping_mid_epoch_without_loading_the_best_model_is_exact(tmp_path):
    """``EarlyStoppingCallback`` on an evaluation every step, stopping inside the first epoch at a large rate."""
    model, traj, trainer = _train(
        tmp_path, callback_kwargs={"check_gradients": False}, evaluate=True, eval_strategy="steps", eval_steps=1,
        metric_for_best_model="eval_loss", greater_is_better=False, learning_rate=2.0, max_steps=20,
        gradient_accumulation_steps=1, extra_callbacks=[transformers.EarlyStoppingCallback(early_stopping_patience=1)])
    assert traj.n_steps == trainer.state.global_step < 7  # stopped before the epoch's 7 steps ended
    _assert_exact(model, traj)


def test_resize_token_embeddings_before_training_is_exact(tmp_path):
    """GPT-2 with its (tied) embeddings resized from 30 to 37 tokens before the Trainer runs."""
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2()
    model.resize_token_embeddings(37, mean_resizing=False)
    model.double()
    assert model.get_input_embeddings().weight.shape[0] == 37 and model.lm_head.weight.shape[0] == 37
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    transformers.Trainer(model=model, args=trainer_args(tmp_path, per_device_train_batch_size=4, max_steps=3,
                                                        learning_rate=1e-2), train_dataset=data,
                         callbacks=[callback], compute_loss_func=callback.compute_loss).train()
    got = lm_figures(model, callback.trajectory)
    note(replica=got["replica"], share=got["residual_share"], train=got["train"], outcome="exact")
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9
