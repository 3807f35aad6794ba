r"""Salvage's third proof: replaying a step's recorded update (docs/recording.md, "Salvaging a damaged store").

A step file written before schema 3 binds no run, so where its journal line was lost nothing in the store vouches
for it (:mod:`~explaind.trajectory._salvage`). What can still be proven is that it *continues the run*: the step
before it is proven, and the step file holds the batch :math:`B_s`, the gradient scale :math:`c_s`, the optimizer's
coefficients and :math:`\theta_{s+1}`. From the model, the training data and the loss (``Trajectory.salvage(...,
replay=True)``; the store's own ``data.safetensors`` and architecture spec where it holds them) the gradient is
recomputed,

.. math::

    g_s = c_s \sum_{k \in B_s} w_{s,k} \nabla\ell_k(\theta_s),

and the update audit of the recorder (:class:`~explaind.trajectory._audit.UpdateAudit`, the linear recurrence of
docs/maths.md §3 with :math:`m_{-1}` from the start files) measures

.. math::

    r_s = \|\Delta\theta_s - \widehat{\Delta\theta}_s\| / \|\Delta\theta_s\|,
    \qquad \Delta\theta_s = \theta_{s+1} - \theta_s .

A step is proven by replay when :math:`r_s` is at most the tolerance of the recorder's gradient check (1e-7 in
float64, 1e-3 in float32): :math:`\theta_{s+1}` is then the update of :math:`\theta_s` by the recorded batch under
the recorded coefficients, to that relative precision. What replay does not prove: bytes of :math:`\theta_{s+1}`
below that precision (a flipped low mantissa bit moves :math:`r_s` by less than the tolerance), the coefficients'
values where they do not enter the modelled update, the record's informational fields (``audit``,
``gradient_check``, ``loss_scale``) and the optimizer state written after the step (it is not replayed: a resume of
the salvaged store continues from the newest step kept with a proven state and records the replayed steps again).
A step file of another run, or one of the same run from an abandoned continuation, gives an :math:`r_s` of the
order of 1 and is dropped, naming :math:`r_s`.

The replay runs the steps from 0 in order (each step's momentum needs the one before), one batch gradient per step.
Each step's forward starts from the buffers the step recorded and, where the run captured its training forward
(dropout, train-mode batch norm), runs under the random state the step recorded, one forward per micro-batch as the
loop ran them; a batch-coupled loss takes its terms per micro-batch. This is the forward of the replay of a sparse
store's segment (:func:`~explaind.trajectory._coupled_loss.replay_forward`). It is offered for every dense store;
a sparse store names why (its segments are replayed whenever they are read) and keeps the steps proven otherwise.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import ConfigError, ExplaindError
from ._audit import UpdateAudit
from ._checks import batch_gradient, default_tolerance
from ._coupled_loss import replay_forward

__all__ = ["ReplayProof", "ReplayInputs", "replay_inputs", "replay_steps", "unreplayable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplayInputs:
    """What a replay recomputes the gradients from: ``Trajectory.load``'s ``model``, ``train_data`` and ``loss``
    (each ``None``: the store's own architecture spec, ``data.safetensors`` and recorded loss name), and ``reader``,
    the store reader that ``Trajectory.load`` uses (passed in: this module is imported by ``Trajectory.salvage``'s
    module chain, so it imports no reader itself)."""

    reader: Any
    model: Any = None
    train_data: Any = None
    loss: Any = None


def replay_inputs(replay: Any, model: Any, train_data: Any, loss: Any, reader: Any) -> ReplayInputs | None:
    """The checked arguments of ``Trajectory.salvage``'s replay (``None``: no replay).

    Raises
    ------
    ConfigError
        For a ``replay`` that is not a bool, ``model``, ``train_data`` or ``loss`` without ``replay=True``, or a
        replay without the store reader.
    """
    if not isinstance(replay, bool):
        raise ConfigError(f"Trajectory.salvage: replay={replay!r} is not allowed: it takes True or False. Fix: pass "
                          f"replay=True to prove steps by replaying their updates, or leave it out.")
    if not replay and (model is not None or train_data is not None or loss is not None):
        raise ConfigError("Trajectory.salvage: model=, train_data= and loss= are used only to replay steps, and "
                          "replay=False. Fix: pass replay=True with them, or leave them out.")
    if replay and reader is None:
        raise ConfigError("salvage_store(replay=True) needs the store reader: call Trajectory.salvage(path, out=..., "
                          "replay=True), which passes it.")
    return ReplayInputs(reader, model, train_data, loss) if replay else None


@dataclass
class ReplayProof:
    """The outcome of :func:`replay_steps`.

    Attributes
    ----------
    residuals : dict of int to float
        :math:`r_s` of every step replayed (the proven ones and the first that failed).
    tolerance : float
        The largest :math:`r_s` of a step proven by replay.
    failed : int or None
        The first step of ``pending`` whose :math:`r_s` is above the tolerance (``None``: every one is proven).
    why : str
        Why ``failed`` is not proven, or why nothing could be replayed (then ``failed`` is the first pending step).
    """

    residuals: dict[int, float] = field(default_factory=dict)
    tolerance: float = 0.0
    failed: int | None = None
    why: str = ""


def unreplayable(manifest: Any) -> str:
    """Why the steps of the store described by ``manifest`` cannot be proven by replay (``""``: they can)."""
    if manifest.param_stride != 1:
        return ("a sparse store's steps are replayed whenever they are read (its segments end on stored checkpoints), "
                "not by salvage: a step file written before schema 3 does not name the checkpoint state its segment "
                "starts from, so without its record nothing says which state to replay from")
    return ""


def replay_steps(out: Path, pending: list[int], inputs: ReplayInputs) -> ReplayProof:
    """Replay the steps of the salvaged store ``out`` from step 0 to the last of ``pending`` (the steps kept without
    another proof), measuring :math:`r_s` of each (module docstring); stop at the first pending step above the
    tolerance."""
    first = pending[0]
    try:
        traj = inputs.reader(out, model=inputs.model, train_data=inputs.train_data, loss=inputs.loss)
    except ExplaindError as exc:
        return ReplayProof(failed=first, why=f"the run cannot be replayed: {exc}")
    proof = ReplayProof(tolerance=default_tolerance(traj.dtype))
    try:
        _replay(traj, out, pending, proof)
    except ExplaindError as exc:  # no training data, data of another shape, a model that does not run them
        proof.failed, proof.why = first, f"the run cannot be replayed: {exc}"
    return proof


def _buffers(traj: Any, s: int) -> dict[str, Any]:
    r"""Copies of the buffers :math:`\beta_s` of step ``s`` (none when the run records no buffer)."""
    if not traj.manifest.buffer_names:
        return {}
    return {n: t.clone() for n, t in traj.buffers(s).items()}


def _replay(traj: Any, out: Path, pending: list[int], proof: ReplayProof) -> None:
    """The replay of :func:`replay_steps`, filling ``proof``."""
    auditor = UpdateAudit()
    auditor.momentum = dict(traj.initial_state())  # m_{-1}: empty for a fresh optimizer
    constants, names, wanted = traj.constants(), list(traj.param_names), set(pending)
    theta, module = traj.params(0), None
    for s in range(pending[-1] + 1):
        theta_next, updates = traj.params(s + 1), traj.updates(s)
        idx, w = traj.batch(s)
        x, y = traj.train_samples(idx)
        leaves = {n: theta[n].detach().clone().requires_grad_(True) for n in names}
        held = {**constants, **_buffers(traj, s)}  # the buffers beta_s the step's forward started from
        where = f"Salvage's replay of step {s} of {str(out)!r}"
        module, parts, generators = replay_forward(traj, s, module, where)  # dropout masks, batch statistics
        grads = batch_gradient(module, held, leaves, [n for n in names if n in updates], traj.loss, (x, y, w), parts,
                               where, generators)
        scale = traj.grad_scale(s)
        residual = auditor.step(theta, theta_next, {n: g.mul(scale) for n, g in grads.items()}, updates)
        if s in wanted:
            proof.residuals[s] = residual
            if not residual <= proof.tolerance:
                proof.failed = s
                proof.why = (f"replayed from theta_{s} with the recorded batch and coefficients, its theta_{s + 1} is "
                             f"{residual:.3g} (relative to the step's movement) away from the modelled update, above "
                             f"the tolerance {proof.tolerance:g}: it does not continue the run (a step file of "
                             f"another run or of an abandoned continuation, a damaged file, or a model, data or loss "
                             f"other than the recording's)")
                return
        theta = theta_next
