r"""Gradient bookkeeping of the recorder: raw-gradient snapshots, the scale ``c_s``, autocast.

* :class:`GradientTap` copies each parameter's accumulated gradient right after ``backward``
  (``Tensor.register_post_accumulate_grad_hook``), before the user's loop may unscale, clip or edit
  it. At ``optimizer.step()`` the gradient the optimizer sees, :math:`g_s`, is compared *by value*
  with that raw gradient :math:`\tilde g_s` (never by ``Tensor._version``, which
  ``GradScaler.unscale_`` does not bump): the global factor :math:`c = \langle g_s, \tilde
  g_s\rangle / \langle \tilde g_s, \tilde g_s\rangle` is measured, and a per-coordinate change (not a
  global multiple) is an error. Each snapshot carries a sequence number, so the snapshots of an
  accumulation whose step was skipped (``GradScaler`` found inf/nan) can be forgotten.
* :class:`~explaind.trajectory._forward_probe.AutocastProbe` notes the autocast dtype of the loop's forwards.
* The update audit, which replays each step with the adapter's coefficients, is
  :class:`~explaind.trajectory._audit.UpdateAudit`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ._loop_hints import CarriedGradients
from ._random import draws_masks
from ._snapshot_copies import SnapshotCopies

__all__ = ["GradientTap", "has_stochastic_layers", "is_power_of_two", "same_bytes"]


def is_power_of_two(c: float) -> bool:
    """Whether ``c`` is exactly ``2**k`` for an integer ``k`` (the signature of a loss-scale unscale)."""
    return c > 0 and math.isfinite(c) and math.frexp(c)[0] == 0.5


def has_stochastic_layers(model: nn.Module) -> list[str]:
    """Names of modules whose training-mode output depends on randomness or batch statistics."""
    found = []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if draws_masks(module) or isinstance(module, nn.modules.batchnorm._NormBase):
            found.append(name or type(module).__name__)
    return found


#: dtypes whose CPU tensors are compared through numpy (``torch.equal`` on CPU is ~15x slower)
_NUMPY_EQUAL = frozenset({torch.float16, torch.float32, torch.float64})
#: The NaN-gradient message's hint for a finite loss: a selection over a branch that is NaN where it is not taken.
NAN_BRANCH_HINT = (
    "If the loss is finite, the NaN often comes from torch.where (or a mask) choosing between branches one of which "
    "is NaN or inf where it is not chosen, e.g. torch.where(h > 0, torch.sqrt(h), h) or a log or division of values "
    "outside their domain: its backward multiplies that branch's derivative by 0, and 0 * NaN = NaN, although the "
    "forward's values are finite. Fix: apply the selection to the branch's input too (the double where), "
    "torch.where(h > 0, torch.sqrt(torch.where(h > 0, h, 1.0)), h); torch.autograd.detect_anomaly(check_nan=True) "
    "around the step names the operation whose backward gave the NaN. Two more sources: x / x.norm() at an all-zero "
    "x, such as ReLU units all off (0 / 0 in the forward too; fix: F.normalize(x, eps=1e-12)), and "
    "torch.log(torch.softmax(z)) once a probability underflows to 0 (log(0) = -inf, its derivative inf; fix: "
    "F.log_softmax(z)).")


@functools.cache
def _memcmp() -> Any:
    """The C library's ``memcmp`` through ctypes, loaded at first use (``None`` where it cannot be)."""
    try:
        fn = (ctypes.CDLL("msvcrt") if sys.platform == "win32" else ctypes.CDLL(None)).memcmp
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return fn


def same_bytes(a: Tensor, b: Tensor) -> bool:
    """Whether two contiguous CPU tensors of one dtype and shape hold the same bytes (``memcmp``, no temporaries)."""
    memcmp = _memcmp()
    if memcmp is None or not (a.is_contiguous() and b.is_contiguous()):
        return False
    return memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values (one pass, no copies).

    Compared by value (``-0.0 == 0.0``). On CPU the bytes are compared first (``memcmp``, without
    numpy's temporary array of ``a.numel()`` booleans), so there a NaN with the same bits in both
    counts as the same; on other devices NaN differs from everything. Either way the caller reports a non-finite
    gradient (:meth:`GradientTap.measure` checks the finiteness of every gradient not known finite).
    """
    if a.dtype != b.dtype or a.device != b.device or a.shape != b.shape:
        return False
    cpu = a.device.type == "cpu" and not (a.is_neg() or b.is_neg())
    if cpu and same_bytes(a, b):
        return True
    if cpu and a.dtype in _NUMPY_EQUAL:
        return bool(np.array_equal(a.detach().numpy(), b.detach().numpy()))
    return bool(torch.equal(a, b))


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite, in one pass without temporaries where it is.

    A sum with a NaN or an infinity among its terms is not finite, so a finite sum means every
    element is; a sum that is not finite can also be an overflow of finite terms (or a complex
    tensor), so then each element is checked (``torch.isfinite``, exact, slower).
    """
    if t.is_floating_point() and math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def _dot64(a: Tensor, b: Tensor) -> Tensor:
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


class GradientTap:
    """Raw accumulated gradients, snapshotted after every ``backward`` that reaches a parameter.

    Parameters
    ----------
    params : dict of str to Parameter
        The recorded parameters; those that do not require grad yet are hooked by :meth:`sync`
        once they do.
    copy : callable, optional
        ``copy(key, tensor)`` makes a new snapshot buffer (default ``clone``; the recorder passes
        its :class:`~explaind.trajectory._background.CopyPool`, keys ``"grad.<name>"``).
    copier : StateCopier, optional
        Makes large CPU snapshots, checked finite, on its thread during ``backward()`` (:mod:`._snapshot_copies`).
    """

    def __init__(self, params: dict[str, nn.Parameter], copy: Any = None, copier: Any = None):
        self._params = params
        self._copy = copy or (lambda _key, g: g.detach().clone())
        self._copies = None if copier is None else SnapshotCopies(params, copier)
        self._unchanged: set[str] = set()
        self._raw: dict[str, Tensor] = {}
        self._stamp: dict[str, int] = {}
        self._finite: dict[str, tuple[int, bool]] = {}  # name -> (stamp, finite) of the snapshot last checked
        self._seq = 0
        self.reset_seq = 0  # the sequence number at the last step: later snapshots belong to the step in flight
        self._hits: dict[str, int] = {}  # snapshots per parameter since the last log_batch
        self._where: dict[str, tuple[int, int]] = {}  # name -> (data_ptr, version) at its last backward this step
        self._hooked: set[str] = set()
        self._handles: list[Any] = []
        self.carried = CarriedGradients()  # zero_grad() left out before a step (explaind/trajectory/_loop_hints.py)

    @property
    def seq(self) -> int:
        """Sequence number of the latest snapshot."""
        return self._seq

    def attach(self) -> None:
        self.sync()

    def sync(self) -> None:
        """Hook every parameter that requires grad now and is not hooked yet (cheap; called per forward)."""
        if len(self._hooked) == len(self._params):
            return
        for name, p in self._params.items():
            if name not in self._hooked and p.requires_grad:
                self._handles.append(p.register_post_accumulate_grad_hook(self._make_hook(name)))
                self._hooked.add(name)

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._hooked.clear()

    def _make_hook(self, name: str) -> Any:
        def hook(p: Tensor) -> None:
            g = p.grad
            if g is None:
                return
            self._seq += 1
            if name not in self._stamp:  # the step's first backward to reach it
                self.carried.first_backward(name, g)
            stamp = self._stamp[name] = self._seq
            self._hits[name] = self._hits.get(name, 0) + 1
            self._where[name] = (p.data_ptr(), p._version)
            if self._copies is None or not self._copies.submit(p, g, lambda: self._snap(name, g, stamp)):
                self._snap(name, g)

        return hook

    def _snap(self, name: str, g: Tensor, stamp: int | None = None) -> None:
        """Copy ``g`` into the snapshot of ``name``; with ``stamp`` (on the copier's thread) also check it finite."""
        buf = self._raw.get(name)
        if buf is None or buf.shape != g.shape or buf.dtype != g.dtype or buf.device != g.device:
            self._raw[name] = buf = self._copy("grad." + name, g)
        else:  # neither tensor requires grad: no autograd bookkeeping
            buf.copy_(g.detach())
        if stamp is not None:  # while the copy is in the cache; finite_since reads it
            self._finite[name] = (stamp, all_finite(buf))

    @property
    def backwards_pending(self) -> int:
        """How many ``backward`` passes reached the parameters since the last :meth:`take_backwards`."""
        return max(self._hits.values(), default=0)

    def take_backwards(self) -> int:
        """How many ``backward`` passes reached the parameters since the last call (the most reaching one)."""
        n = max(self._hits.values(), default=0)
        self._hits.clear()
        return n

    def reset(self) -> None:
        """Forget the snapshots of the finished accumulation (after each optimizer step)."""
        self._stamp.clear()
        self._unchanged.clear()
        self._where.clear()
        self.carried.after_step(self._params)
        self.reset_seq = self._seq

    def written_since_backward(self) -> list[str]:
        """The parameters written (in place, or their ``.data`` assigned) since the ``backward`` that last reached
        them in this step: their gradient was taken at other values than those the step starts from (SAM's
        perturbation restored before ``optimizer.step()``; :mod:`explaind._weight_writes`)."""
        return [n for n, where in self._where.items()
                if (self._params[n].data_ptr(), self._params[n]._version) != where]

    def take(self, name: str) -> Tensor | None:
        """Hand over the snapshot of ``name`` when :meth:`measure` found ``p.grad`` equal to it, else ``None``.

        The caller owns the buffer from now on (the next ``backward`` snapshots into a new one):
        the audit reads the gradient the optimizer saw without copying it again.
        """
        if name not in self._unchanged:
            return None
        self._unchanged.discard(name)
        return self._raw.pop(name, None)

    def snapshot(self, name: str) -> Tensor | None:
        """The snapshot of ``name`` when :meth:`measure` found ``p.grad`` equal to it, else ``None``.

        Unlike :meth:`take` the tap keeps the buffer (the next ``backward`` snapshots into it): for a
        reader that is done with it before then, such as the update audit run at the step.
        """
        return self._raw.get(name) if name in self._unchanged else None

    def drop_unchanged(self) -> int:
        """Free the snapshots that :meth:`measure` found equal to ``p.grad``; returns how many.

        Their values stay readable as ``p.grad`` (:meth:`raw` then returns the gradient it is given,
        :meth:`snapshot` ``None``); the next ``backward`` snapshots into a new buffer. For a moment that
        needs the memory (the gradient check recomputes a whole forward and backward).
        """
        names = [n for n in self._unchanged if n in self._raw]
        for n in names:
            del self._raw[n]
        return len(names)

    def forget_until(self, seq: int) -> None:
        """Forget the snapshots taken up to sequence number ``seq`` (an accumulation whose step was skipped)."""
        self._stamp = {n: t for n, t in self._stamp.items() if t > seq}

    def reached(self, name: str) -> bool:
        """Whether a backward reached ``name`` since the last step."""
        return name in self._stamp

    def raw(self, name: str, seen: Tensor) -> Tensor:
        """The raw gradient of ``name`` (``seen`` itself when no backward reached it since the last step).

        ``seen`` too when its snapshot equalled it and was dropped (:meth:`drop_unchanged`).
        """
        if name in self._stamp and not (name in self._unchanged and name not in self._raw):
            return self._raw[name]
        return seen

    def finite_since(self, seq: int) -> bool | None:
        """Whether the snapshots taken after ``seq`` are all finite (``None`` when there are none).

        Each snapshot's answer is kept with its sequence number, so a snapshot is checked once: on the
        CPU by :func:`all_finite` (a sum: faster than a norm, and the square of a finite value cannot
        overflow it), elsewhere by one ``_foreach_norm`` of all of them (one device sync), each norm that
        is not finite then checked element by element.
        """
        names = [n for n, t in self._stamp.items() if t > seq]
        if not names:
            return None
        todo = [n for n in names if self._finite.get(n, (-1, False))[0] != self._stamp[n]]
        cpu = [n for n in todo if self._raw[n].device.type == "cpu"]
        for n in cpu:
            self._finite[n] = (self._stamp[n], all_finite(self._raw[n]))
        todo = [n for n in todo if n not in cpu]
        if todo:
            norms = torch._foreach_norm([self._raw[n] for n in todo])
            for n, x in zip(todo, norms):
                finite = math.isfinite(float(x)) or bool(torch.isfinite(self._raw[n]).all())
                self._finite[n] = (self._stamp[n], finite)
        return all(self._finite[n][1] for n in names)

    def _known_finite(self, name: str) -> bool:
        """Whether the current snapshot of ``name`` was found finite (by :meth:`finite_since`)."""
        stamp = self._stamp.get(name)
        return stamp is not None and self._finite.get(name) == (stamp, True)

    def measure(self, seen: dict[str, Tensor], step: int, tol: float) -> float:
        """Compare the gradients the optimizer sees with the snapshots; return ``c`` (``g_seen = c g_raw``).

        Parameters
        ----------
        seen : dict of str to Tensor
            ``p.grad`` of the parameters the optimizer steps now.

        Raises
        ------
        TrajectoryError
            For NaN/inf gradients, or a change that is not a global multiple (e.g. ``clip_grad_value_``).
        """
        names = list(seen)
        if not names:
            return 1.0
        compared = [n for n in names if self.reached(n)]
        unchanged = self._unchanged = {n for n in compared if _same(seen[n], self._raw[n])}
        # a gradient equal to its snapshot is finite when the snapshot was found so at log_batch
        unknown = [n for n in names if not (n in unchanged and self._known_finite(n))]
        grads = [seen[n] for n in unknown]
        total = sum(float(x) for x in torch._foreach_norm(grads)) if grads else 0.0
        # a norm that is not finite is a NaN or inf, or a square of a huge finite value that overflowed
        bad = [] if math.isfinite(total) else [n for n, g in zip(unknown, grads) if not bool(torch.isfinite(g).all())]
        if bad:
            raise TrajectoryError(
                f"Step {step}: the gradient of {', '.join(bad)} contains NaN or inf, so this step cannot be recorded "
                f"(nothing was stored for it). Lower the learning rate, check the loss and inputs, or clip gradients. "
                f"{NAN_BRANCH_HINT}"
            )
        if len(unchanged) == len(compared):
            # unchanged gradients (the common case): c = 1 without the float64 dot products below
            return 1.0
        parts = [torch.stack([_dot64(seen[n], self._raw[n]), _dot64(self._raw[n], self._raw[n]),
                              _dot64(seen[n], seen[n])]) for n in compared]
        try:
            values = torch.stack(parts).tolist()
        except RuntimeError:  # parameters on several devices
            values = [v.tolist() for v in parts]
        modified = [n for n, (d, rr, gg) in zip(compared, values) if not d == rr == gg]
        dot = sum(v[0] for v in values)
        sq_raw = sum(v[1] for v in values)
        sq_seen = sum(v[2] for v in values)
        if not modified or sq_raw == 0.0:
            return 1.0
        c = dot / sq_raw
        deviation = math.sqrt(max(sq_seen - dot * dot / sq_raw, 0.0) / sq_seen) if sq_seen > 0 else 0.0
        if deviation > tol:
            raise TrajectoryError(
                f"Step {step}: between backward() and optimizer.step() the gradient of {', '.join(modified)} was "
                f"changed by more than a global factor (relative deviation {deviation:.3g} > {tol:g}). Only global "
                f"rescaling such as torch.nn.utils.clip_grad_norm_ over all parameters can be recorded; "
                f"clip_grad_value_, per-parameter clipping or noise added to .grad cannot (nor unit-wise clipping, "
                f"NFNets' adaptive gradient clipping; noise drawn inside "
                f"the model's forward, e.g. by a noise layer, is replayed from the captured random state). A term "
                f"added to .grad by hand (in the loop, or in a hook such as Lightning's on_after_backward), e.g. "
                f"weight decay p.grad += lam * p, is the optimizer's own weight_decay=lam (SGD, Adam), which is "
                f"recorded: set that instead; an average of past gradients written into .grad by hand (momentum "
                f"by hand, g_avg = beta g_avg + (1 - beta) g from the first gradient on) is SGD(momentum=beta, "
                f"dampening=beta), also recorded. Per-sample clipping (DP-SGD's, sum_k f_k g_k / B written into "
                f".grad) is a weight per sample: backward the per-sample losses times their clip factors, "
                f"(losses * (f / B).detach()).sum().backward(), and log those weights, rec.log_batch(idx, "
                f"weights=f / B), which is recorded exactly; DP-SGD's Gaussian noise is no sample's gradient, so "
                f"no split over samples holds it: record the run without the noise."
                f"{_per_parameter_factor_hint(compared, values, modified, tol)}"
                f"{_centralized_hint({n: seen[n] for n in modified}, {n: self._raw[n] for n in modified})}"
            )
        return c


def _centralized_hint(seen: dict[str, Tensor], raw: dict[str, Tensor]) -> str:
    """The hint for gradient centralization: every changed gradient (of a weight with two or more axes) equal to
    its backward's gradient minus that gradient's mean over the axes after the first, within 1e-6 relative."""
    if not seen:
        return ""
    for name, g in seen.items():
        r = raw[name].double()
        if r.ndim < 2:
            return ""
        centred = r - r.mean(dim=tuple(range(1, r.ndim)), keepdim=True)
        if float((g.double() - centred).norm()) > 1e-6 * max(float(centred.norm()), 1e-300):
            return ""
    return (f" The gradients of {', '.join(seen)} are those of backward() minus their mean over every axis but the "
            f"first: gradient centralization, a projection P of each weight's gradient, which no elementwise "
            f"optimizer adapter expresses. With SGD (momentum, weight decay left out) the same run is a "
            f"reparametrization: register on each such weight a parametrization W = V - V.mean(axes after the "
            f"first) + M0, M0 the initial W's mean held as a buffer of the parametrization "
            f"(torch.nn.utils.parametrize.register_parametrization), V starting at the initial W and trained without "
            f"the centralization: its gradient is P times W's, its W moves as the centralized run's, and it is "
            f"recorded exactly; with Adam-type optimizers no exact form exists (their update of P g is not centred)"
            f": record the run without it.")


def _per_parameter_factor_hint(names: list[str], values: list[list[float]], modified: list[str], tol: float) -> str:
    """The hint for gradients each multiplied by a factor of its own (a per-layer gradient scale).

    ``values`` holds, per name, the float64 products ``(<seen, raw>, |raw|^2, |seen|^2)``; a gradient is a multiple
    of its snapshot when ``<seen, raw>^2 = |raw|^2 |seen|^2`` within ``tol`` (relative, as the global check).
    """
    factors = {}
    for n, (d, rr, gg) in zip(names, values):
        if n in modified:
            if rr == 0.0 or gg == 0.0 or math.sqrt(max(gg - d * d / rr, 0.0) / gg) > tol:
                return ""
            factors[n] = d / rr
    listed = ", ".join(f"{n} times {c:.3g}" for n, c in list(factors.items())[:5])
    return (f" Each of them is its own gradient times a factor ({listed}): a per-layer gradient scale. Fix: with "
            f"SGD (weight_decay 0, the same factor at every step) it is that layer's learning rate times the factor: "
            f"give those parameters their own parameter group, {{'params': [...], 'lr': lr * factor}}, and leave "
            f".grad as backward() left it (recorded exactly); with Adam-like optimizers a constant factor on a "
            f"gradient cancels in the update up to eps: leave it out.")
