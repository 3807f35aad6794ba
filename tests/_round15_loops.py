"""Loops of the fifteenth round (tests/_round15_cases.py): training steps written as popular training code writes
them (timm's training script, Hinton's distillation, GANs, SAM through ``.data``, schedulers stepped per batch,
a forgotten ``zero_grad()``).

A step is ``step(s, model, opt, X, y, idx, rec)`` as in tests/_stranger_loops_kit.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _round15_models import GAN, TEMPERATURE, ModelEmaV2, kd_loss, teacher
from _stranger_loops_kit import batches, data

import explaind


def timm_step(ema: ModelEmaV2, max_norm: float = 0.5) -> Callable:
    """timm's ``train_one_epoch`` without autocast: ``zero_grad(set_to_none=False)``, ``backward()``,
    ``clip_grad_norm_(..., error_if_nonfinite=True)``, the step, then ``model_ema.update(model)`` and a forward of
    the EMA on the test inputs (its validation)."""
    _, _, X_test = data()

    def step(s, model, opt, X, y, idx, rec):
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, error_if_nonfinite=True)
        rec.log_batch(idx)
        opt.step()
        ema.update(model)
        with torch.no_grad():
            ema.module(X_test)
    return step


def kd_in_loop_step(s, model, opt, X, y, idx, rec, _teacher=[]) -> None:  # noqa: B006 - one teacher per run
    """Distillation as the loop writes it: the teacher's logits under ``torch.no_grad()``, KL on temperature-scaled
    logits added to the cross entropy (``loss="cross_entropy"`` given to the recorder)."""
    if not _teacher:
        _teacher.append(teacher())
    with torch.no_grad():
        t = _teacher[0](X[idx])
    out = model(X[idx])
    opt.zero_grad()
    kd_loss(torch.cat([out, t], 1), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def kd_step(s, model, opt, X, y, idx, rec) -> None:
    """The step of the :class:`~_round15_models.Distilled` model: ``kd_loss`` on its columns."""
    opt.zero_grad()
    kd_loss(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    opt.step()


def validation_mid_step(s, model, opt, X, y, idx, rec) -> None:
    """A validation forward of the test inputs under ``torch.no_grad()``, the model still in training mode (dropout
    drawing), between ``backward()`` and the step."""
    _, _, X_test = data()
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    with torch.no_grad():
        model(X_test)
    rec.log_batch(idx)
    opt.step()


def hand_smoothed_targets(s, model, opt, X, y, idx, rec) -> None:
    """Label smoothing written by hand: ``0.8 * one_hot + 0.2 / 3`` soft targets, ``-(soft * log_softmax).sum(1)``."""
    opt.zero_grad()
    out = model(X[idx])
    soft = F.one_hot(y[idx], 3).to(out.dtype) * 0.8 + 0.2 / 3
    (-(soft * F.log_softmax(out, 1)).sum(1).mean()).backward()
    rec.log_batch(idx)
    opt.step()


def scheduler_before_step(s, model, opt, X, y, idx, rec, _held=[]) -> None:  # noqa: B006 - one scheduler per run
    """``scheduler.step()`` called before ``optimizer.step()`` (torch warns about the order): ``StepLR(1, 0.5)``."""
    if not _held or _held[0].optimizer is not opt:
        _held[:] = [torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)]
    opt.zero_grad()
    F.cross_entropy(model(X[idx]), y[idx]).backward()
    rec.log_batch(idx)
    _held[0].step()
    opt.step()


def forgotten_zero_grad(at: int) -> Callable:
    """The textbook step with ``optimizer.zero_grad()`` left out at step ``at`` (the previous step's gradient
    carried into this one)."""
    def step(s, model, opt, X, y, idx, rec):
        if s != at:
            opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
    return step


def scheduled_per_batch(make_sched: Callable[[Any], Any], metric: bool = False) -> Callable:
    """The textbook step with ``sched.step()`` after every batch (``metric``: ``sched.step(loss.item())``, as
    ``ReduceLROnPlateau`` is stepped); the scheduler is made on the first call."""
    held: list[Any] = []

    def step(s, model, opt, X, y, idx, rec):
        if not held:
            held.append(make_sched(opt))
        opt.zero_grad()
        loss = F.cross_entropy(model(X[idx]), y[idx])
        loss.backward()
        rec.log_batch(idx)
        opt.step()
        held[0].step(loss.item()) if metric else held[0].step()
    return step


def gan_train(model: GAN, recorded: str, check_gradients: Any = "auto",
              saved: list[dict[str, torch.Tensor]] | None = None) -> Any:
    """A GAN as its tutorials write it: per step, noise ``z`` (its own generator), the discriminator's step on the
    real batch and ``G(z).detach()`` (BCE against 1 and 0, its optimizer ``opt_D``, Adam), then the generator's on
    ``D(G(z))`` against 1 (``opt_G``, Adam). One recorder over the whole GAN given ``opt_D`` (``recorded="D"``) or
    the discriminator alone with ``opt_D`` (``"D_only"``); the real points are ``train_data`` with targets 1.
    ``saved``: the discriminator's ``state_dict`` is appended before the run and after every step of ``opt_D``."""
    X, _, _ = data()
    ones = torch.ones(X.shape[0])
    opt_D = torch.optim.Adam(model.D.parameters(), lr=0.01)
    opt_G = torch.optim.Adam(model.G.parameters(), lr=0.01)
    target = model if recorded == "D" else model.D
    from _round15_models import real_logit_loss
    rec = explaind.TrajectoryRecorder(target, opt_D, loss=real_logit_loss, train_data=(X, ones),
                                      check_gradients=check_gradients)
    gen = torch.Generator().manual_seed(9)
    if saved is not None:
        saved.append({k: v.detach().clone() for k, v in model.D.state_dict().items()})
    with rec:
        for idx in batches():
            z = torch.randn(len(idx), 2, generator=gen, dtype=X.dtype)
            opt_D.zero_grad()
            fake = model.G(z).detach()
            real_out, fake_out = model.D(X[idx])[:, 0], model.D(fake)[:, 0]
            loss_D = (F.binary_cross_entropy_with_logits(real_out, torch.ones_like(real_out))
                      + F.binary_cross_entropy_with_logits(fake_out, torch.zeros_like(fake_out)))
            loss_D.backward()
            rec.log_batch(idx)
            opt_D.step()
            if saved is not None:
                saved.append({k: v.detach().clone() for k, v in model.D.state_dict().items()})
            opt_G.zero_grad()
            g_out = model.D(model.G(z))[:, 0]
            F.binary_cross_entropy_with_logits(g_out, torch.ones_like(g_out)).backward()
            opt_G.step()
    return rec.trajectory


__all__ = ["TEMPERATURE", "forgotten_zero_grad", "gan_train", "kd_in_loop_step", "kd_step", "scheduled_per_batch",
           "hand_smoothed_targets", "scheduler_before_step", "timm_step", "validation_mid_step"]
