"""First-party explaind plugin: training losses with per-sample values (uses only the public API of explaind).

Registers ``cross_entropy``, ``nll`` and ``mse``. Each implementation returns the per-sample
losses ``(n,)`` whose mean is torch's ``reduction="mean"`` batch loss.
"""

from __future__ import annotations

import explaind
from explaind.records import LossRecord

from .functions import (
    classification_example,
    cross_entropy,
    log_probability_example,
    mse,
    nll,
    reference_cross_entropy,
    reference_mse,
    reference_nll,
    regression_example,
)

__all__ = ["explaind_losses", "cross_entropy", "nll", "mse"]


@explaind.hookimpl
def explaind_losses() -> list[LossRecord]:
    """Register the built-in losses."""
    return [
        LossRecord(
            name="cross_entropy",
            implementation=cross_entropy,
            description="Softmax cross-entropy of logits against class indices or class probabilities.",
            example=classification_example,
            reference=reference_cross_entropy,
        ),
        LossRecord(
            name="nll",
            implementation=nll,
            description="Negative log-likelihood of log-probability outputs against class indices.",
            example=log_probability_example,
            reference=reference_nll,
        ),
        LossRecord(
            name="mse",
            implementation=mse,
            description="Mean squared error, averaged over the output dimensions of each sample.",
            example=regression_example,
            reference=reference_mse,
        ),
    ]
