r"""The computation context of the estimators: parameters per step and one evaluator.

:class:`PathEngine` wraps a :class:`~explaind.trajectory.base.Trajectory` for computation on one
device and dtype. It streams :math:`\theta_s` step by step (a small cache keeps the last few),
builds the explained function :math:`g` for a set of test inputs and evaluates it, and holds the
:class:`~explaind.kernel.evaluate.Evaluator` every algorithm calls for derivatives: the
layer-factored one when it applies (:mod:`~explaind.kernel.layers`), else ``torch.func``
(:mod:`~explaind.kernel.autograd`).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..exceptions import ConfigError, warn_at_caller
from ..inputs import as_inputs
from ..trajectory.base import Trajectory
from .adjoint import reversed_backward
from .autograd import AutogradEvaluator
from .casts import CastSite, find_casts, sites_text
from .evaluate import Evaluator, StepStack, budgets
from .explained import Explained, FunctionalModel, Params
from .jumps import watch_jumps
from .layers import LayerEvaluator
from .layout import ParamLayout

__all__ = ["PathEngine", "make_evaluator", "CASTS"]

logger = logging.getLogger(__name__)

#: Values of the estimators' ``casts`` parameter (see :meth:`PathEngine.settle_casts`).
CASTS = ("auto", "replay_dtype", "as_written")
#: Conversions whose rounding (about 1e-3 and 1e-2 relative) ``casts="auto"`` warns of as an ExplaindWarning.
HALF_DTYPES = frozenset({"torch.float16", "torch.bfloat16"})

#: Parameters kept in the step cache.
CACHED_STEPS = 3


def make_evaluator(fm: FunctionalModel, names: tuple[str, ...], factored: str, chunk_size: int | None) -> Evaluator:
    """The evaluator for ``factored`` (``"auto"``, ``"always"`` or ``"never"``; see :class:`PathEngine`)."""
    if factored not in ("auto", "always", "never"):
        raise ConfigError(f"PathEngine: invalid value for 'factored': {factored!r}; choose one of 'auto', "
                          f"'always', 'never'.")
    base = AutogradEvaluator(fm, chunk_size)
    if factored == "never" or (factored == "auto" and _generic_is_faster(fm)):
        return base
    return LayerEvaluator(base, names, strict=factored == "always")


#: On the CPU, models with an ``nn.MultiheadAttention`` narrower than this take the generic path under ``"auto"``.
NARROW_ATTENTION = 64


def _generic_is_faster(fm: FunctionalModel) -> bool:
    """``"auto"`` on the CPU keeps convolutional models and narrow attention blocks on the ``torch.func`` path.

    Measured by ``benchmarks/bench_layer_rules_models.py`` (docs/engine.md): on the CPU the Conv2d
    rule's unfolded patches cost more than the generic path (a ResNet-18-shaped model ran at 0.56-0.97x
    with the rules in most rows), and a ``nn.TransformerEncoderLayer`` model of width 32 ran at
    0.42-0.97x with the attention rule, against 0.96-1.35x at width 128 (:data:`NARROW_ATTENTION`).
    ``factored="always"`` still uses them.
    """
    if fm.device.type != "cpu":
        return False
    return any(isinstance(m, torch.nn.Conv2d) or (isinstance(m, torch.nn.MultiheadAttention)
                                                  and m.embed_dim < NARROW_ATTENTION) for m in fm.module.modules())


class PathEngine:
    """Computation context over a trajectory.

    Parameters
    ----------
    traj : Trajectory
        The recorded run (read only through the abstract interface).
    device : torch.device
    dtype : torch.dtype
    chunk_size : int or None
        Samples or (input, node) pairs per ``vmap`` call (``None`` = everything at once).
    progress : bool
        Show progress bars over steps.
    factored : {"auto", "always", "never"}
        Use the layer-factored evaluator where registered layer rules cover every trainable
        parameter, each capability after a start-up check against ``torch.func``. ``"auto"`` falls
        back to ``torch.func`` when they do not apply, ``"always"`` raises
        :class:`~explaind.exceptions.ConfigError` then, ``"never"`` always uses ``torch.func``.
    casts : {"auto", "replay_dtype", "as_written"}
        Conversions in the forward below ``dtype`` (:meth:`settle_casts`).
    memory_budget : int, optional
        Bytes of output-sized state: half for the adaptive rule's chunks of (step, input) pairs
        (``rule_bytes``), an eighth for the outputs of one evaluation (:func:`~explaind.kernel.evaluate.budgets`);
        ``None``: the modules' defaults.
    """

    def __init__(self, traj: Trajectory, *, device: torch.device, dtype: torch.dtype, chunk_size: int | None,
                 progress: bool = False, factored: str = "auto", casts: str = "auto",
                 memory_budget: int | None = None):
        if casts not in CASTS:
            raise ConfigError(f"PathEngine: invalid value for 'casts': {casts!r}; choose one of "
                              f"{', '.join(map(repr, CASTS))}.")
        self.casts = casts
        #: the conversions below ``dtype`` found by :meth:`settle_casts` (``None`` before it ran)
        self.cast_sites: tuple[CastSite, ...] | None = None
        #: the forward's calls that can jump in the parameters, found with them (explaind/kernel/jumps.py)
        self.jump_sites: tuple[str, ...] = ()
        #: the forward's calls with a kink (``F.relu``, ``clamp``), found with them, for the cost notices
        self.kink_sites: tuple[str, ...] = ()
        #: the custom Functions or gradient hooks whose backward is not the derivative of the forward, when the
        #: dot-product test found one: Jacobians are then taken in forward mode (:meth:`settle_jacobians`)
        self.forward_jacobians: tuple[str, ...] = ()
        #: the relative gap of that test (0 when it did not run)
        self.backward_gap = 0.0
        self.traj = traj
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.progress = progress
        self.names = tuple(traj.param_names)
        self.fm = FunctionalModel(traj.model, traj.constants(), traj.loss.implementation, device, dtype,
                                  traj.generators)
        self.layout = ParamLayout.from_tensors(traj.params(0), self.names)
        #: buffers that training changed (running statistics, a step counter the forward reads): part of every
        #: point, not of the path; integer ones too (an evaluation forward may read them)
        self.buffer_names = tuple(traj.buffer_names)
        self.evaluator = make_evaluator(self.fm, self.names, factored, chunk_size)
        #: bytes of output-sized state of the adaptive rule's chunks (``None``: ``adaptive_chunks.RULE_BYTES``)
        self.rule_bytes, output_bytes = budgets(memory_budget)
        getattr(self.evaluator, "fallback", self.evaluator).output_bytes = output_bytes
        #: the adaptive rule's evaluations per (step, input) pair at most (``None``: ``adaptive.MAX_EVALS``)
        self.max_evals: int | None = None
        self._cache: OrderedDict[int, Params] = OrderedDict()

    def params(self, s: int) -> Params:
        r""":math:`\theta_s` on the compute device and dtype (cached, do not modify).

        With buffers that training changed, also :math:`\beta_s` (:attr:`buffer_names`): step ``s``'s
        segment is evaluated at :math:`(\theta_s + t\Delta\theta_s, \beta_s)` (docs/maths.md, "Buffers").
        """
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        p = self.fm.cast_params(self.traj.params(s), self.names)
        if self.buffer_names:
            p.update(self.fm.cast_params(self.traj.buffers(s), self.buffer_names))
        self._cache[s] = p
        while len(self._cache) > CACHED_STEPS:
            self._cache.popitem(last=False)
        return p

    def delta(self, s: int) -> Params:
        r""":math:`\Delta\theta_s = \theta_{s+1} - \theta_s`."""
        a, b = self.params(s), self.params(s + 1)
        return {n: b[n] - a[n] for n in self.names}

    def stack(self, lo: int, hi: int, X: Tensor, explained: Explained, points: list[Params] | None = None) -> StepStack:
        r"""The segments of steps ``lo .. hi-1``, :math:`\theta_s` and :math:`\Delta\theta_s` stacked.

        ``points``: :math:`\theta_{lo} .. \theta_{hi}` (``hi - lo + 1`` entries of :meth:`params`) when the caller
        holds them already; each step's file is then read once however many steps the stack holds.
        """
        points = [self.params(s) for s in range(lo, hi + 1)] if points is None else points
        bases = points[:-1]
        deltas = [{n: b[n] - a[n] for n in self.names} for a, b in zip(points[:-1], points[1:])]
        return StepStack({k: torch.stack([b[k] for b in bases]) for k in bases[0]},
                         {k: torch.stack([d[k] for d in deltas]) for k in self.names}, X, explained)

    def settle_casts(self, x: Any, owner: str) -> tuple[CastSite, ...]:
        r"""Find the forward's conversions below the compute dtype on one input ``x`` and decide, once.

        ``"as_written"``: :math:`g` keeps them; when some round a tensor that depends on the
        parameters, an :class:`~explaind.exceptions.ExplaindWarning` names them and the fix (their rounding
        makes the path integrand noisy). ``"replay_dtype"``: :math:`g` converts to the compute dtype
        instead wherever the forward converts below it. ``"auto"``: like ``"replay_dtype"`` when a
        parameter-dependent conversion was found (a logged warning names them; an ExplaindWarning for conversions
        to a 16-bit float, whose rounding the replica then differs from the model by), else like ``"as_written"``
        (no change at all). Training gradients always round as the run did
        (docs/maths.md, "Casts below the replay dtype").

        Returns the sites found (:class:`~explaind.kernel.casts.CastSite`).
        """
        if self.cast_sites is not None:
            return self.cast_sites
        kinks: list[str] = []
        with watch_jumps(self.fm.module, kinks) as jumps:  # the same probe forward
            sites = find_casts(self.fm.module, lambda p: self.fm(p, x), self.params(0), self.names, self.dtype)
        self.cast_sites, self.jump_sites, self.kink_sites = sites, tuple(jumps), tuple(kinks)
        self.settle_jacobians(x, owner)
        moving = tuple(s for s in sites if s.moving)
        self.fm.keep_dtype = self.casts == "replay_dtype" or (self.casts == "auto" and bool(moving))
        if moving and self.casts == "as_written":
            warn_at_caller(
                f"{owner}: the model's forward converts tensors that depend on the parameters to a dtype below "
                f"{self.dtype} ({sites_text(moving)}), and casts='as_written' replays that rounding: the path "
                f"integrand is noisy at its level, so the adaptive quadrature may stop at its cap and the error left "
                f"lands in quadrature_error. Fix: casts='auto' or 'replay_dtype' evaluate these conversions in "
                f"{self.dtype} (docs/guide_own_model.md).")
        elif self.casts == "auto" and (half := tuple(s for s in moving if s.dtype in HALF_DTYPES)):
            warn_at_caller(
                f"{owner}: the model's forward converts tensors that depend on the parameters to a 16-bit float "
                f"({sites_text(half)}); casts='auto' evaluates them in {self.dtype}, so the replica and the scores "
                f"explain the model without that rounding and differ from the model's own outputs by it (about 1e-3 "
                f"relative for float16, 1e-2 for bfloat16), far above the quadrature's tolerance. Fix: compute in "
                f"the model's dtype (remove the conversion from forward); casts='as_written' replays the rounding "
                f"(the path integrand is then noisy at its level and the quadrature stops at its cap); "
                f"KernelReplica().fit(traj).fidelity_report(X, model=model)['model_max_rel_error'] measures the "
                f"difference.")
        elif moving and self.casts == "auto":
            logger.warning("%s: the model's forward converts tensors that depend on the parameters to a dtype below "
                           "%s (%s); the replay evaluates them in %s (casts='auto'), so it explains the model's "
                           "function without that rounding, which differs from the model's own outputs at the "
                           "rounding level of the lower dtype (fidelity_report(X, model=...) measures it). "
                           "casts='as_written' replays the rounding.", owner, self.dtype, sites_text(moving),
                           self.dtype)
        return sites

    def settle_jacobians(self, x: Any, owner: str) -> None:
        r"""Take Jacobians in forward mode when the model's backward is not the derivative of its forward.

        Runs only where the probe found a custom ``torch.autograd.Function`` or a gradient hook in the forward
        (:func:`~explaind.kernel.jumps.function_sites`, :func:`~explaind.kernel.jumps.hook_sites`): the dot-product
        test of :mod:`~explaind.kernel.adjoint` at :math:`\theta_0` and ``x``. On a mismatch (a gradient reversal
        layer) the Jacobians of ``keep`` with ``'param'`` or ``'train'`` come from ``jacfwd`` (the output's own
        derivative; the training samples' gradients keep the backward, which the optimizer applied), factored
        Jacobians are off, and the algorithms that take Jacobians say so in a log line
        (:meth:`log_forward_jacobians`). A Function without a ``jvp`` fails the test and is left to the
        quadrature warnings.
        """
        if self.forward_jacobians:
            return
        sites, gap = reversed_backward(lambda p: self.fm(p, x), self.params(0), self.names, self.jump_sites,
                                       self.dtype)
        if not sites:
            return
        self.forward_jacobians = sites
        base = getattr(self.evaluator, "fallback", self.evaluator)
        base.forward_jacobians = True
        if hasattr(self.evaluator, "state"):
            self.evaluator.state["jacobian"] = "the backward is not the derivative of the forward"
        self.backward_gap = gap
        logger.debug("%s: backward apart from the jvp (%s; dot-product gap %.2g): forward-mode Jacobians", owner,
                     "; ".join(sites[:4]), gap)

    def log_forward_jacobians(self, owner: str) -> None:
        """The log line of an algorithm that takes Jacobians when :attr:`forward_jacobians` is set (once per call)."""
        if self.forward_jacobians:
            logger.warning("%s: the model's backward is not the derivative of its forward (%s; the dot-product test "
                           "u.(Jv) = (u'J).v misses by %.2g of its size at the first test input), as for a gradient "
                           "reversal layer: the Jacobians are taken in forward mode (torch.func.jacfwd, one JVP per "
                           "parameter entry, so their cost grows with the parameters instead of the outputs), which "
                           "follows the output; the training samples' gradients keep the backward, which the "
                           "optimizer applied (docs/engine.md §3).", owner, "; ".join(self.forward_jacobians[:4]),
                           self.backward_gap)

    @property
    def promoted_casts(self) -> list[str]:
        """The conversions evaluated in the compute dtype instead (descriptions; empty when none)."""
        if not self.fm.keep_dtype:
            return []
        return [s.describe() for s in (self.cast_sites or ())]

    def clear(self) -> None:
        """Drop cached parameters."""
        self._cache.clear()

    def inputs(self, X: Any) -> Tensor:
        """Test inputs on the compute device (floating tensors in the compute dtype); tuples and mappings as Inputs."""
        return self.fm.cast(as_inputs(X))

    def explained(self, X: Tensor, target: Any, y: Any, owner: str) -> Explained:
        """:math:`g` for inputs ``X``: all outputs, ``target`` indices, or ``"loss"`` with ``y``."""
        return Explained.build(self.fm, self.params(0), X, target, y, owner)

    def end_params(self, s: int) -> Params:
        r"""The end of step ``s``'s segment, :math:`(\theta_{s+1}, \beta_s)` (:math:`\theta_{s+1}` without buffers)."""
        if not self.buffer_names:
            return self.params(s + 1)
        before = self.params(s)
        return {**self.params(s + 1), **{n: before[n] for n in self.buffer_names}}

    def values_at(self, s: int, X: Tensor, explained: Explained, params: Params | None = None) -> Tensor:
        r""":math:`g(\theta_s, x)` (or :math:`g` at ``params``) for every input, ``(T, O)`` (chunked over inputs)."""
        p = self.params(s) if params is None else params
        step = X.shape[0] if not self.chunk_size else self.chunk_size
        with torch.no_grad():
            parts = [explained(self.fm, p, X[i:i + step], explained.aux[i:i + step])
                     for i in range(0, X.shape[0], step)]
        return torch.cat(parts)

    @property
    def factored_used(self) -> set[str]:
        """Layer-factored capabilities in use so far: ``"jacobian"`` (also per-sample gradients), ``"rows"``."""
        return set(getattr(self.evaluator, "used", ()))

    @property
    def jacobian_used(self) -> str:
        """``"factored"`` once layer-factored Jacobians are in use, else ``"autograd"``."""
        return "factored" if "jacobian" in self.factored_used else "autograd"
