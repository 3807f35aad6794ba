r"""Conformance checks for loss records.

A loss's ``implementation(outputs, targets)`` must return per-sample losses ``l`` of shape
``(n,)`` whose mean is the batch loss (docs/maths.md §1: ``g_s = sum_k w_k grad l_k`` with
``w_k = 1/|B|``). The checks feed ``record.example(n, generator)`` in float64:

``example``
    The record provides ``example(n, generator) -> (outputs, targets)``, reproducible under
    the generator, with ``n`` rows.
``per_sample``
    The result has shape ``(n,)``, a floating dtype and finite values.
``mean_matches_reference``
    ``l.mean()`` equals ``record.reference(outputs, targets)`` (e.g. torch's loss with
    ``reduction="mean"``) to 1e-12 relative; for a record with ``counts`` the count-weighted
    mean ``sum_k n_k l_k / sum_k n_k`` does.
``vmap``
    ``torch.func.vmap`` over single samples (outputs ``(1, O)``) gives the same values, and
    ``vmap(grad)`` with respect to the outputs equals a loop of ``backward`` calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from ..losses import batch_weights
from .plugins import InspectedPlugin, PluginCheckError

__all__ = ["loss_checks", "N_EXAMPLES"]

#: Samples per example batch.
N_EXAMPLES = 5
_RTOL = 1e-12
_ATOL = 1e-12


def _fail(message: str) -> None:
    raise PluginCheckError(message)


def _example(record: Any, seed: int = 0) -> tuple[Tensor, Tensor]:
    if record.example is None:
        _fail(
            f"loss {record.name!r} has no example; the conformance suite needs example(n, generator) -> "
            f"(outputs, targets) on the LossRecord."
        )
    outputs, targets = record.example(N_EXAMPLES, torch.Generator().manual_seed(seed))
    if not (isinstance(outputs, Tensor) and isinstance(targets, Tensor)):
        _fail(f"loss {record.name!r}: example must return two tensors (outputs, targets).")
    outputs = outputs.to(torch.float64)
    if targets.is_floating_point():
        targets = targets.to(torch.float64)
    return outputs, targets


def _check_example(record: Any) -> None:
    outputs, targets = _example(record)
    if outputs.shape[0] != N_EXAMPLES or targets.shape[0] != N_EXAMPLES:
        _fail(
            f"loss {record.name!r}: example(n={N_EXAMPLES}, ...) returned outputs {tuple(outputs.shape)} and "
            f"targets {tuple(targets.shape)}; both need n rows."
        )
    again = _example(record)
    if not (torch.equal(outputs, again[0]) and torch.equal(targets, again[1])):
        _fail(f"loss {record.name!r}: example is not reproducible; draw only from `generator`.")


def _check_per_sample(record: Any) -> None:
    outputs, targets = _example(record)
    values = record.implementation(outputs, targets)
    if not isinstance(values, Tensor) or values.shape != (N_EXAMPLES,):
        shape = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        _fail(f"loss {record.name!r}: implementation must return per-sample losses of shape (n,); got {shape}.")
    if not values.is_floating_point() or not torch.isfinite(values).all():
        _fail(f"loss {record.name!r}: per-sample losses must be finite floats; got {values}.")


def _check_reference(record: Any) -> None:
    if record.reference is None:
        _fail(
            f"loss {record.name!r} has no reference; set reference=(outputs, targets) -> batch loss on the "
            f"LossRecord (e.g. the torch function with reduction='mean') so the mean can be checked."
        )
    outputs, targets = _example(record)
    mean = (batch_weights(record, targets, torch.float64) * record.implementation(outputs, targets)).sum()
    expected = torch.as_tensor(record.reference(outputs, targets), dtype=torch.float64)
    if not torch.allclose(mean, expected, rtol=_RTOL, atol=_ATOL):
        _fail(
            f"loss {record.name!r}: the mean of the per-sample losses ({mean.item():.15g}) differs from the "
            f"reference batch loss ({expected.item():.15g}) in float64."
        )


def _check_vmap(record: Any) -> None:
    outputs, targets = _example(record)
    batched = record.implementation(outputs, targets)

    def one(o: Tensor, t: Tensor) -> Tensor:
        return record.implementation(o.unsqueeze(0), t.unsqueeze(0))[0]

    try:
        mapped = torch.func.vmap(one)(outputs, targets)
        grads = torch.func.vmap(torch.func.grad(one))(outputs, targets)
    except Exception as exc:
        _fail(f"loss {record.name!r} does not run under torch.func.vmap/grad: {type(exc).__name__}: {exc}")
    if not torch.allclose(mapped, batched, rtol=_RTOL, atol=_ATOL):
        _fail(f"loss {record.name!r}: vmap over single samples gives {mapped}, the batched call {batched}.")
    for k in range(N_EXAMPLES):
        leaf = outputs[k : k + 1].clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(record.implementation(leaf, targets[k : k + 1])[0], leaf)
        if not torch.allclose(grads[k], grad[0], rtol=_RTOL, atol=_ATOL):
            _fail(f"loss {record.name!r}: vmap(grad) for sample {k} differs from a backward pass on that sample.")


def loss_checks(record: Any, inspected: InspectedPlugin) -> Iterator[tuple[str, Callable[[], None]]]:
    """Checks of one :class:`~explaind.records.LossRecord` (see the module docstring)."""
    yield "example", lambda: _check_example(record)
    yield "per_sample", lambda: _check_per_sample(record)
    yield "mean_matches_reference", lambda: _check_reference(record)
    if not getattr(record, "batch_coupled", False):  # a batch-coupled loss's terms are never taken one sample alone
        yield "vmap", lambda: _check_vmap(record)
