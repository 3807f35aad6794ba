r"""Resolving the ``loss=`` argument of the public API to a :class:`~explaind.records.LossRecord`.

A loss is given either as the name of a registered loss (``"cross_entropy"``, ``"nll"``,
``"mse"`` or one added by a plugin), as a :class:`LossRecord`, or as a user callable
``loss_fn(outputs, targets) -> mean loss``. Every consumer needs *per-sample* losses
``l_k`` (shape ``(n,)``) whose mean is the batch loss, so a user callable is wrapped:

.. math::

    l_k = \mathrm{loss\_fn}(\mathrm{outputs}[k{:}k{+}1],\ \mathrm{targets}[k{:}k{+}1]),

i.e. the callable applied to each sample on its own (a batch of one). This is exact for every
loss whose batch value is the mean of per-sample terms — any torch loss with
``reduction="mean"`` and no class weights. It is **wrong** for a ``reduction="sum"`` loss or a
loss coupling samples (e.g. contrastive losses); pass ``check=(outputs, targets)`` to have
this verified on a batch. The per-sample calls run under ``torch.func.vmap`` when the callable
supports it and fall back to a Python loop over samples otherwise (slower, same values).

A loss coupling samples is declared by its terms instead, :func:`batch_coupled_loss`: ``terms(outputs,
targets) -> (n,)`` on a whole micro-batch, :math:`L = \sum_k w_k \ell_k`, split exactly by loss term
(docs/maths.md, "Batch-coupled losses").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .exceptions import ConfigError, ExplaindError, UnknownEntryError
from .records import LossRecord

__all__ = ["resolve_loss", "wrap_loss_callable", "batch_coupled_loss", "batch_weights", "CUSTOM_LOSS_PREFIX",
           "COUPLED_LOSS_PREFIX"]

logger = logging.getLogger(__name__)

#: Name prefix of records wrapping a user callable; such losses are not in the registry, so a
#: stored trajectory that used one must be given the callable again when it is loaded.
CUSTOM_LOSS_PREFIX = "custom:"
#: Name prefix of a batch-coupled loss (:func:`batch_coupled_loss`); a stored run keeps it in its manifest.
COUPLED_LOSS_PREFIX = "custom:coupled:"


def _single_sample_loss(loss_fn: Callable[..., Any], outputs: Tensor, targets: Tensor) -> Tensor:
    value = loss_fn(outputs, targets)
    if not isinstance(value, Tensor) or value.dim() != 0:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ConfigError(
            f"The loss callable {_callable_name(loss_fn)} must return the mean loss of the batch as a scalar "
            f"tensor; it returned {shape}. Use reduction='mean' (not 'none')."
        )
    return value


def _one_of_batch(loss_fn: Callable[..., Any], outputs: Tensor, targets: Tensor, k: int) -> Tensor:
    """The callable on sample ``k`` alone; a callable that cannot run on one sample is refused naming why."""
    try:
        return _single_sample_loss(loss_fn, outputs[k : k + 1], targets[k : k + 1])
    except ExplaindError:  # explaind's own refusals (a stand-in loss of a trajectory without one) pass unchanged
        raise
    except Exception as exc:
        raise ConfigError(
            f"The loss callable {_callable_name(loss_fn)} fails on a batch of one sample ({type(exc).__name__}: "
            f"{exc}). explaind splits the loss into per-sample terms loss_fn(outputs[k:k+1], targets[k:k+1]), so a "
            f"loss that needs several samples of the batch at once (the hardest k by topk, in-batch hard negatives "
            f"or positives, batch statistics) has no such split. Fix: select in the loop and log what the loss "
            f"keeps; for online hard example mining losses = F.cross_entropy(out, y, reduction='none'), keep = "
            f"losses.topk(k).indices, losses[keep].mean().backward(), rec.log_batch(idx[keep]) with "
            f"loss='cross_entropy'. A loss that couples the samples (contrastive, triplet mining) is split exactly "
            f"by its terms when declared as loss=explaind.batch_coupled_loss(terms), terms(outputs, targets) -> "
            f"the (n,) terms of the whole micro-batch."
        ) from exc


def _callable_name(loss_fn: Callable[..., Any]) -> str:
    return getattr(loss_fn, "__qualname__", None) or getattr(loss_fn, "__name__", None) or type(loss_fn).__name__


def wrap_loss_callable(loss_fn: Callable[..., Any]) -> LossRecord:
    """Wrap ``loss_fn(outputs, targets) -> mean loss`` as a per-sample :class:`LossRecord`.

    Parameters
    ----------
    loss_fn : callable
        ``(outputs (n, ...), targets (n, ...)) -> scalar`` mean over the batch.

    Returns
    -------
    LossRecord
        ``name`` is ``"custom:<qualified name>"``; ``implementation(outputs, targets)`` returns
        the per-sample losses ``(n,)``: ``loss_fn`` applied to every sample slice
        ``outputs[k:k+1]``, batched with ``torch.func.vmap`` when possible.
    """
    state = {"vmap": True}

    def one(output: Tensor, target: Tensor) -> Tensor:
        return _single_sample_loss(loss_fn, output.unsqueeze(0), target.unsqueeze(0))

    def per_sample(outputs: Tensor, targets: Tensor) -> Tensor:
        n = outputs.shape[0]
        if targets.shape[:1] != outputs.shape[:1]:
            raise ConfigError(
                f"The loss callable {_callable_name(loss_fn)} got {n} outputs but {targets.shape[:1]} targets; "
                f"pass one target per output row."
            )
        if state["vmap"]:
            try:
                return torch.func.vmap(one)(outputs, targets)
            except ConfigError:
                raise
            except Exception as exc:  # the callable is not vmap-able (e.g. calls .item()): loop instead
                logger.info("Loss callable %s does not support vmap (%s); looping over samples.",
                            _callable_name(loss_fn), exc)
                state["vmap"] = False
        return torch.stack([_one_of_batch(loss_fn, outputs, targets, k) for k in range(n)])

    per_sample.__doc__ = f"Per-sample losses of {_callable_name(loss_fn)} (one call per sample)."
    return LossRecord(
        name=f"{CUSTOM_LOSS_PREFIX}{_callable_name(loss_fn)}",
        implementation=per_sample,
        description=f"User loss {_callable_name(loss_fn)} applied to each sample.",
        reference=loss_fn,
    )


def batch_coupled_loss(terms: Callable[..., Any], *, batch_loss: Callable[..., Any] | None = None,
                       name: str | None = None) -> LossRecord:
    r"""A loss whose per-sample terms read the whole batch (InfoNCE, NT-Xent, SupCon, batch-hard triplets).

    ``terms(outputs, targets)`` takes the outputs and targets of one logged micro-batch, ``(n, ...)``, and returns
    the ``n`` loss terms :math:`\ell_k(F(X_B), Y_B)`, ``(n,)``, each of which may read every row of the batch (the
    other samples as negatives, positives or mined triplets). The loss the optimizer minimised must be
    :math:`\sum_k w_k \ell_k` with the logged weights (default :math:`1/n`: the mean of the terms). Sample
    ``k``'s atom is then the gradient of its own term through the shared batch outputs,
    :math:`w_k \nabla_\theta \ell_k(F(X_B; \theta))`: it holds the term's effect through sample ``k``'s own output
    and through the outputs of the others it reads (as their negative), and the atoms of a micro-batch add up to
    its gradient exactly (docs/maths.md, "Batch-coupled losses").

    Parameters
    ----------
    terms : callable
        ``(outputs (n, ...), targets (n, ...)) -> (n,)`` loss terms of the micro-batch as a whole.
    batch_loss : callable, optional
        ``(outputs, targets) -> scalar``: the loss as the loop computes it (e.g. the CLIP loss returning its mean).
        When given, the recorder checks on the first logged micro-batch that the logged weights (normalised over
        the micro-batch) times the terms sum to it, and refuses the run naming both values otherwise. The
        gradient check (``check_gradients``) compares the gradient of :math:`\sum_k w_k \ell_k` with the one the
        optimizer saw either way.
    name : str, optional
        Name stored in the manifest (default: the qualified name of ``terms``).

    Returns
    -------
    LossRecord
        ``batch_coupled=True``, ``name="custom:coupled:<name>"``; pass it as ``loss=`` to
        :class:`~explaind.TrajectoryRecorder` (and to ``Trajectory.load`` for a stored run).

    Raises
    ------
    ConfigError
        When ``terms`` (or ``batch_loss``) is not callable or ``name`` is not a non-empty string; when called, if
        ``terms`` does not return ``(n,)``.

    Examples
    --------
    >>> def info_nce_terms(out, y):  # out = (n, 2, e): two embeddings per pair
    ...     a, b = F.normalize(out[:, 0], dim=1), F.normalize(out[:, 1], dim=1)
    ...     logits, labels = a @ b.T / 0.1, torch.arange(out.shape[0])
    ...     return (F.cross_entropy(logits, labels, reduction="none")
    ...             + F.cross_entropy(logits.T, labels, reduction="none")) / 2
    >>> loss = explaind.batch_coupled_loss(info_nce_terms)  # doctest: +SKIP
    """
    for label, fn in (("terms", terms), ("batch_loss", batch_loss)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"batch_coupled_loss({label}={fn!r}): expected a callable (outputs, targets) -> "
                              f"{'(n,) loss terms' if label == 'terms' else 'scalar batch loss'}.")
    if name is not None and not (isinstance(name, str) and name.strip()):
        raise ConfigError(f"batch_coupled_loss(name={name!r}): expected a non-empty str (the name stored in the "
                          f"manifest), or None for the qualified name of terms.")
    label = name or _callable_name(terms)

    def coupled_terms(outputs: Tensor, targets: Tensor) -> Tensor:
        value = terms(outputs, targets)
        n = int(outputs.shape[0])
        if not isinstance(value, Tensor) or tuple(value.shape) != (n,):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ConfigError(
                f"The batch-coupled loss {label!r} returned {got} for a micro-batch of {n} samples; it must return "
                f"the {n} loss terms, shape ({n},), whose weighted sum is the batch loss (e.g. "
                f"F.cross_entropy(logits, labels, reduction='none'), not the mean)."
            )
        return value

    coupled_terms.__doc__ = f"Loss terms of {label} on the micro-batch as a whole."
    coupled_terms.batch_coupled = True  # type: ignore[attr-defined]  # read where only the callable is at hand
    return LossRecord(name=f"{COUPLED_LOSS_PREFIX}{label}", implementation=coupled_terms,
                      description=f"Batch-coupled loss {label}: terms of the whole micro-batch.",
                      reference=batch_loss, batch_coupled=True)


def batch_weights(record: LossRecord, targets: Tensor, dtype: torch.dtype) -> Tensor:
    r"""The sample weights :math:`w_k` under which :math:`\sum_k w_k \ell_k` is the loss of one batch.

    Parameters
    ----------
    record : LossRecord
    targets : Tensor, shape (n, ...)
        The batch's targets.
    dtype : torch.dtype
        Floating dtype of the result.

    Returns
    -------
    Tensor, shape (n,)
        ``1/n`` each, or :math:`n_k / \sum_j n_j` for a loss with ``counts`` (e.g. the counted tokens of a
        token loss; docs/maths.md §1). A batch without any counted term gets weights 0.
    """
    n = int(targets.shape[0])
    if record.counts is None:
        return torch.full((n,), 1.0 / n, dtype=dtype)
    counts = torch.as_tensor(record.counts(targets)).detach().to("cpu", dtype)
    if counts.shape != (n,):
        raise ConfigError(f"Loss {record.name!r}: counts(targets) returned shape {tuple(counts.shape)}; "
                          f"expected ({n},).")
    return counts / counts.sum().clamp_min(1)


def _check_mean(record: LossRecord, outputs: Tensor, targets: Tensor, reference: Callable[..., Any]) -> None:
    with torch.no_grad():
        per_sample = record.implementation(outputs, targets)
        batch = reference(outputs, targets)
    if per_sample.shape != (outputs.shape[0],):
        raise ConfigError(
            f"Loss {record.name!r} returned per-sample losses of shape {tuple(per_sample.shape)}; "
            f"expected ({outputs.shape[0]},)."
        )
    mean = (batch_weights(record, targets, per_sample.dtype).to(per_sample.device) * per_sample).sum()
    tol = 1e-5 if mean.dtype == torch.float32 else 1e-10
    if not torch.allclose(mean, torch.as_tensor(batch, dtype=mean.dtype), rtol=tol, atol=tol):
        raise ConfigError(
            f"Loss {record.name!r}: the mean of the per-sample losses ({mean.item():.6g}) differs from the batch "
            f"loss ({float(batch):.6g}). explaind needs a loss that is the mean of per-sample terms: use "
            f"reduction='mean' and no terms coupling samples."
        )


def resolve_loss(
    loss: str | LossRecord | Callable[..., Any], *, check: tuple[Tensor, Tensor] | None = None
) -> LossRecord:
    """Turn the ``loss=`` argument into a :class:`LossRecord` with per-sample values.

    Parameters
    ----------
    loss : str, LossRecord or callable
        A registered loss name, a record, or ``loss_fn(outputs, targets) -> mean loss``
        (wrapped by :func:`wrap_loss_callable`).
    check : tuple of Tensor, optional
        ``(outputs, targets)`` of one batch. When given, the mean of the per-sample losses is
        compared to the batch loss (the callable itself, or the record's ``reference``).

    Returns
    -------
    LossRecord

    Raises
    ------
    UnknownEntryError
        For an unknown name; the message lists the registered losses and the closest match.
    ConfigError
        For a value that is neither, or when ``check`` shows the loss is not a mean of
        per-sample terms.
    """
    from .plugins import get_entry

    if isinstance(loss, LossRecord):
        record = loss
    elif isinstance(loss, str):
        try:
            record = get_entry("loss", loss)
        except UnknownEntryError as exc:
            raise UnknownEntryError(f"{exc} A callable (outputs, targets) -> mean loss is accepted too.") from None
    elif callable(loss):
        record = wrap_loss_callable(loss)
    else:
        raise ConfigError(
            f"loss={loss!r} is neither a registered loss name nor a callable. Pass a name such as "
            f"'cross_entropy' or a function (outputs, targets) -> mean loss."
        )
    if check is not None:
        reference = record.reference
        if reference is None:
            raise ConfigError(
                f"Loss {record.name!r} has no reference batch loss to check against; call resolve_loss without check=."
            )
        _check_mean(record, check[0], check[1], reference)
    return record
