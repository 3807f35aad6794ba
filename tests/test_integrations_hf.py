"""Hugging Face Trainer runs recorded by ExplaindTrainerCallback: gradient accumulation, clipping, a warm-up schedule.

Float64 models built from configs (no downloads), every dropout 0 except one GPT-2 run with dropout 0.2; the slow
reference is ``MappingReplayReference`` (tests/_hf_testkit.py), which replays each micro-batch's recorded masks.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _hf_testkit import (
    LENGTH,
    N_TRAIN,
    assert_classifier_exact,
    cls_data,
    lm_data,
    lm_figures,
    record_trainer_bert,
    record_trainer_gpt2,
    run_args,
    tiny_bert,
    tiny_gpt2,
)
from reference import rel_err
from transformers import Trainer

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset, four_d_attention_mask, step_weights
from explaind.losses import resolve_loss
from explaind.trajectory._common import TrainData


@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory):
    return record_trainer_gpt2(tmp_path_factory.mktemp("gpt2"))


def test_trainer_steps_are_recorded_with_their_samples_clipping_and_schedule(gpt2_run):
    _, traj = gpt2_run
    assert traj.n_steps == 4
    batches = [traj.batch(s)[0] for s in range(4)]
    assert all(b.numel() == 8 for b in batches)  # 2 micro-batches of 4 per step
    assert sorted(torch.cat(batches[:3]).tolist()) == list(range(N_TRAIN))  # the first epoch sees every sample once
    assert all(0 < traj.grad_scale(s) < 1 for s in range(4))  # max_grad_norm=0.5 clipped every step
    assert max(traj.gradient_check()) <= 1e-7 and max(traj.audit()) <= 1e-12


def test_trainer_gpt2_replica_and_next_token_scores_are_exact(gpt2_run):
    got = lm_figures(*gpt2_run)
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


def _assert_bert_replica(model, traj) -> dict:
    """The replica of a recorded BERT on 3 held-out inputs (4-D mask) within 1e-6 of ``model`` in evaluation mode."""
    test_ids, test_mask, _ = cls_data(3, seed=7)
    X = {"input_ids": test_ids, "attention_mask": four_d_attention_mask(test_mask)}
    with torch.no_grad():
        truth = model.eval()(input_ids=test_ids, attention_mask=test_mask).logits
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth) <= 1e-6
    return X


def test_trainer_bert_with_the_models_own_loss_is_exact(tmp_path):
    model, traj = record_trainer_bert(tmp_path)
    assert traj.n_steps == 3 and max(traj.gradient_check()) <= 1e-7
    assert_classifier_exact(model, traj)


def test_a_plain_dataset_is_refused_at_the_first_step(tmp_path):
    ids, labels = lm_data()
    items = [{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)]
    callback = ExplaindTrainerCallback(({"input_ids": ids}, labels), loss="causal_lm")
    trainer = Trainer(model=tiny_gpt2(), args=run_args(tmp_path, max_steps=1), train_dataset=items,
                      callbacks=[callback])
    with pytest.raises(TrajectoryError, match="no training batch carried 'explaind_index'"):
        trainer.train()


def test_step_weights_follow_the_two_normalisations():
    _, labels = lm_data()
    data = TrainData(({"input_ids": labels.clamp_min(0)}, labels))
    micro = [torch.tensor([0, 1, 2]), torch.tensor([3, 4])]
    n = [(labels[m, 1:] != -100).sum(1).double() for m in micro]
    loss = resolve_loss("causal_lm")
    step = step_weights(loss, data, micro, "step", torch.float64)
    assert all(torch.allclose(w, c / (n[0].sum() + n[1].sum())) for w, c in zip(step, n))
    given = step_weights(loss, data, micro, "step", torch.float64, total=50.0)
    assert all(torch.allclose(w, c / 50.0) for w, c in zip(given, n))
    per_micro = step_weights(loss, data, micro, "micro_batch", torch.float64)
    assert all(torch.allclose(w, c / c.sum() / 2) for w, c in zip(per_micro, n))
    logits = torch.randn(5, LENGTH, 30, dtype=torch.float64)
    per_sample = loss.implementation(logits, labels[:5])
    parts = [F.cross_entropy(logits[m, :-1].reshape(-1, 30), labels[m, 1:].reshape(-1), ignore_index=-100)
             for m in micro]
    assert torch.allclose(sum((w * per_sample[m]).sum() for w, m in zip(per_micro, micro)), sum(parts) / 2)


def test_trainer_bf16_autocast_is_recorded_and_its_residual_reported(tmp_path):
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2().float()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    Trainer(model=model, args=run_args(tmp_path, max_steps=2, bf16=True), train_dataset=data, callbacks=[callback],
            compute_loss_func=callback.compute_loss).train()
    traj = callback.trajectory
    # accelerate enters autocast inside model.forward; the recorder sees it and checks at the bf16 tolerance
    assert [traj.manifest.steps[s].autocast for s in range(2)] == ["bfloat16", "bfloat16"]
    assert 1e-5 < max(traj.gradient_check()) <= 1.5e-1
    final = tiny_gpt2().float()
    final.load_state_dict(model.state_dict())  # the trained parameters, run without the wrapped autocast
    X = {"input_ids": ids[:3]}
    with torch.no_grad():
        truth = final.eval()(**X).logits.reshape(3, -1)
    assert rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X), truth) <= 1e-4
    with pytest.warns(ExplaindWarning, match="residual share"):
        att = explaind.InfluenceEstimator(keep=("train",), target="loss", device="cpu").fit(traj).transform(
            X, labels[:3])
    assert 1e-4 < att.meta["residual_share"] < 0.1  # bf16 gradients differ from the float32 recomputation


def record_trainer_dropout_gpt2(tmp_path, p: float = 0.2):
    """GPT-2 (SDPA attention) with every dropout ``p``, trained by the Trainer (AdamW, next-token loss, accumulation
    2, clipping, warm-up): each micro-batch's random state is captured."""
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    callback = ExplaindTrainerCallback(data, loss="causal_lm")
    Trainer(model=model, args=run_args(tmp_path, max_steps=2), train_dataset=data, callbacks=[callback],
            compute_loss_func=callback.compute_loss).train()
    return model.eval(), callback.trajectory


def test_trainer_dropout_run_is_exact_with_random_state_capture(tmp_path):
    model, traj = record_trainer_dropout_gpt2(tmp_path)
    assert traj.manifest.random_capture and [len(traj.micro_batches(s)) for s in range(2)] == [2, 2]
    assert all(m.state is not None for s in range(2) for m in traj.micro_batches(s))
    got = lm_figures(model, traj)  # the reference replays each micro-batch's masks
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


def test_a_deep_copy_of_the_model_during_a_trainer_run_leaves_the_recording_exact(tmp_path):
    # a callback that snapshots the model every step (a best-model or EMA copy) copies its forward pre-hooks: the
    # callback's index hook must copy as an inert hook, so the snapshot neither fails nor feeds the recording
    import copy

    from transformers import TrainerCallback

    class Snapshot(TrainerCallback):
        def __init__(self):
            self.copies = []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            self.copies.append(copy.deepcopy(model))
            with torch.no_grad():  # the copy's forward: not one of the recorded model's
                self.copies[-1](input_ids=ids[:2], attention_mask=mask[:2])

    ids, mask, y = cls_data()
    data = IndexedDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N_TRAIN)])
    model = tiny_bert()
    callback = ExplaindTrainerCallback(data, loss="cross_entropy", attention_mask="bidirectional",
                                       check_gradients=True)
    snapshot = Snapshot()
    Trainer(model=model, args=run_args(tmp_path, max_steps=3), train_dataset=data,
            callbacks=[callback, snapshot]).train()
    assert len(snapshot.copies) == 3
    traj = callback.trajectory
    assert traj.n_steps == 3 and max(traj.gradient_check()) <= 1e-7
    _assert_bert_replica(model, traj)
