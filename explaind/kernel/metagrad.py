r"""Exact counterfactual metagradients by reverse mode through the recorded updates (docs/maths.md §9).

With the optimizer's update as a pure function :math:`z_{s+1} = U_s(z_s, g_s)` of the state
:math:`z = (\theta, \mathrm{opt})` and of the gradient
:math:`g_s(\theta, \epsilon) = c_s \sum_k (1 + \epsilon_k) w_{s,k} \nabla\ell_k(\theta)`, the derivative
of :math:`g(x; \theta_N)` with respect to every sample's weight scale :math:`\epsilon_k` at 0 is

.. math::

    \lambda_N = (\nabla_\theta g(x;\theta_N), 0), \qquad
    (\bar z_s, \bar g_s) = \big(\partial U_s / \partial (z_s, g_s)\big)^T \lambda_{s+1}, \\
    \lambda_s = \bar z_s + (H_s \bar g_s, 0), \qquad
    \tau_k \mathrel{+}= c_s w_{s,k} \langle \bar g_s, \nabla\ell_k(\theta_s) \rangle \quad (k \in B_s),

with :math:`H_s = c_s \sum_k w_{s,k} \nabla^2\ell_k(\theta_s)` (one Hessian-vector product per
step, forward-over-reverse). All ``R = T * O`` cotangents (test inputs times outputs) are swept
at once (:func:`torch.func.vmap`).

Dropout and batch norm. A step whose forwards ran in training mode is replayed: :math:`g_s`,
:math:`\nabla\ell_k` and :math:`H_s` are taken through the batched training forward at the step's
recorded random state (sample ``k``'s own loss term through the shared forward), and batch norm's
running statistics :math:`\beta` join the state with their own cotangent :math:`\lambda^\beta`
(:mod:`explaind.kernel.metagrad_coupled`; docs/maths.md §9, "Dropout and batch norm"); spectral
norm's power-iteration buffers too, through a differentiable copy of the iteration
(:mod:`explaind.kernel.metagrad_spectral`).

Memory. ``theta_s`` is read from the trajectory; the optimizer state is rebuilt by replaying
``U`` from ``theta_0`` with the recomputed batch gradients. :func:`counterfactual_sweep` keeps
the state every ``K`` steps (checkpoints) and recomputes one segment of ``K`` steps at a time
during the reverse sweep: ``ceil(N / K) * |opt|`` for the checkpoints, ``K * (|theta| + |opt| +
|g|)`` for a segment and ``2 R (|theta| + |opt|)`` for the cotangents; the default
``K = ceil(sqrt(N))`` makes it ``O(sqrt(N) * D + R * D)`` at the price of one extra forward replay.
The per-sample gradients :math:`\nabla\ell_k(\theta_s)` of a step are taken ``chunk_size`` samples at a
time and contracted with :math:`\bar g_s` chunk by chunk, so a step holds ``chunk_size * D`` of them
instead of ``|B_s| * D``; the chunks only split the sum, the values are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, jvp, vjp, vmap

from ..exceptions import ConfigError, UnsupportedModelError
from ..recurrence import LinearUpdate, is_unchanged
from .coupled import coupled_sample_grads, step_replay
from .evaluate import Batch
from .explained import Explained, FunctionalModel, Params
from .layout import ParamLayout
from .metagrad_coupled import coupled_step_terms, running_stats, shifted_statistics
from .metagrad_forward import transposed_gradient_product, warn_reversed_training_step
from .metagrad_spectral import power_iterations

__all__ = ["Replay", "StepPoint", "counterfactual_sweep", "output_cotangents", "sample_dots", "start_state"]

State = dict[str, dict[str, Tensor]]


@dataclass
class StepPoint:
    """Everything the reverse sweep needs at step ``s`` (the point ``(z_s, g_s)`` and the batch)."""

    s: int
    theta: Params
    state: State
    grad: Params
    scalars: dict[str, dict[str, Any]]
    updates: dict[str, LinearUpdate]
    idx: Tensor
    weights: Tensor
    scale: float
    replay: Any = None


class Replay:
    r"""The recorded run replayed through the pure update ``U_s`` (docs/maths.md §9).

    Parameters
    ----------
    traj : Trajectory
        The recorded run (``params``, ``updates``, ``batch``, ``grad_scale``, ``train_samples``).
    fm : FunctionalModel
        The model on the compute device and dtype.
    pure : PureUpdate
        The adapter's pure update (``record.update_fn(hyperparameters)``).
    chunk_size : int, optional
        Training samples per batch of per-sample gradients (``None``: a step's whole batch at once).
    """

    def __init__(self, traj: Any, fm: FunctionalModel, pure: Any, chunk_size: int | None = None):
        self.traj = traj
        self.fm = fm
        self.pure = pure
        self.chunk_size = chunk_size
        self.names = tuple(traj.param_names)
        #: Batch-norm modules whose running statistics the run changed (carried by the sweep's lambda^beta).
        self.stats = running_stats(fm, tuple(traj.buffer_names), "CounterfactualEstimator")
        #: Spectral-norm layers whose power-iteration buffers the run changed (carried by lambda^beta too).
        self.spectral = power_iterations(fm, tuple(traj.buffer_names), "CounterfactualEstimator")
        #: Largest ``||U_s(z_s, g_s) - theta_{s+1}|| / ||theta_{s+1} - theta_s||`` seen by :meth:`point`.
        self.max_residual = 0.0
        #: The Functions or hooks whose backward is not the derivative of the forward (set by the estimator from the
        #: dot-product test): the curvature term is then taken from forward-mode columns
        #: (:func:`~explaind.kernel.metagrad_forward.transposed_gradient_product`).
        self.reversed_sites: tuple[str, ...] = ()

    def theta(self, s: int) -> Params:
        r""":math:`\theta_s` on the compute device and dtype."""
        return self.fm.cast_params(self.traj.params(s), self.names)

    def init_state(self) -> State:
        """The optimizer state before step 0 (:func:`start_state`)."""
        return start_state(self.traj, self.pure, self.theta(0))

    def batch_loss(self, s: int) -> Any:
        r"""``L_s(theta) = c_s sum_k w_{s,k} l_k(theta)`` (its gradient is the :math:`g_s` of the run)."""
        idx, weights = self.traj.batch(s)
        x, y = self.traj.train_samples(idx)
        x, y = self.fm.cast(x), self.fm.cast(y)
        w = self.fm.cast(weights) * float(self.traj.grad_scale(s))
        return lambda theta: (w * self.fm.sample_loss(theta, x, y)).sum()

    def samples(self, idx: Tensor) -> tuple[Any, Tensor]:
        """Training inputs and targets at ``idx``, on the compute device and dtype."""
        x, y = self.traj.train_samples(idx.cpu())
        return self.fm.cast(x), self.fm.cast(y)

    def buffers(self, s: int) -> Params:
        r""":math:`\beta_s` (the buffers the run changed) on the compute device and dtype."""
        return {n: self.fm.cast(t) for n, t in self.traj.buffers(s).items()}

    def batch_grad(self, s: int, theta: Params, coupled: Any) -> Params:
        r""":math:`g_s`, through the replayed training forward when ``coupled`` (a step replay), else in eval mode."""
        if coupled is None:
            return grad(self.batch_loss(s))(theta)
        idx, weights = self.traj.batch(s)
        x, y = self.samples(idx)
        layout = ParamLayout.from_tensors(theta, self.names)
        batch = Batch(x, y, self.fm.cast(weights) * float(self.traj.grad_scale(s)), coupled)
        return layout.unflatten(coupled_sample_grads(self.fm, theta, layout, batch, None, summed=True))

    def update_all(self, point: StepPoint, theta: Params, state: State, g: Params) -> tuple[Params, State]:
        """``U_s`` over every parameter tensor (a tensor without gradient at ``s`` keeps ``theta`` and state)."""
        new_theta, new_state = {}, {}
        for n in self.names:
            u = point.updates[n]
            if is_unchanged(u):
                new_theta[n], new_state[n] = theta[n], state[n]
            else:
                new_theta[n], new_state[n] = self.pure(u, point.scalars[n], theta[n], state[n], g[n])
        return new_theta, new_state

    def point(self, s: int, state: State) -> tuple[StepPoint, State]:
        """The point of step ``s`` from ``state_s``, and ``state_{s+1}`` (``U_s`` at the recorded ``theta_s``)."""
        theta = self.theta(s)
        coupled = step_replay(self.traj, s)
        g = self.batch_grad(s, theta, coupled)
        updates = {n: u.to(device=self.fm.device, dtype=self.fm.dtype) for n, u in self.traj.updates(s).items()}
        scalars = {n: ({} if is_unchanged(updates[n]) else self.pure.scalars(updates[n], theta[n], state[n], g[n]))
                   for n in self.names}
        idx, weights = self.traj.batch(s)
        point = StepPoint(s, theta, state, g, scalars, updates, idx.to(self.fm.device),
                          self.fm.cast(weights), float(self.traj.grad_scale(s)), coupled)
        with torch.no_grad():
            new_theta, new_state = self.update_all(point, theta, state, g)
            target = self.theta(s + 1)
            num = math.sqrt(sum(float((new_theta[n] - target[n]).pow(2).sum()) for n in self.names))
            den = math.sqrt(sum(float((target[n] - theta[n]).pow(2).sum()) for n in self.names))
        self.max_residual = max(self.max_residual, num / den if den > 0 else num)
        return point, new_state


def start_state(traj: Any, pure: Any, theta: Params) -> State:
    r"""The pure update's state before step 0: zeros, or the state a recording opened on (docs/maths.md §9).

    A run recorded from an optimizer that held state starts from its stored :math:`m_{-1}`
    (:meth:`~explaind.trajectory.base.Trajectory.initial_state`) and torch's own state then
    (:meth:`~explaind.trajectory.base.Trajectory.optimizer_start`: Adam's second moment and step
    count), turned into the pure update's state by its ``start_state``; a parameter that held none
    starts from ``init_state``. ``theta`` (:math:`\theta_0`) sets the dtype and device.

    Raises
    ------
    ConfigError
        The run started from optimizer state and the pure update has no ``start_state``, or
        cannot build its state from what the store kept.
    """
    m, start = traj.initial_state(), traj.optimizer_start()
    if not m and start is None:
        return {n: pure.init_state(theta[n]) for n in theta}
    starter = getattr(pure, "start_state", None)
    if not callable(starter):
        raise ConfigError(
            f"The run started from optimizer state (Trajectory.initial_state(), restored from a checkpoint or left by "
            f"unrecorded steps), and the pure update {type(pure).__name__} of the adapter {traj.manifest.adapter!r} "
            f"has no start_state(theta, m, saved) to start from it. Fix: add start_state to the pure update "
            f"(docs/optimizers.md, 'Pure updates'), record the run from a fresh optimizer, or use InfluenceEstimator."
        )
    saved = start.entries(f"The optimizer's start state of {traj!r}") if start is not None else {}
    out = {}
    for n, t in theta.items():
        if n in m or n in saved:
            out[n] = starter(t, m[n] if n in m else None, saved.get(n) if start is not None else None)
        else:
            out[n] = pure.init_state(t)
    return out


def output_cotangents(fm: FunctionalModel, explained: Explained, theta: Params, X: Tensor,
                      buffers: Params | None = None, stats: Any = (), spectral: Any = (),
                      jacobian: Any = jacrev) -> tuple[Params, Params]:
    r""":math:`\lambda_N = \nabla_\theta g(x; \theta_N, \beta_N)` and :math:`\lambda^\beta_N = \nabla_\beta g`.

    ``buffers`` are :math:`\beta_N` (the buffers the run changed); :math:`\lambda^\beta_N` is taken on
    the running means and variances of ``stats`` (:func:`~explaind.kernel.metagrad_coupled.shifted_statistics`)
    and on the ``_u``/``_v`` of the spectral-norm layers ``spectral`` (read as they are in evaluation mode).
    ``jacobian`` is :func:`torch.func.jacrev`, or :func:`torch.func.jacfwd` for a model whose backward is not the
    derivative of its forward (:func:`~explaind.kernel.metagrad_forward.output_jacobian`). Returns two dicts
    ``name -> (T * O, *shape)`` (per test input and output).
    """
    buffers = {} if buffers is None else buffers
    zeros = {n: torch.zeros_like(buffers[n]) for st in stats for n in (st.mean, st.var)}
    iterates = {n: buffers[n] for it in spectral for n in (it.u, it.v)}
    shifts: dict[str, Tensor] = {}

    def g_one(th: Params, shift: Params, uv: Params, x: Tensor, aux: Tensor) -> Tensor:
        shifts.update(shift)
        return explained(fm, {**buffers, **uv, **th}, x[None], aux[None])[0]

    with shifted_statistics(fm.module, stats, shifts):
        jac_theta, jac_beta, jac_uv = vmap(jacobian(g_one, argnums=(0, 1, 2)), in_dims=(None, None, None, 0, 0))(
            theta, zeros, iterates, X, explained.aux)
    beta = {**zeros, **iterates}
    return ({n: j.reshape(-1, *theta[n].shape) for n, j in jac_theta.items()},
            {n: j.reshape(-1, *beta[n].shape) for n, j in {**jac_beta, **jac_uv}.items()})


def _sample_grads(replay: Replay, theta: Params, idx: Tensor) -> Params:
    r""":math:`\nabla\ell_k(\theta)` of the samples ``idx``, ``name -> (B, *shape)``."""
    fm = replay.fm
    x, y = replay.samples(idx)

    def loss_one(th: Params, xi: Tensor, yi: Tensor) -> Tensor:
        return fm.sample_loss(th, xi[None], yi[None])[0]

    return vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, x, y)


def sample_dots(replay: Replay, theta: Params, idx: Tensor, bar_g: Params) -> Tensor:
    r""":math:`\langle \bar g_r, \nabla\ell_k(\theta) \rangle` for the samples ``idx``, ``(R, B)``.

    The gradients are taken :attr:`Replay.chunk_size` samples at a time (all at once when ``None``).
    """
    B = idx.shape[0]
    R = next(iter(bar_g.values())).shape[0]
    flat = {n: bar_g[n].reshape(R, -1) for n in replay.names}
    out = torch.empty(R, B, dtype=replay.fm.dtype, device=replay.fm.device)
    step = replay.chunk_size or max(1, B)
    for lo in range(0, B, step):
        G = _sample_grads(replay, theta, idx[lo:lo + step])
        out[:, lo:lo + step] = sum(flat[n] @ G[n].reshape(G[n].shape[0], -1).T for n in replay.names)
    return out


def _reverse_step(replay: Replay, point: StepPoint, lam_theta: Params, lam_state: State, lam_beta: Params,
                  tau: Tensor) -> tuple[Params, State, Params]:
    r"""One reverse step: updates ``tau (R, M)`` in place; returns :math:`\lambda_s`, :math:`\lambda^\beta_s`.

    A step whose forwards ran in training mode (dropout, batch norm) takes its per-sample
    gradients, Hessian-vector product and running-statistics term through the replayed batched
    forward (:func:`~explaind.kernel.metagrad_coupled.coupled_step_terms`).
    """
    names = replay.names

    def U(theta: Params, state: State, g: Params) -> tuple[Params, State]:
        return replay.update_all(point, theta, state, g)

    _, vjp_fn = vjp(U, point.theta, point.state, point.grad)
    bar_theta, bar_state, bar_g = vmap(vjp_fn)((lam_theta, lam_state))
    if point.replay is not None:
        if replay.reversed_sites:
            warn_reversed_training_step(replay, point.s)
        x, y = replay.samples(point.idx)
        beta = dict(point.replay.buffers)  # beta_s, read once by step_replay
        counts = {st.module: int(beta.get(st.count, 0)) for st in replay.stats}
        dots, hv, lam_beta = coupled_step_terms(replay.fm, point, x, y, bar_g, lam_beta, replay.stats, counts,
                                                replay.chunk_size, replay.spectral)
    else:
        if replay.spectral:
            raise UnsupportedModelError(
                f"CounterfactualEstimator: step {point.s} of this run with spectral norm ran no training forward "
                f"that can be replayed, so how its gradient depends on the power-iteration buffers is unknown. "
                f"Fix: record with capture_random='auto' (the default) or True, so that every training forward "
                f"is captured and replayed.")
        dots = sample_dots(replay, point.theta, point.idx, bar_g)
        grad_L = grad(replay.batch_loss(point.s))

        def hvp(v: Params) -> Params:
            return jvp(grad_L, (point.theta,), (v,))[1]

        if replay.reversed_sites:  # J_s is not symmetric: J_s^T bar_g from forward-mode columns
            hv = transposed_gradient_product(grad_L, point.theta, bar_g)
        else:
            hv = vmap(hvp)(bar_g)
    tau.index_add_(1, point.idx, dots * (point.scale * point.weights)[None])
    return {n: bar_theta[n] + hv[n] for n in names}, bar_state, lam_beta


def counterfactual_sweep(replay: Replay, lam_theta: Params, n_train: int,
                         checkpoint_every: int | None = None, start: int = 0, stop: int | None = None,
                         lam_beta: Params | None = None) -> Tensor:
    r""":math:`\tau_k = \partial g(x;\theta_{stop}) / \partial\epsilon_k` for ``R`` cotangents at once.

    ``epsilon_k`` scales sample ``k``'s weight in the steps ``start <= s < stop`` only; the state
    :math:`z_{start}` (parameters and optimizer state) is the recorded one and does not depend on it.

    Parameters
    ----------
    replay : Replay
    lam_theta : dict of Tensor
        :math:`\lambda_{stop} = \nabla_\theta g(x; \theta_{stop})` on the parameters, ``name -> (R, *shape)``.
    n_train : int
        ``M``, the number of training samples.
    checkpoint_every : int, optional
        ``K``: keep the optimizer state every ``K`` steps of the window (default ``ceil(sqrt(stop - start))``).
    start, stop : int
        The window of steps (default: the whole run, ``0`` and ``N``).
    lam_beta : dict of Tensor, optional
        :math:`\lambda^\beta_{stop} = \nabla_\beta g(x; \theta_{stop}, \beta_{stop})` on the running
        statistics of ``replay.stats``, ``name -> (R, C)`` (required when the run changed them).

    Returns
    -------
    Tensor
        ``tau``, shape ``(R, M)``.
    """
    stop = int(replay.traj.n_steps) if stop is None else int(stop)
    N = stop - start
    K = max(1, math.ceil(math.sqrt(N))) if checkpoint_every is None else int(checkpoint_every)
    state = replay.init_state()
    for s in range(start):  # the optimizer state at the window start, replayed (not differentiated)
        _, state = replay.point(s, state)
    checkpoints: dict[int, State] = {}
    for s in range(start, stop):
        if (s - start) % K == 0:
            checkpoints[s] = state
        _, state = replay.point(s, state)
    R = next(iter(lam_theta.values())).shape[0]
    fm = replay.fm
    tau = torch.zeros(R, n_train, dtype=fm.dtype, device=fm.device)
    lam_state = {n: {k: torch.zeros(R, *v.shape, dtype=v.dtype, device=v.device) for k, v in st.items()}
                 for n, st in checkpoints[start].items()}
    lam_beta = {} if lam_beta is None else dict(lam_beta)
    for lo in sorted(checkpoints, reverse=True):
        points, state = [], checkpoints[lo]
        for s in range(lo, min(stop, lo + K)):
            point, state = replay.point(s, state)
            points.append(point)
        for point in reversed(points):
            lam_theta, lam_state, lam_beta = _reverse_step(replay, point, lam_theta, lam_state, lam_beta, tau)
    return tau
