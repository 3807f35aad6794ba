r"""The data side of the framework callbacks: datasets that yield their indices, and step weights.

A framework (Hugging Face ``Trainer``, Lightning) owns the training loop, so the recorder cannot
be told which samples a batch holds. :class:`IndexedDataset` adds each item's position to the
item (``item["explaind_index"] = i``); :class:`IndexCollate` carries those positions through any
collator (also one that drops unknown keys) as one ``(B,)`` tensor in the batch, and the callback
takes it out again before the model sees the batch.

:func:`step_weights` turns the micro-batches of one optimizer step into the sample weights
:math:`w_{s,k}` of docs/maths.md §1, for the two ways frameworks normalise the loss:

* ``"step"``: one mean over every counted term of the step (Hugging Face with
  ``num_items_in_batch``): :math:`w_k = n_k / \sum_{j \in \text{step}} n_j`;
* ``"micro_batch"``: a mean per micro-batch, divided by the number of micro-batches :math:`M`
  (the loss scaling of gradient accumulation): :math:`w_k = n_k / (M \sum_{j \in \text{micro-batch}} n_j)`,

with :math:`n_k` the counted terms of sample :math:`k` (tokens of a token loss, else 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from ..exceptions import ConfigError, TrajectoryError
from ..records import LossRecord
from ..trajectory._common import TrainData, resolve_loss_record

__all__ = ["IndexedDataset", "IndexCollate", "four_d_attention_mask", "step_weights", "INDEX_KEY", "Normalization",
           "MaskForm"]

#: The item key that carries a sample's position in the training set.
INDEX_KEY = "explaind_index"

Normalization = Literal["step", "micro_batch"]
#: How :meth:`IndexedDataset.train_data` stores a 2-D ``attention_mask`` (see there).
MaskForm = Literal["keep", "bidirectional", "causal", "key_padding"]


class IndexedDataset(torch.utils.data.Dataset):
    """A map-style dataset of mapping items (Hugging Face style), each with its position added.

    Parameters
    ----------
    dataset : map-style dataset
        Items are mappings such as ``{"input_ids": ..., "attention_mask": ..., "labels": ...}``.
    label_key : str
        The key of the targets (``"labels"``); :meth:`train_data` splits it off the model inputs.
    index_key : str
        The key added to every item.
    """

    def __init__(self, dataset: Any, *, label_key: str = "labels", index_key: str = INDEX_KEY):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise ConfigError(f"IndexedDataset needs a map-style dataset (with __getitem__ and __len__), got "
                              f"{type(dataset).__name__}.")
        self.dataset, self.label_key, self.index_key = dataset, label_key, index_key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        if not isinstance(item, Mapping):
            raise ConfigError(f"IndexedDataset: item {i} is a {type(item).__name__}; the items must be mappings "
                              f"(e.g. {{'input_ids': ..., 'labels': ...}}) so the index can be added as "
                              f"{self.index_key!r}.")
        if self.index_key in item:
            raise ConfigError(f"IndexedDataset: item {i} already has the key {self.index_key!r}; pass another "
                              f"index_key=.")
        return {**item, self.index_key: i}

    def train_data(
        self, collate_fn: Callable[[list[Any]], Any] | None = None, *,
        attention_mask: MaskForm = "keep",
    ) -> tuple[dict[str, Tensor], Tensor]:
        """All items as ``(X, y)`` for the recorder: ``X`` the model inputs, ``y`` the ``label_key`` entries.

        Parameters
        ----------
        collate_fn : callable, optional
            Collates the list of all items (default: stacks each key's values, which must share one shape);
            pass the training collator when it pads.
        attention_mask : {"keep", "bidirectional", "causal", "key_padding"}
            ``"bidirectional"``/``"causal"`` replace a 2-D ``attention_mask`` by the equivalent 4-D mask
            (:func:`four_d_attention_mask`), which explaind can evaluate one input at a time;
            ``"key_padding"`` by the boolean ``(n, 1, 1, L)`` mask ``mask[:, None, None, :]``, which every query
            broadcasts over: for encoder-decoders, whose cross-attention applies the source mask to the decoder's
            queries (a square ``(n, 1, L, L)`` mask has the wrong number of query rows there).
        """
        if attention_mask not in ("keep", "bidirectional", "causal", "key_padding"):
            raise ConfigError(f"attention_mask={attention_mask!r} is not allowed. Choose one of: 'keep', "
                              f"'bidirectional', 'causal', 'key_padding' (encoder-decoders).")
        items = [{k: v for k, v in self.dataset[i].items()} for i in range(len(self))]
        batch = collate_fn(items) if collate_fn is not None else _stack(items)
        if self.label_key not in batch:
            raise ConfigError(f"IndexedDataset.train_data: the items have no {self.label_key!r} entry; pass the key "
                              f"of the targets as label_key=.")
        X = {k: torch.as_tensor(v) for k, v in batch.items() if k not in (self.label_key, self.index_key)}
        rows = {k: tuple(v.shape) for k, v in [*X.items(), (self.label_key, torch.as_tensor(batch[self.label_key]))]
                if v.dim() > 0 and v.shape[0] != len(items)}
        if rows:
            raise ConfigError(
                f"IndexedDataset.train_data: collate_fn={type(collate_fn).__name__} returned {rows} for "
                f"{len(items)} items, not one row per item: explaind recomputes each sample's gradient from its own "
                f"row (a collator that packs a batch into one row, DataCollatorWithFlattening, gives 1). Fix: pass "
                f"a collator that pads (DataCollatorWithPadding, DataCollatorForSeq2Seq for labels) as collate_fn= "
                f"here, or give the callback (X, y) padded yourself (labels -100 at the padding); the Trainer may "
                f"keep the packing collator.")
        if attention_mask == "key_padding" and "attention_mask" in X:
            X["attention_mask"] = X["attention_mask"].bool()[:, None, None, :].contiguous()
        elif attention_mask != "keep" and "attention_mask" in X:
            X["attention_mask"] = four_d_attention_mask(X["attention_mask"], causal=attention_mask == "causal")
        return X, torch.as_tensor(batch[self.label_key])


def _stack(items: list[Mapping[str, Any]]) -> dict[str, Tensor]:
    out = {}
    for key in items[0]:
        values = [torch.as_tensor(item[key]) for item in items]
        if len({tuple(v.shape) for v in values}) > 1:
            raise ConfigError(f"IndexedDataset.train_data: the entries {key!r} have different shapes; pass the "
                              f"training collator (e.g. the Trainer's data_collator) as collate_fn= to pad them.")
        out[key] = torch.stack(values)
    return out


class IndexCollate:
    """Wrap a collator so that the items' positions reach the batch as one ``(B,)`` int64 tensor.

    The positions are taken out of the items before ``collate_fn`` runs (so it never sees the key)
    and put into the collated mapping under ``index_key`` afterwards.
    """

    def __init__(self, collate_fn: Callable[[list[Any]], Any], index_key: str = INDEX_KEY):
        self.collate_fn, self.index_key = collate_fn, index_key

    def __call__(self, items: list[Any]) -> Any:
        if not items or not all(isinstance(it, Mapping) and self.index_key in it for it in items):
            return self.collate_fn(items)
        positions = torch.tensor([int(it[self.index_key]) for it in items], dtype=torch.long)
        batch = self.collate_fn([{k: v for k, v in it.items() if k != self.index_key} for it in items])
        if not isinstance(batch, MutableMapping):
            raise ConfigError(f"the data collator returned a {type(batch).__name__}; the explaind callbacks need a "
                              f"mapping batch (e.g. a dict or BatchEncoding) to carry {self.index_key!r}.")
        batch[self.index_key] = positions
        return batch


def four_d_attention_mask(mask: Tensor, *, causal: bool = False) -> Tensor:
    """A 2-D padding mask ``(n, L)`` as the equivalent 4-D boolean attention mask ``(n, 1, L, L)``.

    Query ``i`` may attend key ``j`` where ``mask[j]`` is set (and ``j <= i`` when ``causal``).
    Hugging Face models take such a mask as it is, without the value-dependent shortcut a 2-D
    mask goes through, so the model can be evaluated under ``torch.func.vmap``.
    """
    if mask.dim() != 2:
        raise ConfigError(f"four_d_attention_mask: expects a (n, length) padding mask, got shape {tuple(mask.shape)}.")
    n, L = mask.shape
    allowed = mask.bool()[:, None, None, :].expand(n, 1, L, L)
    if causal:
        allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=mask.device).tril()
    return allowed.contiguous()


def step_weights(loss: str | LossRecord, data: Any, micro_batches: Sequence[Tensor], normalization: Normalization,
                 dtype: torch.dtype, total: float | None = None) -> list[Tensor]:
    r"""Weights ``(B_m,)`` of each micro-batch of one optimizer step (see the module docstring).

    Parameters
    ----------
    loss : str or LossRecord
        A registered name or record; its ``counts`` give :math:`n_k` (1 per sample when ``None``).
    data : (X, y) or TrainData
        The training set the positions refer to.
    micro_batches : sequence of Tensor
        Positions ``(B_m,)`` of every micro-batch of the step.
    normalization : {"step", "micro_batch"}
    dtype : torch.dtype
    total : float, optional
        ``"step"``: the divisor the framework used (Hugging Face's ``num_items_in_batch``), which need not
        equal :math:`\sum n_j` (it may count tokens the loss does not); default :math:`\sum n_j`.
    """
    if not micro_batches:
        raise TrajectoryError("step_weights: the step has no micro-batch.")
    loss, data = resolve_loss_record(loss), data if isinstance(data, TrainData) else TrainData(data)
    counts = []
    for idx in micro_batches:
        if loss.counts is None:
            counts.append(torch.ones(idx.shape[0], dtype=dtype))
        else:
            counts.append(torch.as_tensor(loss.counts(data.get(idx)[1])).detach().to("cpu", dtype))
    if normalization == "step":
        divisor = torch.tensor(float(total), dtype=dtype) if total is not None else sum(c.sum() for c in counts)
        return [c / divisor.clamp_min(1) for c in counts]
    if normalization == "micro_batch":
        return [c / c.sum().clamp_min(1) / len(counts) for c in counts]
    raise ConfigError(f"normalization={normalization!r} is not allowed. Choose one of: 'step', 'micro_batch'.")
