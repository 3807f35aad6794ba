r"""The optimizer's carried momentum, watched between steps: a change outside ``optimizer.step()`` is refused.

The adapters model the first moment an optimizer carries from step to step (SGD's and RMSprop's
``momentum_buffer``, the ``exp_avg`` of the Adam family and of Hugging Face's Adafactor) as the linear recurrence
of the recorded gradients, :math:`m_s = a_s \odot m_{s-1} + b_s \odot u_s` (docs/maths.md §4), starting from the
buffer the optimizer held when recording began. A buffer changed between two steps (``opt.load_state_dict`` from
another run's checkpoint, ``state["momentum_buffer"].mul_(0.5)`` by hand) makes torch's next update differ from
the modelled one by a term no sample's gradient produced: before this watch, the run was recorded without a word
and the estimators' residual share (0.07 to 0.16 on the cases of tests/test_stranger_loops_round8.py) blamed the
optimizer adapter.

What is watched. After every ``optimizer.step()`` (a step post-hook) each carried buffer is kept by reference
with torch's version counter :math:`v`; before the next step (a pre-hook registered before the recorder's) it must
be the same tensor object with the same :math:`v`. An in-place edit bumps :math:`v`; ``load_state_dict`` puts new
tensors in the state, which are compared by value with the kept one (the same state loaded again passes). A
buffer that is gone (``opt.state.clear()``, a parameter's state deleted) is a restart from zero, which the
adapters model exactly (they read at every step which parameters hold a buffer), and passes. The state the
adapters read afresh at every step (Adam's ``exp_avg_sq`` and ``step``, Adagrad's ``sum``) is not watched: a change
of it is exact. The cost is one dictionary of references per step; no tensor is read unless it was replaced.
An edit through ``.data`` (``buf.data.mul_(0.5)``, which torch does not count) and buffers made under
``torch.inference_mode()`` (which have no counter) are not seen here: the update audit (``traj.audit()``) and the
estimators' residual warning still measure them.

Adapters of other plugins carry their own keys: :data:`CARRIED` names those of the first-party adapters, and an
adapter not listed is not watched (its audit, ``traj.audit()``, still measures every step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError

__all__ = ["CARRIED", "OptimizerStateWatch"]

#: The state entries each first-party adapter carries as :math:`m_{s-1}` (by adapter name).
CARRIED: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum_buffer",), "rmsprop": ("momentum_buffer",), "adam": ("exp_avg",), "adamw": ("exp_avg",),
    "nadam": ("exp_avg",), "radam": ("exp_avg",), "adamax": ("exp_avg",), "hf_adafactor": ("exp_avg",),
}


class OptimizerStateWatch:
    """Refuse a change of the carried buffers between two ``optimizer.step()`` calls.

    Parameters
    ----------
    adapter : str
        The adapter's registered name (its keys in :data:`CARRIED`; none: nothing is watched).
    params : dict of str to Parameter
        The recorded parameters, to name the edited buffers.
    step : callable
        Returns the number of the step about to be recorded (the recorder's count).
    """

    def __init__(self, adapter: str, params: dict[str, nn.Parameter], step: Callable[[], int]) -> None:
        self._keys = CARRIED.get(adapter, ())
        self._names = {id(p): n for n, p in params.items()}
        self._step = step
        self._seen: dict[tuple[int, str], tuple[Tensor, int]] = {}

    def hooks(self, optimizer: Any) -> list[Any]:
        """Register the pre-step check and the post-step snapshot on ``optimizer``; returns their handles."""
        if not self._keys:
            return []
        self._seen = self._carried(optimizer)  # what the recording starts from (the adapter's start state)
        return [optimizer.register_step_pre_hook(self.check), optimizer.register_step_post_hook(self.arm)]

    def _carried(self, optimizer: Any) -> dict[tuple[int, str], tuple[Tensor, int]]:
        out = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                for key in self._keys if state else ():
                    buf = state.get(key)
                    if isinstance(buf, Tensor) and not buf.is_inference():  # inference tensors have no counter
                        out[(id(p), key)] = (buf, buf._version)
        return out

    def arm(self, optimizer: Any, args: Any = (), kwargs: Any = None) -> None:
        """Post-step hook: keep each carried buffer and its version counter."""
        self._seen = self._carried(optimizer)

    def check(self, optimizer: Any, args: Any = (), kwargs: Any = None) -> None:
        """Pre-step hook: raise :class:`~explaind.exceptions.TrajectoryError` when a kept buffer changed."""
        if not self._seen:
            return
        now = self._carried(optimizer)
        edited = []
        for where, (buf, version) in self._seen.items():
            live = now.get(where)
            if live is None or (live[0] is buf and live[1] == version):
                continue
            if live[0] is not buf and _same_values(live[0], buf):  # the same state loaded again: no edit
                continue
            name = self._names.get(where[0], "an unrecorded parameter")
            edited.append(f"{name} ({where[1]}: {'replaced' if live[0] is not buf else 'changed in place'})")
        if not edited:
            return
        s = self._step()
        since = f"step {s - 1}" if s > 0 else "recording began"
        shown = ", ".join(edited[:6]) + (f" and {len(edited) - 6} more" if len(edited) > 6 else "")
        raise TrajectoryError(
            f"Step {s}: the optimizer's momentum buffers of {shown} changed outside optimizer.step() since {since} "
            f"(opt.load_state_dict(...) of another checkpoint, or a buffer edited by hand). explaind models that "
            f"momentum as the recurrence of the recorded gradients (docs/maths.md §4), so the change would move the "
            f"next updates by a term no training sample explains. The steps recorded before are kept. Fix: change "
            f"the optimizer's state outside `with rec:` and record the rest of the run with a new recorder, which "
            f"starts from the state the optimizer then holds (docs/recording.md, 'Starting from optimizer state'); "
            f"a momentum restart, opt.state.clear(), is exact inside `with rec:`."
        )


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` holds the values of ``b`` (shape, dtype and every element; a NaN never equals)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a.detach().to(b.device), b.detach()))
