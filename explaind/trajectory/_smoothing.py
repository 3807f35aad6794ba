r"""The failed gradient check's test for label smoothing in the loop under ``loss="cross_entropy"``.

A loop that trains with ``nn.CrossEntropyLoss(label_smoothing=eps)`` (or ``F.cross_entropy(...,
label_smoothing=eps)``, timm's ``LabelSmoothingCrossEntropy``) while the recorder was given
``loss="cross_entropy"`` fails the gradient check at step 0 with the check's dozen causes. Label smoothing is
linear in :math:`\varepsilon`:

.. math::

    \ell^{\varepsilon}_k = (1 - \varepsilon)\,\mathrm{CE}(f_k, y_k)
        + \varepsilon\,\frac{1}{C}\sum_c -\log \mathrm{softmax}(f_k)_c,

so the loop's gradient is :math:`g_{\mathrm{CE}} + \varepsilon (g_U - g_{\mathrm{CE}})` with :math:`g_U` the
gradient of the uniform term. Two batch gradients and a least-squares :math:`\varepsilon` tell it, computed only
when the check has failed; :func:`label_smoothing_hint` leads the message with it when the fit matches to
:data:`~._perturbed.MATCH` relative.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import batch_gradient
from ._perturbed import MATCH, perturbed_gradient_hint, start_constants

logger = logging.getLogger(__name__)

__all__ = ["failed_check_fits", "label_smoothing_hint"]


def _uniform(out: Tensor, _targets: Tensor) -> Tensor:
    """Per-sample :math:`\\frac{1}{C}\\sum_c -\\log \\mathrm{softmax}(f_k)_c` over the last axis of ``(n, C)``."""
    return -F.log_softmax(out, -1).mean(-1)


def label_smoothing_hint(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss,
                         batch: tuple, recorded: dict[str, Tensor], s: int,
                         generators: Sequence[torch.Generator] = ()) -> str:
    """The sentence that leads a failed check of step ``s`` recorded with ``loss="cross_entropy"`` when the loop's
    gradient is that of cross entropy with label smoothing (``""`` otherwise; module docstring). Arguments as
    :func:`~._perturbed.perturbed_gradient_hint`'s."""
    if getattr(loss, "name", None) != "cross_entropy":
        return ""
    names = [n for n in params if n in raw]
    theta = {n: p.detach() for n, p in params.items()}
    constants = start_constants(model, recorded)
    try:
        g_ce = batch_gradient(model, constants, theta, names, loss, batch, None, f"Step {s}", generators)
        uniform = dataclasses.replace(loss, implementation=_uniform)
        g_u = batch_gradient(model, constants, theta, names, uniform, batch, None, f"Step {s}", generators)
    except (RuntimeError, ValueError, TypeError) as exc:  # the diagnosis must not hide the check's own message
        logger.debug("The label-smoothing diagnosis of step %d failed: %s", s, exc)
        return ""
    d = {n: (g_u[n] - g_ce[n]).double() for n in names}
    r = {n: raw[n].double() - g_ce[n].double() for n in names}
    dd = math.fsum(float(d[n].pow(2).sum()) for n in names)
    size = math.sqrt(math.fsum(float(raw[n].double().pow(2).sum()) for n in names))
    if dd == 0.0 or size == 0.0:
        return ""
    eps = math.fsum(float((r[n] * d[n]).sum()) for n in names) / dd
    rel = math.sqrt(math.fsum(float((r[n] - eps * d[n]).pow(2).sum()) for n in names)) / size
    if not (rel <= MATCH and 0.0 < eps < 1.0):
        return ""
    return (f" At step {s} the loop's gradient is the gradient of cross entropy with label smoothing {eps:.4g} "
            f"(relative difference {rel:.2g}), not of loss='cross_entropy': the loop trains with "
            f"nn.CrossEntropyLoss(label_smoothing={eps:.3g}) or F.cross_entropy(..., label_smoothing={eps:.3g}). Fix: "
            f"give the recorder that same loss, TrajectoryRecorder(..., loss=torch.nn.CrossEntropyLoss("
            f"label_smoothing={eps:.3g})), recorded exactly.")


def failed_check_fits(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss, batch: tuple,
                      recorded: dict[str, Tensor], s: int, generators: Sequence[torch.Generator] = ()) -> str:
    """The failed check's causes found by fitting the loop's gradient: label smoothing, else SAM's or ASAM's
    perturbation (:func:`~._perturbed.perturbed_gradient_hint`)."""
    found = label_smoothing_hint(model, params, raw, loss, batch, recorded, s, generators)
    return found or perturbed_gradient_hint(model, params, raw, loss, batch, recorded, s, generators)
