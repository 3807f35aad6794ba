"""The errors behind tests/test_trainer_options.py and tests/test_lightning_options.py, printed as one table.

The tests assert bounds (replica <= 1e-6 relative to the trained model, residual share <= 1e-9, train scores
<= 1e-9 relative to the slow loop reference); this script trains the same runs with the tests' own helpers and
prints the measured values per option: the replica's relative error, the residual share, the train scores'
relative error against the reference (``-`` where the run has dropout, which the reference does not replay) and
the largest gradient-check mismatch (``-`` where no step was checked).

Run from the repository root: ``PYTHONPATH=.:plugins python benchmarks/bench_framework_options.py``.
"""

from __future__ import annotations

import atexit
import logging
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_lightning_options as lit  # noqa: E402
import test_trainer_options as hf  # noqa: E402
from _framework_testkit import CrossEntropyModule  # noqa: E402
from _hf_testkit import MappingReference, cls_data, mask_4d  # noqa: E402
from reference import Reference, rel_err  # noqa: E402
from transformers import DataCollatorWithPadding, Trainer  # noqa: E402

import explaind  # noqa: E402
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset  # noqa: E402


def _per_sample_ce(out, t):
    return F.cross_entropy(out, t, reduction="none")


def _per_sample_smoothed(out, t):
    return F.cross_entropy(out, t, label_smoothing=0.1, reduction="none")


def _errors(model, traj, X, truth, reference) -> tuple[float, float, float, float]:
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu", residual_tol=1.0).fit(traj).transform(X)
    ref = np.nan if reference is None else rel_err(att.values, reference(traj, X).kept(("train",)))
    checked = np.asarray(traj.gradient_check(), dtype=float)
    return replica, att.meta["residual_share"], ref, float(np.nanmax(checked)) if np.isfinite(checked).any() else np.nan


def _mlp_hf(model, traj, reference=True):
    X = {"x": torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)}
    with torch.no_grad():
        truth = model(**X).logits
    reference = (lambda tr, x: MappingReference(tr, x, loss_fn=_per_sample_ce)) if reference else None
    return _errors(model, traj, X, truth, reference)


def _mlp_lightning(model, traj, reference=True):
    X = torch.randn(3, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    with torch.no_grad():
        truth = model(X)
    return _errors(model, traj, X, truth, Reference if reference else None)


def _bert(model, traj, loss=_per_sample_ce):
    ids, mask, _ = cls_data(3, seed=7)
    X = {"input_ids": ids, "attention_mask": mask_4d(mask)}
    with torch.no_grad():
        truth = model(input_ids=ids, attention_mask=mask).logits
    return _errors(model, traj, X, truth, lambda tr, x: MappingReference(tr, x, loss_fn=loss))


def _bert_run(tmp, *, dynamic, loss, **overrides):
    train = IndexedDataset(hf._bert_items(dynamic=dynamic))
    extra = {}
    if dynamic:
        extra["data_collator"] = DataCollatorWithPadding(hf._tokenizer())
        data = train.train_data(collate_fn=extra["data_collator"], attention_mask="bidirectional")
        callback = ExplaindTrainerCallback(data, loss=loss)
    else:
        callback = ExplaindTrainerCallback(train, loss=loss, attention_mask="bidirectional")
    model = hf.tiny_bert()
    Trainer(model=model, args=hf._bert_args(tmp, **overrides), train_dataset=train, callbacks=[callback],
            **extra).train()
    return model.eval(), callback.trajectory


def main() -> None:
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp())
    atexit.register(shutil.rmtree, tmp, True)
    rows = {
        "Trainer accumulation 3, epoch of 7 micro-batches, check off":
            lambda: _mlp_hf(*hf._train(tmp / "a", callback_kwargs={"check_gradients": False})[:2]),
        "Seq2SeqTrainer, the same":
            lambda: _mlp_hf(*hf._train(tmp / "b", trainer_cls=hf.Seq2SeqTrainer,
                                       callback_kwargs={"check_gradients": False})[:2]),
        **{f"lr_scheduler_type={name}": (lambda name=name: _mlp_hf(*hf._train(
            tmp / name, evaluate="eval_strategy" in hf.SCHEDULES[name], **{"max_steps": 6, **hf.SCHEDULES[name]})[:2]))
           for name in sorted(hf.SCHEDULES)},
        **{f"optim={name}, weight_decay=0.1": (lambda name=name: _mlp_hf(*hf._train(
            tmp / name, optim=name, optim_args=None, weight_decay=0.1, learning_rate=0.05)[:2]))
           for name in ("adamw_torch", "adamw_torch_fused", "sgd")},
        "eval_strategy=steps, dropout 0.3":
            lambda: _mlp_hf(*hf._train(tmp / "e", hf.OwnLossMLP(dropout=0.3), evaluate=True, eval_strategy="steps",
                                       eval_steps=1, callback_kwargs={"check_gradients": True})[:2], reference=False),
        "dataloader_drop_last=True": lambda: _mlp_hf(*hf._train(tmp / "d", dataloader_drop_last=True)[:2]),
        "compute_loss override (micro-batch means)":
            lambda: _mlp_hf(*hf._train(tmp / "c", hf.KeywordLossMLP(), trainer_cls=hf.MeanLossTrainer)[:2]),
        "label_smoothing_factor=0.1, smoothed loss callable (BERT)":
            lambda: _bert(*_bert_run(tmp / "s", dynamic=False, loss=hf._smoothed, label_smoothing_factor=0.1),
                          loss=_per_sample_smoothed),
        "DataCollatorWithPadding + group_by_length (BERT)":
            lambda: _bert(*_bert_run(tmp / "p", dynamic=True, loss="cross_entropy",
                                     train_sampling_strategy="group_by_length")),
        "Lightning gradient_clip_algorithm=norm":
            lambda: _mlp_lightning(*lit._fit(tmp / "n", CrossEntropyModule(lit._mlp(), lit._sgd),
                                             gradient_clip_val=0.05, gradient_clip_algorithm="norm")),
        "Lightning OneCycleLR interval=step, AdamW":
            lambda: _mlp_lightning(*lit._fit(tmp / "o", lit.OneCycle(lit._mlp()), max_steps=6)),
        "Lightning limit_train_batches=3, max_steps=5":
            lambda: _mlp_lightning(*lit._fit(tmp / "l", CrossEntropyModule(lit._mlp(), lit._sgd), max_steps=5,
                                             limit_train_batches=3)),
        "Lightning resumed from ckpt_path, plain SGD": lambda: _mlp_lightning(*lit._resume(tmp / "r", momentum=0.0)),
    }
    print(f"| {'option':<66} | replica | residual share | train vs reference | gradient check |")
    print(f"|{'-' * 68}|---|---|---|---|")
    for name, run in rows.items():
        values = " | ".join("-" if np.isnan(v) else f"{v:.1e}" for v in run())
        print(f"| {name:<66} | {values} |")


if __name__ == "__main__":
    main()
