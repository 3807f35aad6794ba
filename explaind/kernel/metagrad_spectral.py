r"""Spectral norm's power iteration in the counterfactual sweep (docs/maths.md §9, "Spectral norm").

``torch.nn.utils.parametrizations.spectral_norm`` keeps two buffers per layer, :math:`u` and
:math:`v`. Each training forward of the layer first runs ``n`` power-iteration steps from the
current buffers, without gradient, and then divides the weight by :math:`\sigma = \langle u, W v\rangle`
with :math:`u, v` held constant in the gradient (:math:`W` the weight as a matrix):

.. math::

    u \leftarrow \frac{W v}{\max(\|W v\|, \varepsilon)}, \qquad
    v \leftarrow \frac{W^H u}{\max(\|W^H u\|, \varepsilon)} \quad (n \text{ times}), \qquad
    F(W) = W / \langle u, W v \rangle .

An evaluation forward uses the buffers as they are. So :math:`\beta = (u, v)` is part of the
trained model, :math:`\beta_{s+1} = P_s(\theta_s, \beta_s)` over the ``J`` forwards of step ``s``
(from micro-batch to micro-batch), and the step's gradient
:math:`g_s = c_s \sum_j \partial_\theta L_j(\theta_s, \beta^{(j)})`, taken with :math:`\beta^{(j)}` (the
buffers after forward ``j``) held, depends on :math:`\epsilon` through :math:`\theta_s` *and* through
:math:`\beta_s`. Unlike batch norm's statistics (affine in :math:`\beta`, never read by a training
forward) the iteration is nonlinear in :math:`\beta` and read by the same forward, so the sweep carries a
cotangent :math:`\lambda^\beta` on every :math:`u, v` with

.. math::

    \lambda^\beta_s = \Big(\frac{\partial \beta^{(J)}}{\partial \beta_s}\Big)^T \lambda^\beta_{s+1}
        + \sum_j \Big(\frac{\partial g_j}{\partial \beta_s}\Big)^T \bar g_s, \qquad
    \lambda_s \mathrel{+}= \Big(\frac{\partial \beta^{(J)}}{\partial \theta_s}\Big)^T \lambda^\beta_{s+1}
        + \sum_j \Big(\frac{\partial g_j}{\partial \beta^{(j)}} \frac{\partial \beta^{(j)}}{\partial \theta_s}\Big)^T
        \bar g_s ,

all from one backward through a differentiable copy of the iteration: while
:func:`carried_iteration` is active, each spectral-norm module of the replayed training forward
returns :math:`W_a / \langle u, W_a v\rangle` with :math:`(u, v)` iterated from the carried,
differentiable buffers on a second leaf copy :math:`W_b` of the same weight, so
:math:`\partial/\partial W_a` is the loop's gradient and :math:`\partial/\partial W_b` the iteration's
path. The iterates are checked against the values torch's own (no-gradient) iteration wrote.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exceptions import UnsupportedModelError
from .coupled import training_module
from .explained import FunctionalModel, Params

__all__ = ["PowerIteration", "power_iterations", "carried_iteration", "check_iterates"]

_PREFIX = "parametrizations."


@dataclass(frozen=True)
class PowerIteration:
    """A spectral-norm parametrization whose buffers the run changed.

    Attributes
    ----------
    module : str
        Its name in ``model.named_modules()`` (``"<layer>.parametrizations.<tensor>.0"``).
    u, v : str
        Names of its ``_u`` and ``_v`` buffers.
    original : str
        Name of the parameter it normalises (``"<layer>.parametrizations.<tensor>.original"``).
    """

    module: str
    u: str
    v: str
    original: str


def _is_old_spectral_norm(module: nn.Module) -> bool:
    return any(type(h).__name__ == "SpectralNorm" for h in module._forward_pre_hooks.values())


def power_iterations(fm: FunctionalModel, buffer_names: Sequence[str], owner: str) -> tuple[PowerIteration, ...]:
    """The spectral-norm parametrizations whose ``_u``/``_v`` are among the run's changing ``buffer_names``.

    Raises
    ------
    UnsupportedModelError
        For the older hook-based ``torch.nn.utils.spectral_norm`` (its iteration runs in a forward
        pre-hook on the layer itself) and for a spectral norm that is not the first parametrization
        of its tensor (its input is another parametrization's output), each with the fix.
    """
    found = []
    for name, module in training_module(fm).named_modules():
        prefix = f"{name}." if name else ""
        if _is_old_spectral_norm(module) and any(n.startswith(prefix) and n.endswith(("_u", "_v"))
                                                 for n in buffer_names):
            raise UnsupportedModelError(
                f"{owner}: {name!r} uses the hook-based torch.nn.utils.spectral_norm, whose power iteration runs in "
                f"a forward pre-hook that explaind cannot differentiate through. Allowed: "
                f"torch.nn.utils.parametrizations.spectral_norm. Fix: apply that one instead (the same "
                f"normalisation).")
        if type(module).__name__ != "_SpectralNorm" or prefix + "_u" not in buffer_names:
            continue
        head, _, index = name.rpartition(".")
        if index != "0" or _PREFIX not in head:
            raise UnsupportedModelError(
                f"{owner}: the spectral norm {name!r} is not the first parametrization of its tensor, so its power "
                f"iteration runs on another parametrization's output, which the counterfactual sweep does not "
                f"differentiate. Allowed: spectral_norm registered first on a parameter. Fix: register it first, or "
                f"use InfluenceEstimator.")
        found.append(PowerIteration(name, prefix + "_u", prefix + "_v", f"{head}.original"))
    return tuple(found)


def _matrix(module: nn.Module, weight: Tensor) -> Tensor:
    """The weight as the matrix the module iterates on (its ``dim`` first, the rest flattened)."""
    return module._reshape_weight_to_matrix(weight)


@contextlib.contextmanager
def carried_iteration(module: nn.Module, iterations: Sequence[PowerIteration], weights: Params,
                      carried: dict[str, Tensor]) -> Iterator[None]:
    r"""Spectral-norm layers return :math:`W_a / \langle u, W_a v\rangle` with ``u, v`` iterated differentiably.

    Parameters
    ----------
    module : nn.Module
        The training-mode copy that :func:`~explaind.kernel.coupled.replayed_losses` runs.
    weights : dict of Tensor
        :math:`W_b`, the leaf copies of the ``original`` parameters the iteration runs on.
    carried : dict of Tensor
        The current :math:`u, v` by buffer name, differentiable; replaced by the new iterates at each
        forward (so they carry from micro-batch to micro-batch).
    """
    modules = dict(module.named_modules())
    handles = []
    for it in iterations:
        def hook(mod: nn.Module, args: Any, out: Tensor, it: PowerIteration = it) -> Tensor:
            w_a = args[0]
            w_b = _matrix(mod, weights[it.original])
            u, v = carried[it.u], carried[it.v]
            for _ in range(mod.n_power_iterations):
                u = F.normalize(torch.mv(w_b, v), dim=0, eps=mod.eps)
                v = F.normalize(torch.mv(w_b.H, u), dim=0, eps=mod.eps)
            carried[it.u], carried[it.v] = u, v
            return w_a / torch.vdot(u, torch.mv(_matrix(mod, w_a), v))

        handles.append(modules[it.module].register_forward_hook(hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def check_iterates(iterations: Sequence[PowerIteration], carried: dict[str, Tensor], buffers: Params,
                   where: str) -> None:
    """Raise when the differentiable iterates differ from the buffers torch's own iteration wrote in the same forward.

    Raises
    ------
    UnsupportedModelError
        Naming the buffer (a module that reads the weight more or less often than once per forward
        of the parametrization, or a changed torch implementation).
    """
    for it in iterations:
        for name in (it.u, it.v):
            got, want = carried[name].detach(), buffers[name]
            tol = (1e-12 if want.dtype == torch.float64 else 1e-5) * max(float(want.abs().max()), 1e-30)
            if float((got - want).abs().max()) > tol:
                raise UnsupportedModelError(
                    f"{where}: the power iteration of {it.module!r} recomputed for the counterfactual gives {name} "
                    f"off by {float((got - want).abs().max()):.3g} from torch's own; the metagradient through it "
                    f"would be inexact. Fix: use InfluenceEstimator, which replays torch's iteration itself.")
