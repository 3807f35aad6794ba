r"""How the loss of a logged micro-batch splits over its samples: per-sample callables and batch-coupled losses.

:func:`check_loss_decomposes` checks once, on the first logged micro-batch, that a user's per-sample loss callable
weighted by the logged weights gives the batch loss the loop trains with (docs/recording.md).

A loss declared with :func:`explaind.batch_coupled_loss` returns the terms :math:`\ell_k(F(X_B), Y_B)` of a whole
micro-batch: every consumer must evaluate it on the micro-batches as the loop formed them, one call per
``log_batch``, never on a sample alone nor on several micro-batches merged. This module says where those
micro-batches lie in a step's batch (:func:`term_parts`), checks the declaration on the first logged micro-batch
(:func:`coupled_loss_message`) and when a stored run is loaded (:func:`refuse_loss_mismatch`), and refuses at
``log_batch`` a micro-batch that saw several training forwards of a captured model (R-drop's two dropout passes
written as two calls of the model, :func:`forward_count_message`), whose masks cannot be replayed.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import TrajectoryError
from ..inputs import call_model
from ..losses import COUPLED_LOSS_PREFIX
from ..models import copy_memo
from ..outputs import model_output
from ..records import LossRecord
from ._random import replay_parts, resolve_generators

__all__ = ["check_loss_decomposes", "is_batch_coupled", "term_parts", "coupled_loss_message", "coupled_check_hint",
           "refuse_loss_mismatch", "forward_count_message", "replay_forward"]

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


def check_loss_decomposes(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    loss: LossRecord,
    inputs: Tensor,
    targets: Tensor,
    weights: Tensor,
) -> str | None:
    r"""Whether a user loss callable equals :math:`\sum_k w_k \ell_k / \sum_k w_k` on one logged micro-batch.

    The weights are normalised within the micro-batch: a loop that scales each micro-batch's mean (gradient
    accumulation, ``w_k = 1 / (n m)``; a Trainer's ``n_k / N``) is a decomposable loss whose global factor is the
    gradient check's to measure, as for the registered losses.

    Parameters
    ----------
    inputs, targets : Tensor
        One logged micro-batch, ``(n, ...)``.
    weights : Tensor
        Its logged weights ``(n,)``.

    Returns
    -------
    str or None
        A message naming the loss and the fix when the callable's batch value differs from the
        weighted sum of its per-sample values (class weights with the default weights,
        ``reduction="sum"``, terms coupling samples), or, for a batch-coupled loss, of its terms on the whole
        micro-batch; else ``None``. Registered per-sample losses and micro-batches of one sample are not checked.
    """
    reference = loss.reference
    if reference is None or not (loss.name.startswith("custom:") or is_batch_coupled(loss)) or inputs.shape[0] < 2:
        return None
    state = {n: p.detach() for n, p in params.items()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    with torch.no_grad(), torch.autocast(inputs.device.type, enabled=False):
        out = model_output(call_model(model, {**buffers, **state}, inputs))
        w = weights.to(out.device).double()
        mean = float((loss.implementation(out, targets).double() * w).sum() / (w.sum() if w.sum() != 0 else 1.0))
        batch = float(reference(out, targets))
    tol = 1e-10 if out.dtype == torch.float64 else 1e-5
    if abs(mean - batch) <= tol * max(abs(batch), abs(mean), 1e-30):
        return None
    if is_batch_coupled(loss):
        return coupled_loss_message(loss.name, batch, mean)
    nan = (" On one sample alone it gives NaN: a mean over the samples it counts (ignore_index, class weights) "
           "is 0/0 on a sample it does not count; log only the counted samples, with their weights, and give the "
           "loss without ignore_index." if mean != mean else "")
    return (
        f"Loss {loss.name!r}: on the first logged micro-batch the loss callable gives {batch:.6g}, but the "
        f"logged weights (normalised to sum to 1 over the micro-batch) times its per-sample values sum to "
        f"{mean:.6g}.{nan} explaind splits the gradient into "
        f"per-sample terms w_k * grad loss_fn(sample k), exact only when the batch loss is "
        f"sum_k w_k loss_fn(sample k): a "
        f"class-weighted cross entropy (weight=...) normalises by the batch's summed class weights, "
        f"reduction='sum' and terms coupling samples differ too. Fix: pass per-sample weights to "
        f"rec.log_batch(indices, weights) (for class weights w: weights = w[y] / w[y].sum()) and an unweighted "
        f"loss= callable, or use reduction='mean'; a mean over the counted positions of several per sample "
        f"(pixels or tokens with ignore_index) normalises by the batch's count: weights = n / n.sum(), n the "
        f"counted positions of each sample, (y[idx] != ignore_index).flatten(1).sum(1). A loss whose terms read "
        f"other samples of the batch (a "
        f"contrastive loss such as InfoNCE or SupCon, batch-hard triplet mining, a batch metric such as soft-F1) "
        f"has no such split for any weights, nor has a detached batch statistic inside each term (REINFORCE's "
        f"mean-reward baseline (r - r.mean()).detach(), advantages normalised over the batch: one sample alone has "
        f"advantage 0; a baseline of the sample's own, a learned value head as in actor-critic, splits exactly): "
        f"declare such a loss with loss=explaind.batch_coupled_loss(terms), terms(outputs, targets) -> the (n,) "
        f"terms of the whole micro-batch (reduction='none'), and each sample is credited exactly with its own "
        f"term through the batch's shared outputs (docs/guide_own_model.md, 'Batch-coupled losses'); or "
        f"explain this one without that split (InfluenceEstimator(keep=('step', 'param'), split=False) reads only "
        f"the recorded updates, exact; record the run with check_gradients=False for that)."
    )


def replay_forward(src: Any, s: int, module: nn.Module | None, where: str) -> tuple[nn.Module, Any, list[Any]]:
    """The module, micro-batch plan and private generators of a replay of step ``s``'s batch gradient.

    Shared by the replay of a sparse store's segments (:mod:`~explaind.trajectory.replay`) and salvage's replay
    (:mod:`~explaind.trajectory._salvage_replay`). Without captured dropout or batch norm: ``src``'s model as it is,
    one forward (a batch-coupled loss: one per micro-batch, :func:`term_parts`). Otherwise ``module`` (a copy of the
    model, made here when ``None``) in training mode and, per micro-batch, its positions in the batch and its
    recorded random state (:func:`~explaind.trajectory._random.replay_parts`), with the generators to set from it;
    a step whose forwards all ran in evaluation mode: the copy in evaluation mode, one forward.

    Parameters
    ----------
    src : DiskTrajectory
        The store's reader (its manifest, micro-batches, model, loss and generators).
    s : int
        The step.
    module : nn.Module or None
        The copy of the model of an earlier call (``None``: none yet).
    where : str
        Names the caller in a refusal to replay.

    Returns
    -------
    (nn.Module, list or None, list of torch.Generator)
        The module to differentiate, the plan (``None``: one forward) and the generators.
    """
    manifest = src.manifest
    if not (manifest.random_capture and manifest.coupled):
        parts = term_parts(src.micro_batches(s)) if is_batch_coupled(src.loss) else None
        return src.model, None if parts is None else [(slice(lo, hi), None) for lo, hi, _ in parts], []
    if module is None:
        module = copy.deepcopy(src.model, copy_memo(src.model, src.generators))
    states = replay_parts(src.micro_batches(s), manifest.coupled, where)
    module.train(states is not None)
    if states is None:
        return module, None, []
    generators = resolve_generators(manifest.generators, module, src.generators, where)
    return module, [(slice(lo, hi), state) for lo, hi, state in states], generators
