"""A built-in validation benchmark: do the scores predict what retraining does?

On scikit-learn's 8x8 digits, a small MLP is trained with SGD and momentum while the run is
recorded; each attribution method's scores then predict the true-class logit of retraining on
random subsets of the training set (the linear datamodeling score, LDS) and the effect of
removing each test point's top proponents, and both predictions are checked against actual
retraining of the same loop with the removed samples weighted 0 (docs/scores_meaning.md).

Run ``python -m explaind.validation [--quick] [--activation tanh|relu] [--seeds N] [--leave-out] [--out DIR]``, or call
:func:`run_validation`. ``--setting adamw dropout batchnorm contrastive`` runs the same measurement on AdamW with
a cosine schedule, dropout with replayed masks, a train-mode batch-norm CNN and InfoNCE
(:mod:`explaind.validation.settings`, docs/scores_meaning.md "Beyond SGD on an MLP"), and ``tiny_lm`` on a tiny
causal transformer trained by AdamW on generated token sequences (:mod:`explaind.validation.token_lm`);
``--leave-out`` also measures every method against retraining with the removed samples taken out of their
batches (:mod:`explaind.validation.leave_out`).
"""

from __future__ import annotations

from .benchmark import REMOVAL_METHODS, ValidationResult, draw_subsets, run_validation
from .methods import METHODS, OPTIONAL_METHODS, compute_scores
from .metrics import bootstrap_mean, lds, rank, spearman, subset_predictions
from .problem import ValidationConfig, ValidationProblem

__all__ = [
    "METHODS",
    "OPTIONAL_METHODS",
    "REMOVAL_METHODS",
    "ValidationConfig",
    "ValidationProblem",
    "ValidationResult",
    "bootstrap_mean",
    "compute_scores",
    "draw_subsets",
    "lds",
    "rank",
    "run_validation",
    "spearman",
    "subset_predictions",
]
