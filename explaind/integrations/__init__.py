"""Framework integrations: record Hugging Face ``Trainer`` and Lightning runs (docs/guide_own_model.md).

Public names are imported on first access, so ``import explaind.integrations`` loads neither
``transformers`` nor ``lightning``:

* :class:`IndexedDataset`, :class:`IndexCollate`, :func:`four_d_attention_mask`, :func:`step_weights`
  (:mod:`explaind.integrations.data`, torch only);
* :class:`ExplaindTrainerCallback` (:mod:`explaind.integrations.hf`, needs ``transformers`` and ``accelerate``);
* :class:`ExplaindLightningCallback` (:mod:`explaind.integrations.lightning`, needs ``lightning``).
"""

from __future__ import annotations

from .. import _lazy_exports

_EXPORTS = {
    "IndexedDataset": "data",
    "IndexCollate": "data",
    "four_d_attention_mask": "data",
    "step_weights": "data",
    "ExplaindTrainerCallback": "hf",
    "ExplaindLightningCallback": "lightning",
}

__all__ = list(_EXPORTS)

__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
