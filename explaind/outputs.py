"""The tensor a model's forward returns for explaind: its logits, whatever container holds them.

Models return a tensor, a tuple or list whose first element is the output (``return_dict=False``
models, ``(logits, hidden)`` pairs), a mapping or an object with a ``logits`` entry (Hugging Face
``ModelOutput``). :func:`model_output` picks the tensor that losses and explained quantities are
computed from. A mapping without ``logits`` whose logits are split over fields named ``*_logits``
(a question-answering head's ``start_logits`` and ``end_logits``, each ``(n, L)``) gives them stacked
along a new last axis in the mapping's order, ``(n, L, 2)``: both are explained, and a loss sees both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
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
    split = _split_logits(out)
    if split is not None:
        return split
    if isinstance(out, tuple | list) and out and isinstance(out[0], Tensor):
        return out[0]
    _refuse_pairwise(out)
    raise UnsupportedModelError(
        f"the model's forward returned {type(out).__name__}, which holds no output tensor explaind can use: "
        f"return a tensor, a tuple whose first element is the output, or an object/mapping with a 'logits' "
        f"tensor (e.g. a Hugging Face ModelOutput).{_fields_hint(out)}"
    )


def _fields_hint(out: Any) -> str:
    """For a mapping without logits: its tensor fields and tuples of tensors (a distribution head's parameters),
    and the wrapper that returns one of them as the output; ``""`` for anything else."""
    if not isinstance(out, Mapping):
        return ""
    fields: dict[str, Any] = {}
    for k, v in out.items():
        if isinstance(v, Tensor):
            fields[k] = tuple(v.shape)
        elif isinstance(v, tuple | list) and v and all(isinstance(t, Tensor) for t in v):
            fields[k] = [tuple(t.shape) for t in v]
    if not fields:
        return ""
    stacked = next((k for k, v in fields.items() if isinstance(v, list) and len(set(v)) == 1), None)
    pick = (f"torch.stack(model(**inputs).{stacked}, dim=-1) (its {len(fields[stacked])} tensors, e.g. a "
            f"distribution head's parameters, on a new last axis)" if stacked is not None
            else f"model(**inputs).{next(iter(fields))}")
    scaler = ""
    if stacked is not None and "loc" in fields and "scale" in fields:
        scaler = (f" The output also holds 'loc' and 'scale' (a scaler's shift and scale), which rescale the head's "
                  f"distribution (loc + scale * X): return them too, e.g. torch.stack([*out.{stacked}, "
                  f"out.loc.reshape(n, 1).expand(-1, steps), out.scale.reshape(n, 1).expand(-1, steps)], dim=-1) "
                  f"for one target series, and evaluate the log-likelihood at (y - loc) / scale minus log(scale).")
    return (f" It holds {fields}. Fix for a model you did not write: record and explain a module that holds it and "
            f"whose forward returns the tensor to explain, e.g. {pick}, train through that module, and give a loss "
            f"callable that reads that tensor (a distribution's negative log-likelihood built from it, for one)."
            f"{scaler}")


def _split_logits(out: Any) -> Tensor | None:
    """The tensors of a mapping's ``*_logits`` fields stacked on a new last axis (one field: itself).

    ``None`` when ``out`` is no mapping or has no such field.

    Raises
    ------
    UnsupportedModelError
        When the fields' shapes differ (they cannot be stacked), naming them and the fix.
    """
    if not isinstance(out, Mapping):
        return None
    fields = {k: v for k, v in out.items() if isinstance(k, str) and k.endswith("_logits") and isinstance(v, Tensor)}
    if len(fields) <= 1:
        return next(iter(fields.values()), None)
    shapes = {k: tuple(v.shape) for k, v in fields.items()}
    if len(set(shapes.values())) > 1:
        raise UnsupportedModelError(
            f"the model's forward returned {type(out).__name__} with the logit fields {shapes}, whose shapes differ, "
            f"so explaind cannot stack them into one output: return the logits to explain as a tensor, or under "
            f"'logits' (e.g. a module whose forward returns model(**inputs).{next(iter(fields))})."
        )
    return torch.stack(list(fields.values()), dim=-1)


def _refuse_pairwise(out: Any) -> None:
    """Refuse a contrastive model's output (``logits_per_image``, ``logits_per_text``: ``(n, n)``), naming why.

    Raises
    ------
    UnsupportedModelError
        When ``out`` has a ``logits_per_*`` tensor field (Hugging Face ``CLIPOutput``, ``SiglipOutput``).
    """
    items = out.items() if isinstance(out, Mapping) else vars(out).items() if hasattr(out, "__dict__") else ()
    pairwise = [k for k, v in items if isinstance(k, str) and k.startswith("logits_per_") and isinstance(v, Tensor)]
    if not pairwise:
        return
    raise UnsupportedModelError(
        f"the model's forward returned {type(out).__name__}, whose {pairwise} score every sample of the batch "
        f"against every other (a contrastive model, (n, n)): a sample's output, and a contrastive loss over them, "
        f"depend on the rest of its batch, so a training step has no split into per-sample terms and a test "
        f"input no output of its own (docs/maths.md section 1: the loss is a weighted sum of per-sample losses). "
        f"explaind explains per-sample outputs trained on per-sample losses. Fix: train and explain a per-sample "
        f"head, e.g. CLIPForImageClassification, or a module returning model.get_image_features(pixel_values) "
        f"@ class_text_embeddings.T with the class prompts' embeddings fixed (a buffer), on cross entropy."
    )
