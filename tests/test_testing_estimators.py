"""The estimator conformance checks accept a conforming estimator and catch each violation."""

from __future__ import annotations

import threading
from typing import Any, ClassVar, Literal

import numpy as np
import pytest
import torch
from engine_fixtures import recorded_run
from pydantic import Field
from torch.func import functional_call

import explaind
from explaind.config import StrictModel
from explaind.estimators.base import ExplaindEstimator
from explaind.exceptions import TrajectoryError
from explaind.testing.estimators import (
    ESTIMATOR_CHECKS,
    EstimatorCheckError,
    check_estimator,
    config_default_mismatches,
    estimator_checks,
    parametrize_with_checks,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class _ToyConfig(StrictModel):
    scale: float = Field(1.0, gt=0)
    keep: tuple[Literal["a", "b"], ...] = ("a",)
    dtype: Literal["float32", "float64"] = "float64"


class ToyReplica(ExplaindEstimator):
    """Predicts ``scale * f(x; theta_N)``: a minimal conforming estimator."""

    _config_model: ClassVar = _ToyConfig

    def __init__(self, *, scale=1.0, keep=("a",), dtype="float64"):
        self.scale = scale
        self.keep = keep
        self.dtype = dtype

    def fit(self, trajectory):
        if not isinstance(trajectory, explaind.Trajectory):
            raise TrajectoryError(f"fit expects an explaind.Trajectory, got {type(trajectory).__name__}.")
        cfg = self._validated_config()
        self.config_ = cfg
        self.model_ = trajectory.model
        self.params_ = trajectory.params(trajectory.n_steps)
        self.n_steps_ = trajectory.n_steps
        return self

    def _forward(self, X):
        dt = getattr(torch, self.config_.dtype)
        params = {k: v.to(dt) for k, v in self.params_.items()}
        with torch.no_grad():
            return functional_call(self.model_.to(dt), params, (X.to(dt),)) * self.config_.scale

    def predict(self, X):
        self._check_fitted()
        return self._forward(X).numpy()


class PositionalInit(ToyReplica):
    def __init__(self, scale=1.0, keep=("a",), dtype="float64"):
        super().__init__(scale=scale, keep=keep, dtype=dtype)


class CopiesParams(ToyReplica):
    def __init__(self, *, scale=1.0, keep=("a",), dtype="float64"):
        super().__init__(scale=scale, keep=tuple(list(keep)), dtype=dtype)


class ValidatesInInit(ToyReplica):
    def __init__(self, *, scale=1.0, keep=("a",), dtype="float64"):
        if not isinstance(scale, float) or scale <= 0:
            raise ValueError("scale must be positive")
        super().__init__(scale=scale, keep=keep, dtype=dtype)


class NoValidation(ToyReplica):
    def _validated_config(self) -> Any:
        return _ToyConfig.model_construct(**self.get_params())

    def _forward(self, X):
        params = {k: v.to(torch.float64) for k, v in self.params_.items()}
        with torch.no_grad():
            out = functional_call(self.model_, params, (X,))
        return out.to(torch.float32 if self.dtype == "float32" else torch.float64)


class ReturnsNone(ToyReplica):
    def fit(self, trajectory):
        super().fit(trajectory)


class PlainFittedName(ToyReplica):
    def fit(self, trajectory):
        super().fit(trajectory)
        self.weights = 1
        return self


class WrongNotFitted(ToyReplica):
    def predict(self, X):
        return self._forward(X).numpy()


class Noisy(ToyReplica):
    def predict(self, X):
        return super().predict(X) + np.random.default_rng().normal(size=1)


class IgnoresDtype(ToyReplica):
    def predict(self, X):
        return super().predict(X).astype(np.float64)


class Uncopyable(ToyReplica):
    def fit(self, trajectory):
        super().fit(trajectory)
        self.lock_ = threading.Lock()  # copy.deepcopy refuses it
        return self


class AcceptsAnything(ToyReplica):
    def fit(self, trajectory):
        self._validated_config()
        self.config_ = self._validated_config()
        self.params_ = trajectory.params(trajectory.n_steps)
        return self


class VagueFitError(ToyReplica):
    def fit(self, trajectory):
        if not isinstance(trajectory, explaind.Trajectory):
            raise TrajectoryError("bad input")
        return super().fit(trajectory)


class SetParamsReturnsNone(ToyReplica):
    def set_params(self, **params):
        super().set_params(**params)


class WrongDefault(ToyReplica):
    """Its signature says ``scale=2.0`` while ``_ToyConfig`` says 1.0."""

    def __init__(self, *, scale=2.0, keep=("a",), dtype="float64"):
        super().__init__(scale=scale, keep=keep, dtype=dtype)


BROKEN = [
    (PositionalInit, "init_keyword_only", "keyword-only"),
    (CopiesParams, "init_keyword_only", "verbatim"),
    (ValidatesInInit, "invalid_params_at_fit", "validation belongs in fit"),
    (NoValidation, "invalid_params_at_fit", "accepted the invalid value"),
    (ReturnsNone, "fit_returns_self", "return the estimator itself"),
    (PlainFittedName, "fitted_attributes", "['weights']"),
    (WrongNotFitted, "not_fitted", "not NotFittedError"),
    (Noisy, "deterministic", "different results"),
    (IgnoresDtype, "dtype", "with dtype='float32' the result"),
    (Uncopyable, "copy_round_trip", "cannot be copied"),
    (AcceptsAnything, "fit_rejects_wrong_input", "not an ExplaindError"),
    (SetParamsReturnsNone, "set_params_and_clone", "set_params must return"),
    (VagueFitError, "fit_rejects_wrong_input", "should name the type given"),
    (WrongDefault, "config_defaults", "parameter 'scale': the __init__ default 2.0 differs from the _ToyConfig "
                                      "default 1.0"),
]


@pytest.fixture(scope="module")
def run():
    return recorded_run("tanh", "sgd_momentum")


def test_conforming_estimator_passes_every_check(run):
    check_estimator(ToyReplica(scale=2.0), run.trajectory, run.X_test)


@pytest.mark.parametrize("cls, check_name, phrase", BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_each_violation_is_caught(run, cls, check_name, phrase):
    check = dict(ESTIMATOR_CHECKS)[check_name]
    est = cls()
    with pytest.raises(Exception) as info:
        check(est, run.trajectory, run.X_test)
    assert isinstance(info.value, EstimatorCheckError), info.value
    assert cls.__name__ in str(info.value)
    assert phrase in str(info.value)
    with pytest.raises(EstimatorCheckError, match=check_name):
        check_estimator(est, run.trajectory, run.X_test)


def test_default_params_check_catches_a_changed_default(run):
    class ChangedDefault(ToyReplica):
        def get_params(self, deep=True):
            out = super().get_params(deep)
            out["scale"] = 3.0
            return out

    with pytest.raises(EstimatorCheckError, match="signature default"):
        dict(ESTIMATOR_CHECKS)["default_params"](ChangedDefault(), run.trajectory, run.X_test)


class _RequiredScaleConfig(StrictModel):
    scale: float = Field(gt=0)
    keep: tuple[Literal["a", "b"], ...] = ("a",)
    dtype: Literal["float32", "float64"] = "float64"


class _ExtraFieldConfig(_ToyConfig):
    extra: int = 0


class _WithSeed(ToyReplica):
    def __init__(self, *, scale=1.0, keep=("a",), dtype="float64", seed=None):
        super().__init__(scale=scale, keep=keep, dtype=dtype)
        self.seed = seed


@pytest.mark.parametrize("cls, config, phrase", [
    (ToyReplica, _ExtraFieldConfig, "_ExtraFieldConfig field 'extra' is not an __init__ parameter"),
    (_WithSeed, _ToyConfig, "__init__ parameter 'seed' is not a field of _ToyConfig"),
    (ToyReplica, _RequiredScaleConfig, "parameter 'scale': the __init__ default 1.0 differs from the "
                                       "_RequiredScaleConfig default <required>"),
], ids=["extra-field", "extra-parameter", "required-field"])
def test_config_defaults_check_compares_names_both_ways_and_required(run, cls, config, phrase):
    broken = type(f"{cls.__name__}With{config.__name__}", (cls,), {"_config_model": config})
    with pytest.raises(EstimatorCheckError, match="config_defaults") as info:
        check_estimator(broken(), run.trajectory, run.X_test)
    assert phrase in str(info.value)
    assert config_default_mismatches(cls, config) == [phrase + "."]


def test_config_defaults_agree_for_the_first_party_estimators():
    for cls in (explaind.KernelReplica, explaind.InfluenceEstimator):
        assert config_default_mismatches(cls, cls._config_model) == [], cls.__name__


def test_checks_leave_the_given_estimator_unfitted(run):
    est = ToyReplica()
    check_estimator(est, run.trajectory, run.X_test)
    assert not hasattr(est, "n_steps_")


def test_check_names_are_unique_and_listed():
    names = [n for n, _ in estimator_checks(ToyReplica())]
    assert len(names) == len(set(names)) == len(ESTIMATOR_CHECKS)
    assert {"not_fitted", "copy_round_trip", "invalid_params_at_fit", "dtype"} <= set(names)


@parametrize_with_checks([ToyReplica(), ToyReplica(dtype="float32", keep=("a", "b"))])
def test_parametrized_checks(estimator, check, run):
    check(estimator, run.trajectory, run.X_test)


class ToyScores(ExplaindEstimator):
    """A pruning-style estimator: ``fit(model, data, trajectory)``, fitted ``scores_`` dict, ``masks()``."""

    _config_model: ClassVar = _ToyConfig
    _fitted_marker: ClassVar[str] = "scores_"

    def __init__(self, *, scale=1.0, keep=("a",), dtype="float64"):
        self.scale = scale
        self.keep = keep
        self.dtype = dtype

    def fit(self, model, data=None, trajectory=None):
        if not isinstance(model, torch.nn.Module):
            raise TrajectoryError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        cfg = self._validated_config()
        dt = getattr(torch, cfg.dtype)
        self.scores_ = {n: p.detach().abs().to(dt) * cfg.scale for n, p in model.named_parameters()}
        return self

    def masks(self):
        self._check_fitted()
        return {n: s > 0 for n, s in self.scores_.items()}

    def transform(self, model, sparsity=None):
        self._check_fitted()
        return model


def test_tuple_fit_inputs_and_dict_results(run):
    model = run.trajectory.model
    check_estimator(ToyScores(), (model, None, run.trajectory), run.X_test)

    class Shaky(ToyScores):
        def fit(self, model, data=None, trajectory=None):
            super().fit(model, data, trajectory)
            self.scores_ = {n: s + float(np.random.default_rng().normal()) for n, s in self.scores_.items()}
            return self

    with pytest.raises(EstimatorCheckError, match="scores_"):
        dict(ESTIMATOR_CHECKS)["deterministic"](Shaky(), (model, None, run.trajectory), run.X_test)
