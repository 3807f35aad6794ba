"""The tensor a model's forward returns for explaind: its logits, whatever container holds them.

Models return a tensor, a tuple or list whose first element is the output (``return_dict=False``
models, ``(logits, hidden)`` pairs), a mapping or an object with a ``logits`` entry (Hugging Face
``ModelOutput``). :func:`model_output` picks the tensor that losses and explained quantities are
computed from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .exceptions import UnsupportedModelError

__all__ = ["model_output"]


def model_output(out: Any) -> Tensor:
    """The output tensor of a forward pass: ``out`` itself, its ``logits``, or its first element.

    Raises
    ------
    UnsupportedModelError
        When no tensor can be found (names the type returned and the fix).
    """
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    raise UnsupportedModelError(
        f"the model's forward returned {type(out).__name__}, which holds no output tensor explaind can use: "
        f"return a tensor, a tuple whose first element is the output, or an object/mapping with a 'logits' "
        f"tensor (e.g. a Hugging Face ModelOutput)."
    )
