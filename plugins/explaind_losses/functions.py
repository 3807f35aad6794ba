r"""Per-sample training losses.

Each function maps a batch of model outputs and targets to the vector of per-sample losses
``(l_1, ..., l_n)``, shape ``(n,)``, whose mean is the batch loss torch computes with
``reduction="mean"``. With sample weights ``w_k = 1/|B|`` the recorded gradient is therefore
``g = sum_k w_k grad l_k``, as docs/maths.md §1 defines it.

The functions use only shape-static tensor operations (no ``.item()``, no data-dependent
branches), so they run unchanged under ``torch.func.vmap`` over single samples (outputs of
shape ``(1, O)``), ``torch.func.grad`` and ``torch.func.jvp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from explaind.exceptions import ConfigError

__all__ = [
    "cross_entropy",
    "nll",
    "mse",
    "classification_example",
    "log_probability_example",
    "regression_example",
    "reference_cross_entropy",
    "reference_nll",
    "reference_mse",
]


def _per_sample_mean(values: Tensor) -> Tensor:
    """Average every dimension but the first: ``(n, ...) -> (n,)``."""
    return values.reshape(values.shape[0], -1).mean(dim=1)


def _check_outputs(name: str, outputs: Tensor) -> None:
    if outputs.dim() < 2:
        raise ConfigError(
            f"{name} loss: outputs must have shape (n, C) or (n, C, d1, ...); got shape {tuple(outputs.shape)}. "
            f"Give the model a class dimension (e.g. reshape outputs to (n, 1))."
        )


def _class_log_likelihood(name: str, log_probs: Tensor, targets: Tensor) -> Tensor:
    """``log_probs[k, targets[k], ...]`` for class-index targets, shape ``(n, d1, ...)``."""
    expected = (log_probs.shape[0], *log_probs.shape[2:])
    if tuple(targets.shape) != expected:
        raise ConfigError(
            f"{name} loss: class-index targets must have shape {expected} for outputs of shape "
            f"{tuple(log_probs.shape)}; got {tuple(targets.shape)}. Pass one integer class per sample."
        )
    return log_probs.gather(1, targets.long().unsqueeze(1)).squeeze(1)


def cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample softmax cross-entropy.

    ``l_k = -log softmax(outputs_k)[y_k]`` for class-index targets, or
    ``l_k = -sum_c y_{k,c} log softmax(outputs_k)_c`` for class-probability targets.
    Extra dimensions ``d1, ...`` are averaged per sample, so ``l.mean()`` equals
    ``F.cross_entropy(outputs, targets)``.

    Parameters
    ----------
    outputs : Tensor, shape (n, C) or (n, C, d1, ...)
        Unnormalised logits.
    targets : Tensor
        Integer class indices of shape ``(n,)`` (``(n, d1, ...)``), or floating class
        probabilities of the same shape as ``outputs``.

    Returns
    -------
    Tensor, shape (n,)
    """
    _check_outputs("cross_entropy", outputs)
    log_probs = torch.log_softmax(outputs, dim=1)
    if targets.is_floating_point():
        if targets.shape != outputs.shape:
            raise ConfigError(
                f"cross_entropy loss: probability targets must have the shape of the outputs "
                f"{tuple(outputs.shape)}; got {tuple(targets.shape)}. Pass integer class indices of shape "
                f"(n,) or one probability vector per sample."
            )
        return _per_sample_mean(-(targets * log_probs).sum(dim=1))
    return _per_sample_mean(-_class_log_likelihood("cross_entropy", log_probs, targets))


def nll(outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample negative log-likelihood of log-probability outputs: ``l_k = -outputs_k[y_k]``.

    ``l.mean()`` equals ``F.nll_loss(outputs, targets)`` (no class weights, no ignore index).

    Parameters
    ----------
    outputs : Tensor, shape (n, C) or (n, C, d1, ...)
        Log-probabilities (e.g. from ``log_softmax``).
    targets : Tensor of int, shape (n,) or (n, d1, ...)
        Class indices.

    Returns
    -------
    Tensor, shape (n,)
    """
    _check_outputs("nll", outputs)
    if targets.is_floating_point():
        raise ConfigError(
            f"nll loss: targets must be integer class indices; got dtype {targets.dtype}. "
            f"Convert them with targets.long(), or use loss='cross_entropy' for probability targets."
        )
    return _per_sample_mean(-_class_log_likelihood("nll", outputs, targets))


def mse(outputs: Tensor, targets: Tensor) -> Tensor:
    r"""Per-sample mean squared error: ``l_k = mean_j (outputs_{k,j} - y_{k,j})^2``.

    The mean runs over the output dimensions of sample ``k``, so ``l.mean()`` equals
    ``F.mse_loss(outputs, targets)``. Shapes must match exactly: torch would silently
    broadcast ``(n, 1)`` against ``(n,)`` to ``(n, n)``, which is never intended.

    Parameters
    ----------
    outputs : Tensor, shape (n, ...)
    targets : Tensor, same shape as ``outputs``

    Returns
    -------
    Tensor, shape (n,)
    """
    if targets.shape != outputs.shape:
        raise ConfigError(
            f"mse loss: targets of shape {tuple(targets.shape)} do not match outputs of shape "
            f"{tuple(outputs.shape)}. Reshape the targets to the output shape (e.g. y.reshape(-1, 1))."
        )
    if not targets.is_floating_point():
        targets = targets.to(outputs.dtype)
    return _per_sample_mean((outputs - targets) ** 2)


# ---------------------------------------------------------------------- references and examples
def reference_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy`` with the mean reduction (the batch loss torch trains with)."""
    return F.cross_entropy(outputs, targets, reduction="mean")


def reference_nll(outputs: Tensor, targets: Tensor) -> Tensor:
    """``F.nll_loss`` with the mean reduction."""
    return F.nll_loss(outputs, targets, reduction="mean")


def reference_mse(outputs: Tensor, targets: Tensor) -> Tensor:
    """``F.mse_loss`` with the mean reduction."""
    return F.mse_loss(outputs, targets, reduction="mean")


def classification_example(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits of shape ``(n, 5)`` and class indices of shape ``(n,)``."""
    outputs = torch.randn(n, 5, generator=generator)
    targets = torch.randint(0, 5, (n,), generator=generator)
    return outputs, targets


def log_probability_example(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Log-probabilities of shape ``(n, 5)`` and class indices of shape ``(n,)``."""
    outputs, targets = classification_example(n, generator)
    return torch.log_softmax(outputs, dim=1), targets


def regression_example(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Outputs and targets of shape ``(n, 3)``."""
    return torch.randn(n, 3, generator=generator), torch.randn(n, 3, generator=generator)
