r"""What the recorder does with a Python attribute that changed between steps.

docs/recording.md, "Python attributes changed between steps", has the user's side.

:class:`~explaind.trajectory._attributes.AttributeWatch` names the entries of the model's non-tensor
state that differ between the forwards of two consecutive steps. A change matters only if the
forward reads it, which the fingerprint cannot tell (a Lightning module's ``self.epoch`` counter, a
cached value kept for logging, are read by nothing). So at the step where a change is seen the
recorder runs the forward twice on the step's first logged micro-batch (at most
:data:`TEST_SAMPLES` samples, the loop's modes, no gradient, the same random state both times,
buffers copied so batch-norm statistics stay as they are): once as it is, once with the changed
entries set back to their values at the previous step (a forward that draws random numbers also in pairs under
:data:`DRAWS` seeded states: a value read only on some draws changes no output on many).
Outputs :math:`f_{\text{new}}, f_{\text{old}}` that differ,

.. math:: \max |f_{\text{new}} - f_{\text{old}}| > 64\,\varepsilon \max |f_{\text{new}}|,

mean the forward reads it: the engine would replay that step with the final value, so the step is
refused with a :class:`~explaind.exceptions.TrajectoryError` naming each entry, its old and new value
and the fix. Outputs equal mean it is not read on that batch: the change is accepted (logged at INFO)
and tested again at its 2nd, 4th, 8th, ... change. Without ``train_data`` nothing can be tested and an
:class:`~explaind.exceptions.ExplaindWarning` names the changes (once per entry). When recording ends,
changes made after the last step are warned about the same way.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, TrajectoryError
from ..inputs import call_model
from ..outputs import model_output
from ._attribute_record import final_state, keep_record, save_record
from ._attributes import ABSENT, AttributeWatch, Change, restore_value
from ._common import warn_user

__all__ = ["RecorderAttributesMixin", "attribute_watch", "reading", "TEST_SAMPLES"]

logger = logging.getLogger("explaind.trajectory.recorder")

#: Samples of the step's first micro-batch the forward is run on to test a change.
TEST_SAMPLES = 64
#: Random states a change is also tested under when the forward draws random numbers, and the first one's seed.
DRAWS, DRAW_SEED = 8, 20251

FIX = ("Fix: hold a tensor the forward reads as a buffer (self.register_buffer('mask', mask), recorded at every "
       "step) rather than a plain attribute or a list of tensors; set config fields (model.config...) before `with "
       "rec:`; keep a value the forward reads in a buffer it derives the value from (register_buffer('step', "
       "torch.zeros((), dtype=torch.long)) counted up in forward while training, then tau = f(step)): buffers are "
       "recorded at every step, so the engine replays each step with its own value; swap submodules, flip their "
       "mode or add hooks before `with rec:` or after it. If the change is deliberate and the inexact steps "
       "accepted (the estimators' residual share then measures them), name it in "
       "TrajectoryRecorder(ignore_attributes=[...]) (fnmatch patterns of these names).")


def attribute_watch(model: nn.Module, ignore: Any) -> AttributeWatch:
    """The recorder's :class:`AttributeWatch`, with ``ignore_attributes`` checked (a sequence of ``str``)."""
    if isinstance(ignore, str) or not all(isinstance(p, str) for p in ignore):
        raise ConfigError(f"ignore_attributes={ignore!r}: expected a list of fnmatch patterns of attribute names "
                          f"such as ['tau', 'encoder.*.p'] (['*'] watches nothing). Fix: wrap a single name in a "
                          f"list.")
    return AttributeWatch(model, tuple(ignore))


@contextlib.contextmanager
def _restored(changes: Sequence[Change], root: nn.Module) -> Iterator[None]:
    """The changed entries hold their old values inside the block; the current objects are put back after."""
    saved = []
    for c in changes:
        entries = c.module.__dict__
        saved.append((entries, c.key, entries.get(c.key, ABSENT)))
        if c.key == "training":
            entries["training"] = root.training if c.old else not root.training
        elif c.old is ABSENT:
            entries.pop(c.key, None)
        else:
            entries[c.key] = restore_value(c.old)
    try:
        yield
    finally:
        for entries, key, value in reversed(saved):
            if value is ABSENT:
                entries.pop(key, None)
            else:
                entries[key] = value


def _forward(model: nn.Module, x: Any, quiet: Callable[[], Any], seed: int | None = None) -> Tensor:
    """The model's output on ``x`` as the loop runs it, without gradient, its buffers left untouched; ``seed``: torch's
    generators seeded with it first (inside ``quiet``, so the loop's are untouched), else as the loop left them."""
    with quiet(), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        return model_output(call_model(model, buffers, x)).detach()


def _differ(a: Tensor, b: Tensor) -> bool:
    r"""Whether two outputs differ beyond rounding: :math:`\max|a - b| > 64 \varepsilon \max|b|` (NaN where NaN)."""
    if a.shape != b.shape:
        return True
    if not a.is_floating_point() or a.numel() == 0:
        return not torch.equal(a, b)
    if not torch.equal(a.isnan(), b.isnan()):
        return True
    a, b = a.double().nan_to_num(), b.double().nan_to_num()
    return float((a - b).abs().max()) > 64 * torch.finfo(b.dtype if b.is_floating_point() else a.dtype).eps * \
        float(b.abs().max())


def _seeds(model: nn.Module, x: Any, quiet: Callable[[], Any], now: Tensor) -> list[int | None]:
    """The random states a change is tested under: the loop's own (``None``), and when the forward draws random
    numbers (its output under another seed differs) :data:`DRAWS` seeded ones too: a value read only on some draws
    (scheduled sampling's probability, a masking ratio) changes no output on many of them."""
    try:
        drawn = _differ(_forward(model, x, quiet, DRAW_SEED), now)
    except Exception:  # noqa: BLE001 - the test must not replace the loop's own error
        drawn = False
    return [None, *range(DRAW_SEED, DRAW_SEED + DRAWS)] if drawn else [None]


def reading(model: nn.Module, changes: Sequence[Change], x: Any, quiet: Callable[[], Any]) -> list[Change] | None:
    """The changes the forward reads on ``x``: those whose old values give another output (tested one at a time
    when there are at most 8, else together; under several random states when the forward draws, :func:`_seeds`);
    ``None`` when the forward as it is fails (nothing can be told)."""
    try:
        now = _forward(model, x, quiet)
    except Exception as exc:  # noqa: BLE001 - the test must not replace the loop's own error
        logger.info("The attribute test forward failed (%s: %s); the changes are not tested.", type(exc).__name__,
                    exc)
        return None
    seeds = _seeds(model, x, quiet, now)
    nows: dict[int | None, Tensor] = {None: now}
    groups = [[c] for c in changes] if len(changes) <= 8 else [list(changes)]
    read = []
    for group in groups:
        if not all(c.testable for c in group):  # a large plain tensor changed in place: its old value is gone
            read += group
            continue
        try:
            for seed in seeds:
                if seed not in nows:
                    nows[seed] = _forward(model, x, quiet, seed)
                with _restored(group, model):
                    before = _forward(model, x, quiet, seed)
                if _differ(nows[seed], before):
                    read += group
                    break
        except Exception:  # noqa: BLE001 - the old state cannot even run on this batch: it is read
            read += group
            continue
    return read


def _listed(changes: Sequence[Change]) -> str:
    return "; ".join(c.describe() for c in changes[:8]) + (f"; and {len(changes) - 8} more" if len(changes) > 8
                                                              else "")


class RecorderAttributesMixin:
    """The recorder's attribute checks (see :class:`~explaind.TrajectoryRecorder`)."""

    model: nn.Module
    _attributes: AttributeWatch
    _random: Any
    _pending: list[Any]
    _data: Any
    _n: int
    _quiet: Callable[[], Any]
    _memory: Any
    _store: Any
    _fsync: bool
    _manifest: Any

    def _test_batch(self, indices: Tensor | None) -> Any:
        """The inputs of at most :data:`TEST_SAMPLES` of ``indices``, on the parameters' device (``None``: no data)."""
        if self._data is None or indices is None:
            return None
        x, _ = self._data.get(indices[:TEST_SAMPLES])
        device = next(self.model.parameters()).device
        return x.to(device)

    def _check_attributes(self, s: int) -> None:
        """At step ``s``'s pre-step hook: refuse a change of the watched state that the forward reads (and a module
        compiled since the last step whose draws no eager replay repeats, explaind/_compiled.py)."""
        if self._random.compiled is not None:
            self._random.compiled.step(s)
        changes = self._attributes.take_changes()
        if not changes:
            return
        counts = self._attributes.counts
        for c in changes:
            counts[c.name] = counts.get(c.name, 0) + 1
        due = [c for c in changes if counts[c.name] & (counts[c.name] - 1) == 0]  # its 1st, 2nd, 4th, ... change
        where = f"between steps {s - 1} and {s}"
        x = self._test_batch(self._pending[0].indices) if due and self._pending else None
        if x is None and due:
            due = [c for c in due if counts[c.name] == 1]  # without data: warned about once
            if due:
                warn_user(logger, f"Step {s}: the model's {_listed(due)} changed {where}, outside the parameters and "
                                  f"buffers explaind records: the engine replays every step with the values as they "
                                  f"are when explaining, so if the forward reads them the earlier steps are inexact "
                                  f"(without train_data the recorder cannot test whether it does). {FIX}")
            self._attributes.accept()
            return
        read = reading(self.model, due, x, self._quiet) if due else []
        if read is None:
            warn_user(logger, f"Step {s}: the model's {_listed(due)} changed {where} and the recorder's test forward "
                              f"failed, so it cannot tell whether the forward reads them. {FIX}")
            self._attributes.accept()
            return
        if read:
            for c in changes:  # not accepted: tested again at the next step
                counts[c.name] -= 1
            self._attributes.refused = True
            raise TrajectoryError(
                f"Step {s}: the model's state outside its parameters and buffers changed {where} and the forward "
                f"reads it (on this step's batch it gives other outputs with the previous value): {_listed(read)}. "
                f"explaind records parameters and buffers per step, not Python attributes, submodules, modes or "
                f"hooks: the engine would replay every step with the values as they are when explaining, so all "
                f"earlier steps would be silently inexact. {FIX}"
            )
        logger.info("Step %d: %s changed %s; the forward does not read it on the step's batch (accepted).", s,
                    _listed(changes), where)
        self._attributes.unread.update(n for c in changes for n in c.names())
        self._attributes.accept()

    def _keep_attributes(self, clean: bool) -> None:
        """Keep the last step's fingerprint with the recording (docs/recording.md; ``_attribute_record``): on the
        in-memory trajectory, or in the store's ``attributes.json`` (a stale one removed after an unclean run)."""
        watch = self._attributes
        record = keep_record(watch.base, watch.ignore, watch.unread) if clean and watch.enabled else None
        self._final_state = final_state(self.model) if clean else None  # the values `with rec:` left
        if self._memory is not None:
            self._memory.attribute_record = record
            self._memory.final_state = self._final_state
        if self._store is not None:
            try:
                save_record(self._store, record, fsync=self._fsync, run_id=self._manifest.run_id)
            except OSError as exc:  # the recording itself is complete: only the later check is lost
                logger.warning("The attribute fingerprint could not be written to %s (%s): changes to the model's "
                               "plain attributes after recording will not be checked.", self._store, exc)

    def _with_final_state(self, traj: Any) -> Any:
        """``traj`` (a reader of this recorder's store) holding the values ``with rec:`` left (``_attribute_record``,
        :func:`~explaind.trajectory._attribute_record.check_final_state`)."""
        traj.final_state = getattr(self, "_final_state", None)
        return traj

    def _end_attributes(self, clean: bool, last: Tensor | None) -> None:
        """When recording ends: stop watching; after a clean run (no exception, no refused step), warn about changes
        after the last step that the forward reads on the last step's batch ``last`` (or, without data, about any)."""
        clean = clean and not self._attributes.refused
        changes = self._attributes.final_changes() if clean else []  # with its own hook still on, as at each step
        self._attributes.stop()
        try:
            self._final_attributes(changes, last)
        finally:
            self._keep_attributes(clean)

    def _final_attributes(self, changes: list[Change], last: Tensor | None) -> None:
        """Warn about ``changes`` made after the last step that the forward reads on ``last``'s batch."""
        if not changes:
            return
        x = self._test_batch(last)
        read = changes if x is None else reading(self.model, changes, x, self._quiet)
        if read is None:
            read = changes
        self._attributes.unread.update(n for c in changes if not any(c is r for r in read) for n in c.names())
        if read:
            warn_user(logger, f"After the last recorded step ({self._n - 1}) the model's {_listed(read)} changed "
                              f"(inside `with rec:`). The engine replays every step with the values as they are when "
                              f"explaining: set them back before explaining the run, or the replica and scores are "
                              f"inexact. {FIX}")
