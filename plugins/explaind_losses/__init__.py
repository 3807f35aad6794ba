"""First-party explaind plugin: training losses with per-sample values (uses only the public API of explaind).

Registers ``cross_entropy``, ``nll`` and ``mse`` — per-sample losses ``(n,)`` whose mean is torch's
``reduction="mean"`` batch loss — and the token losses ``causal_lm`` and ``token_cross_entropy``,
whose token-count-weighted mean is the batch loss (their records carry ``counts``).
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
from .tokens import (
    causal_lm,
    causal_lm_counts,
    reference_causal_lm,
    reference_token_cross_entropy,
    token_counts,
    token_cross_entropy,
    token_example,
)

__all__ = ["explaind_losses", "cross_entropy", "nll", "mse", "causal_lm", "token_cross_entropy"]


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
        _token_record("causal_lm", causal_lm, causal_lm_counts, reference_causal_lm,
                      "Next-token cross-entropy of a causal LM (shifted labels, ignore_index=-100), per token."),
        _token_record("token_cross_entropy", token_cross_entropy, token_counts, reference_token_cross_entropy,
                      "Cross-entropy of every counted position against its own label (ignore_index=-100)."),
    ]


def _token_record(name: str, implementation, counts, reference, description: str) -> LossRecord:
    """A token loss: per-sample token means, weighted by their token counts (docs/maths.md §1)."""
    return LossRecord(name=name, implementation=implementation, description=description, example=token_example,
                      reference=reference, counts=counts)
