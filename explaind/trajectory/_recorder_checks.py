r"""The recorder's own forward passes: the loss-callable check and the gradient check (docs/recording.md).

Kept apart from the hooks so that each module reads on its own; the methods use the recorder's
attributes (``_pending``, ``_tap``, ``_probe``, ``_random``, ...) set in its ``__init__``. Every
forward here runs *quietly*: the autocast probe and the random-state capture ignore it, and the
loop's random generators are left as they were (a check never changes the masks the loop draws
next).

With captured random states the gradient check recomputes each micro-batch as one batched
training forward under its recorded state (:func:`~explaind.trajectory._random.replayed`), so
runs with dropout or batch norm are checked like any other.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .._compiled import refuse_compiled_at_step
from .._weight_writes import stepped_elsewhere_note, submodules_called_hint, written_since_backward_message
from ..exceptions import ConfigError, TrajectoryError
from ._background import CopyPool, Handoff, StateCopier
from ._backward_draws import backward_draw_hint, draws_in_backward, inductor_masks_hint
from ._buffers import BufferTracker, moved_message
from ._checks import CheckSchedule, GradientCheck, check_batch_gradient
from ._common import evaluation_mode, warn_user
from ._coupled_loss import (
    check_loss_decomposes,
    coupled_check_hint,
    forward_count_message,
    is_batch_coupled,
    term_parts,
)
from ._forward_probe import AutocastProbe, loop_inputs_hint
from ._forward_state import cached_methods_hint, mode_branch_hint, requires_grad_message, switched_off
from ._gradient_fits import failed_check_fits, start_constants
from ._gradients import GradientTap, has_stochastic_layers
from ._loop_hints import carried_message, cleared_message, loop_kwargs_hint
from ._participation import (
    edit_list,
    edit_message,
    edited_parameters,
    frozen_edit_message,
    never_stepped_message,
    renamed_parameters,
    retyped_hint,
    second_step_message,
)
from ._random import MicroBatch, RandomCapture, RandomState, replay_parts
from ._setup import refuse_dtype_mismatch

__all__ = ["RecorderChecksMixin", "LoggedBatch"]

logger = logging.getLogger("explaind.trajectory.recorder")


def unlogged_backward_message(s: int, checked: bool) -> str:
    """Names a ``backward()`` after step ``s``'s last ``rec.log_batch()``
    (:meth:`RecorderChecksMixin._unlogged_backward`); ``checked``: the sentence that leads a failed gradient check's
    hint, else a warning that no check can run."""
    what = (f" At step {s} a backward() reached the parameters after the step's last rec.log_batch()" if checked else
            f"Step {s}: a backward() reached the parameters after the step's last rec.log_batch(), in a loop that "
            f"logs each micro-batch after its backward(), and no gradient check can run (check_gradients off or no "
            f"train_data)")
    return (what + ": the gradient the optimizer steps then holds samples no rec.log_batch() named (an auxiliary "
            "or unlabelled batch backwarded after logging, a second loss of another batch)"
            + ("" if checked else ", whose share of the update is left in the residual")
            + ". Fix: call rec.log_batch(indices) after the backward() of every batch "
            "whose loss reaches the parameters, with the loss= the loop trains with (a second loss of the same "
            "batch: log it after its last backward()).")


@dataclass(frozen=True)
class LoggedBatch:
    """One ``log_batch`` call: samples and weights, the tap's sequence number then, whether the gradient was finite,
    the training forwards and random state captured for it, and the ``backward`` passes since the previous call.
    """

    indices: Tensor
    weights: Tensor
    seq: int
    finite: bool | None
    forwards: int = -1
    state: RandomState | None = None
    eval_forwards: int = 0
    backwards: int = 1


class RecorderChecksMixin:
    """Check methods of the recorder (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    _params: dict[str, nn.Parameter]
    _pending: list[LoggedBatch]
    _tap: GradientTap
    _probe: AutocastProbe
    _random: RandomCapture
    _buffers: BufferTracker
    _loss: Any
    _data: Any
    _n: int
    _loss_checked: bool
    _schedule: CheckSchedule
    _theta: dict[str, Tensor] | None
    _constant_params: dict[str, nn.Parameter]
    _frozen: dict[str, Tensor]
    _sigma: float
    _sigma_shape: tuple[tuple[int, int], ...] | None
    _sigma_at: int | None
    _sigma_moved: bool
    _checked_c: float | None
    _pool: CopyPool
    _writer: Any
    _theta_handoff: Handoff | None
    _copier: StateCopier
    _pooled: Callable[[], bool]

    def _resolve_check(self, check: Any) -> CheckSchedule:
        """The checked steps (``"auto"`` without data, or with uncaptured dropout or batch norm: none)."""
        schedule = CheckSchedule(check)
        if schedule.kind == "auto" and (self._data is None or (has_stochastic_layers(self.model) and
                                                               not self._random.enabled)):
            return CheckSchedule(False)
        if not schedule.never and self._data is None:
            raise ConfigError(
                f"check_gradients={check!r} needs the training data: pass train_data=(X, y) or set "
                f"check_gradients=False."
            )
        return schedule

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """The recorder's own forwards: unseen by the probe and the capture, the loop's generators untouched."""
        self._probe.paused = True
        try:
            with self._random.quiet():
                yield
        finally:
            self._probe.paused = False

    def _micro_batches(self) -> list[MicroBatch]:
        """The pending micro-batches as the trajectory stores them."""
        return [MicroBatch(e.indices, e.weights, e.forwards, e.state, e.eval_forwards) for e in self._pending]

    def _replay_plan(self, s: int) -> tuple[bool, list[tuple[slice, RandomState]] | None]:
        """``(checkable, replay)``: the micro-batches' positions and states when the forwards were captured.

        A run with dropout or batch norm whose micro-batch saw no or several training forwards cannot
        be recomputed: not checkable (the engine refuses such steps, naming the fix).
        """
        parts: Any = None
        if self._random.enabled and self._random.coupled:
            try:
                parts = replay_parts(self._micro_batches(), self._random.coupled, f"Step {s}")
            except TrajectoryError as exc:
                logger.info("%s Its gradient is not checked.", exc)
                return False, None
        if parts is None and is_batch_coupled(self._loss):  # the terms of each micro-batch, in evaluation mode
            parts = term_parts(self._micro_batches())
        return True, None if parts is None else [(slice(lo, hi), state) for lo, hi, state in parts]

    def _check_gradient(self, seen: dict[str, Tensor], no_input: Any, indices: Tensor, weights: Tensor,
                        device: torch.device, s: int, tol: float, autocast: Any,
                        moved: tuple[str, ...] = ()) -> GradientCheck | None:
        """The gradient check of step ``s`` (``None`` when its forwards cannot be replayed); ``moved`` names the
        buffers that changed before the step's first forward (:meth:`BufferTracker.take_moved`)."""
        if self._random.enabled:  # a submodule compiled after the start (explaind/_compiled.py)
            refuse_compiled_at_step(self.model, s)
        checkable, replay = self._replay_plan(s)
        replayed = replay is not None and any(state is not None for _, state in replay)
        if not checkable:
            self._warn_moved_buffers(moved, s)
            return None
        raw = {n: self._tap.raw(n, g) for n, g in seen.items() if n not in no_input}
        x, y = self._data.get(indices)
        # without forwards to replay the engine recomputes gradients in evaluation mode: so does the check, and
        # a training forward that differs from it in a way no module shows (F.dropout, torch.rand) fails here
        hint = unlogged_backward_message(s, checked=True) if self._unlogged_backward() else ""
        written = self._tap.written_since_backward()  # SAM: the gradient taken at perturbed, restored weights
        hint = (written_since_backward_message(s, written, checked=True) if written else "") + hint
        hint = (carried_message(s, self._tap.carried.names, True) if self._tap.carried.names else "") + hint
        if not replayed and self.model.training:
            hint += (" The loop's forward ran in training mode and no training forward of this run is replayed, so "
                     "explaind recomputes gradients in evaluation mode: if the forward draws random numbers "
                     "(F.dropout, F.scaled_dot_product_attention with dropout_p > 0, torch.rand, np.random) or "
                     "reads a buffer it updates, record with "
                     "TrajectoryRecorder(..., capture_random=True), which replays every training forward.")
        if moved:
            hint += moved_message(moved, s, checked=True)
        hint += coupled_check_hint(self._loss, [int(e.indices.shape[0]) for e in self._pending])
        hint += getattr(self, "framework_hint", "")  # set by a framework callback (explaind.integrations)
        hint += inductor_masks_hint(self.model)
        hint += cached_methods_hint(self.model)
        batch = (x.to(device), y.to(device), weights.to(device))
        if not replayed and self.model.training:
            lazy: Any = lambda: mode_branch_hint(self.model, self._params, batch[0]) + hint  # noqa: E731
        else:
            lazy = hint if not replayed else self._backward_draws(batch, replay, s, hint)
        inputs, then = list(self._probe.inputs), lazy  # the loop's inputs against train_data's rows, named first
        keywords = list(self._probe.keywords.seen)
        cleared = (lambda: "") if replayed else self._cleared_between(raw, device, s, tol, autocast)
        perturbed = (lambda: "") if replayed or written else lambda: failed_check_fits(  # noqa: E731
            self.model, self._params, raw, self._loss, batch, self._buffers.recorded(), s, self._random.generators,
            [int(e.indices.shape[0]) for e in self._pending])
        lazy = lambda: (submodules_called_hint(s, bool(inputs), self._params, self.optimizer)  # noqa: E731
                        + loop_inputs_hint(inputs, batch[0]) + loop_kwargs_hint(keywords, batch[0]) + perturbed()
                        + cleared() + (then() if callable(then) else then))
        with self._quiet(), evaluation_mode(self.model) if not replayed else contextlib.nullcontext():
            try:
                return check_batch_gradient(self.model, self._params, raw, self._loss, batch, s, tol, autocast,
                                            replay, self._random.generators, self._buffers.recorded(), lazy)
            except RuntimeError as exc:  # torch's dtype error of half-precision parameters (Fabric 'bf16-true')
                refuse_dtype_mismatch(exc, self._params, batch[0], s)
                if "can't retain_grad on Tensor that has requires_grad=False" in str(exc):
                    names = switched_off(self.model, self._params, batch[0])
                    raise TrajectoryError(requires_grad_message(names, s)) from exc
                raise

    def _cleared_between(self, raw: dict[str, Tensor], device: torch.device, s: int, tol: float,
                         autocast: Any) -> Callable[[], str]:
        """The failed check's hint when the gradient is the last logged micro-batch's alone (``zero_grad()`` inside
        the accumulation loop; :func:`~._loop_hints.cleared_message`), computed only when the check fails."""
        def diagnose() -> str:
            if len(self._pending) < 2 or is_batch_coupled(self._loss):
                return ""
            last = self._pending[-1]
            x, y = self._data.get(last.indices)
            try:  # the check of the last micro-batch alone: no error means the gradient is its own
                check_batch_gradient(self.model, self._params, raw, self._loss,
                                     (x.to(device), y.to(device), last.weights.to(device)), s, tol, autocast, None,
                                     self._random.generators, self._buffers.recorded(), "")
            except (TrajectoryError, RuntimeError):
                return ""
            return cleared_message(s, len(self._pending))
        return diagnose

    def _backward_draws(self, batch: Any, replay: list[tuple[slice, RandomState]], s: int,
                        hint: str) -> Callable[[], str]:
        """The failed check's hint: :func:`backward_draw_hint` first when a replayed micro-batch's backward() draws
        random numbers (only computed when the check fails)."""
        def diagnose() -> str:
            buffers = start_constants(self.model, self._buffers.recorded())
            try:
                drawn = any(draws_in_backward(self.model, {**buffers, **self._params}, self._loss, batch, part,
                                              self._random.generators) for part in replay)
            except RuntimeError as exc:  # the diagnosis must not hide the check's own message
                logger.debug("The backward-draw diagnosis of step %d failed: %s", s, exc)
                drawn = False
            return (backward_draw_hint(s) if drawn else "") + hint
        return diagnose

    def _warn_moved_buffers(self, moved: tuple[str, ...], s: int) -> None:
        """Warn that buffers changed between steps when step ``s`` is not checked (nothing when none did)."""
        if moved:
            warn_user(logger, moved_message(moved, s, checked=False))

    @contextlib.contextmanager
    def _room_for_check(self) -> Iterator[None]:
        r"""Around the gradient check: what the recorder holds only for later is freed, so the check's forward and
        backward reuse its memory (docs/recording.md, "Memory at a checked step").

        Before the check a dense store's writer finishes the queued steps (their copies of :math:`\theta` and of
        the optimizer state go back to the pool), the pool's idle buffers are dropped, the gradient snapshots equal
        to ``p.grad`` too (:meth:`GradientTap.drop_unchanged`), and the copy of :math:`\theta_s`, which after that
        only the step's update audit reads, is let go: the live parameters hold the same values
        (:meth:`_refuse_edits` compared them before), so it is copied from them again after the check, whether it
        passed or raised. The check's extra memory is then its activations, not those plus the recorder's copies.
        """
        theta = self._pooled() and self._theta is not None
        if theta:
            self._writer.flush()  # the writer's readers of theta_s and of the state copies are done
            if self._theta_handoff is not None:
                self._theta_handoff.done()  # the audit's turn: the writer's came with the flush
            else:  # the first theta_s, read by no writer
                self._pool.release("param.", self._theta or {})
            self._theta = self._theta_handoff = None  # no reference to theta_s is left while the check runs
        self._pool.trim()
        self._tap.drop_unchanged()
        try:
            yield
        finally:
            if theta:  # back to the pool after the audit (RecorderStoreMixin._audit_now)
                self._theta = self._pool.copies("param.", self._params)

    def _check_loss_callable(self, device: torch.device) -> None:
        """Once, on the first logged micro-batch: a user loss callable must equal sum_k w_k * per-sample loss."""
        self._loss_checked = True
        first = self._pending[0]
        x, y = self._data.get(first.indices)
        with self._quiet():  # one forward: its masks need not be the loop's
            message = check_loss_decomposes(self.model, self._params, self._loss, x.to(device), y.to(device),
                                            first.weights)
        if message is None:
            return
        if not self._schedule.never:
            raise TrajectoryError(f"Step {self._n}: {message}")
        warn_user(logger, message)


    def _refuse_forwards(self, forwards: int, eval_forwards: int) -> None:
        """At ``log_batch``: refuse a micro-batch with no training forward; one with several (R-drop's two calls of
        the model) too, or only warn when gradients are not checked (docs/recording.md, "Dropout and batch norm")."""
        message = forward_count_message(forwards, eval_forwards, self._random.coupled, self._n)
        if message is None:
            return
        if forwards == 0 or not self._schedule.never:
            raise TrajectoryError(message)
        warn_user(logger, message)

    # ----------------------------------------------------------------- changes outside the step
    def _refuse_edits(self, s: int) -> None:
        r"""Raise when a recorded parameter no longer holds :math:`\theta_s` as recorded (changed outside the step),
        or a frozen parameter (a constant of the trajectory) no longer holds its stored value."""
        edited = edited_parameters(self._params, self._theta or {})
        renamed = renamed_parameters(self.model, self._params) if edited else None
        if renamed is not None:  # a parametrization registered mid-run writes the tensor it moves
            raise TrajectoryError(f"Step {s}: {renamed}")
        if edited:
            elsewhere = stepped_elsewhere_note(edited, self._params, self.optimizer)  # a GAN's generator
            raise TrajectoryError(edit_message(edited, s, self._schedule.start)
                                  + retyped_hint(self._params, self._theta or {}) + elsewhere)
        frozen = edited_parameters(self._constant_params, self._frozen)
        if frozen:
            raise TrajectoryError(frozen_edit_message(frozen, s, self._schedule.start))

    @contextlib.contextmanager
    def _edits_checked(self, s: int) -> Iterator[None]:
        r""":meth:`_refuse_edits` of step ``s`` on the state copier's thread while the block runs on the loop's.

        The comparisons of the live parameters with :math:`\theta_s` (``memcmp``, which releases the GIL)
        then overlap the block's own (the gradients with their snapshots, :meth:`GradientTap.measure`);
        the block must not change the parameters. Its edit error comes first, as when the check ran before
        the block: it replaces an error the block raised. Parameters off the CPU are compared on the
        loop's thread, before the block (another thread would read them on another stream).
        """
        if any(p.device.type != "cpu" for p in self._params.values()):
            self._refuse_edits(s)
            yield
            return
        checked = self._copier.run([lambda: self._refuse_edits(s)])
        try:
            yield
        except BaseException:
            checked.result()  # raises the edit error, if any, in place of the block's
            raise
        checked.result()

    def _skip_or_refuse_empty(self, s: int) -> None:
        """``optimizer.step()`` with no micro-batch logged since the previous step: skipped when no recorded
        parameter holds a gradient, refused otherwise.

        torch's optimizers leave a parameter whose ``.grad`` is ``None`` as it is, and its state too; Lightning
        calls ``optimizer.step()`` so when ``training_step`` returned ``None`` for every micro-batch of the step
        (no backward ran). Nothing is recorded and the step count stays; an optimizer that moves the parameters
        all the same is refused at the next step (or warned about at the end) as an edit outside a step.
        """
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if grads:
            empty = all(not bool(g.any()) for g in grads)  # a backward over 0 samples (or a loss times 0)
            if s > self._schedule.start and not empty and not self._tap.backwards_pending:
                raise TrajectoryError(second_step_message(s))
            raise TrajectoryError(
                f"Step {s}: optimizer.step() was called without a logged batch: call rec.log_batch(indices) before "
                f"optimizer.step() (after backward)." + (
                    " Every gradient is zero: if the batch held no sample, skip it as a whole, before its forward "
                    "(`if len(idx) == 0: continue`), so that no optimizer.step() is taken for it (a step over 0 "
                    "samples has no sample to credit, while it would still move the parameters by momentum or "
                    "weight decay)." if empty else "")
            )
        logger.info("optimizer.step() without a logged batch or a gradient (e.g. a Lightning training_step that "
                    "returned None) left the parameters as they were: not recorded as a step.")
        self._random.take()  # a forward whose loss was not backpropagated trains nothing
        self._tap.reset()
        self._probe.reset()
        self._step_state = {"skipped": True}

    def _warn_final_edits(self) -> None:
        r"""Warn when the model left the recorder holding other values than :math:`\theta_N`, the last recorded
        (or other frozen parameters than the stored constants, or other buffers than the last recorded)."""
        if self._n == self._schedule.start:  # micro-batches logged, yet this optimizer never stepped
            if self._pending[-1].finite is not False:  # not a step a GradScaler skipped on inf or NaN
                warn_user(logger, never_stepped_message(len(self._pending), type(self.optimizer),
                                                        edited_parameters(self._params, self._theta or {})))
            return
        moved = self._buffers.differing()
        if moved:
            warn_user(logger, f"After the last recorded step ({self._n - 1}) the buffers {list(moved)} were changed "
                              f"(a forward in training mode, e.g. a validation pass without model.eval() or "
                              f"torch.optim.swa_utils.update_bn, or a hand edit): the trajectory ends at the buffers "
                              f"the last step left, traj.buffers(traj.n_steps), not at the model as it is now, so its "
                              f"replica and scores explain the model with those buffers "
                              f"(KernelReplica.fidelity_report(X, model=model) measures the difference). Fix: run "
                              f"such forwards under model.eval(), or after `with rec:` on a copy of the model.")
        edited = edited_parameters(self._params, self._theta or {})
        frozen = edited_parameters(self._constant_params, self._frozen)
        if not (edited or frozen):
            return
        changed = [f"the parameter(s) {edit_list(edited)}"] if edited else []
        changed += [f"the frozen parameter(s) {edit_list(frozen)}"] if frozen else []
        hint = getattr(self, "final_hint", "")  # the framework option that did it, set by a callback
        if self._pending and self._pending[-1].finite is not False:  # batches logged, this optimizer not stepped
            hint += (f" {len(self._pending)} micro-batch(es) were logged after that step and no step of this "
                     f"optimizer followed them: the parameters were moved by another optimizer object (one built "
                     f"again inside the loop, which also drops its momentum, or a second phase's, as linear probing "
                     f"then full fine-tuning builds?). Build the optimizer once, before the recorder, and call "
                     f"opt.state.clear() where a momentum restart was meant; for phases with other trainable "
                     f"parameters, one optimizer over all of them with requires_grad off where a phase freezes, or "
                     f"a recorder per phase (each exact).")
        message = (f"After the last recorded step ({self._n - 1}) {' and '.join(changed)} were changed outside "
                   f"optimizer.step() (weight clipping, an EMA or load_state_dict written into the model): the "
                   f"trajectory ends at theta_{self._n}, the values the last step produced (frozen parameters: as "
                   f"stored when recording started), not at the model as it is now, so its replica and scores "
                   f"explain theta_{self._n}.{hint} Fix: explain the model at traj.params(traj.n_steps) (frozen "
                   f"parameters: traj.constants()), or make such changes after `with rec:`, on a copy of the model.")
        warn_user(logger, message)

    # ----------------------------------------------------------------- the loss scale
    def _batch_shape(self) -> tuple[tuple[int, int], ...]:
        """``(samples, backward passes)`` of each pending micro-batch: what the loss scale was measured for."""
        return tuple((int(e.indices.shape[0]), int(e.backwards)) for e in self._pending)

    def _sigma_stale(self) -> bool:
        r"""Whether the measured loss scale :math:`\sigma` may not hold for the pending micro-batches.

        :math:`\sigma` is measured by the gradient check on one step's micro-batches. A step is checked
        too when its micro-batches saw another number of ``backward`` passes than at that step (a
        second ``loss.backward()``, an auxiliary loss backpropagated on its own), and, when
        :math:`\sigma \ne 1`, when their sizes differ (``reduction="sum"`` makes :math:`\sigma` the
        batch size; a loop that divides by a fixed number of micro-batches has another one at an
        epoch's last, smaller step).
        """
        written = self._tap.written_since_backward()
        if written:  # a gradient taken at other weights than the step's: checked, or named when no check can run
            if self._data is not None and not self._schedule.never:
                return True
            if not getattr(self, "_written_named", False):
                self._written_named = True  # once per run: every step of a SAM loop does it
                warn_user(logger, written_since_backward_message(self._n, written, checked=False))
        if self._tap.carried.names:  # zero_grad() left out before this step: checked, or named when no check can run
            if self._data is not None and not self._schedule.never:
                return True
            if not getattr(self, "_carried_named", False):  # once per run: p.grad.data.zero_() looks the same
                self._carried_named = True
                warn_user(logger, carried_message(self._n, self._tap.carried.names, checked=False))
        if self._unlogged_backward():  # its samples are checked, or named when no check can run
            if self._data is not None and not self._schedule.never:
                return True
            warn_user(logger, unlogged_backward_message(self._n, checked=False))
        if self._sigma_shape is None or self._data is None or self._schedule.never:
            return False
        if self._sigma_moved:  # a loss scale that moved between two checks: measured at every step since
            return True
        shape = self._batch_shape()
        if [b for _, b in shape] != [b for _, b in self._sigma_shape]:
            return True
        return self._sigma != 1.0 and shape != self._sigma_shape

    def _unlogged_backward(self) -> bool:
        """Whether a ``backward()`` reached the parameters after the step's last ``rec.log_batch()`` in a loop that
        logs after ``backward()`` (a backward of this step came before its first ``log_batch``): the gradient then
        holds samples no ``log_batch`` named. A loop that logs before each forward is not affected."""
        return (bool(self._pending) and self._tap.seq > self._pending[-1].seq
                and self._pending[0].seq > self._tap.reset_seq)

    def _take_sigma(self, sigma: float, autocast: Any, tol: float, c_in: float, s: int) -> None:
        r"""Keep the loss scale :math:`\sigma` the gradient check measured at step ``s``.

        When it moved by more than twice the check's tolerance since the previous check on micro-batches
        of the same sizes (a loss multiplied by a factor that changes during training: a loss-weight
        warm-up), the steps in between, not checked, were recorded with the previous :math:`\sigma`, so
        their ``c_s`` is off by the change, left in the residual: warn naming them, and check every later step.
        """
        if autocast is not None and abs(sigma - 1.0) <= tol:
            sigma = 1.0  # autocast rounding is not a loss scale
        shape, previous, at = self._batch_shape(), self._sigma, self._sigma_at
        moved = (at is not None and shape == self._sigma_shape
                 and abs(sigma - previous) > 2 * tol * max(abs(sigma), abs(previous)))  # each within tol
        if moved:
            if not self._sigma_moved:
                logger.info("Step %d: the loss scale moved from %.6g to %.6g; every later step is checked.",
                            s, previous, sigma)
            self._sigma_moved = True
        if moved and s - at > 1:
            between = f"step {at + 1}" if s - at == 2 else f"steps {at + 1} to {s - 1}"
            warn_user(logger, (
                f"Step {s}: the loss scale the gradient check measured moved from {previous:.6g} (step {at}) to "
                f"{sigma:.6g} on micro-batches of the same sizes: the loop multiplies its loss by a factor that "
                f"changes during training (a loss-weight warm-up or schedule, a hand-set scale). The {between}, "
                f"not checked, were recorded with {previous:.6g}, so their gradient scale c_s is off by that "
                f"factor's change there; the difference is left in the residual (the per-sample scores miss it; "
                f"InfluenceEstimator's residual share says how much). Every step from this one on is checked, so "
                f"its scale is measured. Fix: record with check_gradients=True, which measures the scale at "
                f"every step (exact), or keep the factor constant."))
        self._sigma, self._checked_c, self._sigma_shape, self._sigma_at = sigma, c_in, shape, s
