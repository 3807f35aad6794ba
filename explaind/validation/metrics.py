r"""The linear datamodeling score (LDS) and its bootstrap error bar.

For one test point, ``M`` training subsets :math:`S_1, \dots, S_M`, the retrained outputs
:math:`g_m` and an attribution's predictions :math:`\hat g_m = \sum_{k \in S_m} \tau_k`, the LDS is
the Spearman rank correlation of :math:`(\hat g_m)_m` and :math:`(g_m)_m`. Adding a constant to
every prediction leaves it unchanged, so :math:`\sum_{k \in S_m} \tau_k` and the predicted change
:math:`-\sum_{k \notin S_m} \tau_k` (the first-order effect of removing the complement) give the
same LDS at a fixed subset size.
"""

from __future__ import annotations

import warnings

import numpy as np
from numpy.typing import ArrayLike

from ..exceptions import ConfigError

__all__ = ["rank", "spearman", "subset_predictions", "lds", "bootstrap_mean"]


def rank(values: ArrayLike) -> np.ndarray:
    """Ranks ``1..n`` along the last axis, ties given their average rank (as in Spearman's rho)."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(values, dtype=np.float64), method="average", axis=-1)


def spearman(x: ArrayLike, y: ArrayLike) -> np.ndarray:
    """Spearman rank correlation of ``x`` and ``y`` along the last axis (``nan`` where one is constant).

    Parameters
    ----------
    x, y : array_like, shape (..., M)
        Paired observations; ``M >= 2``.

    Returns
    -------
    numpy.ndarray, shape (...)
        The Pearson correlation of the ranks.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim == 0 or a.shape[-1] < 2:
        raise ConfigError(f"spearman: x and y need the same shape with at least 2 entries on the last axis; got "
                          f"{a.shape} and {b.shape}.")
    ra, rb = rank(a), rank(b)
    ra -= ra.mean(-1, keepdims=True)
    rb -= rb.mean(-1, keepdims=True)
    denom = np.sqrt((ra * ra).sum(-1) * (rb * rb).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, (ra * rb).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def subset_predictions(scores: ArrayLike, masks: ArrayLike) -> np.ndarray:
    r"""Additive predictions :math:`\hat g_{t,m} = \sum_{k \in S_m} \tau_{t,k}`.

    Parameters
    ----------
    scores : array_like, shape (T, n_train)
        One score per test point and training sample.
    masks : array_like of bool, shape (M, n_train)
        Membership of each sample in each subset.

    Returns
    -------
    numpy.ndarray, shape (T, M)
    """
    return np.asarray(scores, dtype=np.float64) @ np.asarray(masks, dtype=np.float64).T


def lds(predicted: ArrayLike, actual: ArrayLike) -> np.ndarray:
    """Per-test-point LDS: Spearman correlation across subsets of predicted and actual outputs.

    Parameters
    ----------
    predicted, actual : array_like, shape (T, M)
        Predicted and retrained outputs of ``T`` test points on ``M`` subsets.

    Returns
    -------
    numpy.ndarray, shape (T,)
    """
    return spearman(predicted, actual)


def bootstrap_mean(values: ArrayLike, n_resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Mean of ``values`` (``nan`` ignored) and the standard deviation of its bootstrap resamples.

    Parameters
    ----------
    values : array_like, shape (T,) or (S, T)
        One value per test point, or per seed and test point. With seeds, each resample draws
        ``S`` seeds with replacement and then ``T`` test points with replacement within each
        drawn seed (a two-level bootstrap: the spread between runs and between test points).
    n_resamples : int
        Bootstrap resamples.
    seed : int
        Seed of the resampling.

    Returns
    -------
    (float, float)
        ``(mean, bootstrap std)``; ``(nan, nan)`` when no value is finite.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v.reshape(1, -1) if v.ndim < 2 else v.reshape(v.shape[0], -1)
    if not np.isfinite(v).any():
        return float("nan"), float("nan")
    if n_resamples <= 1:
        return float(np.nanmean(v)), 0.0
    rng = np.random.default_rng(seed)
    S, T = v.shape
    rows = rng.integers(0, S, size=(int(n_resamples), S))
    cols = rng.integers(0, T, size=(int(n_resamples), S, T))
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample of only nan values
        means = np.nanmean(v[rows[..., None], cols].reshape(int(n_resamples), -1), 1)
    return float(np.nanmean(v)), float(np.nanstd(means, ddof=1))
