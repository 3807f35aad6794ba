"""Shared pydantic building blocks and small resolvers used by every estimator."""

from __future__ import annotations

import difflib
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from .exceptions import ConfigError

__all__ = [
    "StrictModel",
    "DeviceName",
    "DtypeName",
    "resolve_device",
    "resolve_dtype",
    "validate_config",
]

DeviceName = str  # "auto", "cpu", "cuda", "cuda:1", ...
DtypeName = Literal["float32", "float64"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class StrictModel(BaseModel):
    """Base of every explaind config: unknown fields are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


def validate_config(model: type[BaseModel], values: dict[str, Any], owner: str,
                    fix: str = "Fix the parameter and call fit again.") -> Any:
    """Validate ``values`` against ``model``; turn pydantic's error into a :class:`ConfigError`.

    The message names each offending field, the value given and what is allowed, e.g.
    ``KernelReplica: invalid value for 'quadrature': 'simpson' — Input should be 'adaptive',
    'gauss-legendre', 'midpoint' or 'left'.``; a field the model does not have is listed with the
    fields it does have. ``fix`` ends the message (how to correct it where the values came from).
    """
    try:
        return model.model_validate(values)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err.get("loc", ())) or "<config>"
            given = err.get("input")
            problems.append(f"invalid value for {field!r}: {given!r} — {err.get('msg')}")
            if err.get("type") == "extra_forbidden" and len(err.get("loc", ())) == 1:
                close = difflib.get_close_matches(field, list(model.model_fields), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems[-1] += f" (the fields are: {', '.join(model.model_fields)}{hint})"
        raise ConfigError(f"{owner}: " + "; ".join(problems) + ". " + fix) from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``"auto"``/``None`` -> CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(
            f"Unknown device {device!r}. Use 'auto', 'cpu', 'cuda' or 'cuda:N'."
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} was requested but CUDA is not available. Use device='cpu' or 'auto'.")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, default: torch.dtype = torch.float64) -> torch.dtype:
    """Map ``"float32"``/``"float64"`` (or a torch dtype) to a torch dtype; ``None`` -> ``default``."""
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"Unsupported dtype {dtype!r}. Choose one of: float32, float64.")
