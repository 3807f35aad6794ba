r"""Leave-out retraining: the removed samples are taken out of their batches, not weighted 0.

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
sample kept it is the recorded run, bit for bit. ``"dropout"`` is not supported: its replayed masks
are drawn for the batch's shape, so leaving samples out would draw other masks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError
from .problem import ValidationProblem

__all__ = ["LEAVE_OUT_SETTINGS", "leave_out_train", "leave_out_logits"]

#: The settings on which leave-out retraining is defined.
LEAVE_OUT_SETTINGS: tuple[str, ...] = ("sgd_mlp", "adamw", "batchnorm", "contrastive")


def _checked_keep(problem: ValidationProblem, keep: Tensor | None) -> Tensor:
    n = problem.config.n_train
    if problem.config.setting not in LEAVE_OUT_SETTINGS:
        raise ConfigError(f"leave_out_train: not defined for the setting {problem.config.setting!r} (its replayed "
                          f"dropout masks depend on the batch's shape). Allowed: {', '.join(LEAVE_OUT_SETTINGS)}.")
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
        torch.manual_seed(seed)  # as the weighted loop does (no random layer draws from it here)
    for idx in problem.batches:
        kept = idx[mask[idx]]
        opt.zero_grad()
        if len(kept):
            (problem.terms(model(problem.X_train[kept]), problem.y_train[kept]).sum() / len(idx)).backward()
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
