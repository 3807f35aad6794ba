"""Lightning runs recorded by ExplaindLightningCallback: a BERT classifier with accumulation, clipping, a schedule.

Float64 (``precision="64-true"``), every dropout 0, and once 0.1; the slow reference is ``MappingReplayReference``
(tests/_hf_testkit.py), which replays each micro-batch's recorded masks.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from _hf_testkit import N_TRAIN, assert_classifier_exact, cls_data, tiny_bert

from explaind.exceptions import ConfigError, TrajectoryError
from explaind.integrations import ExplaindLightningCallback, IndexedDataset


class Classifier(pl.LightningModule):
    """A Hugging Face sequence classifier inside a LightningModule, trained on the model's own loss."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.model = tiny_bert(dropout=dropout)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.8)}


def _items():
    ids, mask, y = cls_data()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N_TRAIN)]


def _fit(tmp_path, module, callback, data, max_steps=4):
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, gradient_clip_val=0.05, precision="64-true",
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=str(tmp_path))
    trainer.fit(module, loader)


def record_lightning_bert(tmp_path, dropout: float = 0.0):
    """The BERT classifier trained by Lightning (AdamW, StepLR, accumulation 2, clipping), every dropout
    ``dropout``; the trained model in evaluation mode and the trajectory."""
    data = IndexedDataset(_items())
    module = Classifier(dropout)
    callback = ExplaindLightningCallback(data, loss="cross_entropy", module="model", attention_mask="bidirectional",
                                         check_gradients=True)
    _fit(tmp_path, module, callback, data)
    return module.model.eval(), callback.trajectory


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    return record_lightning_bert(tmp_path_factory.mktemp("bert"))


def test_lightning_steps_hold_both_micro_batches_and_the_clipping(bert_run):
    _, traj = bert_run
    assert traj.n_steps == 4
    batches = [traj.batch(s)[0] for s in range(4)]
    assert all(b.numel() == 8 for b in batches)
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(N_TRAIN))
    weights = torch.cat([traj.batch(s)[1] for s in range(4)])
    assert torch.allclose(weights, torch.full_like(weights, 1 / 8))  # mean of 4, divided by 2 micro-batches
    assert any(traj.grad_scale(s) < 1 - 1e-6 for s in range(4))  # gradient_clip_val=0.05 acted
    assert max(traj.gradient_check()) <= 1e-7 and max(traj.audit()) <= 1e-12


def test_lightning_bert_replica_and_train_scores_are_exact(bert_run):
    model, traj = bert_run
    assert_classifier_exact(model, traj)


def test_lightning_bert_with_dropout_is_exact_with_each_micro_batchs_masks_replayed(tmp_path):
    model, traj = record_lightning_bert(tmp_path, dropout=0.1)
    assert traj.manifest.random_capture and [len(traj.micro_batches(s)) for s in range(4)] == [2] * 4
    assert all(m.state is not None for s in range(4) for m in traj.micro_batches(s))
    assert float(np.nanmax(traj.gradient_check())) <= 1e-7
    assert_classifier_exact(model, traj)  # the reference replays the recorded masks


def test_a_dataloader_without_indices_is_refused(tmp_path):
    callback = ExplaindLightningCallback(IndexedDataset(_items()), loss="cross_entropy", module="model")
    with pytest.raises(TrajectoryError, match="has no 'explaind_index'"):
        _fit(tmp_path, Classifier(), callback, _items(), max_steps=1)


def test_an_unknown_submodule_is_refused(tmp_path):
    callback = ExplaindLightningCallback(IndexedDataset(_items()), loss="cross_entropy", module="encoder")
    with pytest.raises(ConfigError, match="module='encoder'"):
        _fit(tmp_path, Classifier(), callback, IndexedDataset(_items()), max_steps=1)
