"""The error tree of explaind.

Every error the library raises on purpose derives from :class:`ExplaindError`, so callers can
catch the whole family at once. Errors caused by bad values are also :class:`ValueError`
subclasses, so code written against the standard library conventions keeps working.
"""

from __future__ import annotations

from collections.abc import Iterable

from sklearn.exceptions import NotFittedError as _SklearnNotFittedError

__all__ = [
    "ExplaindError",
    "ConfigError",
    "TrajectoryError",
    "UnknownEntryError",
    "NotFittedError",
    "UnsupportedModelError",
    "PluginError",
    "ExplaindWarning",
]


class ExplaindError(Exception):
    """Base class of every error raised by explaind on purpose."""


class ConfigError(ExplaindError, ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


class TrajectoryError(ExplaindError, ValueError):
    """A recorded trajectory is inconsistent, truncated, corrupted or used incorrectly."""


class UnknownEntryError(ExplaindError, ValueError):
    """A registry look-up named an entry that no loaded plugin provides."""


class PluginError(ExplaindError):
    """A plugin is malformed (bad record, duplicate name, hook mismatch)."""


class NotFittedError(ExplaindError, _SklearnNotFittedError):
    """An estimator was used before ``fit``; also a scikit-learn ``NotFittedError``."""


class UnsupportedModelError(ExplaindError, ValueError):
    """A model cannot be explained; carries *all* problems found, not only the first.

    Parameters
    ----------
    problems : iterable of str
        One human-readable sentence per problem.
    """

    def __init__(self, problems: Iterable[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems: list[str] = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"The model cannot be explained ({len(self.problems)} problem(s)):\n{lines}")


class ExplaindWarning(UserWarning):
    """Warnings emitted by explaind (skipped plugins, large residuals, ...)."""
