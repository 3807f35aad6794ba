r"""Per-sample gradients through the replayed batched training forward (dropout, batch norm; docs/maths.md).

With dropout or batch norm in training mode the gradient the optimizer saw is that of
:math:`L_s(\theta) = \sum_k w_k \ell_k(F(X_B; \theta, \xi_s))`: ``F`` is the *batched* forward (batch
statistics couple the samples) and :math:`\xi_s` the random state of the micro-batch's forward
(dropout masks). The atom of sample ``k`` is the gradient of its own loss term through that shared
forward,

.. math::

    G_k = w_k \frac{\partial}{\partial\theta} \ell_k\big(F(X_B; \theta, \xi_s)\big)\Big|_{\theta_s},
    \qquad \sum_k G_k = \nabla_\theta L_s(\theta_s),

so the atoms add up to the batch gradient exactly. :func:`coupled_sample_grads` runs one batched
forward per micro-batch, on a training-mode copy of the model with copies of the recorded buffers
:math:`\beta_s` the step started from, carried from micro-batch to micro-batch (a forward that reads
buffers it updates, like spectral norm's power iteration, sees what the loop's saw; nothing of the
recorded model is mutated), under the recorded state (:func:`~explaind.trajectory._random.replayed`), and takes the
``B`` gradients as one batched backward with cotangents :math:`w_k e_k` (``is_grads_batched``,
chunked by ``chunk_size``). :func:`step_replay` says which steps need it and refuses steps that
cannot be replayed.

A batch-coupled loss (:func:`explaind.batch_coupled_loss`; docs/maths.md, "Batch-coupled losses") couples the
samples through the loss instead: :math:`\ell_k` reads the whole micro-batch's outputs. Its atoms are the same
:math:`G_k`, every step goes through :func:`coupled_sample_grads`, and a micro-batch without a training forward to
replay (no dropout or batch norm captured) is one batched forward in evaluation mode (``state`` ``None``), as
the per-sample path recomputes any loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import call_model
from ..outputs import model_output
from ..trajectory._coupled_loss import is_batch_coupled, term_parts
from ..trajectory._random import RandomState, replay_parts, replayed, resolve_generators
from .explained import FunctionalModel, Params
from .layout import ParamLayout

__all__ = ["Replay", "step_replay", "coupled_sample_grads", "replayed_losses", "start_buffers", "training_module"]


@dataclass(frozen=True)
class Replay:
    """How to recompute step ``step``'s batch: micro-batch positions ``[lo, hi)`` in the batch and their states.

    ``generators`` names the run's private generators (``manifest.generators``) and ``extra`` holds
    those passed to the recorder (``traj.generators``); both are resolved on the replayed module.
    ``buffers`` holds the recorded buffers :math:`\beta_s` the step's first forward started from.
    """

    step: int
    parts: tuple[tuple[int, int, RandomState | None], ...]
    generators: tuple[str, ...] = ()
    extra: tuple[torch.Generator, ...] = ()
    buffers: tuple[tuple[str, Tensor], ...] = ()


def step_replay(traj: Any, s: int) -> Replay | None:
    """The :class:`Replay` of step ``s``, or ``None`` when it needs none.

    None is needed without dropout or batch norm, without captured states, or when every forward
    of the step ran in evaluation mode, unless the loss is batch-coupled: then its micro-batches are
    always taken as a whole (their states ``None`` when not replayed).

    Raises
    ------
    TrajectoryError
        When the run captured random states but a micro-batch of step ``s`` saw no or several
        training forwards between two ``log_batch`` calls: its masks and batch statistics are not known.
    """
    manifest = traj.manifest
    parts: Any = None
    if getattr(manifest, "random_capture", False) and getattr(manifest, "coupled", None):
        parts = replay_parts(traj.micro_batches(s), manifest.coupled, f"Step {s}")
    if parts is None and is_batch_coupled(traj.loss):
        parts = term_parts(traj.micro_batches(s))
    if parts is None:
        return None
    return Replay(s, parts, tuple(getattr(manifest, "generators", ())), tuple(traj.generators),
                  tuple(traj.buffers(s).items()))


def training_module(fm: FunctionalModel) -> nn.Module:
    """A copy of ``fm``'s module with every submodule in training mode (cached on ``fm``)."""
    cached = getattr(fm, "_training_module", None)
    if cached is None:
        cached = fm.copy(fm.module).train()
        fm._training_module = cached  # type: ignore[attr-defined]
    return cached


def start_buffers(fm: FunctionalModel, replay: Replay) -> Params:
    r"""Copies of every buffer of ``fm``'s module as the step's first training forward found them (:math:`\beta_s`)."""
    names = {n for n, _ in training_module(fm).named_buffers()}
    values = {**fm.constants, **{n: fm.cast(t) for n, t in replay.buffers}}
    return {n: t.clone() for n, t in values.items() if n in names}


def replayed_losses(fm: FunctionalModel, point: Params, X: Any, Y: Tensor, state: RandomState | None,
                    replay: Replay, buffers: Params) -> Tensor:
    r"""Per-sample losses :math:`\ell_k(F(X; \theta, \xi))` of one micro-batch, ``(n,)``, differentiable in ``point``.

    One batched forward of the training-mode copy (:func:`training_module`) at the parameters
    ``point`` under the recorded state ``state`` (the private generators of ``replay`` included).
    The forward reads and updates ``buffers`` in place (batch norm's running statistics, spectral
    norm's power iteration), so passing the same dict to the micro-batches of a step in order carries
    the buffers from one to the next as in the loop (they replace buffer entries of ``point``; a step
    starts from :func:`start_buffers`). Nothing of ``fm`` or ``point`` changes. With ``state`` ``None`` (a
    batch-coupled loss's micro-batch without a training forward to replay) the forward is ``fm``'s own, in
    evaluation mode, as for the per-sample losses.
    """
    if state is None:
        with torch.enable_grad():
            return fm.sample_loss(point, X, Y)
    module = training_module(fm)
    where = f"Step {replay.step}"
    generators = resolve_generators(replay.generators, module, replay.extra, where)
    state_dict = {**fm.constants, **point, **buffers}
    with torch.enable_grad(), replayed(state, fm.device, where, generators), fm.rewritten():
        losses = fm.loss_fn(model_output(call_model(module, state_dict, X)), Y)
    return losses.reshape(-1)


def coupled_sample_grads(fm: FunctionalModel, theta: Params, block: ParamLayout, batch: Any,
                         chunk_size: int | None, summed: bool = False) -> Tensor:
    r""":math:`G_k` (weights :math:`c_s w_{s,k}` included) on ``block``, ``(B, D_b)``; with ``summed`` their sum.

    ``batch`` is a :class:`~explaind.kernel.evaluate.Batch` whose ``replay`` is a :class:`Replay`.
    """
    names = block.names
    B = batch.weights.shape[0]
    out = torch.zeros((block.size,) if summed else (B, block.size), dtype=fm.dtype, device=fm.device)
    buffers = start_buffers(fm, batch.replay)  # carried through the micro-batches in order
    for lo, hi, state in batch.replay.parts:
        point = {n: (t.detach().requires_grad_(True) if n in names else t.detach()) for n, t in theta.items()}
        losses = replayed_losses(fm, point, batch.X[lo:hi], batch.Y[lo:hi], state, batch.replay, buffers)
        w = batch.weights[lo:hi].to(losses.dtype)
        inputs = [point[n] for n in names]
        if summed:
            grads = torch.autograd.grad((w * losses).sum(), inputs, allow_unused=True)
            out += block.flatten(_filled(names, grads, point))
            continue
        n = hi - lo
        step = chunk_size or n
        for c in range(0, n, step):
            rows = torch.arange(c, min(c + step, n), device=fm.device)
            cot = torch.zeros(rows.shape[0], n, dtype=losses.dtype, device=fm.device)
            cot[torch.arange(rows.shape[0], device=fm.device), rows] = w[rows]
            grads = torch.autograd.grad(losses, inputs, grad_outputs=cot, is_grads_batched=True, retain_graph=True,
                                        allow_unused=True)
            out[lo + c:lo + c + rows.shape[0]] = block.flatten(_filled(names, grads, point, rows.shape[0]), lead=1)
    return out


def _filled(names: Any, grads: Any, point: Params, lead: int | None = None) -> Params:
    """``name -> gradient`` with zeros for parameters the loss does not reach."""
    out = {}
    for n, g in zip(names, grads):
        if g is None:
            shape = point[n].shape if lead is None else (lead, *point[n].shape)
            g = torch.zeros(shape, dtype=point[n].dtype, device=point[n].device)
        out[n] = g
    return out
