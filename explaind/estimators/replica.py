r"""The exact path-kernel replica of a trained model.

.. math::

    \hat f(x) = f(x; \theta_{start}) + \sum_{s=start}^{stop-1} \varphi_s(x)\,\Delta\theta_s,
    \qquad \varphi_s(x) = \int_0^1 \nabla_\theta f(x; \theta_s + t\Delta\theta_s)\,dt

(docs/maths.md §2). The telescoping sum is exact; only the 1-D integral is approximated, and each
:math:`\varphi_s(x)\Delta\theta_s` is computed with forward-mode JVPs at the quadrature nodes, so a
prediction costs about (nodes per step) x (steps) forward passes: no per-sample gradients, no
Jacobians.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator
from torch import nn

from ..exceptions import ConfigError, warn_at_caller
from ..inputs import Inputs, as_inputs
from ..kernel.planning import window_plans
from ..kernel.shard import all_max_, all_sum_, choose_layout, world
from ..outputs import model_output
from ..trajectory._attribute_record import check_model
from ._path import PathConfig, PathEstimator, budget_bytes
from .residual import PATH_TERMS, refuse_non_finite

__all__ = ["KernelReplica", "KernelReplicaConfig"]


@dataclass(frozen=True)
class _Replicated:
    r"""Per input ``(T, O)``: :math:`g(\theta_{start})`, :math:`g(\theta_{stop})` and the summed step
    increments (quadrature estimates and buffers terms); per step ``(S,)``: the largest quadrature
    error and the largest :math:`|g(\theta_{s+1}) - g(\theta_s)|`, and the evaluations summed over inputs."""

    g_start: torch.Tensor
    g_stop: torch.Tensor
    increments: torch.Tensor
    error: torch.Tensor
    scale: torch.Tensor
    evals: torch.Tensor

    @property
    def replica(self) -> torch.Tensor:
        r""":math:`f(x;\theta_{start}) + \sum_s \varphi_s(x)\Delta\theta_s`, ``(T, O)``."""
        return self.g_start + self.increments


class KernelReplicaConfig(PathConfig):
    """Validated parameters of :class:`KernelReplica` (same fields as its ``__init__``)."""

    memory_budget: int | str | None = None
    max_evals: int | None = Field(default=None, ge=1)

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return budget_bytes(v)


class KernelReplica(PathEstimator):
    r"""Kernel-machine replica of a recorded training run.

    Parameters
    ----------
    quadrature : {"adaptive", "gauss-legendre", "midpoint", "left"}
        Rule for the path integral (see :mod:`explaind.kernel.quadrature`); ``"left"`` with one
        node is the TracIn limit (the gradient at :math:`\theta_s` only; docs/maths.md §2).
    nodes : int, optional
        Nodes per step (``"gauss-legendre"``: default 4; ``"midpoint"``: default 100; ``"left"``:
        default 1) or per panel (``"adaptive"``: default 4).
    tol : float
        Relative error target of the adaptive rule per step and test input.
    steps : (int, int or None), optional
        Window ``(start, stop)`` of steps; the replica starts from :math:`f(x;\theta_{start})`
        and approximates :math:`f(x;\theta_{stop})`. Default: the whole run.
    device : str
        ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
    dtype : {"float64", "float32"}
        Compute dtype.
    chunk_size : int or None
        (input, node) pairs per ``vmap`` call (16 times as many rows per batch on the factored path); fewer
        where their outputs would pass 256 MiB (a language model's logits), and the adaptive rule refines the
        inputs in chunks whose state stays within 1 GiB, with the same plans (``docs/engine.md`` §3, *Chunking*;
        ``memory_budget`` sets both bounds).
    factored : {"auto", "always", "never"}
        When every trainable parameter lies in an ``nn.Linear`` or ``nn.Embedding``, evaluate all
        (step, input, node) rows of many steps as one batch through layers that are affine in their
        parameters, with no parameter copy per row (:mod:`explaind.kernel.layers`), after a start-up
        check against the generic path. ``"auto"``: when it applies; ``"always"``: raise
        :class:`~explaind.exceptions.ConfigError` when it does not; ``"never"``: ``vmap`` over
        per-row parameters. Same results to rounding.
    progress : bool
        Progress bar over steps.
    distributed : {"auto", "off"}
        ``"auto"``: inside an initialised ``torch.distributed`` process group of several processes,
        ``predict``, ``score`` and ``fidelity_report`` split the test inputs and then the steps
        over them and sum the zero-padded shares with one all-reduce (:mod:`explaind.kernel.shard`;
        the same numbers as one process, to rounding). ``"off"``: every process computes everything.
    casts : {"auto", "replay_dtype", "as_written"}
        Conversions in the model's forward to a floating dtype below ``dtype`` (``Tensor.to``,
        ``.float()``, ``dtype=`` arguments; Hugging Face's RMS norms convert to ``float32``), found
        on the first test input. ``"replay_dtype"``: the replay converts to ``dtype`` instead, so the
        path integrand has no float32 rounding; ``"as_written"``: it rounds as the forward says (a
        warning names parameter-dependent ones: their rounding makes the integrand noisy and the
        adaptive quadrature may stop at its cap). ``"auto"``: ``"replay_dtype"`` when a conversion
        of a parameter-dependent tensor was found (a logged warning names them), else unchanged.
        Training gradients always round as in the run (docs/maths.md, "Casts below the replay dtype").
    memory_budget : int or str, optional
        Bytes (``2_000_000_000``) or a size (``"2GB"``, ``"512MiB"``) of output-sized state the replica may
        hold: the adaptive rule refines (step, input) pairs in chunks within half of it and each evaluation
        holds outputs within an eighth of it (a language model's logits); the plans are the same at any
        budget (to rounding). ``None`` (default): 1 GiB and 256 MiB, as ``"2GiB"`` (``docs/engine.md`` §3,
        *Chunking*). A value that is not a positive size raises :class:`~explaind.exceptions.ConfigError`
        in ``fit``.
    max_evals : int, optional
        The adaptive rule's cap on evaluations per (step, input) pair; ``None`` (default): 4,096
        (``explaind.kernel.adaptive.MAX_EVALS``). A pair that reaches it stops with its error left, reported
        as ``quadrature_error`` and named in a warning; a path that crosses more kinks than the cap locates to
        ``tol`` (``docs/engine.md`` §2) becomes exact with a higher cap, at up to that many evaluations a pair.
        Not a positive integer: :class:`~explaind.exceptions.ConfigError` in ``fit``.

    Attributes
    ----------
    trajectory_ : Trajectory
        The fitted run (a reference, not a copy).
    window_ : (int, int)
        Resolved ``(start, stop)``.
    n_steps_, n_params_ : int
        Steps recorded and trainable coordinates ``D``.
    """

    _config_model: ClassVar[type[KernelReplicaConfig]] = KernelReplicaConfig

    def __init__(self, *, quadrature: str = "adaptive", nodes: int | None = None, tol: float = 1e-7,
                 steps: tuple[int, int | None] | None = None, device: str = "auto", dtype: str = "float64",
                 chunk_size: int | None = 256, factored: str = "auto", progress: bool = False,
                 distributed: str = "auto", casts: str = "auto", memory_budget: int | str | None = None,
                 max_evals: int | None = None):
        self.quadrature = quadrature
        self.nodes = nodes
        self.tol = tol
        self.steps = steps
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size
        self.factored = factored
        self.progress = progress
        self.distributed = distributed
        self.casts = casts
        self.memory_budget = memory_budget
        self.max_evals = max_evals

    def fit(self, traj: Any, y: Any = None) -> KernelReplica:
        """Validate the parameters and attach the trajectory ``traj``; returns ``self``."""
        self._fit_common(traj)
        return self

    # ------------------------------------------------------------------ evaluation
    def _sharded(self, X: Any) -> _Replicated:
        r"""Replica, :math:`g(\theta_{stop})` and per-step statistics of all inputs (each process its :class:`Cell`)."""
        self._check_fitted()
        Xt = self._inputs(X)
        engine, cfg = self.engine_, self.config_
        explained = engine.explained(Xt, None, None, type(self).__name__)
        start, stop = self.window_
        T, O, S = Xt.shape[0], explained.n_outputs, stop - start
        rank, size = world() if cfg.distributed == "auto" else (0, 1)
        cell = choose_layout(size, T, S, blocks=False, steps=True).cell(rank, T, self.window_)
        kw = {"dtype": engine.dtype, "device": engine.device}
        out = _Replicated(*(torch.zeros(T, O, **kw) for _ in range(3)),
                          *(torch.zeros(S, **kw) for _ in range(3)))
        if not cell.empty:
            lo, hi = cell.window
            g_lo, g_hi, plans, buffers = window_plans(engine, Xt[cell.rows], explained.take(cell.rows), cell.window,
                                                      cfg.quadrature, cfg.nodes, cfg.tol, with_estimate=True)
            out.increments[cell.rows] = sum(p.estimate for p in plans) + (0 if buffers is None else buffers.sum(1))
            if lo == start:
                out.g_start[cell.rows] = g_lo
            if hi == stop:
                out.g_stop[cell.rows] = g_hi
            steps = slice(lo - start, hi - start)
            out.error[steps] = torch.stack([(p.exact - p.estimate).abs().amax() for p in plans])
            out.scale[steps] = torch.stack([p.exact.abs().amax() for p in plans])
            out.evals[steps] = torch.stack([p.evals.double().sum() for p in plans]).to(out.evals)
        if size > 1:
            all_sum_([out.increments, out.g_start, out.g_stop, out.evals])
            all_max_([out.error, out.scale])
        refuse_non_finite([out.g_start, out.g_stop], [out.increments], type(self).__name__, "the replica is",
                          PATH_TERMS)
        if cfg.quadrature == "adaptive":
            _warn_accumulated(out, cfg.tol, type(self).__name__, start)
        return out

    def predict(self, X: Any) -> np.ndarray:
        r"""Replica outputs :math:`f(x;\theta_{start}) + \sum_s \varphi_s(x)\Delta\theta_s`, shape ``(n, O)``."""
        return self._sharded(X).replica.detach().cpu().numpy()

    def score(self, X: Any, y: Any = None) -> float:
        r"""Agreement of the replica with the model.

        Without ``y``: the fraction of inputs whose replica arg-max output equals the arg-max of
        the trained model :math:`f(x;\theta_{stop})`. With ``y``: the replica's accuracy on ``y``.
        """
        rep = self._sharded(X)
        replica, g_stop = rep.replica, rep.g_stop
        pred = replica.argmax(-1).cpu()
        ref = g_stop.argmax(-1).cpu() if y is None else torch.as_tensor(np.asarray(y)).reshape(-1).cpu()
        return float((pred == ref).double().mean())

    def fidelity_report(self, X: Any, model: nn.Module | None = None) -> dict[str, Any]:
        r"""How faithful the replica is on ``X``.

        Returns
        -------
        dict
            ``steps`` (S,): step numbers; ``quadrature_error`` (S,): max over inputs and outputs of
            ``|exact - estimate|`` per step; ``relative_quadrature_error`` (S,): the same divided
            by the largest ``|g(theta_{s+1}) - g(theta_s)|`` of the step; ``evals_per_step`` (S,):
            mean evaluations per input; ``total_evals``; ``max_abs_error`` and ``max_rel_error``
            of the replica against :math:`f(x;\theta_{stop})` (relative to ``max |f|``);
            ``argmax_agreement``; ``kl_divergence``: mean
            ``KL(softmax(f(x;theta_stop)) || softmax(replica))``; ``promoted_casts``: the conversions
            evaluated in the replay dtype (``casts``; empty when none). With ``model`` (the user's
            trained model, run in evaluation mode with its own buffers, e.g. final BatchNorm
            statistics): ``model_max_rel_error`` and ``model_argmax_agreement`` of the replica
            against it, and ``model_vs_recorded``, the largest relative difference between it and
            :math:`f(x;\theta_{stop})` — above rounding level (a warning says so) the recorded run
            does not end in that model, and the replica explains the recorded one. Its plain attributes,
            submodules, hooks, plain tensors and config fields are compared with the recording's last step
            (an ``ExplaindWarning`` names those that differ; docs/recording.md).
        """
        rep = self._sharded(X)
        replica, g_stop, errs, scale = rep.replica, rep.g_stop, rep.error, rep.scale
        evals = rep.evals / replica.shape[0]
        diff = (replica - g_stop).abs()
        log_p = torch.log_softmax(g_stop.double(), -1)
        log_q = torch.log_softmax(replica.double(), -1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean()
        start, stop = self.window_
        report = {
            "steps": np.arange(start, stop),
            "quadrature_error": errs.cpu().numpy(),
            "relative_quadrature_error": (errs / scale.clamp_min(torch.finfo(scale.dtype).tiny)).cpu().numpy(),
            "evals_per_step": evals.cpu().numpy(),
            "total_evals": int(rep.evals.sum()),
            "max_abs_error": float(diff.max()),
            "max_rel_error": _rel(replica, g_stop),
            "argmax_agreement": float((replica.argmax(-1) == g_stop.argmax(-1)).double().mean()),
            "kl_divergence": max(float(kl), 0.0),
            "promoted_casts": self.engine_.promoted_casts,
        }
        if model is not None:
            check_model(self.trajectory_, model, f"{type(self).__name__}.fidelity_report", same_layout=True)
            report.update(self._against_model(model, X, replica, g_stop))
        return report

    def _against_model(self, model: nn.Module, X: Any, replica: torch.Tensor,
                       g_stop: torch.Tensor) -> dict[str, float]:
        """The replica against the user's model in evaluation mode (its mode is restored)."""
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        Xt = as_inputs(X).to(device)  # a tensor, or a tuple/mapping of tensors (model(*x) / model(**x))
        if isinstance(Xt, torch.Tensor) and Xt.is_floating_point() and first is not None:
            Xt = Xt.to(first.dtype)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = model_output(Xt.call(model) if isinstance(Xt, Inputs) else model(Xt))
        finally:
            model.train(was_training)
        out = out.reshape(out.shape[0], -1).to(device=replica.device, dtype=replica.dtype)
        if out.shape != replica.shape:
            raise ConfigError(f"{type(self).__name__}.fidelity_report: the model returns {tuple(out.shape)} outputs "
                              f"for X, the replica {tuple(replica.shape)}; pass the model the trajectory was recorded "
                              f"from.")
        drift = _rel(out, g_stop)
        bound = 1e-6 if replica.dtype == torch.float64 else 1e-3
        if drift > bound and _own_rounding(model, Xt, g_stop, bound):
            pass  # a model in a coarser dtype holding the recorded state: the difference is its own rounding
        elif drift > bound and _agrees_with_gradients(model, Xt, g_stop, bound):
            warn_at_caller(
                f"{type(self).__name__}.fidelity_report: the model's outputs under torch.no_grad() differ from its "
                f"outputs with gradients enabled by {drift:.3g} (relative) on X, in evaluation mode with the "
                f"recorded parameters: torch takes an inference fast path there (nn.TransformerEncoder with "
                f"enable_nested_tensor=True and a src_key_padding_mask returns 0 at the padded positions). explaind "
                f"differentiates the model, so the replica and the scores explain the outputs with gradients "
                f"enabled. Fix: build nn.TransformerEncoder(..., enable_nested_tensor=False), or read only unpadded "
                f"positions (pool with the mask).")
        elif drift > bound and isinstance(model, torch.optim.swa_utils.AveragedModel):
            warn_at_caller(f"{type(self).__name__}.fidelity_report: the model is a torch.optim.swa_utils.AveragedModel "
                           f"and differs from the recorded final state by {drift:.3g} (relative) on X: it holds an "
                           f"average of the iterates (SWA or an EMA), a point the optimizer never stepped to, so no "
                           f"step of the trajectory ends in it. The replica and the scores explain the model the "
                           f"optimizer trained (its last iterate); pass that model here to measure the replica.")
        elif drift > bound:
            warn_at_caller(
                f"{type(self).__name__}.fidelity_report: the model differs from the recorded final state by "
                f"{drift:.3g} (relative) on X: its buffers or parameters are not those of the recorded run's last "
                f"step (the model was changed after recording, it is a copy holding other weights, such as an EMA "
                f"of the iterates kept by hand, or the run was recorded before buffers such as BatchNorm running "
                f"statistics were recorded per step). The replica reproduces the recorded run.")
        return {"model_max_rel_error": _rel(replica, out), "model_argmax_agreement":
                float((replica.argmax(-1) == out.argmax(-1)).double().mean()), "model_vs_recorded": drift}


def _own_rounding(model: nn.Module, Xt: Any, g_stop: torch.Tensor, bound: float) -> bool:
    r"""Whether ``model``, stored in a dtype coarser than ``g_stop``'s, agrees with ``g_stop`` within ``bound`` once
    evaluated in ``g_stop``'s dtype.

    A float16 or bfloat16 model (or a deep float32 one) that holds exactly the recorded :math:`\theta_{stop}`
    differs from the engine's float64 :math:`f(x;\theta_{stop})` by the rounding of its own forward (5e-4 relative
    in float16, up to 4e-3 in bfloat16 on the MLPs of docs/engine.md, "float32 and half-precision runs"): not
    another state. Evaluated in float64 on a copy, its (exactly representable) parameters give
    :math:`f(x;\theta_{stop})` to rounding, while a model that holds other weights still differs.
    """
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if not dtypes or min(torch.finfo(d).eps for d in dtypes) <= torch.finfo(g_stop.dtype).eps:
        return False
    Xw = Xt.to(g_stop.dtype) if isinstance(Xt, torch.Tensor) and Xt.is_floating_point() else Xt
    try:
        wide = copy.deepcopy(model).to(g_stop.dtype).eval()
        with torch.no_grad():
            out = model_output(Xw.call(wide) if isinstance(Xw, Inputs) else wide(Xw))
    except (RuntimeError, TypeError):  # a model that cannot be copied, or runs only in its own dtype: not shown
        return False
    out = out.reshape(out.shape[0], -1).to(device=g_stop.device, dtype=g_stop.dtype)
    return out.shape == g_stop.shape and _rel(out, g_stop) <= bound


def _agrees_with_gradients(model: nn.Module, Xt: Any, g_stop: torch.Tensor, bound: float) -> bool:
    """Whether ``model`` in evaluation mode *with* gradients enabled agrees with ``g_stop`` within ``bound``.

    Called when its ``torch.no_grad()`` outputs do not: when this one does, the difference is torch's inference
    fast path, not the parameters or buffers.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model_output(Xt.call(model) if isinstance(Xt, Inputs) else model(Xt)).detach()
    finally:
        model.train(was_training)
    out = out.reshape(out.shape[0], -1).to(device=g_stop.device, dtype=g_stop.dtype)
    return out.shape == g_stop.shape and _rel(out, g_stop) <= bound


#: The replica's error against :math:`f(x;\theta_{stop})` that is warned about, in multiples of ``tol`` (and above 1e-6
#: in float64, 1e-3 in float32): the adaptive rule holds each step to ``tol`` of that step's own change, and on
#: ordinary runs the replica's error is at or below ``tol`` of the output (docs/quickstart.md: 3e-10 at tol 1e-7).
#: It was 1000: Adam at lr 5 and 10 on a float64 ReLU CNN left 1.4e-5 and 6.8e-5 at tol 1e-7 without a word
#: (tests/test_stranger_loops_round8.py).
ACCUMULATED_TOLS = 10.0
#: How many times the largest per-step relative error the replica's error must exceed to be warned about when steps
#: ended above ``tol`` (their own warning gives that per-step figure).
UNDERSTATED = 10.0


def _warn_accumulated(out: _Replicated, tol: float, who: str, start: int = 0) -> None:
    r"""Warn when the per-step errors add up to far more than ``tol`` of the outputs.

    The adaptive rule errs by at most ``tol`` times each step's largest change :math:`|g(\theta_{s+1}) - g(\theta_s)|`
    (``out.scale``); when those changes are much larger than the net change (a diverging or oscillating run at an
    untuned learning rate) their errors add up although every step met ``tol``. When steps ended above ``tol`` the
    adaptive rule's own warning names them with the largest error relative to a step's change; this one then speaks
    only when the replica's error relative to the outputs exceeds that figure :data:`UNDERSTATED` times (steps whose
    change dwarfs the outputs), with the window that leaves those steps out.
    """
    rel = _rel(out.replica, out.g_stop)
    floor = 1e-6 if out.replica.dtype == torch.float64 else 1e-3  # the replica bounds of fidelity_report(model=)
    if not rel > max(ACCUMULATED_TOLS * tol, floor):  # NaN-safe: a non-finite replica is another error's to report
        return
    tiny = torch.finfo(out.scale.dtype).tiny
    per_step = out.error / out.scale.clamp_min(tiny)
    worst = float(per_step.max())
    net = float((out.g_stop - out.g_start).abs().max().clamp_min(tiny))
    gross = float(out.scale.sum())
    ratio = gross / net
    if worst > tol:
        if not rel > UNDERSTATED * worst:
            return  # the adaptive rule's own warning names their cause and an error of this size
        above = torch.nonzero(per_step > tol).flatten().tolist()
        after = start + above[-1] + 1  # the step after the last one above tol
        warn_at_caller(
            f"{who}: the replica misses f(x; theta_stop) by {rel:.2g} (relative to the largest output), "
            f"{rel / worst:.3g}x the largest error the adaptive rule left in a step ({worst:.2g} of that step's own "
            f"change, the figure of its warning): the steps' changes add up to {ratio:.3g}x the net change of the "
            f"outputs (a diverging or oscillating run, an untuned learning rate), so an error small against a "
            f"step's change is large against the outputs. {len(above)} step(s) ended above tol={tol:g} (steps "
            f"{[start + a for a in above[:6]]}{' ...' if len(above) > 6 else ''}); fidelity_report() gives each "
            f"step's error. Fix: explain the window after them (steps=({after}, stop)), or spend more evaluations "
            f"on them (quadrature='midpoint', nodes=N, whose error is reported).")
        return
    warn_at_caller(
        f"{who}: the replica misses f(x; theta_stop) by {rel:.2g} (relative to the largest output) although the "
        f"adaptive rule held each step to tol={tol:g} of that step's own change: the steps' changes add up to "
        f"{ratio:.3g}x the net change of the outputs, so they cancel (a diverging or oscillating run, an untuned "
        f"learning rate) and their per-step errors add up. fidelity_report() gives each step's error. Fix: a "
        f"smaller tol (the error falls about in proportion: tol={max(tol * tol / rel, 1e-15):.1g} for an error "
        f"near {tol:g}), or explain a window of steps after the run settles (steps=(start, stop)).")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(b.dtype).tiny))
