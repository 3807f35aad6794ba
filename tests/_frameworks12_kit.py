"""Helpers of tests/test_frameworks_round12.py and tests/test_frameworks_round12_more.py.

An accelerate loop written as accelerate's documentation teaches it, over an ``IndexedDataset`` of mapping items
(``{"x": ..., "labels": ...}``) whose batches carry their positions; a model that draws NEFTune's noise in a layer of
its own; and the float64 data these runs share (the 25 samples of tests/test_trainer_options.py). The exactness checks
are those of the earlier rounds (``_assert_exact`` of tests/test_stranger_hf_round5.py and
tests/test_stranger_lightning_round5.py), against the slow float64 loop references of tests/_hf_testkit.py and
tests/reference.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import accelerate
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from test_trainer_options import BATCH, DT, OwnLossMLP, _data
from torch import Tensor, nn
from transformers import get_linear_schedule_with_warmup
from transformers.modeling_outputs import SequenceClassifierOutput

import explaind
from explaind.integrations.data import INDEX_KEY

__all__ = ["AccelerateRun", "NoisyEmbeddingClassifier", "accelerate_loop", "accelerate_resumed_mid_epoch",
           "reset_accelerate", "token_items"]


def reset_accelerate() -> None:
    """Forget accelerate's per-process state (another precision or accumulation needs a fresh one)."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


@dataclass
class AccelerateRun:
    """What :func:`accelerate_loop` returns: the trained model (``accelerator.unwrap_model``), the trajectory, the
    positions of every micro-batch in the order the prepared loader served them, and the rate of every step."""

    model: nn.Module
    traj: Any
    served: list[list[int]] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)


def accelerate_loop(*, epochs: int = 2, clip: float | None = 0.05, optimizer: str = "adamw",
                    model: nn.Module | None = None, give: str = "prepared", clip_every_micro_batch: bool = False,
                    check_gradients: bool | str = "auto", accumulate: bool = True,
                    **accelerator_kwargs: Any) -> AccelerateRun:
    """The loop of accelerate's documentation on the 25 float64 samples, batches of 4 from a shuffled loader:
    ``prepare(model, optimizer, loader, scheduler)`` (AdamW with weight decay or SGD momentum, transformers' linear
    schedule with a step of warm-up), ``with accelerator.accumulate(model)``, ``accelerator.backward(outputs.loss)``
    (the model's own mean loss), ``accelerator.clip_grad_norm_`` when the gradients sync, ``optimizer.step()``,
    ``scheduler.step()``, ``optimizer.zero_grad()``. What the user adds to record it: the recorder, and two lines in
    the loop, ``idx = batch.pop("explaind_index")`` before the forward and ``rec.log_batch(idx)`` after the backward.
    ``give``: the recorder gets the prepared objects (``"prepared"``) or ``accelerator.unwrap_model(model)`` and the
    torch optimizer (``"unwrapped"``). ``clip_every_micro_batch``: ``clip_grad_norm_`` at every micro-batch, not only
    when the gradients sync (a habit accelerate's docs warn against: it clips partial sums of the step's gradient);
    ``check_gradients``: the recorder's setting; ``accumulate=False``: the loop without
    ``accelerator.accumulate``. Every batch's inputs are compared with the rows of its positions."""
    X, y = _data()
    train = indexed(X, y)
    net = model if model is not None else OwnLossMLP()
    opt = (torch.optim.AdamW(net.parameters(), lr=0.05, weight_decay=0.1) if optimizer == "adamw"
           else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    acc = accelerate.Accelerator(cpu=True, **accelerator_kwargs)
    schedule = get_linear_schedule_with_warmup(opt, 1, 8)
    prepared, aopt, loader, sched = acc.prepare(net, opt, loader, schedule)
    recorded = (prepared, aopt) if give == "prepared" else (acc.unwrap_model(prepared), opt)
    rec = explaind.TrajectoryRecorder(*recorded, loss="cross_entropy", train_data=train.train_data(),
                                      check_gradients=check_gradients)
    run = AccelerateRun(net, None)
    with rec:
        for epoch in range(epochs):
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(epoch)
            for batch in loader:
                idx = batch.pop(INDEX_KEY)
                if not torch.equal(batch["x"], X[idx]):
                    raise AssertionError(f"the batch's rows are not those of its positions {idx.tolist()}")
                run.served.append(idx.tolist())
                with acc.accumulate(prepared) if accumulate else contextlib.nullcontext():
                    acc.backward(prepared(**batch).loss)
                    rec.log_batch(idx)
                    if acc.sync_gradients:
                        run.rates.append(float(aopt.param_groups[0]["lr"]))
                    if clip is not None and (acc.sync_gradients or clip_every_micro_batch):
                        acc.clip_grad_norm_(prepared.parameters(), clip)
                    aopt.step()
                    sched.step()
                    aopt.zero_grad()
    run.model, run.traj = acc.unwrap_model(prepared), rec.trajectory
    return run


def token_items(n: int = 25, length: int = 6, vocab: int = 11) -> tuple[dict[str, Tensor], Tensor]:
    """``n`` rows of ``length`` token ids and a class label each (seeded)."""
    gen = torch.Generator().manual_seed(4)
    return {"input_ids": torch.randint(0, vocab, (n, length), generator=gen)}, torch.randint(0, 3, (n,), generator=gen)


class NoisyEmbeddingClassifier(nn.Module):
    """NEFTune written as a layer of the model: token embeddings (float64), plus in training mode uniform noise of
    scale ``alpha / sqrt(length * width)`` drawn with ``torch.rand`` (what the Trainer's ``neftune_noise_alpha`` adds
    through a forward hook), mean-pooled, then ``Linear - Tanh - Linear``; returns the mean cross entropy too.
    ``get_input_embeddings`` is there so the Trainer could hook it."""

    def __init__(self, alpha: float = 5.0, vocab: int = 11, width: int = 6):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width).to(DT)
        self.head = nn.Sequential(nn.Linear(width, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
        self.alpha = alpha

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: Tensor, labels: Tensor | None = None) -> SequenceClassifierOutput:
        h = self.embed(input_ids)
        if self.training and self.alpha:
            scale = self.alpha / (h.shape[1] * h.shape[2]) ** 0.5
            h = h + (2 * torch.rand(h.shape, dtype=h.dtype) - 1) * scale
        logits = self.head(h.mean(dim=1))
        return SequenceClassifierOutput(loss=None if labels is None else F.cross_entropy(logits, labels),
                                        logits=logits)


def accelerate_resumed_mid_epoch(state_dir: str, *, k: int = 3, first_steps: int = 1) -> AccelerateRun:
    """accelerate's documented resume inside an epoch: ``first_steps`` steps of ``k`` micro-batches trained (SGD
    momentum 0.9, not recorded) and ``accelerator.save_state(state_dir)``; then a new model, optimizer, loader and
    accelerator, ``accelerator.load_state(state_dir)`` (the momentum restored), ``accelerator.skip_first_batches``
    over the micro-batches already trained, and the rest of the epoch plus one more recorded."""
    X, y = _data()
    train = indexed(X, y)

    def prepared():
        reset_accelerate()
        net = OwnLossMLP()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True,
                                             generator=torch.Generator().manual_seed(1))
        acc = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=k)
        return (net, acc, *acc.prepare(net, opt, loader))

    def steps(acc, model, opt, batches, rec=None):
        served = []
        for batch in batches:
            idx = batch.pop(INDEX_KEY)
            served.append(idx.tolist())
            with acc.accumulate(model):
                acc.backward(model(**batch).loss)
                if rec is not None:
                    rec.log_batch(idx)
                opt.step()
                opt.zero_grad()
        return served

    _, acc, model, opt, loader = prepared()
    steps(acc, model, opt, [b for _, b in zip(range(first_steps * k), loader)])
    acc.save_state(state_dir)
    net, acc, model, opt, loader = prepared()
    acc.load_state(state_dir)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=train.train_data())
    with rec:
        served = steps(acc, model, opt, acc.skip_first_batches(loader, first_steps * k), rec)
        served += steps(acc, model, opt, loader, rec)
    return AccelerateRun(acc.unwrap_model(model), rec.trajectory, served)
