"""Hugging Face ``Trainer`` as people configure it, round 7: exact, or loud naming the cause and the fix.

Most runs train the float64 MLP of tests/test_trainer_options.py (its own mean loss, 25 samples in batches of 4,
gradient accumulation 3: an epoch of 7 micro-batches has steps of 3, 3 and 1; SGD momentum 0.9, gradient check off
unless a case needs it, through ``_train`` and ``_quiet`` of tests/test_stranger_hf_round5.py). The token runs use
the tiny GPT-2 and BERT of tests/_hf_testkit.py and a tiny T5 built from its config. "Exact": replica <= 1e-6
relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)`` <= 1e-9 relative to
the slow float64 loop reference (``MappingReference``). The figures go to ``_hf_stranger_kit.MEASURED``
(``python tests/hf_strangers_table.py test_stranger_hf_round7.py`` prints them).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import indexed
from _hf_stranger_kit import note
from _hf_testkit import N_TRAIN, assert_classifier_exact, classifier_figures, cls_data, lm_data, lm_figures, \
    loop_token_loss, tiny_bert, tiny_gpt2, trainer_args
from test_stranger_hf_round5 import _assert_exact, _quiet
from test_trainer_options import N, OwnLossMLP, _data, _train

from explaind.exceptions import ConfigError, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers")]


def _sizes(traj) -> list[int]:
    return [traj.batch(s)[0].numel() for s in range(traj.n_steps)]


# ---------------------------------------------------------------- resuming
def _checkpoint(tmp_path, **settings) -> None:
    """Two steps of 3 micro-batches of the MLP saved at ``checkpoint-2`` (``save_strategy="steps"``)."""
    X, y = _data()
    transformers.Trainer(model=OwnLossMLP(), args=_quiet(tmp_path, max_steps=2, save_strategy="steps", save_steps=2,
                                                         **settings),
                         train_dataset=[{"x": X[i], "labels": y[i]} for i in range(N)]).train()


def _resumed(tmp_path, resume, **settings):
    X, y = _data()
    model = OwnLossMLP()
    callback = ExplaindTrainerCallback(indexed(X, y), loss="cross_entropy", check_gradients=False)
    transformers.Trainer(model=model, args=_quiet(tmp_path, max_steps=5, save_strategy="steps", save_steps=2,
                                                  **settings),
                         train_dataset=indexed(X, y), callbacks=[callback]).train(resume_from_checkpoint=resume)
    return model.eval(), callback.trajectory


def test_resuming_with_ignore_data_skip_restarts_the_epoch_and_is_exact(tmp_path):
    """``ignore_data_skip=True``: the resumed run starts a fresh epoch (steps of 3, 3, 1 micro-batches) at step 2,
    where the run it resumes was at its epoch's last step (1 micro-batch)."""
    _checkpoint(tmp_path)
    model, traj = _resumed(tmp_path, str(tmp_path / "checkpoint-2"), ignore_data_skip=True)
    assert _sizes(traj) == [12, 12, 1]
    assert [float(traj.batch(s)[1][0]) for s in range(3)] == [1 / 12, 1 / 12, 1.0]
    _assert_exact(model, traj)


def test_resuming_the_latest_checkpoint_with_a_linear_schedule_and_adamw_is_exact(tmp_path):
    """``resume_from_checkpoint=True`` finds ``checkpoint-2`` itself; the linear schedule's state and AdamW's moments
    come back with it (the moments' part of the resumed updates is the ``initial_state`` term)."""
    settings = dict(optim="adamw_torch", optim_args=None, lr_scheduler_type="linear", learning_rate=0.05,
                    weight_decay=0.1)
    _checkpoint(tmp_path, **settings)
    model, traj = _resumed(tmp_path, True, **settings)
    assert _sizes(traj) == [1, 12, 12] and traj.initial_state()
    _assert_exact(model, traj)
