r"""The failed gradient check's tests that fit the loop's gradient: label smoothing, SAM's perturbation, and
micro-batches rescaled one by one.

Both run only when the check has failed, from what it holds (the loop's gradient and the logged batch), a few
batch gradients each; :func:`failed_check_fits` returns the sentence that then leads the message.

**Label smoothing.** A loop that trains with ``nn.CrossEntropyLoss(label_smoothing=eps)`` (or
``F.cross_entropy(..., label_smoothing=eps)``, timm's ``LabelSmoothingCrossEntropy``) while the recorder was given
``loss="cross_entropy"`` fails the gradient check at step 0 with the check's dozen causes. Label smoothing is
linear in :math:`\varepsilon`:

.. math::

    \ell^{\varepsilon}_k = (1 - \varepsilon)\,\mathrm{CE}(f_k, y_k)
        + \varepsilon\,\frac{1}{C}\sum_c -\log \mathrm{softmax}(f_k)_c,

so the loop's gradient is :math:`g_{\mathrm{CE}} + \varepsilon (g_U - g_{\mathrm{CE}})` with :math:`g_U` the
gradient of the uniform term. Two batch gradients and a least-squares :math:`\varepsilon` tell it, computed only
when the check has failed; :func:`label_smoothing_hint` leads the message with it when the fit matches to
:data:`MATCH` relative.

**SAM and ASAM through** ``.data``. Sharpness-aware minimisation takes the step's gradient at
:math:`\theta_s + \epsilon_s` and writes :math:`\theta_s` back before ``optimizer.step()``. Written in place or
by assigning ``p.data``, the write moves the parameter's version counter or storage and the recorder names it at
once (:meth:`~explaind.trajectory._gradients.GradientTap.written_since_backward`). Written through
``p.data.add_(e)`` and ``p.data.sub_(e)`` it moves neither: torch does not count writes through ``.data``, and
nothing the recorder keeps per ``backward()`` tells the step's gradient from any other that fails the check.

So the test runs only when the check has failed, from what the check holds: the loop's gradient
:math:`\tilde g` and the logged batch. With :math:`g(\theta) = \sum_k w_k \nabla\ell_k(\theta)` and the two
perturbation directions of the recipes,

.. math::

    u_{\mathrm{SAM}} = \frac{g(\theta_s)}{\lVert g(\theta_s)\rVert}, \qquad
    u_{\mathrm{ASAM}} = \frac{T^2 g(\theta_s)}{\lVert T g(\theta_s)\rVert}, \quad T = |\theta_s|

(norms over every compared parameter together), it fits the radius :math:`\rho` of
:math:`\tilde g \approx g(\theta_s + \rho u)` by secant steps on the least-squares residual, from
:math:`\rho = 0` and the recipes' default 0.05, and names the recipe when the fitted gradient matches
:math:`\tilde g` to :data:`MATCH` relative. A few batch gradients, computed only on the error path.

**Micro-batches rescaled one by one.** A loop that clips (``clip_grad_norm_``) after every micro-batch of an
accumulated step, not once before ``optimizer.step()`` (accelerate's ``accelerator.clip_grad_norm_`` called outside
``if accelerator.sync_gradients:``), rescales partial sums: the step's gradient is
:math:`\tilde g = \sum_j a_j G_j` with :math:`G_j` micro-batch :math:`j`'s logged gradient and factors
:math:`a_j` that differ, which no single :math:`c_s` reproduces. With the check off the recorder measures only the
last factor and the rest lands in the residual. :func:`micro_batch_scales_hint` fits the :math:`a_j` by least
squares (one batch gradient per micro-batch) and names the cause when the fit matches to :data:`MATCH` relative.
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

logger = logging.getLogger(__name__)

__all__ = ["MATCH", "failed_check_fits", "label_smoothing_hint", "micro_batch_scales_hint", "perturbed_gradient_hint",
           "start_constants"]

#: Relative distance at which the loop's gradient is taken to be the batch's gradient at the fitted perturbation.
MATCH = 1e-6

#: Secant steps per direction.
_STEPS = 8

#: After this many secant steps a fit that no longer halves its distance is given up (a failure with another cause
#: costs a few gradients, not :data:`_STEPS`).
_GIVE_UP = 2


def start_constants(model: nn.Module, recorded: dict[str, Tensor]) -> dict[str, Tensor]:
    """Copies of ``model``'s buffers, the ``recorded`` ones where kept: what a step's check starts from."""
    return {n: b.detach().clone() for n, b in {**dict(model.named_buffers()), **recorded}.items()}


def _norm(parts: Sequence[Tensor]) -> float:
    return math.sqrt(math.fsum(float(t.double().pow(2).sum()) for t in parts))


def _fit(grad_at, raw: dict[str, Tensor], u: dict[str, Tensor], g0: dict[str, Tensor]) -> tuple[float, float]:
    """``(rho, relative distance)`` of the best fit of ``raw`` by ``grad_at(rho)`` along ``u`` (secant steps)."""
    scale = max(_norm(list(raw.values())), 1e-300)

    def gap(g: dict[str, Tensor]) -> dict[str, Tensor]:
        return {n: (raw[n].double() - g[n].double()) for n in raw}

    rho_a, g_a = 0.0, g0
    rho_b, g_b = 0.05, grad_at(0.05)
    last = math.inf
    for i in range(_STEPS):
        slope = {n: (g_b[n].double() - g_a[n].double()) / (rho_b - rho_a) for n in raw}
        den = math.fsum(float(slope[n].pow(2).sum()) for n in raw)
        if den == 0.0:
            break
        r = gap(g_b)
        rel = _norm(list(r.values())) / scale
        if rel <= MATCH * 1e-3 or (i >= _GIVE_UP and rel > last / 2):  # matched, or stalled: another cause
            return rho_b, rel
        last = rel
        step = math.fsum(float((r[n] * slope[n]).sum()) for n in raw) / den
        rho_a, g_a = rho_b, g_b
        rho_b = rho_b + step
        if not math.isfinite(rho_b):
            return rho_a, math.inf
        g_b = grad_at(rho_b)
    return rho_b, _norm(list(gap(g_b).values())) / scale


def perturbed_gradient_hint(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss,
                            batch: tuple, recorded: dict[str, Tensor], s: int,
                            generators: Sequence[torch.Generator] = ()) -> str:
    """The sentence that leads a failed check of step ``s`` when the loop's gradient is the logged batch's gradient
    at SAM's or ASAM's perturbation of the parameters (``""`` otherwise; module docstring).

    Parameters
    ----------
    model : nn.Module
        Template for ``functional_call``.
    params : dict of str to Tensor
        :math:`\\theta_s`, every recorded parameter.
    raw : dict of str to Tensor
        The loop's gradients of the compared parameters.
    loss : LossRecord
        The recorder's loss.
    batch : (inputs, Tensor, Tensor)
        The logged batch's inputs, targets and weights.
    recorded : dict of str to Tensor
        The buffers the recorder kept for the step (the model's own otherwise).
    s : int
        The step (message).
    generators : sequence of torch.Generator
        The model's private generators.

    Returns
    -------
    str
    """
    from .._weight_writes import perturbed_gradient_message  # the messages' module (no cycle: it imports no torch)

    names = [n for n in params if n in raw]
    if not names:
        return ""
    theta = {n: p.detach() for n, p in params.items()}
    constants = start_constants(model, recorded)

    def grad_of(values: dict[str, Tensor]) -> dict[str, Tensor]:
        return batch_gradient(model, constants, values, names, loss, batch, None, f"Step {s}", generators)

    try:
        g0 = grad_of(theta)
        size = _norm([g0[n] for n in names])
        if size == 0.0:
            return ""
        found: list[tuple[float, str, float]] = []
        for form in ("SAM", "ASAM"):
            if form == "SAM":
                u = {n: g0[n] / size for n in names}
            else:
                scaled = _norm([theta[n].abs() * g0[n] for n in names])
                if scaled == 0.0:
                    continue
                u = {n: theta[n].pow(2) * g0[n] / scaled for n in names}

            def grad_at(rho: float, u: dict[str, Tensor] = u) -> dict[str, Tensor]:
                return grad_of({**theta, **{n: theta[n] + rho * u[n] for n in names}})

            rho, rel = _fit(grad_at, {n: raw[n] for n in names}, u, g0)
            found.append((rel, form, rho))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # never hide the check's own message
        logger.debug("The perturbation diagnosis of step %d failed: %s", s, exc)
        return ""
    rel, form, rho = min(found)
    return perturbed_gradient_message(s, form, rho, rel) if rel <= MATCH and rho != 0.0 else ""


def _uniform(out: Tensor, _targets: Tensor) -> Tensor:
    """Per-sample :math:`\\frac{1}{C}\\sum_c -\\log \\mathrm{softmax}(f_k)_c` over the last axis of ``(n, C)``."""
    return -F.log_softmax(out, -1).mean(-1)


def label_smoothing_hint(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss,
                         batch: tuple, recorded: dict[str, Tensor], s: int,
                         generators: Sequence[torch.Generator] = ()) -> str:
    """The sentence that leads a failed check of step ``s`` recorded with ``loss="cross_entropy"`` when the loop's
    gradient is that of cross entropy with label smoothing (``""`` otherwise; module docstring). Arguments as
    :func:`perturbed_gradient_hint`'s."""
    if getattr(loss, "name", None) != "cross_entropy":
        return ""
    names = [n for n in params if n in raw]
    theta = {n: p.detach() for n, p in params.items()}
    constants = start_constants(model, recorded)
    try:
        g_ce = batch_gradient(model, constants, theta, names, loss, batch, None, f"Step {s}", generators)
        uniform = dataclasses.replace(loss, implementation=_uniform)
        g_u = batch_gradient(model, constants, theta, names, uniform, batch, None, f"Step {s}", generators)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # never hide the check's own message
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
            f"nn.CrossEntropyLoss(label_smoothing={eps:.3g}), F.cross_entropy(..., label_smoothing={eps:.3g}) or soft "
            f"targets smoothed by hand ((1 - eps) * one_hot + eps / C). Fix: "
            f"give the recorder that same loss, TrajectoryRecorder(..., loss=torch.nn.CrossEntropyLoss("
            f"label_smoothing={eps:.3g})), recorded exactly.")


def micro_batch_scales_hint(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss,
                            batch: tuple, recorded: dict[str, Tensor], s: int,
                            generators: Sequence[torch.Generator] = (), sizes: Sequence[int] = ()) -> str:
    """The sentence that leads a failed check of step ``s`` when the loop's gradient is a combination of the
    micro-batches' gradients with factors that differ (module docstring; ``""`` otherwise). ``sizes``: the rows of
    each logged micro-batch, in ``batch``'s order; the other arguments as :func:`perturbed_gradient_hint`'s."""
    if len(sizes) < 2 or sum(sizes) != int(batch[1].shape[0]):
        return ""
    names = [n for n in params if n in raw]
    theta = {n: p.detach() for n, p in params.items()}
    constants = start_constants(model, recorded)
    starts = [sum(sizes[:j]) for j in range(len(sizes))]
    try:
        parts = [batch_gradient(model, constants, theta, names, loss, tuple(v[a:a + n] for v in batch), None,
                                f"Step {s}", generators) for a, n in zip(starts, sizes)]
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # never hide the check's own message
        logger.debug("The micro-batch scale diagnosis of step %d failed: %s", s, exc)
        return ""
    G = torch.stack([torch.cat([g[n].double().flatten() for n in names]) for g in parts])  # (M, D)
    target = torch.cat([raw[n].double().flatten() for n in names])
    size = float(target.norm())
    if size == 0.0:
        return ""
    a = torch.linalg.lstsq(G.T, target[:, None]).solution.flatten()
    rel = float((G.T @ a - target).norm()) / size
    top = max(float(a.abs().max()), 1e-300)
    # factors that differ, none of them zero (a zero factor is a micro-batch cleared by zero_grad: its own hint)
    if not (rel <= MATCH and float(a.max() - a.min()) > 1e-6 * top and float(a.min()) > 1e-6 * top):
        return ""
    factors = ", ".join(f"{float(x):.4g}" for x in a[:8]) + (", ..." if len(a) > 8 else "")
    return (f" At step {s} the loop's gradient is the sum of its {len(sizes)} micro-batches' gradients each times a "
            f"factor of its own ({factors}; relative difference {rel:.2g}): .grad was rescaled between the "
            f"micro-batches of the step, e.g. clip_grad_norm_ called after every backward() of an accumulated step "
            f"(accelerator.clip_grad_norm_ outside `if accelerator.sync_gradients:`), which clips partial sums, or "
            f"the loop scales each micro-batch's loss by a factor of its own. Fix: rescale once per step, after the "
            f"step's last backward() and before optimizer.step() (with accelerate: inside `if "
            f"accelerator.sync_gradients:`), which is recorded exactly as the step's factor c_s; a loss scaled per "
            f"micro-batch is a weight: log each micro-batch with its factor, rec.log_batch(idx, weights=factor / n).")


def failed_check_fits(model: nn.Module, params: dict[str, Tensor], raw: dict[str, Tensor], loss, batch: tuple,
                      recorded: dict[str, Tensor], s: int, generators: Sequence[torch.Generator] = (),
                      sizes: Sequence[int] = ()) -> str:
    """The failed check's causes found by fitting the loop's gradient: label smoothing, else SAM's or ASAM's
    perturbation (:func:`perturbed_gradient_hint`), else micro-batches rescaled one by one
    (:func:`micro_batch_scales_hint`, with ``sizes`` the rows of each logged micro-batch)."""
    found = label_smoothing_hint(model, params, raw, loss, batch, recorded, s, generators)
    found = found or perturbed_gradient_hint(model, params, raw, loss, batch, recorded, s, generators)
    return found or micro_batch_scales_hint(model, params, raw, loss, batch, recorded, s, generators, sizes)
