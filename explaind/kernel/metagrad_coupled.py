r"""One reverse step of the counterfactual sweep through the replayed training forward (docs/maths.md §9).

With dropout or batch norm in training mode the recorded gradient is that of the *batched*
forward at the step's recorded random state :math:`\xi_s`,
:math:`g_s(\theta, \epsilon) = c_s \nabla_\theta \sum_k (1 + \epsilon_k) w_{s,k} \ell_k(F(X_B; \theta, \xi_s))`
(docs/maths.md, "Dropout and batch norm"). Each quantity of the reverse step is then taken through
that same forward, one micro-batch at a time under its own recorded state
(:func:`~explaind.kernel.coupled.replayed_losses`):

* :math:`\partial g_s / \partial \epsilon_k = c_s w_{s,k} G_k` with
  :math:`G_k = \nabla_\theta \ell_k(F(X_B; \theta_s, \xi_s))`, sample ``k``'s own loss term through
  the shared forward (one batched backward with cotangents :math:`e_k`);
* :math:`H_s = \nabla^2_\theta L_s(\theta_s)` of the batched loss, applied to :math:`\bar g_s` by
  reverse-over-reverse (the gradient's graph kept, then one batched backward);
* batch norm's running statistics. The trained model is :math:`(\theta_N, \beta_N)` and each
  training forward updates :math:`\beta \leftarrow (1 - m)\beta + m\, \mathrm{stat}(\theta)`
  (the batch mean, and the unbiased batch variance, of the layer's input; ``m`` the momentum,
  ``1 / num_batches_tracked`` when it is ``None``). Over the ``J`` micro-batches of a step,
  :math:`\beta_{s+1} = \prod_j (1 - m_j) \beta_s + \sum_j m_j \prod_{i > j} (1 - m_i)\, \mathrm{stat}_j(\theta_s)`:
  it depends on :math:`\epsilon` through :math:`\theta_s` only, so the sweep carries a cotangent
  :math:`\lambda^\beta` with :math:`\lambda^\beta_s = \prod_j (1 - m_j) \lambda^\beta_{s+1}` and adds
  :math:`\sum_j m_j \prod_{i>j} (1 - m_i) (\partial\,\mathrm{stat}_j / \partial\theta)^T \lambda^\beta_{s+1}`
  to :math:`\lambda_s`. The statistics are recomputed from the layer's input by a forward hook
  (only their derivatives are used; the values of :math:`\beta` are the recorded ones).

Spectral norm's power-iteration buffers are carried the same way, through a differentiable copy
of the iteration (:mod:`explaind.kernel.metagrad_spectral`). Any other buffer that training
changes cannot be differentiated here: :func:`running_stats` refuses it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import UnsupportedModelError
from .coupled import replayed_losses, start_buffers, training_module
from .explained import FunctionalModel, Params
from .metagrad_spectral import PowerIteration, carried_iteration, check_iterates, power_iterations

__all__ = ["RunningStat", "running_stats", "coupled_step_terms", "shifted_statistics"]


@dataclass(frozen=True)
class RunningStat:
    """A batch-norm module whose running statistics the run changed.

    Attributes
    ----------
    module : str
        Its name in ``model.named_modules()``.
    mean, var : str
        Names of its ``running_mean`` and ``running_var`` buffers.
    count : str
        Name of its ``num_batches_tracked`` buffer.
    momentum : float or None
        ``m`` of the update (``None``: the cumulative average ``1 / num_batches_tracked``).
    """

    module: str
    mean: str
    var: str
    count: str
    momentum: float | None

    def factors(self, count: int, n_parts: int) -> tuple[list[float], float]:
        r"""``(coefficients, decay)`` of one step of ``n_parts`` training forwards.

        ``coefficients[j]`` is :math:`m_j \prod_{i>j}(1 - m_i)` and ``decay`` :math:`\prod_j (1 - m_j)`,
        with ``count`` the ``num_batches_tracked`` before the step.
        """
        ms = [self.momentum if self.momentum is not None else 1.0 / (count + j + 1) for j in range(n_parts)]
        coefficients = [ms[j] * math.prod(1.0 - m for m in ms[j + 1:]) for j in range(n_parts)]
        return coefficients, math.prod(1.0 - m for m in ms)


def running_stats(fm: FunctionalModel, buffer_names: Sequence[str], owner: str) -> tuple[RunningStat, ...]:
    """The batch-norm modules whose statistics are among the run's changing ``buffer_names``.

    Raises
    ------
    UnsupportedModelError
        When training changed a buffer that is not a batch-norm running statistic: its
        dependence on the sample weights is unknown, so the metagradient would be inexact.
    """
    found, covered = [], {n for it in power_iterations(fm, buffer_names, owner) for n in (it.u, it.v)}
    for name, module in training_module(fm).named_modules():
        if not (isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats):
            continue
        prefix = f"{name}." if name else ""
        mean, var, count = (prefix + b for b in ("running_mean", "running_var", "num_batches_tracked"))
        if mean in buffer_names or var in buffer_names:
            found.append(RunningStat(name, mean, var, count, module.momentum))
            covered.update((mean, var, count))
    unknown = [n for n in buffer_names if n not in covered]
    if unknown:
        raise UnsupportedModelError(
            f"{owner}: training changed the buffers {unknown}, which are not batch-norm running statistics; how "
            f"they depend on the sample weights is unknown, so the metagradient through them would be inexact. "
            f"Allowed: buffers of BatchNorm1d/2d/3d with track_running_stats and of "
            f"torch.nn.utils.parametrizations.spectral_norm. Fix: keep those buffers constant "
            f"during training, or use InfluenceEstimator (it adds the buffers' change as its own exact term)."
        )
    return tuple(found)


@contextlib.contextmanager
def batch_statistics(module: nn.Module, names: Sequence[str]) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Collect, per batch-norm module name, the batch mean and unbiased variance of its input during a forward."""
    found: dict[str, tuple[Tensor, Tensor]] = {}
    modules = dict(module.named_modules())
    handles = []
    for name in names:
        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            x = args[0]
            dims = [0, *range(2, x.dim())]
            found[name] = (x.mean(dims), x.var(dims, correction=1))

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def shifted_statistics(module: nn.Module, stats: Sequence[RunningStat], shifts: dict[str, Tensor]) -> Iterator[None]:
    r"""Evaluation-mode batch norm recomputed with its running statistics shifted by ``shifts[name]``.

    Torch's batch norm is not differentiable in its running statistics, so while this is active
    each module of ``stats`` returns :math:`\gamma (x - \mu - \delta_\mu) / \sqrt{\sigma^2 + \delta_{\sigma^2}
    + \varepsilon} + b`, with the shifts read from ``shifts`` at each forward: differentiating in the
    (zero) shifts gives :math:`\nabla_\beta g`. ``module`` must be in evaluation mode.
    """
    modules = dict(module.named_modules())
    handles = []
    for st in stats:
        def hook(mod: nn.Module, args: Any, out: Any, st: RunningStat = st) -> Tensor:
            x = args[0]
            shape = (1, -1) + (1,) * (x.dim() - 2)
            mean = (mod.running_mean + shifts[st.mean]).reshape(shape)
            var = (mod.running_var + shifts[st.var]).reshape(shape)
            y = (x - mean) / torch.sqrt(var + mod.eps)
            if mod.weight is not None:
                y = y * mod.weight.reshape(shape) + mod.bias.reshape(shape)
            return y

        handles.append(modules[st.module].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def coupled_step_terms(fm: FunctionalModel, point: Any, x: Any, y: Tensor, bar_g: Params, lam_beta: Params,
                       stats: Sequence[RunningStat], counts: dict[str, int],
                       chunk_size: int | None = None,
                       spectral: Sequence[PowerIteration] = ()) -> tuple[Tensor, Params, Params]:
    r"""The data, curvature and running-statistics terms of one reverse step through the replayed forward.

    Parameters
    ----------
    fm : FunctionalModel
    point : StepPoint
        Step ``s`` (``theta``, ``weights``, ``scale`` and ``replay``, the micro-batches and their states).
    x, y : Tensor or Inputs, Tensor
        The step's training samples in batch order (on the compute device).
    bar_g : dict of Tensor
        :math:`\bar g_s`, ``name -> (R, *shape)``.
    lam_beta : dict of Tensor
        :math:`\lambda^\beta_{s+1}` on the running means and variances of ``stats``, ``name -> (R, C)``.
    stats : sequence of RunningStat
    counts : dict of int
        ``num_batches_tracked`` of each of ``stats`` before the step.
    chunk_size : int, optional
        Samples whose gradients :math:`G_k` one backward pass takes (one-hot cotangents; ``None``: a
        whole micro-batch), so at most ``chunk_size * D`` of them are held at once.
    spectral : sequence of PowerIteration
        Spectral-norm layers whose buffers the run changed: their iteration is differentiated too
        (:mod:`~explaind.kernel.metagrad_spectral`), with :math:`\lambda^\beta_{s+1}` on their
        ``_u``/``_v`` in ``lam_beta``.

    Returns
    -------
    dots : Tensor
        :math:`\langle \bar g_{s,r}, G_k \rangle`, ``(R, B)`` (weights not included).
    theta_bar : dict of Tensor
        :math:`H_s \bar g_s + \sum_j m_j \prod_{i>j}(1-m_i) (\partial\,\mathrm{stat}_j/\partial\theta)^T
        \lambda^\beta_{s+1}` (plus the spectral-norm iteration's terms), ``name -> (R, *shape)``.
    lam_beta_s : dict of Tensor
        :math:`\lambda^\beta_s`.
    """
    names = tuple(point.theta)
    theta = {n: t.detach().requires_grad_(True) for n, t in point.theta.items()}
    inputs = [theta[n] for n in names]
    R = next(iter(bar_g.values())).shape[0]
    dots = torch.zeros(R, point.weights.shape[0], dtype=fm.dtype, device=fm.device)
    theta_bar = {n: torch.zeros_like(bar_g[n]) for n in names}
    parts = point.replay.parts
    factors = {st.module: st.factors(counts[st.module], len(parts)) for st in stats}
    module = training_module(fm)
    buffers = start_buffers(fm, point.replay)  # beta_s, carried through the micro-batches as in the loop
    # spectral norm: W_b, the iteration's own leaf copy of each weight, and beta_s on u, v as leaves
    w_b = {it.original: point.theta[it.original].detach().requires_grad_(True) for it in spectral
           if it.original in point.theta}
    start = {n: buffers[n].detach().clone().requires_grad_(True) for it in spectral for n in (it.u, it.v)}
    carried = dict(start)
    lam_beta = {**{n: torch.zeros(R, *t.shape, dtype=t.dtype, device=t.device) for n, t in start.items()},
                **lam_beta}  # no cotangent given on u, v: zero
    beta_bar = {n: torch.zeros_like(lam_beta[n]) for n in start}  # lambda^beta_s on u, v
    extra = list(w_b.values()) + list(start.values())
    for j, (lo, hi, state) in enumerate(parts):
        weights_b = {it.original: w_b.get(it.original, fm.constants.get(it.original)) for it in spectral}
        with batch_statistics(module, [st.module for st in stats]) as found, \
                carried_iteration(module, spectral, weights_b, carried):
            losses = replayed_losses(fm, theta, x[lo:hi], y[lo:hi], state, point.replay, buffers)
        check_iterates(spectral, carried, buffers, f"Step {point.s}")
        n = hi - lo
        eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
        step = chunk_size or n
        for c in range(0, n, step):
            rows = eye[c:c + step]
            G = torch.autograd.grad(losses, inputs, grad_outputs=rows, is_grads_batched=True, retain_graph=True,
                                    allow_unused=True)
            for name, g in zip(names, G):
                if g is not None:
                    dots[:, lo + c:lo + c + rows.shape[0]] += bar_g[name].reshape(R, -1) @ g.reshape(rows.shape[0],
                                                                                                     -1).T
        cw = (point.scale * point.weights[lo:hi]).to(losses.dtype)
        grads = torch.autograd.grad((cw * losses).sum(), inputs, create_graph=True, allow_unused=True)
        outs = [g for g in grads if g is not None and g.requires_grad]
        cots = [bar_g[name] for name, g in zip(names, grads) if g is not None and g.requires_grad]
        for st in stats:
            mean, var = found[st.module]
            c = factors[st.module][0][j]
            outs += [mean, var]
            cots += [c * lam_beta[st.mean], c * lam_beta[st.var]]
        if j == len(parts) - 1:  # beta_{s+1}: the iterates after the step's last forward
            outs += [carried[n] for n in start if carried[n].requires_grad]
            cots += [lam_beta[n] for n in start if carried[n].requires_grad]
        if not outs:
            continue
        back = torch.autograd.grad(outs, inputs + extra, grad_outputs=cots, is_grads_batched=True,
                                   allow_unused=True, retain_graph=bool(spectral))  # the iteration spans the step
        for name, b in zip(names, back):
            if b is not None:
                theta_bar[name] += b
        for name, b in zip(list(w_b) + list(start), back[len(names):]):
            if b is not None:  # W_b: the iteration's path to theta_s; u, v: to beta_s
                (theta_bar if name in w_b else beta_bar)[name] += b
    lam_beta_s = {**lam_beta, **beta_bar}
    for st in stats:
        decay = factors[st.module][1]
        lam_beta_s[st.mean], lam_beta_s[st.var] = decay * lam_beta[st.mean], decay * lam_beta[st.var]
    return dots, theta_bar, lam_beta_s
