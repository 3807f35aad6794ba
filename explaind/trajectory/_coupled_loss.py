r"""Batch-coupled losses and the forwards of a logged micro-batch (docs/maths.md, "Batch-coupled losses").

A loss declared with :func:`explaind.batch_coupled_loss` returns the terms :math:`\ell_k(F(X_B), Y_B)` of a whole
micro-batch: every consumer must evaluate it on the micro-batches as the loop formed them, one call per
``log_batch``, never on a sample alone nor on several micro-batches merged. This module says where those
micro-batches lie in a step's batch (:func:`term_parts`), checks the declaration on the first logged micro-batch
(:func:`coupled_loss_message`) and when a stored run is loaded (:func:`refuse_loss_mismatch`), and refuses at
``log_batch`` a micro-batch that saw several training forwards of a captured model (R-drop's two dropout passes
written as two calls of the model, :func:`forward_count_message`), whose masks cannot be replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..exceptions import TrajectoryError
from ..losses import COUPLED_LOSS_PREFIX

__all__ = ["is_batch_coupled", "term_parts", "coupled_loss_message", "coupled_check_hint", "refuse_loss_mismatch",
           "forward_count_message"]

def is_batch_coupled(loss: Any) -> bool:
    """Whether ``loss`` (a :class:`~explaind.records.LossRecord`) was declared batch-coupled."""
    return bool(getattr(loss, "batch_coupled", False))


def term_parts(micro: Sequence[Any]) -> tuple[tuple[int, int, None], ...]:
    """Positions ``[lo, hi)`` of each micro-batch in the step's batch, without a random state to replay.

    The micro-batches over which a batch-coupled loss's terms are taken when no training forward is replayed
    (the forward is recomputed in evaluation mode, as for any loss).
    """
    parts, lo = [], 0
    for m in micro:
        n = int(m.indices.shape[0])
        parts.append((lo, lo + n, None))
        lo += n
    return tuple(parts)


def coupled_loss_message(name: str, batch: float, weighted: float) -> str:
    """The refusal when the logged weights times a batch-coupled loss's terms do not sum to its ``batch_loss``."""
    return (
        f"Loss {name!r}: on the first logged micro-batch its batch_loss (a LossRecord's reference) gives "
        f"{batch:.6g}, but the logged weights (normalised to sum to 1 over the micro-batch) times its terms sum to "
        f"{weighted:.6g}. A batch-coupled loss is split exactly only when the loss the optimizer minimised is "
        f"sum_k w_k * terms(outputs, targets)[k]. Fix: return from terms the n per-row terms whose mean (or "
        f"logged-weight sum) is the batch loss, e.g. for CLIP's symmetric InfoNCE (F.cross_entropy(logits, labels, "
        f"reduction='none') + F.cross_entropy(logits.T, labels, reduction='none')) / 2; a loop that sums the "
        f"terms optimises n times their mean: give that mean as batch_loss (the gradient check measures the "
        f"factor as the loop's loss scale)."
    )


def coupled_check_hint(loss: Any, sizes: Sequence[int]) -> str:
    """The failed gradient check's hint for a batch-coupled loss (empty for any other loss)."""
    if not is_batch_coupled(loss):
        return ""
    return (
        f" The loss {loss.name!r} is batch-coupled: its terms were recomputed on each logged micro-batch as a whole "
        f"(sizes {list(sizes)}). Check that they are the terms the loop optimised (the same temperature, margin, "
        f"positives) and that every rec.log_batch call logs exactly the rows one loss was computed over (a loss "
        f"over the whole step logged as several micro-batches couples rows the terms do not see together: log "
        f"the step once)."
    )


def refuse_loss_mismatch(recorded: str | None, loss: Any, where: str) -> None:
    """Refuse a stored run whose recorded loss and the loss given to load it differ in batch coupling.

    Raises
    ------
    TrajectoryError
        When the run was recorded with a batch-coupled loss and a per-sample one is given, or the reverse: its
        per-sample gradients would be of another loss than the optimizer's.
    """
    if recorded is None or recorded == getattr(loss, "name", None):  # a registered loss is the record it names
        return
    stored = recorded.startswith(COUPLED_LOSS_PREFIX)
    if stored == is_batch_coupled(loss):
        return
    if stored:
        raise TrajectoryError(
            f"The trajectory at {where} was recorded with the batch-coupled loss {recorded!r}, but the loss given "
            f"to load it, {getattr(loss, 'name', loss)!r}, is per-sample: its terms would be taken on each sample "
            f"alone. Fix: Trajectory.load(path, loss=explaind.batch_coupled_loss(terms)) with the same terms.")
    raise TrajectoryError(
        f"The trajectory at {where} was recorded with the per-sample loss {recorded!r}, but the loss given to load "
        f"it, {getattr(loss, 'name', loss)!r}, is batch-coupled. Fix: pass the loss the run was recorded with.")


def forward_count_message(forwards: int, eval_forwards: int, coupled: Sequence[str], s: int) -> str | None:
    """The refusal of a ``log_batch`` call whose micro-batch saw no or several training forwards (captured runs).

    ``None`` when the micro-batch saw exactly one training forward, only evaluation-mode forwards, or nothing was
    captured (``forwards == -1``).
    """
    if forwards == 0 and eval_forwards == 0:
        return (
            f"rec.log_batch() was called with no forward of the model since the previous call, so its samples "
            f"cannot be paired with the dropout masks and batch statistics of the modules {list(coupled)} (each "
            f"logged micro-batch is replayed with the random state of its own forward). Fix: call "
            f"rec.log_batch(indices) after that micro-batch's forward and backward() and before optimizer.step(), "
            f"once per micro-batch; not before the forward (with optimizer.step(closure): inside the closure, after "
            f"backward())."
        )
    if forwards <= 1:
        return None
    return (
        f"Step {s}: the micro-batch logged now saw {forwards} training forwards of the model since the previous "
        f"rec.log_batch call, so the dropout masks and batch statistics of the modules {list(coupled)} cannot be "
        f"replayed per forward and its split over samples would be inexact. R-drop's (or a consistency loss's) two "
        f"dropout passes written as two calls of the model on the batch do this. Fix: take both passes inside one "
        f"forward that returns them side by side (torch.cat([net(x), net(x)], 1)) and let the loss callable "
        f"compare them; if the forwards were parts of the batch, call rec.log_batch(part) after each part's "
        f"backward(). Recorded with check_gradients=False this is a warning, and only explanations without the "
        f"split over samples (KernelReplica, InfluenceEstimator(keep=('step', 'param'), split=False)) are exact."
    )
