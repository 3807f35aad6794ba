r"""The attribution methods compared by the validation benchmark, each as a ``(T, n_train)`` score matrix.

Every score :math:`\tau_{t,k}` is oriented so that a positive value means "sample ``k`` raised
test point ``t``'s true-class logit", and every method is read additively: a subset :math:`S` is
predicted to give :math:`\sum_{k \in S} \tau_{t,k}` up to a constant.

* ``explaind``: the ExPLAIND decomposition, ``InfluenceEstimator(keep=("train",))`` (adaptive
  quadrature, exact to rounding);
* ``tracin``: its left-rule truncation, ``InfluenceEstimator(keep=("train",), quadrature="left")``;
* ``grad_dot``: the gradient dot product at the end of training,
  :math:`-\langle \nabla_\theta f(x_t; \theta_N), \nabla_\theta \ell_k(\theta_N) \rangle` (the sign
  of one gradient step on ``k``: that step moves :math:`f` by :math:`-\eta` times the dot product);
* ``counterfactual``: ``CounterfactualEstimator()``, :math:`\tau_k = \partial f / \partial \epsilon_k`
  of the retrained model (removing ``k`` is :math:`\epsilon_k = -1`, predicted change
  :math:`-\tau_k`);
* ``influence``: the explicit influence function with damping :math:`\lambda` (Koh and Liang's
  up-weighting influence at :math:`\theta_N`),
  :math:`-\frac{1}{n}\nabla_\theta f(x_t)^T (H + \lambda I)^{-1} \nabla_\theta \ell_k(\theta_N)` with
  :math:`H = \nabla^2_\theta \frac{1}{n}\sum_j \ell_j(\theta_N)` formed exactly (every parameter) and
  :math:`\lambda` = :attr:`ValidationConfig.damping`: the derivative of :math:`f` with respect to
  up-weighting ``k`` at a minimum of the damped training loss, the classic counterfactual estimate;
* ``random``: independent standard normal scores (a sanity check: LDS near 0);
* ``leave_out_grad`` (settings ``"batchnorm"`` and ``"contrastive"`` only): the derivative of the outputs
  in each sample's presence in its batches, statistics and negatives included
  (:func:`explaind.validation.leave_out.presence_scores`), a first-order prediction of leave-out retraining;
* ``captum_influence`` and ``trak``: the same explicit damped influence function from Captum and
  TRAK from the ``traker`` package (:mod:`explaind.validation.external`), when those optional
  packages are installed (``pip install 'explaind[validation]'``).

All of them explain the true-class logit of each test point (``target = y_test``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.func import functional_call, grad, vmap

from ..exceptions import ConfigError
from . import external
from .leave_out import presence_scores
from .problem import ValidationProblem

__all__ = ["METHODS", "OPTIONAL_METHODS", "compute_scores", "flat_sample_grads"]

logger = logging.getLogger(__name__)

#: Method names in table order.
METHODS: tuple[str, ...] = ("counterfactual", "explaind", "tracin", "influence", "grad_dot", "random")
#: Methods of optional packages, compared only when importable.
OPTIONAL_METHODS: tuple[str, ...] = ("captum_influence", "trak")


def _estimator_scores(estimator: Any, trajectory: Any, problem: ValidationProblem) -> np.ndarray:
    attribution = estimator.fit(trajectory).transform(problem.X_test)
    return attribution.values[..., 0].numpy().astype(np.float64)


def _explaind(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    from ..estimators.influence import InfluenceEstimator

    est = InfluenceEstimator(keep=("train",), target=problem.targets(), device="cpu")
    return _estimator_scores(est, trajectory, problem)


def _tracin(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    from ..estimators.influence import InfluenceEstimator

    est = InfluenceEstimator(keep=("train",), target=problem.targets(), quadrature="left", device="cpu")
    return _estimator_scores(est, trajectory, problem)


def _counterfactual(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    from ..estimators.counterfactual import CounterfactualEstimator

    est = CounterfactualEstimator(target=problem.targets(), device="cpu")
    return _estimator_scores(est, trajectory, problem)


def flat_sample_grads(model: torch.nn.Module, problem: ValidationProblem,
                      params: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Flattened gradients at ``params`` (default: ``model``'s): test true-class logits and training losses.

    Returns
    -------
    g_test : Tensor, shape (n_test, D)
        :math:`\nabla_\theta f(x_t; \theta)_{y_t}`.
    g_train : Tensor, shape (n_train, D)
        :math:`\nabla_\theta \ell_k(\theta)` (cross-entropy of sample ``k``).
    """
    params = {name: p.detach() for name, p in model.named_parameters()} if params is None else params

    def logit(theta: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta, (x[None],))[0].gather(0, c[None])[0]

    def loss(theta: dict[str, torch.Tensor], x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(functional_call(model, theta, (x[None],)), c[None])

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], 1)

    g_test = flat(vmap(grad(logit), in_dims=(None, 0, 0))(params, problem.X_test, problem.y_test))
    g_train = flat(vmap(grad(loss), in_dims=(None, 0, 0))(params, problem.X_train, problem.y_train))
    return g_test, g_train


def _grad_dot(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    final_grads = getattr(problem, "final_grads", None)  # the settings beyond the SGD MLP define their own
    g_test, g_train = final_grads(model) if final_grads is not None else flat_sample_grads(model, problem)
    return (-(g_test @ g_train.T)).numpy()


def _influence(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    params = {name: p.detach() for name, p in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    # a token model gives its own mean training loss and gradients (explaind.validation.token_lm)
    own_loss = getattr(problem, "mean_train_loss", None)

    def mean_loss(flat: torch.Tensor) -> torch.Tensor:
        theta = {n: v.reshape(s) for n, v, s in zip(names, torch.split(flat, sizes), shapes)}
        out = functional_call(model, theta, (problem.X_train,))
        return torch.nn.functional.cross_entropy(out, problem.y_train) if own_loss is None else own_loss(out)

    flat = torch.cat([p.reshape(-1) for p in params.values()])
    hessian = torch.func.hessian(mean_loss)(flat)
    damped = hessian + problem.config.damping * torch.eye(flat.numel(), dtype=flat.dtype)
    g_test, g_train = flat_sample_grads(model, problem) if own_loss is None else problem.final_grads(model)
    solved = torch.linalg.solve(damped, g_train.T)  # (D, n_train)
    return (-(g_test @ solved) / problem.config.n_train).numpy()


def _random(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module) -> np.ndarray:
    rng = np.random.default_rng(problem.config.seed + 1)
    return rng.standard_normal((problem.config.n_test, problem.config.n_train))


_FUNCTIONS: dict[str, Callable[[ValidationProblem, Any, torch.nn.Module], np.ndarray]] = {
    "counterfactual": _counterfactual, "explaind": _explaind, "tracin": _tracin, "grad_dot": _grad_dot,
    "random": _random, "influence": _influence, "leave_out_grad": presence_scores,
    "captum_influence": external.captum_influence, "trak": external.trak,
}


def compute_scores(problem: ValidationProblem, trajectory: Any, model: torch.nn.Module,
                   methods: tuple[str, ...] = METHODS) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Scores of every method on the recorded run, and the wall time of each.

    Parameters
    ----------
    problem : ValidationProblem
        The data of the run.
    trajectory : Trajectory
        The recorded run (``problem.train(record=True)``).
    model : torch.nn.Module
        The trained model (its parameters are :math:`\\theta_N`).
    methods : tuple of str
        Names from :data:`METHODS` and :data:`OPTIONAL_METHODS`; an optional method whose package
        is not installed is left out of the result (:func:`~explaind.validation.external.missing`).

    Returns
    -------
    scores : dict
        Method name -> array of shape ``(n_test, n_train)``.
    seconds : dict
        Method name -> wall time of computing its scores (fit and transform for the estimators).
    """
    unknown = [m for m in methods if m not in _FUNCTIONS]
    if unknown:
        raise ConfigError(f"compute_scores: unknown method(s) {unknown!r}. Allowed: "
                          f"{', '.join(METHODS + OPTIONAL_METHODS)}, and leave_out_grad on 'batchnorm' and "
                          f"'contrastive'.")
    scores, seconds = {}, {}
    for name in methods:
        if name in OPTIONAL_METHODS and external.missing(name) is not None:
            logger.info("validation: %s skipped, %s is not installed", name, external.missing(name))
            continue
        start = time.perf_counter()
        scores[name] = _FUNCTIONS[name](problem, trajectory, model)
        seconds[name] = time.perf_counter() - start
        logger.info("validation: %s scores in %.2fs", name, seconds[name])
    return scores, seconds
