"""Record a Lightning run and explain a BERT-style sequence classifier's predictions by training sequence.

A tiny BERT classifier (built from a config, no download, float64, dropout 0) inside a
LightningModule learns whether token 1 occurs in a padded sequence. The training script adds only
the :class:`~explaind.integrations.IndexedDataset` and the callback; Lightning accumulates gradients
over two micro-batches, clips them and steps a learning-rate schedule, and the recorder measures each.

The recorder keeps the training inputs with the 4-D attention mask equivalent to the 2-D one
(``attention_mask="bidirectional"``): Hugging Face's handling of a 2-D mask branches on its values,
which ``torch.func.vmap`` cannot trace. The test inputs are given the same way.

Run ``python examples/lightning_callback.py`` (well under a minute) or with ``--tiny`` (used by the tests).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
from transformers import BertConfig, BertForSequenceClassification

import explaind
from explaind.integrations import ExplaindLightningCallback, IndexedDataset, four_d_attention_mask

VOCAB, LENGTH = 12, 8


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (pad 0), 2-D attention masks and labels (1 where token 1 occurs)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen) * mask
    return ids, mask, (ids == 1).any(1).long()


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=LENGTH, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0, num_labels=2)
        config._attn_implementation = "sdpa"
        self.model = BertForSequenceClassification(config)

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.7)}


def main(tiny: bool = False) -> dict:
    n_train, steps = (16, 3) if tiny else (64, 30)
    torch.manual_seed(0)
    ids, mask, y = sequences(n_train, seed=1)
    train = IndexedDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]}
                            for i in range(n_train)])
    module = Classifier()
    callback = ExplaindLightningCallback(train, loss="cross_entropy", module="model", attention_mask="bidirectional")
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2))
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=2, gradient_clip_val=1.0, precision="64-true",
                         accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         default_root_dir=tempfile.mkdtemp(prefix="explaind-lightning-"))
    trainer.fit(module, loader)
    traj = callback.trajectory

    test_ids, test_mask, test_y = sequences(4, seed=3)
    X = {"input_ids": test_ids, "attention_mask": four_d_attention_mask(test_mask)}
    fidelity = explaind.KernelReplica().fit(traj).fidelity_report(X, model=module.model)
    att = explaind.InfluenceEstimator(keep=("train",), target=test_y.tolist()).fit(traj).transform(X)
    scores = att.values[..., 0]  # (test, train): contribution to the logit of the true class
    checks = {"fidelity": fidelity, "completeness_gap": att.completeness_error(),
              "residual_share": att.meta["residual_share"]}
    print(f"{traj.n_steps} steps recorded (accumulation 2, clipping, StepLR); replica max rel. error "
          f"{fidelity['model_max_rel_error']:.1e}, residual share {checks['residual_share']:.1e}, completeness gap "
          f"{checks['completeness_gap']:.1e}")
    for t, row in enumerate(scores):
        top = torch.argsort(row, descending=True)[:3]
        print(f"test {t} (label {int(test_y[t])}, true-class logit {float(att.total()[t, 0]):+.3f}): most supporting "
              f"training sequences {top.tolist()} with labels {y[top].tolist()}")
    return {**checks, "scores": scores}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    main(tiny=parser.parse_args().tiny)
