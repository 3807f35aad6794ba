"""The dataset wrapper, collator wrapper and 4-D mask of explaind.integrations: results and every refusal."""

from __future__ import annotations

import pytest
import torch

from explaind.exceptions import ConfigError
from explaind.integrations import IndexCollate, IndexedDataset, four_d_attention_mask

ITEMS = [{"input_ids": torch.tensor([i, i + 1, 0]), "labels": torch.tensor(i % 2)} for i in range(4)]


def test_items_carry_their_position_and_train_data_splits_the_labels():
    data = IndexedDataset(ITEMS)
    assert [data[i]["explaind_index"] for i in range(4)] == [0, 1, 2, 3]
    X, y = data.train_data()
    torch.testing.assert_close(X["input_ids"], torch.stack([it["input_ids"] for it in ITEMS]))
    torch.testing.assert_close(y, torch.tensor([0, 1, 0, 1]))
    assert set(X) == {"input_ids"}


def test_the_collator_wrapper_moves_the_positions_past_the_collator():
    seen = []

    def collate(items):
        seen.append(items)
        return {"input_ids": torch.stack([it["input_ids"] for it in items])}

    data = IndexedDataset(ITEMS)
    batch = IndexCollate(collate)([data[2], data[0]])
    assert all("explaind_index" not in it for it in seen[0])  # the user's collator never sees the key
    assert batch["explaind_index"].tolist() == [2, 0] and batch["explaind_index"].dtype == torch.long


def test_four_d_mask_equals_the_mask_built_entry_by_entry():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    for causal in (False, True):
        got = four_d_attention_mask(mask, causal=causal)
        assert got.shape == (2, 1, 3, 3) and got.dtype == torch.bool
        for n in range(2):
            for i in range(3):
                for j in range(3):
                    assert bool(got[n, 0, i, j]) == (bool(mask[n, j]) and (j <= i or not causal))


def test_refusals_name_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"map-style dataset.*got int"):
        IndexedDataset(3)
    with pytest.raises(ConfigError, match=r"item 0 is a tuple; the items must be mappings"):
        IndexedDataset([(1, 2)])[0]
    with pytest.raises(ConfigError, match=r"item 0 already has the key 'explaind_index'; pass another index_key="):
        IndexedDataset([{"explaind_index": 5}])[0]
    with pytest.raises(ConfigError, match=r"no 'target' entry; pass the key of the targets as label_key="):
        IndexedDataset(ITEMS, label_key="target").train_data()
    ragged = [{"input_ids": torch.zeros(2), "labels": 0}, {"input_ids": torch.zeros(3), "labels": 1}]
    with pytest.raises(ConfigError, match=r"'input_ids' have different shapes; pass the training collator"):
        IndexedDataset(ragged).train_data()
    with pytest.raises(ConfigError, match=r"collator returned a list; the explaind callbacks need a mapping"):
        IndexCollate(lambda items: [it["input_ids"] for it in items])([IndexedDataset(ITEMS)[0]])
    with pytest.raises(ConfigError, match=r"expects a \(n, length\) padding mask, got shape \(3,\)"):
        four_d_attention_mask(torch.ones(3))
