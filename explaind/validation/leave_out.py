r"""Leave-out retraining (the removed samples taken out of their batches, not weighted 0) and a score for it.

The benchmark's retraining (:meth:`~explaind.validation.problem.ValidationProblem.train`) removes a
sample by a weight of 0 on its loss term. Where the samples of a batch are coupled, that is not the
same as leaving the sample out:

* with train-mode batch norm (setting ``"batchnorm"``), a weight-0 sample still enters its batches'
  statistics (and the running statistics), so it still normalises the others;
* with InfoNCE (setting ``"contrastive"``), a weight-0 pair is still a negative of the other pairs.

:func:`leave_out_train` is the other intervention: a plain torch loop (float64, no explaind code)
over the recorded batches in which step ``s`` runs the training forward on the kept samples
:math:`B_s \cap S` only, so the batch statistics and the negatives are computed without the
removed samples, and minimises

.. math::

    L_s = \frac{1}{|B_s|} \sum_{k \in B_s \cap S} \ell_k(F(X_{B_s \cap S}; \theta_s)),

still divided by the *recorded* batch size, as in the weighted retraining: the two differ only by
what the removed samples do inside the forward. Where nothing couples the samples of a batch
(``"sgd_mlp"``, ``"adamw"``) the two are the same run up to rounding. A step whose samples are all
removed is a step on a zero gradient (momentum, weight decay and the schedule go on). With every
sample kept it is the recorded run, bit for bit.

With dropout (setting ``"dropout"``) leave-out is defined by the masks: the recorded step draws one mask
row per sample of its batch, ``(|B_s|, hidden)`` from the global generator, so a forward on the kept rows
alone would draw a mask of another shape, other random numbers for every later step, and a retraining
that differs from the recorded run by the masks, not by the removed samples. :func:`leave_out_train` draws
the mask of the *recorded* batch shape at every step (also a step whose samples are all removed), keeps the
rows of the kept samples and drops the removed rows' masks. Dropout acts on each row alone, so this is the
weighted retraining up to rounding: a removed sample's mask touched only its own loss term.

**A score for it**: the derivative in a sample's *presence* in its batches. The counterfactual
:math:`\tau_k = \partial f / \partial \epsilon_k` differentiates the weighted retraining, in which
:math:`\epsilon_k` scales sample ``k``'s loss term only; with train-mode batch norm or InfoNCE a removed
sample still shapes its batches' statistics or negatives there. Leave-out retraining takes it out of them
too. :func:`presence_train` interpolates between the recorded run and leave-out with a presence weight
:math:`p_k` that scales the sample *everywhere* in its batches:

* its loss term: :math:`L_s = \frac{1}{|B_s|}\sum_{k \in B_s} p_k \ell_k`;
* batch norm (setting ``"batchnorm"``): the batch mean and (biased) variance of each channel are
  :math:`p`-weighted means over the batch, and the running variance's unbiased factor is
  :math:`N / (N - 1)` with :math:`N = (\sum_k p_k) H W`;
* InfoNCE (setting ``"contrastive"``): pair ``j`` enters the softmax denominators of the others as
  :math:`p_j e^{s_{kj}}` (a log-weight :math:`\log p_j` added to its logit).

At :math:`p = 1` this is the recorded run; at :math:`p_k = 0` sample ``k`` is exactly left out of its
batches (statistics, negatives and loss), which is leave-out retraining. :func:`presence_scores` returns
:math:`\partial f(x_t) / \partial p_k` at :math:`p = 1`, by reverse-mode differentiation of the unrolled
loop (plain torch, float64, SGD with momentum written out, no explaind code): a first-order prediction
of leave-out retraining, as the counterfactual is of the weighted one. The validation benchmark compares
it as the method ``leave_out_grad`` on these two settings.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..exceptions import ConfigError
from .problem import ValidationProblem

__all__ = ["LEAVE_OUT_SETTINGS", "PRESENCE_SETTINGS", "leave_out_train", "leave_out_logits", "presence_train",
           "presence_scores"]

#: The settings on which leave-out retraining is defined.
LEAVE_OUT_SETTINGS: tuple[str, ...] = ("sgd_mlp", "adamw", "dropout", "batchnorm", "contrastive", "relu_untuned",
                                       "tiny_lm")


def _dropout_noise(model: nn.Module, rows: int) -> Tensor | None:
    """The mask of a training forward on ``rows`` samples, drawn as ``nn.Dropout`` draws it (``None``: no dropout).

    ``nn.Dropout`` on CPU fills a tensor of its input's shape with Bernoulli(1 - p) draws from the global generator
    and divides it by 1 - p; this draws the same numbers for a batch of ``rows`` samples.
    """
    layers = list(model.children())
    drops = [m for m in layers if isinstance(m, nn.Dropout)]
    if not drops:
        return None
    width = next(m.out_features for m in layers if isinstance(m, nn.Linear))
    noise = torch.empty(rows, width, dtype=torch.float64).bernoulli_(1 - drops[0].p)
    return noise.div_(1 - drops[0].p)


def _forward_rows(model: nn.Module, x: Tensor, noise: Tensor | None) -> Tensor:
    """The training forward on ``x``, with the dropout layer's mask given by ``noise`` (its rows for ``x``)."""
    if noise is None:
        return model(x)
    for layer in model.children():
        x = x * noise if isinstance(layer, nn.Dropout) else layer(x)
    return x


def _checked_keep(problem: ValidationProblem, keep: Tensor | None) -> Tensor:
    n = problem.config.n_train
    if problem.config.setting not in LEAVE_OUT_SETTINGS:
        raise ConfigError(f"leave_out_train: not defined for the setting {problem.config.setting!r}. Allowed: "
                          f"{', '.join(LEAVE_OUT_SETTINGS)}.")
    if keep is None:
        return torch.ones(n, dtype=torch.bool)
    mask = torch.as_tensor(keep)
    if mask.shape != (n,) or mask.dtype != torch.bool:
        raise ConfigError(f"leave_out_train: keep must be a boolean tensor of shape ({n},) (True: the sample stays); "
                          f"got dtype {mask.dtype} and shape {tuple(mask.shape)}.")
    return mask


def leave_out_train(problem: ValidationProblem, keep: Tensor | None = None) -> nn.Module:
    """Retrain ``problem``'s run with the samples where ``keep`` is false left out of their batches.

    Parameters
    ----------
    problem : ValidationProblem
        The run (its data, initialisation, optimizer and batch schedule).
    keep : Tensor of bool, shape (n_train,), optional
        Which samples stay (default: all, the recorded run).

    Returns
    -------
    torch.nn.Module
        The trained model, in evaluation mode.
    """
    mask = _checked_keep(problem, keep)
    model = problem.build_model()
    opt, schedule = problem.optimizer(model)
    params = list(model.parameters())
    seed = getattr(problem, "mask_seed", None)
    if seed is not None:
        torch.manual_seed(seed)  # as the weighted loop does: the dropout masks' stream
    for idx in problem.batches:
        rows = mask[idx]
        kept = idx[rows]
        opt.zero_grad()
        noise = _dropout_noise(model, len(idx))  # the recorded batch's masks, drawn even when no sample stays
        if len(kept):
            out = _forward_rows(model, problem.X_train[kept], None if noise is None else noise[rows])
            (problem.terms(out, problem.y_train[kept]).sum() / len(idx)).backward()
        else:
            for p in params:
                p.grad = torch.zeros_like(p)
        opt.step()
        if schedule is not None:
            schedule.step()
    model.eval()
    return model


def leave_out_logits(problem: ValidationProblem, keep: Tensor | None = None) -> Tensor:
    """The explained test outputs after :func:`leave_out_train`, shape ``(n_test,)``."""
    return problem.true_logits(leave_out_train(problem, keep))


#: The settings whose batches couple their samples, on which the presence weight is defined.
PRESENCE_SETTINGS: tuple[str, ...] = ("batchnorm", "contrastive")

_EPS = 1e-5  # BatchNorm2d's default eps, as built by the settings module
_MOMENTUM = 0.1  # BatchNorm2d's default momentum of the running statistics


def _weighted_bn(x: Tensor, p: Tensor, weight: Tensor, bias: Tensor, stats: dict[str, Tensor]
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Train-mode batch norm with the batch statistics weighted by ``p``; returns the output and new running stats."""
    hw = x.shape[2] * x.shape[3]
    share = (p / p.sum())[:, None, None, None] / hw
    mean = (share * x).sum((0, 2, 3))
    centred = x - mean[None, :, None, None]
    var = (share * centred * centred).sum((0, 2, 3))
    count = p.sum() * hw
    running = {"mean": (1 - _MOMENTUM) * stats["mean"] + _MOMENTUM * mean,
               "var": (1 - _MOMENTUM) * stats["var"] + _MOMENTUM * var * count / (count - 1)}
    out = centred / torch.sqrt(var + _EPS)[None, :, None, None]
    return out * weight[None, :, None, None] + bias[None, :, None, None], running


class _PresenceRun:
    """The presence-weighted loop of one problem, written functionally so that it can be differentiated."""

    def __init__(self, problem: ValidationProblem):
        c = problem.config
        if c.setting not in PRESENCE_SETTINGS:
            raise ConfigError(f"explaind.validation.leave_out: the presence weight is defined for the settings whose "
                              f"batches couple their samples ({', '.join(PRESENCE_SETTINGS)}); got {c.setting!r}. "
                              f"Elsewhere it is the counterfactual's weight.")
        self.problem = problem
        self.model = problem.build_model()
        self.act = torch.tanh if c.activation == "tanh" else torch.relu

    def _head(self, theta: dict[str, Tensor], h: Tensor) -> Tensor:
        """The CNN after its batch norm: activation, 2x2 average pool, linear."""
        h = nn.functional.avg_pool2d(self.act(h), 2).flatten(1)
        return nn.functional.linear(h, theta["5.weight"], theta["5.bias"])

    def batch_loss(self, theta: dict[str, Tensor], stats: dict[str, Tensor], idx: Tensor, p: Tensor
                   ) -> tuple[Tensor, dict[str, Tensor]]:
        """The presence-weighted loss of one batch and the running statistics after it."""
        prob = self.problem
        x, y, pb = prob.X_train[idx], prob.y_train[idx], p[idx]
        if prob.config.setting == "batchnorm":
            h = nn.functional.conv2d(x, theta["0.weight"], theta["0.bias"], padding=1)
            h, stats = _weighted_bn(h, pb, theta["1.weight"], theta["1.bias"], stats)
            out = self._head(theta, h)
            terms = nn.functional.cross_entropy(out, y, reduction="none")
        else:
            out = functional_call(self.model, theta, (x,))
            e = (out.shape[1] - 1) // 2
            a = nn.functional.normalize(out[:, :e], dim=1)
            b = nn.functional.normalize(out[:, e:2 * e], dim=1)
            logits = a @ b.T / prob.config.temperature
            logw = torch.log(pb)[None, :]  # pair j in every denominator with weight p_j
            own = torch.diagonal(logits)
            terms = 0.5 * ((torch.logsumexp(logits + logw, 1) - own) + (torch.logsumexp(logits.T + logw, 1) - own))
        return (pb * terms).sum() / len(idx), stats

    def run(self, p: Tensor, create_graph: bool) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Train with presence weights ``p``; the final parameters and running statistics (a graph in ``p``
        when ``create_graph``)."""
        c = self.problem.config
        theta = {name: q.detach().clone().requires_grad_(True) for name, q in self.model.named_parameters()}
        stats = {"mean": torch.zeros(8, dtype=torch.float64), "var": torch.ones(8, dtype=torch.float64)}
        buf: dict[str, Tensor] = {}
        for idx in self.problem.batches:
            loss, stats = self.batch_loss(theta, stats, idx, p)
            grads = torch.autograd.grad(loss, list(theta.values()), create_graph=create_graph)
            new = {}
            for (name, q), g in zip(theta.items(), grads):
                buf[name] = g if name not in buf else c.momentum * buf[name] + g
                new[name] = q - c.lr * buf[name]
            theta = new if create_graph else {n: q.detach().requires_grad_(True) for n, q in new.items()}
            if not create_graph:
                buf = {n: v.detach() for n, v in buf.items()}
                stats = {n: v.detach() for n, v in stats.items()}
        return theta, stats

    def outputs(self, theta: dict[str, Tensor], stats: dict[str, Tensor]) -> Tensor:
        """The explained test outputs ``(T,)`` in evaluation mode (batch norm with the running statistics)."""
        prob = self.problem
        if prob.config.setting == "batchnorm":
            h = nn.functional.conv2d(prob.X_test, theta["0.weight"], theta["0.bias"], padding=1)
            scale = theta["1.weight"] / torch.sqrt(stats["var"] + _EPS)
            h = (h - stats["mean"][None, :, None, None]) * scale[None, :, None, None]
            out = self._head(theta, h + theta["1.bias"][None, :, None, None])
        else:
            out = functional_call(self.model, theta, (prob.X_test,))
        return out.gather(1, torch.as_tensor(prob.targets())[:, None])[:, 0]


def presence_train(problem: ValidationProblem, presence: Tensor | None = None) -> Tensor:
    """The explained test outputs ``(T,)`` after the presence-weighted loop with weights ``presence``.

    ``presence`` defaults to all ones (the recorded run); a 0 leaves the sample out of its batches.
    """
    run = _PresenceRun(problem)
    n = problem.config.n_train
    p = torch.ones(n, dtype=torch.float64) if presence is None else torch.as_tensor(presence, dtype=torch.float64)
    if p.shape != (n,):
        raise ConfigError(f"presence_train: presence must have shape ({n},); got {tuple(p.shape)}.")
    empty = [s for s, idx in enumerate(problem.batches) if not float(p[idx].sum()) > 0]
    if bool((p < 0).any()) or empty:
        raise ConfigError(f"presence_train: presence weights must be >= 0 with a positive sum in every recorded batch "
                          f"(the batch statistics divide by it); got min {float(p.min())!r} and batches without "
                          f"presence at steps {empty[:5]}. Use leave_out_train to drop whole batches.")
    with torch.enable_grad():
        theta, stats = run.run(p, create_graph=False)
    return run.outputs(theta, stats).detach()


def presence_scores(problem: ValidationProblem, trajectory: Any = None,
                    model: nn.Module | None = None) -> np.ndarray:
    r""":math:`\partial f(x_t) / \partial p_k` at :math:`p = 1`, ``(n_test, n_train)`` as a numpy array.

    ``trajectory`` and ``model`` are not used (the run is re-run from the problem); they make this a method of
    :func:`~explaind.validation.methods.compute_scores`.
    """
    run = _PresenceRun(problem)
    p = torch.ones(problem.config.n_train, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        theta, stats = run.run(p, create_graph=True)
        out = run.outputs(theta, stats)
        rows = [torch.autograd.grad(out[t], p, retain_graph=t + 1 < len(out))[0] for t in range(len(out))]
    return torch.stack(rows).numpy()
