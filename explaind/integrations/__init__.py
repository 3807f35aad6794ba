"""Framework integrations: record Hugging Face ``Trainer`` and Lightning runs (docs/guide_own_model.md).

The callbacks import their framework when first used, so ``import explaind`` and this package
work without ``transformers`` or ``lightning`` installed:

* :class:`IndexedDataset`, :class:`IndexCollate`, :func:`four_d_attention_mask`, :func:`step_weights`
  (:mod:`explaind.integrations.data`, torch only);
* :class:`ExplaindTrainerCallback` (:mod:`explaind.integrations.hf`, needs ``transformers`` and ``accelerate``);
* :class:`ExplaindLightningCallback` (:mod:`explaind.integrations.lightning`, needs ``lightning``).
"""

from __future__ import annotations

import importlib
from typing import Any

from .data import IndexCollate, IndexedDataset, four_d_attention_mask, step_weights

__all__ = [
    "IndexedDataset",
    "IndexCollate",
    "four_d_attention_mask",
    "step_weights",
    "ExplaindTrainerCallback",
    "ExplaindLightningCallback",
]

_LAZY = {"ExplaindTrainerCallback": ("hf", "transformers"), "ExplaindLightningCallback": ("lightning", "lightning")}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'explaind.integrations' has no attribute {name!r}")
    module, package = _LAZY[name]
    try:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    except ModuleNotFoundError as exc:
        from ..exceptions import ConfigError

        raise ConfigError(
            f"explaind.integrations.{name} needs the package {exc.name!r} ({package}); install it with "
            f"pip install 'explaind[{module}]'."
        ) from exc
