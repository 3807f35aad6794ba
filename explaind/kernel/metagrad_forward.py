r"""The counterfactual's derivatives in forward mode, for a model whose backward is not the derivative of its forward.

On an ordinary model the reverse sweep of :mod:`explaind.kernel.metagrad` takes the test gradient
:math:`\lambda_N = \nabla_\theta g(x;\theta_N)` by reverse mode and the curvature term as :math:`H_s \bar g_s`, one
forward-over-reverse product, since :math:`H_s`, the Jacobian of the batch gradient :math:`g_s(\theta)`, is a
symmetric Hessian. A gradient reversal layer (a custom ``torch.autograd.Function`` whose backward is ``-g``, or a
``Tensor.register_hook(lambda g: -g)`` in ``forward``) breaks both (docs/maths.md §9, "Backwards that are not the
derivative of the forward"):

* reverse mode follows the backward, the output its forward, so :math:`\lambda_N` is taken by
  :func:`torch.func.jacfwd` (:func:`output_jacobian`);
* :math:`g_s(\theta)` is what the backward computed (what the optimizer applied), not the gradient of a loss, so its
  Jacobian :math:`J_s = \partial g_s / \partial\theta` is not symmetric and the sweep needs :math:`J_s^\top \bar g_s`.
  Reverse over reverse would push cotangents back through the reversed backward of the forward part, so the
  product is built from forward-mode columns :math:`J_s e_j` (one JVP of :math:`g_s` per parameter entry, taken
  :data:`COLUMNS` at a time; :func:`transposed_gradient_product`).

The per-sample gradients :math:`\nabla\ell_k(\theta_s)` keep the backward: they are what the run applied.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import jacfwd, jvp, vmap

from ..exceptions import warn_at_caller
from .explained import Params
from .layout import ParamLayout

__all__ = ["COLUMNS", "output_jacobian", "transposed_gradient_product", "warn_reversed_training_step"]

#: Forward-mode columns :math:`J_s e_j` taken at once (one batched JVP of the step's gradient each chunk).
COLUMNS = 64


def output_jacobian(reversed_sites: tuple[str, ...]) -> Callable:
    """:func:`torch.func.jacfwd` when the dot-product test found ``reversed_sites``, else :func:`torch.func.jacrev`."""
    return jacfwd if reversed_sites else torch.func.jacrev


def transposed_gradient_product(grad_fn: Callable[[Params], Params], theta: Params, bar_g: Params,
                                columns: int = COLUMNS) -> Params:
    r""":math:`J^\top \bar g_r` for every cotangent ``r``, where :math:`J` is the Jacobian of ``grad_fn`` at ``theta``.

    Parameters
    ----------
    grad_fn : callable
        :math:`\theta \mapsto g(\theta)`, the step's batch gradient as the backward computes it.
    theta : dict of Tensor
        :math:`\theta_s`, ``name -> shape``.
    bar_g : dict of Tensor
        :math:`\bar g_s`, ``name -> (R, *shape)``.
    columns : int
        Columns :math:`J e_j` per batched JVP.

    Returns
    -------
    dict of Tensor
        ``name -> (R, *shape)``: entry ``j`` of row ``r`` is :math:`\langle \bar g_r, J e_j \rangle`.
    """
    layout = ParamLayout.from_tensors(theta, tuple(theta))
    flat_bar = layout.flatten(bar_g, lead=1)
    D = layout.size
    ref = next(iter(theta.values()))
    out = torch.empty(flat_bar.shape[0], D, dtype=flat_bar.dtype, device=flat_bar.device)

    def column(v: Params) -> Params:
        return jvp(grad_fn, (theta,), (v,))[1]

    for lo in range(0, D, columns):
        hi = min(D, lo + columns)
        basis = torch.zeros(hi - lo, D, dtype=ref.dtype, device=ref.device)
        basis[torch.arange(hi - lo), torch.arange(lo, hi)] = 1.0
        cols: Tensor = layout.flatten(vmap(column)(layout.unflatten(basis)), lead=1)
        out[:, lo:hi] = flat_bar @ cols.T
    return layout.unflatten(out)


def warn_reversed_training_step(replay: Any, step: int) -> None:
    """Once per sweep: an :class:`~explaind.exceptions.ExplaindWarning` that step ``step``, replayed through the
    training forward (dropout, batch norm), keeps its reverse-mode curvature on a model whose backward is not the
    derivative of its forward, so the values are not exact there."""
    if getattr(replay, "reversed_warned", False):
        return
    replay.reversed_warned = True
    warn_at_caller(
        f"CounterfactualEstimator: the model's backward is not the derivative of its forward "
        f"({'; '.join(replay.reversed_sites[:4])}), and step {step} is replayed through its training forward "
        f"(dropout or batch norm in training mode), whose curvature and running-statistics terms have no "
        f"forward-mode form here: they follow the backward, so the scores are not the first-order effect of "
        f"re-weighting a sample. Fix: InfluenceEstimator (exact on such a model for every keep), or record the run "
        f"with the model in evaluation mode (no dropout, batch norm on its running statistics).")
