r"""Per-sample token losses: next-token prediction of causal language models and chosen positions.

A token loss averages over the *tokens* of a batch, not over its samples. With :math:`t_{k,j}`
the cross-entropy of token :math:`j` of sample :math:`k` and :math:`m_{k,j} \in \{0, 1\}` whether
that token is counted (its label is not ``ignore_index``), the batch loss that torch's
``F.cross_entropy(..., ignore_index=-100)`` and Hugging Face's causal-LM loss compute is

.. math::

    L = \frac{\sum_k \sum_j m_{k,j} t_{k,j}}{\sum_k n_k} = \sum_k w_k \ell_k, \qquad
    \ell_k = \frac{\sum_j m_{k,j} t_{k,j}}{n_k}, \quad n_k = \sum_j m_{k,j}, \quad
    w_k = \frac{n_k}{\sum_j n_j},

so the per-sample loss :math:`\ell_k` is the mean over the counted tokens of sample :math:`k` and
the sample weight is its share of the batch's counted tokens (docs/maths.md §1, token losses).
``counts`` gives :math:`n_k`; a sample with no counted token has :math:`\ell_k = 0` and weight 0.

``causal_lm`` shifts first: the logits at position :math:`j` predict the label at :math:`j + 1`
(the labels are the input ids, padding marked ``ignore_index``), as Hugging Face's
``ForCausalLMLoss`` does. ``token_cross_entropy`` does not shift: each position's logits are
scored against that position's label, so a test input can explain chosen positions (label every
other position ``ignore_index``), masked-LM or token-classification losses.

Everything runs in the dtype of the logits (no upcast) and only uses shape-static operations, so
it works under ``torch.func.vmap``/``grad``/``jvp``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from explaind.exceptions import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "causal_lm",
    "token_cross_entropy",
    "causal_lm_counts",
    "token_counts",
    "reference_causal_lm",
    "reference_token_cross_entropy",
    "token_example",
]

#: The label value that marks a position as not counted (torch's and Hugging Face's default).
IGNORE_INDEX = -100


def _check(name: str, logits: Tensor, labels: Tensor) -> None:
    if logits.dim() != 3 or tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ConfigError(
            f"{name} loss: expects logits of shape (n, length, vocab) and integer labels of shape (n, length); "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}. Pass the model's token logits and "
            f"one label per position (ignore_index={IGNORE_INDEX} where a position is not counted)."
        )
    if labels.is_floating_point():
        raise ConfigError(f"{name} loss: labels must be integer token ids, got dtype {labels.dtype}. "
                          f"Use labels.long().")


def _token_mean(logits: Tensor, labels: Tensor, ignore_index: int) -> Tensor:
    """``(n,)``: the mean cross-entropy over the counted positions of each sample (0 where none counts)."""
    keep = labels != ignore_index
    safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
    token = -torch.log_softmax(logits, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    total = torch.where(keep, token, torch.zeros_like(token)).sum(dim=1)
    return total / keep.sum(dim=1).clamp_min(1).to(logits.dtype)


def _shifted(labels: Tensor) -> Tensor:
    """Labels of the next position, ``(n, length - 1)``."""
    return labels[:, 1:]


def causal_lm(outputs: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Per-sample next-token loss: the mean over sample ``k``'s counted positions of ``-log p(y_{j+1} | x_{\le j})``.

    Parameters
    ----------
    outputs : Tensor, shape (n, length, vocab)
        Logits at every position.
    targets : Tensor of int, shape (n, length)
        Labels (the input ids; ``ignore_index`` at padding and other positions not counted).
    ignore_index : int
        The label value of positions that are not counted.

    Returns
    -------
    Tensor, shape (n,)
        :math:`\ell_k`; with the weights ``causal_lm_counts(targets) / causal_lm_counts(targets).sum()`` their
        sum is Hugging Face's batch loss.
    """
    _check("causal_lm", outputs, targets)
    return _token_mean(outputs[:, :-1], _shifted(targets), ignore_index)


def token_cross_entropy(outputs: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    r"""Per-sample mean cross-entropy over the counted positions, each position scored against its own label.

    Parameters
    ----------
    outputs : Tensor, shape (n, length, classes)
    targets : Tensor of int, shape (n, length)
        ``ignore_index`` where a position is not counted.
    ignore_index : int

    Returns
    -------
    Tensor, shape (n,)
    """
    _check("token_cross_entropy", outputs, targets)
    return _token_mean(outputs, targets, ignore_index)


def causal_lm_counts(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(n,)``: the counted next-token predictions of each sample (labels after the first that are not ignored)."""
    return (_shifted(targets) != ignore_index).sum(dim=1)


def token_counts(targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """``(n,)``: the counted positions of each sample."""
    return (targets != ignore_index).reshape(targets.shape[0], -1).sum(dim=1)


def reference_causal_lm(outputs: Tensor, targets: Tensor) -> Tensor:
    """The batch loss as Hugging Face computes it: shifted logits and labels, cross-entropy averaged over tokens."""
    vocab = outputs.shape[-1]
    return F.cross_entropy(outputs[:, :-1].reshape(-1, vocab), targets[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)


def reference_token_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """``F.cross_entropy`` over all counted positions of the batch (the token mean)."""
    return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def token_example(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Logits ``(n, 6, 7)`` and labels ``(n, 6)``, right-padded with ``IGNORE_INDEX`` to different lengths."""
    outputs = torch.randn(n, 6, 7, generator=generator)
    labels = torch.randint(0, 7, (n, 6), generator=generator)
    lengths = torch.randint(2, 7, (n,), generator=generator)
    pad = torch.arange(6)[None, :] >= lengths[:, None]
    return outputs, labels.masked_fill(pad, IGNORE_INDEX)
