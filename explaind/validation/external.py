r"""Attribution methods of established libraries, compared by the validation benchmark when installed.

Both are optional (``pip install 'explaind[validation]'``): :func:`missing` names the package a
method lacks, and the benchmark then reports the method as "not installed" instead of scoring it.
Each function returns a ``(n_test, n_train)`` matrix oriented like every method of
:mod:`explaind.validation.methods` (positive: sample ``k`` raised test point ``t``'s output).

* ``captum_influence``: Captum's ``NaiveInfluenceFunction``, the explicit influence function with
  its exact Hessian of the training loss at :math:`\theta_N`, every eigen-direction kept
  (``projection_dim`` = number of parameters) and ``hessian_reg`` = :math:`n \lambda` (Captum forms the
  Hessian of the summed loss; :math:`\lambda` = :attr:`ValidationConfig.damping` is relative to the
  mean loss, as in ``influence``), so it is the same quantity as ``influence`` up to the eigen-directions
  Captum drops (damped eigenvalue below its tolerance).
  Captum's score is :math:`\nabla f(x_t)^T H^{-1} \nabla \ell_k` (its docstring); up-weighting
  ``k`` moves :math:`f` by minus that, so the score is negated. It explains the true-class logit.
* ``trak``: TRAK from the ``traker`` package (its CPU ``BasicProjector``, float64, projection
  dimension ``min(trak_proj_dim, D)``, below ``n_train``: TRAK inverts the Gram matrix of the
  projected training gradients, singular otherwise), an ensemble of ``trak_models`` models each
  trained by the recorded loop on a random half of the training set (the TRAK paper's recipe).
  TRAK explains its own output function for classification, the margin
  :math:`f_{y} - \log\sum_{c \neq y} e^{f_c}` (a monotone function of the true-class probability),
  not the logit.
"""

from __future__ import annotations

import importlib.util
import logging
import tempfile
from typing import Any

import numpy as np
import torch

from .problem import ValidationProblem

__all__ = ["PACKAGES", "missing", "captum_influence", "trak"]

logger = logging.getLogger(__name__)

#: Import name of the package each optional method needs.
PACKAGES: dict[str, str] = {"captum_influence": "captum", "trak": "trak"}


def missing(method: str) -> str | None:
    """The package ``method`` needs when it cannot be imported, else ``None``."""
    package = PACKAGES[method]
    return package if importlib.util.find_spec(package) is None else None


def captum_influence(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    """Captum's explicit damped influence function on the true-class logit, ``(n_test, n_train)``."""
    from captum.influence import NaiveInfluenceFunction

    final = {name: p.detach().clone() for name, p in model.named_parameters()}

    def load(net: torch.nn.Module, checkpoint: str) -> float:
        net.load_state_dict(final, strict=False)  # the trained parameters, from memory (no file)
        return 1.0

    def true_logit(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return out.gather(1, y[:, None])[:, 0]

    true_logit.reduction = "none"  # type: ignore[attr-defined]  # Captum's marker of a per-sample function
    data = torch.utils.data.TensorDataset(problem.X_train, problem.y_train)
    n_params = sum(p.numel() for p in model.parameters())
    influence = NaiveInfluenceFunction(
        model, data, "final", load, loss_fn=torch.nn.CrossEntropyLoss(reduction="none"), batch_size=len(data),
        test_loss_fn=true_logit, projection_dim=n_params, hessian_reg=problem.config.damping * len(data),
    )
    scores = influence.influence((problem.X_test, problem.y_test))
    return -scores.detach().numpy().astype(np.float64)


def trak(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    """TRAK (``traker``) over models trained on random halves of the training set, ``(n_test, n_train)``."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    config = problem.config
    rng = np.random.default_rng(config.seed + 2)
    checkpoints = []
    for _ in range(config.trak_models):
        half = np.zeros(config.n_train)
        half[rng.choice(config.n_train, config.n_train // 2, replace=False)] = 1.0
        trained = problem.train(torch.as_tensor(half))[0]
        checkpoints.append({name: p.detach() for name, p in trained.state_dict().items()})
    net = problem.build_model()
    dim = sum(p.numel() for p in net.parameters())
    proj_dim = min(config.trak_proj_dim, dim)
    projector = BasicProjector(grad_dim=dim, proj_dim=proj_dim, seed=config.seed, proj_type=ProjectionType.normal,
                               device="cpu", dtype=torch.float64)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(model=net, task="image_classification", train_set_size=config.n_train, save_dir=save_dir,
                        device="cpu", projector=projector, proj_dim=proj_dim, use_half_precision=False,
                        logging_level=logging.WARNING)
        for i, checkpoint in enumerate(checkpoints):
            traker.load_checkpoint(checkpoint, model_id=i)
            traker.featurize(batch=(problem.X_train, problem.y_train), num_samples=config.n_train)
        traker.finalize_features()
        for i, checkpoint in enumerate(checkpoints):
            traker.start_scoring_checkpoint(exp_name="validation", checkpoint=checkpoint, model_id=i,
                                            num_targets=config.n_test)
            traker.score(batch=(problem.X_test, problem.y_test), num_samples=config.n_test)
        scores = np.asarray(traker.finalize_scores(exp_name="validation"), dtype=np.float64)
    return scores.T.copy()
