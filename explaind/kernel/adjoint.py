r"""Whether a model's backward is the adjoint of its forward-mode derivative: the dot-product test.

Reverse-mode Jacobians (:func:`torch.func.jacrev`, the layer factors' backward passes) follow each operation's
backward; the output, and forward-mode derivatives (:func:`torch.func.jvp`), follow its forward. For an ordinary
model the two are adjoint: for any tangent :math:`v` and cotangent :math:`u`,
:math:`u^\top (J v) = (u^\top J) v`. A custom ``torch.autograd.Function`` whose backward changes gradients on
purpose (a gradient reversal layer, ``-g``) or a gradient hook registered in ``forward``
(``Tensor.register_hook(lambda g: -g)``) breaks that: the reverse-mode Jacobians are then not the derivative of the
output, and the path integrals of ``keep`` with ``'param'`` or ``'train'`` miss part of the change
(docs/engine.md §3, "Backwards that are not the derivative of the forward").

:func:`backward_mismatch` runs the test once at one input, with random Gaussian :math:`u, v` of a fixed seed;
:class:`~explaind.kernel.engine.PathEngine` calls it only when the probe of
:mod:`~explaind.kernel.jumps` found such a Function or hook, and on a mismatch takes Jacobians in forward mode
(:func:`torch.func.jacfwd`, one JVP per parameter entry instead of one backward pass per output).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import jvp, vjp

from .jumps import function_sites, hook_sites

__all__ = ["ADJOINT_TOL", "backward_mismatch", "mismatch_limit", "reversed_backward"]

#: Relative gap between :math:`u^\top (J v)` and :math:`(u^\top J) v` above which the backward is taken as not the
#: adjoint of the forward-mode derivative, in units of the square root of the dtype's machine epsilon (1.5e-6 in
#: float64, 3.5e-2 in float32): far above rounding, far below a reversal (a relative gap of order 1).
ADJOINT_TOL = 100.0

#: The seed of the random tangent and cotangent (the test is reproducible).
SEED = 20261207


def backward_mismatch(fn: Callable[[dict[str, Tensor]], Tensor], point: dict[str, Tensor],
                      names: Sequence[str]) -> float:
    r"""The relative gap :math:`|u^\top (J v) - (u^\top J) v| / \sum |u \odot J v|` of ``fn`` at ``point``.

    Parameters
    ----------
    fn : callable
        Maps the entries of ``point`` to the model's outputs (a tensor).
    point : mapping of str to Tensor
        The parameters (and buffers, held fixed) to test at.
    names : sequence of str
        The entries differentiated (the trainable parameters).

    Returns
    -------
    float
        The gap relative to the size of the forward-mode product's terms; rounding gives about the dtype's epsilon,
        a backward that is not the adjoint of ``jvp`` a value of order 1. ``0.0`` when the outputs do not depend on
        the parameters at all.
    """
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    block = {n: point[n] for n in names}
    rest = {n: v for n, v in point.items() if n not in block}

    def f(p: dict[str, Tensor]) -> Tensor:
        return fn({**rest, **p})

    tangent = {n: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v) for n, v in block.items()}
    out, forward = jvp(f, (block,), (tangent,))
    cotangent = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    _, pull = vjp(f, block)
    (back,) = pull(cotangent)
    terms = (cotangent * forward).detach()
    size = float(terms.abs().sum())
    if size == 0.0:
        return 0.0
    gap = float(terms.sum()) - sum(float((back[n] * tangent[n]).detach().sum()) for n in block)
    return abs(gap) / size


def mismatch_limit(dtype: torch.dtype) -> float:
    """:data:`ADJOINT_TOL` times the square root of ``dtype``'s machine epsilon."""
    return ADJOINT_TOL * math.sqrt(torch.finfo(dtype).eps)


def reversed_backward(fn: Callable[[dict[str, Tensor]], Tensor], point: dict[str, Tensor], names: Sequence[str],
                      sites: Sequence[str], dtype: torch.dtype) -> tuple[tuple[str, ...], float]:
    """The custom-Function and gradient-hook ``sites`` of a probe (:func:`~explaind.kernel.jumps.find_jumps`) and the
    gap of :func:`backward_mismatch`, when the gap exceeds :func:`mismatch_limit`; else ``((), gap)``.

    The test runs only when such sites exist; a test that fails (a Function without ``jvp``, an operation without
    forward-mode derivatives) counts as no mismatch: the quadrature warnings name the sites then.
    """
    found = (*function_sites(sites), *hook_sites(sites))
    if not found:
        return (), 0.0
    try:
        gap = backward_mismatch(fn, point, names)
    except Exception:  # noqa: BLE001 - nothing to switch to; the quadrature warnings name the sites
        return (), 0.0
    return (found, gap) if gap > mismatch_limit(dtype) else ((), gap)
