"""A plain ``nn.Module`` trained by Lightning or by the Hugging Face Trainer, as the callback tests set them up.

The training set is an ``IndexedDataset`` of ``{"x": X[i], "labels": y[i]}`` items; the model takes ``x`` and
is trained on the mean cross entropy of each micro-batch, SGD with momentum 0.9, gradient accumulation over
``accumulate`` micro-batches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from explaind.integrations import IndexedDataset


class NoisyItems(torch.utils.data.Dataset):
    """``{"x": X[i] + noise, "labels": y[i]}`` with Gaussian noise (0.1) drawn anew at every ``__getitem__``: random
    augmentation, as a dataset's transform does it."""

    def __init__(self, X: Tensor, y: Tensor):
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"x": self.X[i] + 0.1 * torch.randn(self.X.shape[1:], dtype=self.X.dtype), "labels": self.y[i]}


def indexed(X: Tensor, y: Tensor) -> IndexedDataset:
    """``{"x": X[i], "labels": y[i]}`` items, each with its position."""
    return IndexedDataset([{"x": X[i], "labels": y[i]} for i in range(len(X))])


class CrossEntropyModule(pl.LightningModule):
    """``model`` as ``self.model`` (record it with ``module="model"``), with the optimizer ``make_optimizer`` builds."""

    def __init__(self, model: nn.Module, make_optimizer: Callable[[Any], torch.optim.Optimizer]):
        super().__init__()
        self.model = model
        self._make_optimizer = make_optimizer

    def training_step(self, batch, batch_idx):
        return F.cross_entropy(self.model(batch["x"]), batch["labels"])

    def configure_optimizers(self):
        return self._make_optimizer(self.parameters())


def fit_lightning(tmp_path, module: pl.LightningModule, callback: Any, train: IndexedDataset, *, max_steps: int,
                  batch: int, accumulate: int, **trainer_kwargs: Any) -> pl.Trainer:
    """``Trainer.fit`` on the CPU over a shuffled loader of ``train`` (seeded), without logging or checkpoints."""
    loader = torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    trainer = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=accumulate, accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback], default_root_dir=str(tmp_path),
                         **trainer_kwargs)
    trainer.fit(module, loader)
    return trainer


class KeywordInput(nn.Module):
    """``net`` called as the Trainer calls a model, ``model(x=...)``; the loss is the callback's ``compute_loss``."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def hf_trainer(tmp_path, model: nn.Module, callback: Any, train: IndexedDataset, *, max_steps: int, batch: int,
               accumulate: int, lr: float, **overrides: Any) -> Trainer:
    """A Trainer (not yet trained) with SGD momentum 0.9 at a constant ``lr``, no clipping unless overridden."""
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
                    max_steps=max_steps, learning_rate=lr, lr_scheduler_type="constant", optim="sgd",
                    optim_args="momentum=0.9", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True,
                    remove_unused_columns=False, report_to=[], save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, seed=0, dataloader_num_workers=0)
    return Trainer(model=model, args=TrainingArguments(**{**settings, **overrides}), train_dataset=train,
                   callbacks=[callback], compute_loss_func=callback.compute_loss)
