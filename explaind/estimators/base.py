"""Common machinery of explaind's scikit-learn style estimators.

Subclasses declare ``_config_model`` (a pydantic model whose fields are exactly the
``__init__`` keyword parameters), store every parameter verbatim in a keyword-only
``__init__`` and call :meth:`ExplaindEstimator._validated_config` at the start of ``fit``.
Fitted attributes end with an underscore; :meth:`_check_fitted` raises
:class:`explaind.exceptions.NotFittedError` before ``fit``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel
from sklearn.base import BaseEstimator

from ..config import resolve_device, validate_config
from ..exceptions import ConfigError, NotFittedError

__all__ = ["ExplaindEstimator"]


class ExplaindEstimator(BaseEstimator):
    """Base class: parameter validation through a pydantic model and fitted-state checks."""

    _config_model: ClassVar[type[BaseModel]]
    _fitted_marker: ClassVar[str] = "n_steps_"

    def _validated_config(self) -> Any:
        """Validate ``get_params()`` against ``_config_model``; raises ``ConfigError`` naming the field."""
        return validate_config(self._config_model, self.get_params(deep=False), type(self).__name__)

    def _device(self, value: str) -> Any:
        """The ``torch.device`` of the ``device`` parameter; ``ConfigError`` naming the estimator and the value."""
        try:
            return resolve_device(value)
        except ConfigError as exc:
            raise ConfigError(f"{type(self).__name__}: invalid value for 'device': {exc}") from None

    def _check_fitted(self) -> None:
        if not hasattr(self, self._fitted_marker):
            raise NotFittedError(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with a Trajectory "
                f"before using this method."
            )

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, self._fitted_marker)
