"""The error tree of explaind.

Every error the library raises on purpose derives from :class:`ExplaindError`, so callers can
catch the whole family at once. Errors caused by bad values are also :class:`ValueError`
subclasses, so code written against the standard library conventions keeps working.
"""

from __future__ import annotations

import sys
import warnings
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
    "warn_at_caller",
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


#: Top-level packages whose frames a warning skips to reach the user's line: explaind, its first-party
#: plugins, and the frameworks that call into it (an optimizer step hook, a Trainer or Lightning callback).
LIBRARY_PACKAGES = frozenset({
    "explaind", "explaind_architectures", "explaind_losses", "explaind_optimizers", "explaind_pruning",
    "torch", "transformers", "accelerate", "lightning", "lightning_fabric", "pytorch_lightning", "sklearn",
    "pluggy", "contextlib", "functools", "concurrent", "threading",
})


def warn_at_caller(message: str, category: type[Warning] = ExplaindWarning,
                   skip: frozenset[str] = LIBRARY_PACKAGES) -> None:
    """Warn with the location of the first calling frame outside ``skip``: the user's own line.

    A fixed ``stacklevel`` points into explaind whenever the call depth differs (an estimator called
    from another, a recorder check run from torch's optimizer hook, a callback run by a Trainer);
    this walks up to the first frame whose module's top-level package is not in ``skip``, so the
    warning names the line of the user's script or test that caused it, and Python's once-per-line
    filters count that line. When every frame is a library's (a worker thread), the outermost is named.

    Parameters
    ----------
    message : str
    category : type of Warning
        Default :class:`ExplaindWarning`.
    skip : frozenset of str
        Top-level package names whose frames are skipped (default :data:`LIBRARY_PACKAGES`).
    """
    frame = sys._getframe(1)
    level = 2  # warnings.warn's stacklevel that names this function's caller
    while frame.f_back is not None and str(frame.f_globals.get("__name__", "")).split(".")[0] in skip:
        frame = frame.f_back
        level += 1
    warnings.warn(message, category, stacklevel=level)
