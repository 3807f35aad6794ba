r"""Resuming a recording: the recorder's ``restore()`` and the checks that a store can be resumed.

``TrajectoryRecorder(store=..., resume=True)`` reads the store's manifest (:meth:`RecorderResumeMixin._validate_resume`:
the same model, adapter, loss, ``checkpoint_every`` and training data), and ``restore()`` loads
:math:`\theta_N`, the buffers after step :math:`N - 1`, the optimizer state and the update audit's momentum of
the last step with a stored optimizer state, so the resumed run records the same steps bit for bit
(docs/recording.md, "Resuming").
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ._audit import UpdateAudit
from ._binding import unbound_state
from ._common import warn_user
from ._io import decode_optimizer_state, read_tensors
from ._layout import warn_missing_steps, warn_uncommitted_steps
from ._start_optimizer import state_differences
from ._start_state import held_state, stepped_state
from .disk import DiskTrajectory, check_model_matches
from .fingerprint import check_train_data
from .manifest import TrajectoryManifest
from .store import read_manifest

__all__ = ["RecorderResumeMixin"]

logger = logging.getLogger("explaind.trajectory.recorder")

def _group_settings(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every parameter group's hyperparameters (all entries but ``"params"``)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _same_setting(a: Any, b: Any) -> bool:
    """Equal hyperparameter values (``0 == 0.0``, a tuple equals the list of its items; tensors by value)."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b))
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and torch.equal(a.cpu(), b.cpu())
    return bool(a == b)


def _warn_replaced_settings(given: list[dict[str, Any]], restored: list[dict[str, Any]], n: int) -> None:
    """Warn when ``restore()`` replaced hyperparameters the resumed optimizer was built with (``load_state_dict``)."""
    changed = [f"param_groups[{g}][{k!r}]: {old[k]!r} -> {new.get(k)!r}" for g, (old, new) in
               enumerate(zip(given, restored)) for k in old if not _same_setting(old[k], new.get(k))]
    if not changed:
        return
    message = (f"restore() loaded the optimizer state of step {n}, and with it the hyperparameters the run was "
               f"recorded with, replacing those this optimizer was built with: {'; '.join(changed[:6])}. The run "
               f"continues with the recorded values. To continue with other values, set them in "
               f"optimizer.param_groups after restore(): the recorder follows a change at any step that the "
               f"optimizer adapter models (it refuses one it cannot, such as switching maximize while momentum "
               f"buffers built under the recorded value exist).")
    warn_user(logger, message)


class RecorderResumeMixin:
    """Resume methods of the recorder (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    _store: Path | None
    _manifest: TrajectoryManifest
    _resumed: bool
    _restarted: bool
    _loss: Any
    _params: dict[str, nn.Parameter]
    _auditor: UpdateAudit
    _data: Any
    _every: int
    _adapter: Any
    _restored: bool

    def _validate_resume(self) -> TrajectoryManifest:
        assert self._store is not None
        stored = read_manifest(self._store)
        check_model_matches(self.model, stored, repr(str(self._store)))
        for field, new in (("adapter", self._manifest.adapter), ("loss", self._manifest.loss)):
            if getattr(stored, field) != new:
                raise TrajectoryError(
                    f"Cannot resume the run at {str(self._store)!r}: it was recorded with {field} "
                    f"{getattr(stored, field)!r}, this recorder uses {new!r}."
                )
        if stored.param_stride != self._every:
            raise ConfigError(
                f"Cannot resume the run at {str(self._store)!r} with checkpoint_every={self._every}: it was recorded "
                f"with checkpoint_every={stored.param_stride}. Pass checkpoint_every={stored.param_stride}."
            )
        if self._data is not None and stored.n_train is not None:
            check_train_data(self._data, stored.train_fingerprint, repr(str(self._store)))
        point = len(stored.steps)
        warn_uncommitted_steps(self._store, point, resuming=True)
        warn_missing_steps(self._store, [r.file.path for r in stored.steps])
        while point > 0 and stored.steps[point - 1].optimizer_state is None:
            point -= 1
        if point < len(stored.steps):
            logger.warning("Resuming %s at step %d, the last step with a stored optimizer state; the %d later "
                           "step(s) are recorded again.", self._store, point, len(stored.steps) - point)
            stored.steps = stored.steps[:point]
            stored.n_steps = point
        return stored

    def restore(self, *, accept_unbound_state: bool = False) -> int:
        """Load ``theta_N``, the recorded buffers and the optimizer state into the model and optimizer; returns ``N``.

        Use with ``resume=True`` before the loop, then continue training from step ``N``. An LR
        scheduler is the loop's own: recreate it at step ``N`` (e.g. ``last_epoch=N - 1``). An
        optimizer that already holds state must hold exactly the state the store saved at ``N`` (the
        one of a run that started from optimizer state at ``N = 0``), which is then left as it is;
        any other state is refused rather than replaced.

        Parameters
        ----------
        accept_unbound_state : bool
            Load an optimizer state that its step file does not bind (a store written before schema 3,
            docs/recording.md, "Strangers' files, round 8"), which is otherwise refused: nothing but its
            checksum, kept in the unkeyed index, tells it from a replaced one. Pass ``True`` only for a store
            not modified since it was recorded; the steps recorded from then on bind their state.
        """
        if self._store is not None and self._restarted:
            return 0  # resume=True where an interrupted recording had recorded nothing: starting anew
        if self._store is None or not self._resumed:
            raise TrajectoryError("restore() needs a recorder opened with store=<path> and resume=True.")
        if not isinstance(accept_unbound_state, bool):
            raise ConfigError(f"restore(accept_unbound_state={accept_unbound_state!r}): allowed are True and False "
                              f"(got a {type(accept_unbound_state).__name__}). Fix: pass True to load an optimizer "
                              f"state its step file does not bind, else leave it out.")
        n = self._manifest.n_steps  # the last step with a stored optimizer state
        state, audit = self._saved_state(n, trust=accept_unbound_state)
        self._refuse_other_state(state, n, loading=True)
        stored = DiskTrajectory(self._store, model=self.model, loss=self._loss)
        final, buffers = stored.params(n), dict(self.model.named_buffers())
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(final[name])
            for name, b in stored.buffers(n).items():  # running statistics as they were after step n - 1
                buffers[name].copy_(b)
        if state is not None:
            given = _group_settings(self.optimizer)
            self.optimizer.load_state_dict(state)
            _warn_replaced_settings(given, _group_settings(self.optimizer), n)
        self._continue_from(audit)
        return n

    def _check_resumed_state(self) -> None:
        """``with rec:`` on a resumed store without ``restore()``: the optimizer must hold the state saved at ``N``.

        So a framework that restored the model and optimizer from its own checkpoint of step ``N``
        continues the store (the parameters were compared with ``theta_N`` before).
        """
        if self._restored:
            return
        n = self._manifest.n_steps
        state, audit = self._saved_state(n, trust=True)  # compared with the optimizer's own state, bit for bit
        self._refuse_other_state(state, n, loading=False)
        live = [dict(group) for group in self.optimizer.param_groups]
        if state is not None:  # the adapter learns the settings the state was built under (maximize), then the
            for group, saved in zip(self.optimizer.param_groups, state["param_groups"]):  # live ones come back:
                group.update({k: v for k, v in saved.items() if k != "params"})  # a switch is refused at the step
        try:
            self._continue_from(audit)
        finally:
            for group, values in zip(self.optimizer.param_groups, live):
                group.clear()
                group.update(values)

    def _continue_from(self, audit: dict[str, Tensor]) -> None:
        """The update audit's modelled buffer and the adapter's ``resumed`` hook, once the optimizer holds the state."""
        resumed = getattr(self._adapter, "resumed", None)  # optional adapter method (OptimizerAdapter)
        if callable(resumed):
            resumed(self.optimizer)
        self._auditor.momentum = {k: v.to(self._params[k].device) for k, v in audit.items()}
        self._restored = True

    def _saved_state(self, n: int, trust: bool) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
        """The decoded ``state_dict`` the store saved at step ``n`` and the audit's buffers then.

        At ``n = 0``: the state the recording opened on and its :math:`m_{-1}` (``None`` and ``{}``
        for a fresh optimizer). ``trust``: take a state that its step file does not bind (written before
        schema 3); else it is refused (:func:`~explaind.trajectory._binding.unbound_state`).
        """
        assert self._store is not None
        if n == 0:
            start = DiskTrajectory(self._store, model=self.model, loss=self._loss)
            begun = start.optimizer_start()
            where = f"The optimizer's start state in {str(self._store)!r}"
            state = None if begun is None else begun.state_dict(self.optimizer.state_dict(), where)
            return state, start.initial_state()
        rec = self._manifest.steps[n - 1].optimizer_state
        assert rec is not None  # _validate_resume chose n so
        tensors, meta = read_tensors(self._store, rec, step=n - 1)
        audit_file = self._manifest.steps[n - 1].audit_state  # sparse stores keep it apart
        kept = {} if audit_file is None else read_tensors(self._store, audit_file, step=n - 1)[0]
        audit = {k[len("audit."):]: v for k, v in {**tensors, **kept}.items() if k.startswith("audit.")}
        state = {k: v for k, v in tensors.items() if not k.startswith("audit.")}
        decoded = decode_optimizer_state(state, meta, self.optimizer.state_dict(),
                                         f"Trajectory file {str(self._store / rec.path)!r}")
        stored = DiskTrajectory(self._store, model=self.model, loss=self._loss)  # the state its step file binds:
        bound = stored.check_state_file(n - 1, rec, tensors, meta, audit=None if audit_file is None else False)
        if audit_file is not None:
            stored.check_state_file(n - 1, audit_file, kept, None, audit=True)
        step_file = self._manifest.steps[n - 1].file
        where = f"{rec.path!r} (step {n - 1}) of the store {str(self._store)!r}"
        if not bound and not trust:
            raise TrajectoryError(unbound_state(where, repr(step_file and step_file.path), n))
        if not bound:
            logger.warning("restore(accept_unbound_state=True): loading the optimizer state %s, which its step file "
                           "does not bind (written before schema 3); the steps recorded from now on bind theirs.",
                           where)
        return decoded, audit

    def _refuse_other_state(self, state: dict[str, Any] | None, n: int, loading: bool) -> None:
        """Refuse an optimizer holding state other than ``state`` (saved at ``n``; ``None``: none), naming where.

        ``loading``: ``restore()``, which loads ``state`` into a fresh optimizer; without it the
        optimizer must hold ``state`` already (a fresh one: none).
        """
        if loading and not stepped_state(self.optimizer):  # fresh, or only what its constructor built (Adagrad)
            return
        differ = state_differences(self.optimizer, state or {})
        if not differ:
            return
        saved = f"after step {n - 1}" if n > 0 else "when the recording opened"
        why = ("restore() would replace it" if loading else
               "`with rec:` without restore() continues the store from the state it saved")
        holds = "holds state that differs from" if held_state(self.optimizer) else "holds no state, unlike"
        raise ConfigError(
            f"resume=True: the optimizer {holds} the state the store at {str(self._store)!r} saved {saved} "
            f"(at {', '.join(differ[:5])}{' ...' if len(differ) > 5 else ''}), and {why}. Allowed: "
            f"a fresh optimizer and rec.restore(), or an optimizer holding exactly that state (restored from the "
            f"checkpoint of step {n}). Fix: open the recorder with resume=True on a fresh optimizer and call its "
            f"restore(); to start a new recording from this optimizer's state, use a new store (or store=None) "
            f"without resume."
        )
