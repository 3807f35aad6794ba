"""Trainer and Lightning runs a new user sets up that no other test contains: exact, or refused naming the fix.

A RoBERTa sequence classifier (built from a config, float64, every dropout 0) trained by the Hugging Face
``Trainer`` with gradient accumulation 3 over an epoch that does not divide into it, a cosine schedule with
warm-up, weight decay, clipping and a label-smoothed loss given as a callable; the slow reference is
``MappingReference`` (tests/_hf_testkit.py). Refused: ``label_smoothing_factor`` that the Trainer would ignore,
NEFTune, two Lightning optimizers, and mapping inputs the recorded module's ``forward`` does not take.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import CrossEntropyModule, fit_lightning, indexed
from _hf_testkit import LENGTH, VOCAB, MappingReference, cls_data, lm_data, tiny_gpt2, trainer_args
from reference import rel_err
from torch import nn
from transformers import RobertaConfig, RobertaForSequenceClassification, Trainer, TrainingArguments

import explaind
from explaind.exceptions import ConfigError
from explaind.integrations import (
    ExplaindLightningCallback,
    ExplaindTrainerCallback,
    IndexedDataset,
    four_d_attention_mask,
)

DT = torch.float64
N = 25  # batches of 4 with accumulation 3: steps of 3, 3 and 1 micro-batches per epoch


def _smoothed(out, target):
    return F.cross_entropy(out, target, label_smoothing=0.1)


def _roberta() -> RobertaForSequenceClassification:
    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=LENGTH + 4, pad_token_id=0,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
    cfg._attn_implementation = "sdpa"
    return RobertaForSequenceClassification(cfg).to(DT)


def _args(tmp_path, **overrides) -> TrainingArguments:
    return trainer_args(tmp_path, **{**dict(per_device_train_batch_size=4, gradient_accumulation_steps=3, max_steps=4,
                                          learning_rate=5e-2, lr_scheduler_type="cosine", warmup_steps=1,
                                          weight_decay=0.01, max_grad_norm=1.0), **overrides})


def test_trainer_label_smoothed_loss_callable_with_accumulation_3_is_exact(tmp_path):
    """Before the fix the recorder refused step 0: its loss-callable check expected the micro-batch's weights,
    divided by the Trainer's 12 samples of the step, to sum to 1."""
    ids, mask, y = cls_data(N)
    data = IndexedDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N)])
    model = _roberta()
    callback = ExplaindTrainerCallback(data, loss=_smoothed, attention_mask="bidirectional", check_gradients=True)
    Trainer(model=model, args=_args(tmp_path), train_dataset=data, callbacks=[callback],
            compute_loss_func=callback.compute_loss).train()
    traj = callback.trajectory
    assert [traj.batch(s)[0].numel() for s in range(traj.n_steps)] == [12, 12, 1, 12]
    assert max(traj.gradient_check()) <= 1e-12
    test_ids, test_mask, _ = cls_data(3, seed=7)
    X = {"input_ids": test_ids, "attention_mask": four_d_attention_mask(test_mask)}
    with torch.no_grad():
        truth = model.eval()(input_ids=test_ids, attention_mask=test_mask).logits
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    assert att.meta["residual_share"] <= 1e-9
    ref = MappingReference(traj, X, loss_fn=lambda out, t: F.cross_entropy(out, t, label_smoothing=0.1,
                                                                             reduction="none"))
    assert float(ref.quad_error.abs().max()) <= 1e-8
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def _xy():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(12, 5, generator=gen, dtype=DT), torch.randint(0, 3, (12,), generator=gen)


def _gpt2_trainer(tmp_path, model=None, **overrides) -> tuple[Trainer, ExplaindTrainerCallback]:
    ids, labels = lm_data(8)
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(8)])
    callback = ExplaindTrainerCallback(data, loss="causal_lm")
    return Trainer(model=model or tiny_gpt2(), args=_args(tmp_path, gradient_accumulation_steps=1, **overrides),
                   train_dataset=data, callbacks=[callback], compute_loss_func=callback.compute_loss), callback


def test_trainer_label_smoothing_factor_ignored_by_compute_loss_func_is_refused(tmp_path):
    """The Trainer drops label_smoothing_factor when compute_loss_func is set: before, the run trained unsmoothed."""
    model = tiny_gpt2()
    trainer, _ = _gpt2_trainer(tmp_path, model, label_smoothing_factor=0.1)
    with pytest.raises(ConfigError, match=r"label_smoothing_factor=0.1\) has no effect.*Fix: set "
                                          r"label_smoothing_factor=0 and give the callback the smoothed loss"):
        trainer.train()
    trainer, callback = _gpt2_trainer(tmp_path, model, max_steps=1)  # the refused callback let go of the model
    trainer.train()
    assert callback.trajectory.n_steps == 1


def test_trainer_neftune_is_refused(tmp_path):
    """NEFTune's noise hook is removed after training: before, the residual share was 7.6e3 with a dropout hint."""
    with pytest.raises(ConfigError, match=r"neftune_noise_alpha=5.0\).*Fix: train with neftune_noise_alpha=None"):
        _gpt2_trainer(tmp_path, neftune_noise_alpha=5.0)[0].train()


class _TwoOptimizers(pl.LightningModule):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.model = net
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        for opt in self.optimizers():
            opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.model(batch["x"]), batch["labels"]))
        for opt in self.optimizers():
            opt.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.model[0].parameters(), lr=0.1),
                torch.optim.SGD(self.model[2].parameters(), lr=0.1)]


def test_lightning_two_optimizers_are_refused_naming_one_optimizer_with_groups(tmp_path):
    train = indexed(*_xy())
    callback = ExplaindLightningCallback((train.train_data()[0]["x"], _xy()[1]), loss="cross_entropy", module="model")
    with pytest.raises(ConfigError, match=r"returned 2\..*Fix: return one optimizer with a parameter group"):
        fit_lightning(tmp_path, _TwoOptimizers(_mlp()), callback, train, max_steps=1, batch=4, accumulate=1)


def test_lightning_mapping_keys_the_forward_does_not_take_are_refused_then_exact_with_explicit_data(tmp_path):
    """``self.model(batch["x"])`` on an ``nn.Sequential``: before, a raw TypeError inside optimizer.step()."""
    X, y = _xy()
    train = indexed(X, y)
    refused = ExplaindLightningCallback(train, loss="cross_entropy", module="model")
    module = CrossEntropyModule(_mlp(), lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9))
    with pytest.raises(ConfigError, match=r"inputs \['x'\] are passed to the recorded model as keyword arguments.*"
                                          r"Sequential\.forward\(input\).*Fix:.*train_data=\(X, y\)"):
        fit_lightning(tmp_path, module, refused, train, max_steps=1, batch=4, accumulate=1)
    net = _mlp()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")
    fit_lightning(tmp_path, CrossEntropyModule(net, lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)), callback,
                  train, max_steps=3, batch=4, accumulate=1)
    X_test = torch.randn(3, 5, generator=torch.Generator().manual_seed(5), dtype=DT)
    with torch.no_grad():
        truth = net.eval()(X_test)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(callback.trajectory).predict(X_test), truth) <= 1e-6
