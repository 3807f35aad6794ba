"""Lightning Fabric and Hugging Face accelerate, round 11: exact, or loud naming the cause and the fix.

The runs train the float64 tanh MLP of tests/_stranger_loops_kit.py (24 samples, shuffled batches of 4 positions)
with the recorder of docs/guide_own_model.md ("Fabric and Accelerate"), through the helpers of
tests/test_fabric_accelerate.py. "Exact" is ``assert_exact`` of that kit: replica <= 1e-6 relative to the trained
model, residual share <= 1e-9 with no warning, ``keep=("train",)`` <= 1e-9 relative to the slow float64 loop
reference (tests/reference.py). The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_fabric_accelerate_round11.py`` prints them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _stranger_loops_kit import data, mlp
from test_fabric_accelerate import _accelerator, _exact, _fresh_accelerate_state, _loader, _record

fabric_mod = pytest.importorskip("lightning.fabric")
accelerate = pytest.importorskip("accelerate")

pytestmark = [pytest.mark.usefixtures("one_thread", "_fresh_accelerate_state"),
              pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
              pytest.mark.filterwarnings("ignore::UserWarning:accelerate")]

__all__ = ["_fresh_accelerate_state"]  # the fixture, imported for pytest


def test_fabric_setup_module_and_optimizers_apart_with_adamw_clipped_at_every_step_is_exact():
    """``fabric.setup_module`` and ``fabric.setup_optimizers`` called apart (as for FSDP), AdamW, two micro-batches a
    step under ``no_backward_sync`` with the loss divided by 2, ``fabric.clip_gradients(max_norm=1e-3)`` acting at
    every step: the division and the clipping are one factor ``c_s`` the default gradient check measures."""
    X, y, _ = data()
    net = mlp()
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision="32-true")
    model = fabric.setup_module(net)
    opt = fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1))
    loader = fabric.setup_dataloaders(_loader())
    rec = _record(model, opt)
    with rec:
        for _ in range(2):
            for i, idx in enumerate(loader):
                last = i % 2 == 1
                with fabric.no_backward_sync(model, enabled=not last):
                    fabric.backward(F.cross_entropy(model(X[idx]), y[idx]) / 2)
                rec.log_batch(idx)
                if last:
                    fabric.clip_gradients(model, opt, max_norm=1e-3)
                    opt.step()
                    opt.zero_grad()
    traj = rec.trajectory
    assert traj.n_steps == 6 and all(traj.grad_scale(s) < 0.5 for s in range(6))  # the 1/2 and the clipping
    _exact(net, traj)


def _accelerate_loop(acc, *, divide: int = 1, batch: int = 4, schedule: bool = False,
                     clip: float | None = None):
    """``prepare`` of the MLP, SGD momentum 0.9 (and a ``StepLR`` with ``schedule``) and the loader of positions;
    two epochs of ``with acc.accumulate(model)`` and ``acc.backward(loss / divide)``, clipping by norm at ``clip``
    when the gradients sync. Returns the model, the trajectory and the learning rate of every optimizer step."""
    X, y, _ = data()
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    objects = [net, opt, _loader(batch)] + ([torch.optim.lr_scheduler.StepLR(opt, 1, 0.9)] if schedule else [])
    model, aopt, loader, *scheduler = acc.prepare(*objects)
    rec, rates = _record(model, aopt), []
    with rec:
        for _ in range(2):
            for idx in loader:
                with acc.accumulate(model):
                    acc.backward(F.cross_entropy(model(X[idx]), y[idx]) / divide)
                    rec.log_batch(idx)
                    if acc.sync_gradients:
                        rates.append(aopt.param_groups[0]["lr"])
                        if clip is not None:
                            acc.clip_grad_norm_(model.parameters(), clip)
                    aopt.step()
                    for sched in scheduler:
                        sched.step()
                    aopt.zero_grad()
    return net, rec.trajectory, rates


def test_accelerate_sync_each_batch_with_clipping_is_exact():
    """``GradientAccumulationPlugin(num_steps=2, sync_each_batch=True)``: the gradients sync at every micro-batch
    (no ``no_sync``), accelerate still steps every second one; the clipping acts at every step."""
    plugin = accelerate.utils.GradientAccumulationPlugin(num_steps=2, sync_each_batch=True)
    net, traj, _ = _accelerate_loop(_accelerator(gradient_accumulation_plugin=plugin), clip=0.05)
    assert [len(traj.micro_batches(s)) for s in range(traj.n_steps)] == [2] * 6
    assert all(traj.grad_scale(s) < 0.5 for s in range(traj.n_steps))
    _exact(net, traj)


def test_accelerate_split_batches_is_exact():
    """``DataLoaderConfiguration(split_batches=True)``: the loader's batch of 8 is split over the processes (one
    here, so it keeps 8), accumulation 3 over epochs of 3 micro-batches."""
    config = accelerate.utils.DataLoaderConfiguration(split_batches=True)
    net, traj, _ = _accelerate_loop(_accelerator(dataloader_config=config, gradient_accumulation_steps=3),
                                    batch=8)
    assert [traj.batch(s)[0].numel() for s in range(traj.n_steps)] == [24, 24]
    _exact(net, traj)


def test_accelerate_stepping_the_scheduler_at_every_micro_batch_is_exact():
    """``Accelerator(step_scheduler_with_optimizer=False)``: the prepared ``StepLR`` steps at every micro-batch, so
    the rate falls by ``0.9 ** 2`` between two optimizer steps; the recorder reads the rate each step used."""
    acc = _accelerator(gradient_accumulation_steps=2, step_scheduler_with_optimizer=False)
    net, traj, rates = _accelerate_loop(acc, schedule=True)
    assert rates[:3] == pytest.approx([0.1 * 0.9, 0.1 * 0.9 ** 3, 0.1 * 0.9 ** 5])
    _exact(net, traj)


def test_accelerate_with_a_loss_the_loop_divides_too_is_exact_with_the_check():
    """The loop divides the loss by 3 itself and ``accelerator.backward`` divides it again: the step's gradient is
    ``1/9`` of the micro-batches' means, one factor the default gradient check measures."""
    net, traj, _ = _accelerate_loop(_accelerator(gradient_accumulation_steps=3), divide=3)
    assert [round(traj.grad_scale(s), 12) for s in range(traj.n_steps)] == [round(1 / 9, 12)] * 4
    _exact(net, traj)
