r"""Loop habits the gradient check names when it fails: keyword arguments only the loop passes, gradients
cleared between the micro-batches of one step.

**Keyword arguments.**

explaind calls the model with ``train_data``'s inputs alone: ``model(x)`` for a tensor, ``model(*x)`` for a tuple,
``model(**x)`` for a mapping, whose entries that are no tensor are passed unchanged to every call (docs/recording.md).
A loop that passes more, ``model(features=x, temperature=2.0)`` or ``model(x, mask=m)``, trains a function of
arguments the recomputed gradients never see: they take the forward's defaults there, every per-sample gradient
is another function's, and the gradient check refuses step 0 with a dozen causes, none of them this one.

:class:`KeywordProbe` keeps, for the first few training forwards of each step (grad enabled, the model in training
mode, not the recorder's own forwards), the names of the keyword arguments and a short text of each value that is
no tensor; :func:`loop_kwargs_hint` names those that ``train_data`` does not pass, or passes with another value,
and the fix: put them in ``train_data`` as a mapping.

**Gradients cleared between micro-batches.** ``optimizer.zero_grad()`` inside the accumulation loop leaves only the
last micro-batch's gradient for the step, while every micro-batch is logged. When the check of such a step fails,
the recorder checks the last micro-batch alone; if its gradient matches, :func:`cleared_message` names the
habit and the fix.

**Gradients carried over from the previous step.** A loop that leaves out ``optimizer.zero_grad()`` before one step
accumulates that step's gradient onto the previous step's: the optimizer steps with
:math:`g_s(\theta_s) + g_{s-1}(\theta_{s-1})`, no gradient of the logged batch at :math:`\theta_s`. Unless the
gradient check runs at that step (``check_gradients="auto"`` checks only some), the run would be recorded with the
difference in the residual, which the estimators warn about without naming it. :class:`CarriedGradients` sees it
without touching values: after each step it keeps, per parameter, a weak reference to ``p.grad`` and the
gradient's version counter; at the step's first ``backward`` that reaches the parameter, the same tensor whose
counter moved exactly once (by the accumulation itself) was neither set to ``None`` (``zero_grad()``'s default
makes a new tensor) nor zeroed in place (``zero_grad(set_to_none=False)`` moves the counter once more). The
recorder then checks that step's gradient, whose failure :func:`carried_message` names, or warns when no check can
run. A gradient zeroed through ``p.grad.data.zero_()``, which the counter does not see, only costs that step a
check that passes.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..inputs import Inputs
from ._common import ModelHook

__all__ = ["CarriedGradients", "KeywordProbe", "carried_message", "cleared_message", "loop_kwargs_hint"]

#: At most this many training forwards' keyword arguments are kept per step.
_KEPT = 4

#: Keyword arguments that do not change the outputs explaind explains (a Hugging Face model's own loss and flags).
_NEUTRAL = frozenset({"labels", "label", "return_dict", "use_cache", "output_attentions", "output_hidden_states",
                      "num_items_in_batch"})


def _text(value: Any) -> str:
    """A short text of a keyword argument's value: ``"<tensor>"`` for a tensor (compared by name only)."""
    return "<tensor>" if isinstance(value, Tensor) else repr(value)[:40]


class KeywordProbe:
    """A forward pre-hook (``with_kwargs=True``) on the recorded model keeping its training forwards' keyword
    arguments since the last step.

    Parameters
    ----------
    model : nn.Module
        The recorded model.
    paused : callable
        ``paused()`` is true while the recorder runs its own forwards (which it makes with ``train_data``).
    """

    def __init__(self, model: nn.Module, paused: Callable[[], bool]):
        self._model, self._paused = model, paused
        self.seen: list[dict[str, str]] = []
        self._handle: Any = None

    def attach(self) -> None:
        self._handle = self._model.register_forward_pre_hook(ModelHook(self._hook), with_kwargs=True)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        if (kwargs and not self._paused() and module.training and torch.is_grad_enabled()
                and len(self.seen) < _KEPT):
            self.seen.append({k: _text(v) for k, v in kwargs.items()})

    def reset(self) -> None:
        """Forget the forward passes of the finished step."""
        self.seen = []


def loop_kwargs_hint(seen: list[dict[str, str]], rows: Any) -> str:
    """The failed gradient check's sentence naming keyword arguments of the loop's training forwards that
    ``train_data`` does not pass (or passes with another value); ``""`` when there are none.

    Parameters
    ----------
    seen : list of dict
        :attr:`KeywordProbe.seen`: per training forward, each keyword argument's name and value text.
    rows : Tensor or Inputs
        ``train_data``'s inputs at the logged indices.

    Returns
    -------
    str
    """
    held = rows.data if isinstance(rows, Inputs) and isinstance(rows.data, dict) else {}
    extra: dict[str, str] = {}
    for kwargs in seen:
        for name, text in kwargs.items():
            if name in _NEUTRAL:
                continue
            if name not in held:
                extra.setdefault(name, text)
            elif text != "<tensor>" and not isinstance(held[name], Tensor) and _text(held[name]) != text:
                extra.setdefault(name, f"{text} (train_data: {_text(held[name])})")
    if not extra:
        return ""
    shown = ", ".join(f"{k}={v}" for k, v in list(extra.items())[:6])
    return (f" The model's training forward(s) of this step received keyword argument(s) {shown} that train_data's "
            f"inputs do not pass as the loop did: explaind calls the model with train_data's inputs alone (model(x), "
            f"or model(**x) for a mapping), so every recomputed gradient took the forward's defaults there. Fix: "
            f"give train_data as a mapping holding them, ({{'features': X, 'temperature': 2.0}}, y) for "
            f"model(features=x, temperature=2.0): entries that are no tensor are passed unchanged to every call, "
            f"tensors are sliced by the logged indices.")


def cleared_message(s: int, micro_batches: int) -> str:
    """The failed check's first sentence when step ``s``'s gradient is its last micro-batch's alone (of
    ``micro_batches`` logged).

    Parameters
    ----------
    s : int
        The step.
    micro_batches : int
        How many micro-batches the step logged.

    Returns
    -------
    str
    """
    return (f" The gradient the optimizer steps at step {s} is the gradient of the last of its {micro_batches} logged "
            f"micro-batches alone (checked: it matches): the gradients were cleared between micro-batches, as "
            f"optimizer.zero_grad() (or model.zero_grad()) inside the gradient-accumulation loop does. Fix: clear them "
            f"once per step, before the first micro-batch's backward(); or, if only the last micro-batch is meant to "
            f"count, log only it.")


class CarriedGradients:
    """The parameters whose gradient at the step's first ``backward`` was the previous step's, accumulated into."""

    def __init__(self) -> None:
        self._left: dict[str, tuple[weakref.ref, int]] = {}
        self.names: list[str] = []

    def after_step(self, params: dict[str, nn.Parameter]) -> None:
        """Remember each gradient the finished step leaves (a weak reference and its version counter)."""
        self._left = {n: (weakref.ref(p.grad), p.grad._version) for n, p in params.items() if p.grad is not None}
        self.names = []

    def first_backward(self, name: str, grad: Tensor) -> None:
        """At the step's first ``backward`` reaching ``name``: note it if ``grad`` is the left gradient, moved once."""
        left = self._left.get(name)
        if left is not None and left[0]() is grad and grad._version == left[1] + 1:
            self.names.append(name)


def carried_message(s: int, names: list[str], checked: bool) -> str:
    """Names the parameters whose step-``s`` gradient was accumulated onto the previous step's.

    Parameters
    ----------
    s : int
        The step.
    names : list of str
        The parameters (at most five are shown).
    checked : bool
        ``True``: the sentence that leads a failed gradient check's hint; ``False``: a warning that no check runs.

    Returns
    -------
    str
    """
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    head = f" At step {s} the gradient" if checked else f"Step {s}: the gradient"
    tail = "" if checked else ("; no gradient check can run here (check_gradients off or no train_data), so the "
                               "carried gradient is left in the residual (a gradient zeroed through "
                               "p.grad.data.zero_(), which moves no version counter, looks the same: then nothing is "
                               "carried; said once per run)")
    return (f"{head} of {shown} was accumulated onto the one step {s - 1} left: p.grad was neither set to None nor "
            f"zeroed between step {s - 1}'s optimizer.step() and this step's backward() (optimizer.zero_grad() left "
            f"out), so the optimizer stepped with this batch's gradient plus the previous one's, which is no "
            f"gradient of the logged batch at the step's parameters{tail}. Fix: call optimizer.zero_grad() before "
            f"every step's backward(); to accumulate several batches into one step on purpose, log each as a "
            f"micro-batch of that step (rec.log_batch per micro-batch, one optimizer.step()), recorded exactly.")
