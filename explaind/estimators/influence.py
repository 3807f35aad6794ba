r"""ExPLAIND influence scores: the path-kernel decomposition summed to the axes a query keeps.

``InfluenceEstimator(keep=...).fit(traj).transform(X)`` returns an
:class:`~explaind.kernel.attribution.Attribution` whose terms add up exactly (to rounding) to
:math:`g(x;\theta_{stop})` (docs/maths.md §5). The engine picks the algorithm from the kept axes:

* ``keep`` within ``{"step", "group"}``: forward-mode JVPs along the data, regularization and
  residual parts of every update (one tangent per part and parameter tensor);
* ``"param"`` or ``"train"`` kept: the quadrature-weighted Jacobian :math:`\Phi_s` at each step,
  contracted with the parts; for ``"train"`` with per-sample gradients and the momentum coupled
  forward (per-sample buffer) or in reverse (test-side accumulator), chosen by ``momentum`` and
  the memory budget, chunked over test inputs and parameter blocks.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from ..exceptions import ConfigError
from ..kernel.accumulate import Accumulators, make_blocks
from ..kernel.attribution import AXES, Attribution
from ..kernel.budget import plan_sweep
from ..kernel.jumps import NO_GRAD, grad_off_sites, hook_sites
from ..kernel.paths import Query, forward_sweep, jvp_path, reverse_sweep, seen_samples, update_sweep
from ..kernel.planning import window_plans
from ..kernel.shard import Cell, all_sum_, choose_layout, world
from ..kernel.split import momentum_start
from ._path import PathConfig, PathEstimator, budget_bytes
from ._residual_tol import quadrature_tol
from .residual import JACOBIAN_TERMS, PATH_TERMS, check_finite, check_quadrature, check_residual

__all__ = ["InfluenceEstimator", "InfluenceConfig", "AXES"]

logger = logging.getLogger(__name__)


class InfluenceConfig(PathConfig):
    """Validated parameters of :class:`InfluenceEstimator` (same fields as its ``__init__``)."""

    keep: tuple[Literal["step", "group", "param", "train"], ...] = ("train",)
    target: Any = None
    split: bool = True
    residual_tol: float | Literal["auto"] = "auto"
    strict: bool = False
    momentum: Literal["auto", "forward", "reverse"] = "auto"
    memory_budget: int | str = "2GB"
    max_evals: int | None = Field(default=None, ge=1)
    test_chunk_size: int | None = Field(default=None, ge=1)
    param_chunk_size: int | None = Field(default=None, ge=1)

    @field_validator("keep", mode="before")
    @classmethod
    def _keep(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = (v,)
        if v is None:
            return ()
        try:
            v = tuple(v)
        except TypeError:
            raise ValueError(f"use a tuple of axis names from {AXES}, e.g. keep=('train',)") from None
        if len(set(v)) != len(v):
            raise ValueError(f"axes must not repeat; choose a subset of {AXES}")
        if "group" in v and "param" in v:
            raise ValueError("'group' and 'param' cannot both be kept (the param axis already identifies its "
                             "tensor); keep 'param' and call Attribution.by_group(), or keep 'group'")
        return v

    @field_validator("residual_tol")
    @classmethod
    def _residual_tol(cls, v: Any) -> Any:
        if not isinstance(v, str) and not v > 0:
            raise ValueError(f"residual_tol={v!r} is not a tolerance: pass a positive number (the largest residual "
                             f"share accepted silently) or 'auto' (the rounding level of the run)")
        return v

    @field_validator("target", mode="before")
    @classmethod
    def _target(cls, v: Any) -> Any:
        if v is None or (isinstance(v, str) and v == "loss"):
            return v
        if isinstance(v, str):
            raise ValueError("use None (all outputs), 'loss' (needs y), an int or a sequence of ints")
        arr = np.asarray(v)
        if arr.dtype.kind not in "iu" or arr.ndim > 2:
            raise ValueError("use None (all outputs), 'loss' (needs y), an int, a 1-D sequence of ints or one row "
                             "of indices into the output shape per test input, e.g. [(position, token), ...]")
        if arr.ndim == 2:
            return tuple(tuple(int(t) for t in row) for row in arr)
        return tuple(int(t) for t in arr.reshape(-1))

    @field_validator("memory_budget", mode="before")
    @classmethod
    def _budget(cls, v: Any) -> Any:
        return budget_bytes(v)


class InfluenceEstimator(PathEstimator):
    r"""ExPLAIND influence scores over steps, parameter tensors, coordinates and training samples.

    Parameters
    ----------
    keep : tuple of str
        Axes to keep, a subset of ``("step", "group", "param", "train")`` (not both ``group`` and
        ``param``); the others are summed. Their order is the order of the axes in the result.
    target : None, int, sequence of int, (T, r) ints or "loss"
        Explained quantity: all outputs (``O`` = model outputs), one output per test input
        (``O = 1``: a flat index, or ``r`` indices into outputs of shape ``(d_1, ..., d_r)`` such as
        ``(position, token)`` of token logits), or the per-sample loss of ``(f(x), y)`` (``O = 1``;
        ``transform`` needs ``y``; for ``loss="causal_lm"`` the next-token loss of each input).
    split : bool
        Split every update into its data (kernel), regularization and residual parts (default), and, for a
        run recorded from an optimizer that held momentum, the part it carries (``initial_state``).
        ``False``: ``values`` hold each step's whole update :math:`\varphi_s(x)\Delta\theta_s` on the kept
        axes and ``regularization``/``residual`` are zero; only the recorded parameters are read
        (no training data, no optimizer coefficients), and ``"train"`` cannot be kept.
    residual_tol : float or "auto"
        Largest accepted residual share (:meth:`~explaind.kernel.attribution.Attribution.residual_share`,
        the part of the explained change that the model of the updates leaves unexplained; stored in
        ``meta["residual_share"]``, the tolerance used in ``meta["residual_tol"]``). Above it ``transform``
        warns, naming the likely cause and the fix. ``"auto"`` (default): the rounding level of the run,
        1e-7 for a float64 run (1e-5 where its forward converts to float32 inside), every share past a
        hundredth of the autocast dtype's unit roundoff stated for a run recorded under
        ``torch.autocast`` (with ``meta["expected_residual_share"]``, the
        autocast dtype's unit roundoff; with ``strict`` such a run raises unless ``residual_tol`` is a
        number), 1e-3 otherwise (docs/guide_own_model.md,
        "The residual share, and what to do when it warns").
    strict : bool
        Raise :class:`~explaind.exceptions.TrajectoryError` instead of warning. The quadrature-error
        share (``meta["quadrature_share"]``) is warned about above the same ``residual_tol`` (1e-3 for
        ``"auto"``), except for the first-order ``"left"`` rule.
    steps : (int, int or None), optional
        Window ``(start, stop)``: ``initial`` is :math:`g(\theta_{start})`, the total is
        :math:`g(\theta_{stop})`. Momentum from steps before ``start`` is still data (it is
        attributed to the samples that produced it).
    quadrature, nodes, tol
        Path-integral rule (see :class:`~explaind.KernelReplica`).
    momentum : {"auto", "forward", "reverse"}
        How the per-sample momentum coupling is computed for ``"train"`` (same results).
        ``"reverse"`` cannot keep ``"step"``.
    memory_budget : int or str
        Peak working memory target (bytes or ``"2GB"``); chooses chunks and the momentum mode, and bounds
        the adaptive rule's output-sized state as :class:`~explaind.KernelReplica`'s does.
    max_evals : int, optional
        The adaptive rule's cap on evaluations per (step, input) pair, as :class:`~explaind.KernelReplica`'s
        (``None``: 4,096); the cap's warning names it where pairs stopped at it.
    distributed : {"auto", "off"}
        ``"auto"``: inside an initialised ``torch.distributed`` process group of several processes,
        split the work over them — test inputs, then step windows (not with ``"train"``) or
        parameter blocks (Jacobian path) — and sum the zero-padded shares with one all-reduce
        (:mod:`explaind.kernel.shard`; the same numbers as one process, to rounding). ``"off"``:
        every process computes everything.
    test_chunk_size, param_chunk_size : int, optional
        Force test inputs per chunk / coordinates per parameter block (whole tensors).
    chunk_size : int or None
        Samples or (input, node) pairs per ``vmap`` call.
    factored : {"auto", "always", "never"}
        Layer-factored computation (see :class:`~explaind.KernelReplica`); here it also forms
        :math:`\Phi_s` for ``"param"``/``"train"`` from layer factors, all (input, node) entries of
        a step in one batch (:mod:`explaind.kernel.layers`), instead of ``vmap(jacrev)``.
    device, dtype, progress, casts
        As in :class:`~explaind.KernelReplica`; ``meta["promoted_casts"]`` lists the conversions
        evaluated in the replay dtype (empty when none).

    Attributes
    ----------
    trajectory_, window_, n_steps_, n_params_
        As in :class:`~explaind.KernelReplica`.
    sweep_ : dict
        The algorithm the last ``transform`` used (path, momentum mode, chunking, and for the
        Jacobian path ``"jacobian"``: ``"factored"`` or ``"autograd"``, how :math:`\Phi_s` was formed).
    """

    _config_model: ClassVar[type[InfluenceConfig]] = InfluenceConfig
    #: Forward mode (JVPs) is used while tangents per node <= this ratio x outputs (else Jacobians).
    _jvp_tangent_ratio: ClassVar[float] = 1.0

    def __init__(self, *, keep: Any = ("train",), target: Any = None, split: bool = True,
                 residual_tol: float | str = "auto", strict: bool = False, steps: Any = None,
                 quadrature: str = "adaptive", nodes: int | None = None, tol: float = 1e-7, momentum: str = "auto",
                 memory_budget: int | str = "2GB", distributed: str = "auto", test_chunk_size: int | None = None,
                 param_chunk_size: int | None = None, chunk_size: int | None = 256, factored: str = "auto",
                 device: str = "auto", dtype: str = "float64", progress: bool = False, casts: str = "auto",
                 max_evals: int | None = None):
        self.keep = keep
        self.target = target
        self.split = split
        self.residual_tol = residual_tol
        self.strict = strict
        self.steps = steps
        self.quadrature = quadrature
        self.nodes = nodes
        self.tol = tol
        self.momentum = momentum
        self.memory_budget = memory_budget
        self.distributed = distributed
        self.test_chunk_size = test_chunk_size
        self.param_chunk_size = param_chunk_size
        self.chunk_size = chunk_size
        self.factored = factored
        self.device = device
        self.dtype = dtype
        self.progress = progress
        self.casts = casts
        self.max_evals = max_evals

    def fit(self, traj: Any, y: Any = None) -> InfluenceEstimator:
        """Validate the parameters and attach the trajectory ``traj``; returns ``self``."""
        config = self._fit_common(traj)
        keep = config.keep
        if config.momentum == "reverse" and "step" in keep and "train" in keep:
            raise ConfigError(
                "InfluenceEstimator: invalid value for 'momentum': 'reverse' — the reverse sweep sums over steps and "
                "cannot keep both 'step' and 'train'. Use momentum='forward' or 'auto'."
            )
        if config.split and not traj.has_updates:
            raise ConfigError(
                f"InfluenceEstimator: {traj!r} has no record of each step's batches and optimizer state, so its "
                f"updates cannot be split into data, regularization and residual parts (nor over training samples). "
                f"Use split=False with keep within ('step', 'group', 'param'), or record the run with "
                f"TrajectoryRecorder."
            )
        if "train" in keep and not config.split:
            raise ConfigError(
                "InfluenceEstimator: keep=('train', ...) needs split=True — the per-sample atoms come from the "
                "data part of each update. Use split=True, or keep only 'step', 'group' or 'param'."
            )
        if "train" in keep:
            try:
                traj.n_train  # noqa: B018
            except Exception as exc:
                raise ConfigError(f"InfluenceEstimator: keep={keep!r} needs the training data: {exc}") from None
        return self

    def transform(self, X: Any, y: Any = None) -> Attribution:
        r"""Decompose :math:`g(x;\theta_{stop})` for test inputs ``X`` (and targets ``y`` for ``target='loss'``).

        In a ``torch.distributed`` process group (``distributed="auto"``), each process computes
        its share — test inputs × parameter blocks × step windows, chosen from the world size, the
        number of inputs, the steps and the kept axes — and every process returns the whole
        result (:mod:`explaind.kernel.shard`); ``meta["shards"]`` names the arrangement.
        """
        self._check_fitted()
        cfg = self.config_
        name = type(self).__name__
        Xt = self._inputs(X)
        if cfg.target == "loss" and y is None:
            raise ConfigError(f"{name}: target='loss' explains the test loss and needs the test targets: call "
                              f"transform(X, y).")
        target = cfg.target if cfg.target is None or cfg.target == "loss" else torch.tensor(cfg.target)
        att = self._decompose(Xt, target, y)
        att.meta["promoted_casts"] = self.engine_.promoted_casts
        check_finite(att, name, JACOBIAN_TERMS if self.sweep_.get("path") == "jacobian" else PATH_TERMS)
        if cfg.split:
            check_residual(att, self.trajectory_, self.window_, tol=cfg.residual_tol, strict=cfg.strict, owner=name)
        check_quadrature(att, cfg.quadrature, tol=quadrature_tol(cfg.residual_tol), owner=name,
                         jumps=self.engine_.jump_sites, jacobian=self.sweep_.get("path") == "jacobian")
        return att

    def _decompose(self, Xt: Any, target: Any, y: Any) -> Attribution:
        """The attribution of the inputs ``Xt``; in a process group, each process computes its :class:`Cell`."""
        cfg = self.config_
        name = type(self).__name__
        engine = self.engine_
        explained = engine.explained(Xt, target, y, name)
        keep = cfg.keep
        start, stop = self.window_
        T, O = Xt.shape[0], explained.n_outputs
        layout = engine.layout
        needs_train = "train" in keep
        n_train = int(self.trajectory_.n_train) if needs_train else 0
        elem = torch.finfo(engine.dtype).bits // 8
        result_bytes = elem * Accumulators.result_numel(keep, T, O, stop - start, layout, n_train)
        if result_bytes > cfg.memory_budget:
            raise ConfigError(
                f"{name}: the result of keep={keep!r} for {T} inputs needs {result_bytes / 1e9:.3g} GB, more than "
                f"memory_budget={self.memory_budget!r}. Keep fewer axes, explain fewer inputs or outputs, or raise "
                f"memory_budget."
            )
        # forward mode costs one tangent pass per part (and tensor), the Jacobian one backward pass per output;
        # forward mode runs through torch.no_grad() in the forward where the Jacobian stops, and ignores gradient
        # hooks the Jacobian follows (explaind/kernel/jumps.py)
        n_parts = (4 if self.trajectory_.initial_state() else 3) if cfg.split else 1
        n_tangents = n_parts * (len(layout) if "group" in keep else 1)
        cheaper = (n_tangents > self._jvp_tangent_ratio * O and not grad_off_sites(engine.jump_sites, NO_GRAD)
                   and not hook_sites(engine.jump_sites))
        jacobian_path = needs_train or "param" in keep or cheaper
        rank, size = world() if cfg.distributed == "auto" else (0, 1)
        shards = choose_layout(size, T, stop - start, blocks=jacobian_path, steps=not needs_train)
        cell = shards.cell(rank, T, self.window_)
        kw = {"dtype": engine.dtype, "device": engine.device}
        acc = Accumulators(keep, T, O, self.window_, layout, n_train, engine.dtype, engine.device)
        exact, evals = torch.zeros(T, stop - start, O, **kw), torch.zeros(T, stop - start, **kw)
        g_start, g_stop = torch.zeros(T, O, **kw), torch.zeros(T, O, **kw)
        buffers = torch.zeros(T, stop - start, O, **kw) if engine.buffer_names else None
        self.sweep_ = {"path": "jacobian" if jacobian_path else "jvp", "momentum": None, "test_chunk": 0,
                       "block_size": 0}
        if not cell.empty:
            lo, hi = cell.window
            X, ex = Xt[cell.rows], explained.take(cell.rows)
            g_lo, g_hi, plans, cell_buffers = window_plans(engine, X, ex, cell.window, cfg.quadrature, cfg.nodes,
                                                           cfg.tol, with_estimate=False, coarsen=True)
            first = momentum_start(engine, lo) if cfg.split else lo
            query = Query(X, ex, plans, cell.window, first, cell.rows, split=cfg.split)
            if not jacobian_path:
                jvp_path(engine, query, acc, max(1, cfg.memory_budget // 4))
                self.sweep_ = {"path": "jvp", "momentum": None, "test_chunk": X.shape[0], "block_size": layout.size}
            else:
                engine.log_forward_jacobians(name)
                self._jacobian_path(engine, query, acc, keep, O, elem, cell)
            if cell.lead:
                exact[cell.rows, lo - start:hi - start] = torch.stack([p.exact for p in plans], dim=1)
                evals[cell.rows, lo - start:hi - start] = torch.stack([p.evals for p in plans], dim=1).to(evals)
                if buffers is not None:
                    buffers[cell.rows, lo - start:hi - start] = cell_buffers
                if lo == start:
                    g_start[cell.rows] = g_lo
                if hi == stop:
                    g_stop[cell.rows] = g_hi
        if size > 1:
            all_sum_([acc.values, acc.regularization, acc.residual, acc.initial_state, acc.estimate, exact, evals,
                      g_start, g_stop,
                      *([] if buffers is None else [buffers])])
            self.sweep_["processes"] = size
            self.sweep_["shards"] = shards.describe()
        return self._assemble(acc, keep, g_start, g_stop, exact, evals, explained, T, n_train, buffers)

    def _jacobian_path(self, engine: Any, query: Query, acc: Accumulators, keep: tuple[str, ...], O: int,
                       elem: int, cell: Cell) -> None:
        cfg = self.config_
        first, stop = query.first, query.window[1]
        layout = engine.layout
        T = query.X.shape[0]
        batch_max = max(int(torch.as_tensor(self.trajectory_.batch(s)[0]).numel())
                        for s in range(first, stop)) if cfg.split else 0
        n_seen = int(seen_samples(engine, first, stop).numel()) if "train" in keep else 0
        plan = plan_sweep(momentum=cfg.momentum if "train" in keep else "forward", keep_step="step" in keep, T=T,
                          O=O, D=layout.size, largest_tensor=max(layout.numels), B=batch_max, M=n_seen, elem=elem,
                          budget=cfg.memory_budget, chunk_size=cfg.chunk_size, test_chunk=cfg.test_chunk_size,
                          block_size=cfg.param_chunk_size)
        sweep = update_sweep if not cfg.split else reverse_sweep if plan.mode == "reverse" else forward_sweep
        block_size = plan.block_size
        if cell.block[1] > 1 and not cfg.param_chunk_size:
            # enough blocks for the block shards (whole tensors, so some processes may get none)
            block_size = min(block_size, max(max(layout.numels), -(-layout.size // cell.block[1])))
        blocks = make_blocks(layout, block_size)
        mine = cell.my_blocks(blocks)
        self.sweep_ = {"path": "jacobian", "momentum": plan.mode if cfg.split else None, "test_chunk": plan.test_chunk,
                       "block_size": block_size, "n_blocks": len(blocks), "estimate_bytes": plan.estimate_bytes}
        for lo in range(0, T, plan.test_chunk):
            part = replace(query.chunk(slice(lo, min(T, lo + plan.test_chunk))), jac_chunk=plan.jac_chunk)
            for block in mine:
                sweep(engine, part, acc, block)
        self.sweep_["jacobian"] = engine.jacobian_used
        engine.clear()

    def _assemble(self, acc: Accumulators, keep: tuple[str, ...], g_start: torch.Tensor, g_stop: torch.Tensor,
                  exact: torch.Tensor, evals: torch.Tensor, explained: Any, T: int, n_train: int,
                  buffers: torch.Tensor | None) -> Attribution:
        cfg = self.config_
        start, stop = self.window_
        layout = self.engine_.layout
        canon = acc.canon

        def order(tensor: torch.Tensor, have: tuple[str, ...]) -> torch.Tensor:
            want = [a for a in keep if a in have]
            perm = [0] + [1 + have.index(a) for a in want] + [len(have) + 1]
            return tensor.permute(perm).contiguous().cpu()

        side = tuple(a for a in canon if a != "train")
        quad = acc.quadrature_error(exact)
        coords: dict[str, Any] = {"test": np.arange(T)}
        for a in keep:
            coords[a] = {"step": lambda: np.arange(start, stop), "group": lambda: list(layout.names),
                         "param": lambda: np.arange(layout.size), "train": lambda: np.arange(n_train)}[a]()
        coords["output"] = (np.arange(explained.n_outputs) if explained.kind == "outputs" else [explained.kind])
        meta = {
            "target_kind": explained.kind,
            "target": None if cfg.target is None or cfg.target == "loss" else list(cfg.target),
            "window": [start, stop],
            "quadrature": cfg.quadrature,
            "nodes": cfg.nodes,
            "tol": cfg.tol,
            "dtype": cfg.dtype,
            "split": cfg.split,
            "evals_per_step": evals.double().mean(0).cpu().tolist(),
            **{k: v for k, v in self.sweep_.items()},
        }
        return Attribution(
            axes=("test", *[a for a in keep], "output"),
            values=order(acc.values, canon),
            initial=g_start.cpu(),
            final=g_stop.cpu(),
            regularization=order(acc.regularization, side),
            residual=order(acc.residual, side),
            initial_state=order(acc.initial_state, side),
            quadrature_error=order(quad, ("step",) if "step" in keep else ()),
            buffers=None if buffers is None else order(buffers if "step" in keep else buffers.sum(1),
                                                        ("step",) if "step" in keep else ()),
            coords=coords,
            layout=layout,
            meta=meta,
        )

