"""Token models through the plain loop: a tiny GPT-2 with the next-token loss, a BERT-style sequence classifier.

Float64 throughout; every dropout is 0. The slow reference is ``MappingReference`` (per-sample
``autograd.grad`` loop, unrolled AdamW recurrence, Gauss–Legendre path integrals) with token losses
written as loops over positions.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _hf_testkit import (
    VOCAB,
    MappingReference,
    assert_classifier_exact,
    cls_data,
    lm_data,
    loop_token_loss,
    mask_4d,
    tiny_bert,
    tiny_gpt2,
)
from reference import rel_err

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError, UnsupportedModelError
from explaind.integrations import step_weights
from explaind.losses import batch_weights, resolve_loss


def _hf_lm_loss(logits, labels):
    """The batch loss Hugging Face trains a causal LM with (mean over the batch's counted next tokens)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


def _record_lm(steps: int = 4, batch: int = 6):
    model = tiny_gpt2()
    ids, labels = lm_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": ids}, labels),
                                      check_gradients=True)
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(3))
    with rec:
        for s in range(steps):
            idx = order[s * batch : (s + 1) * batch]
            opt.zero_grad()
            _hf_lm_loss(model(input_ids=ids[idx]).logits, labels[idx]).backward()
            rec.log_batch(idx)  # weights: each sample's share of the batch's counted tokens
            opt.step()
            sched.step()
    return model.eval(), rec.trajectory


@pytest.fixture(scope="module")
def lm_run():
    return _record_lm()


def test_causal_lm_per_sample_losses_and_weights_give_the_hf_batch_loss():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 8, VOCAB, generator=gen, dtype=torch.float64)
    ids, labels = lm_data(5, seed=4)
    labels[2, 1:] = -100  # a sample without any counted next token: loss 0, weight 0
    record = resolve_loss("causal_lm")
    per_sample = record.implementation(logits, labels)
    assert torch.allclose(per_sample, loop_token_loss(logits, labels, shift=True), rtol=1e-13, atol=1e-13)
    w = batch_weights(record, labels, torch.float64)
    counts = torch.tensor([sum(int(t != -100) for t in row[1:]) for row in labels], dtype=torch.float64)
    assert torch.equal(w, counts / counts.sum()) and w[2] == 0
    assert torch.allclose((w * per_sample).sum(), _hf_lm_loss(logits, labels), rtol=1e-13)
    token = resolve_loss("token_cross_entropy")
    assert torch.allclose(token.implementation(logits, labels), loop_token_loss(logits, labels, shift=False),
                          rtol=1e-13, atol=1e-13)
    with pytest.raises(ConfigError, match=r"logits of shape \(n, length, vocab\)"):
        record.implementation(logits[:, :, 0], labels)


def test_gpt2_replica_matches_the_trained_model(lm_run):
    model, traj = lm_run
    ids, _ = lm_data(4, seed=9)
    with torch.no_grad():
        truth = model(input_ids=ids).logits.reshape(4, -1)
    replica = torch.as_tensor(explaind.KernelReplica(device="cpu").fit(traj).predict({"input_ids": ids}))
    assert rel_err(replica, truth) <= 1e-6
    assert float(max(traj.gradient_check())) <= 1e-9  # every step's gradient is sum_k w_k grad l_k


def test_gpt2_next_token_loss_scores_match_the_loop_reference(lm_run):
    _, traj = lm_run
    ids, labels = lm_data(3, seed=9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), target="loss", tol=1e-11, device="cpu").fit(traj).transform(
            {"input_ids": ids}, labels)
    assert att.meta["residual_share"] <= 1e-9 and att.completeness_error() <= 1e-10
    ref = MappingReference(traj, {"input_ids": ids}, target="loss", y=labels,
                           loss_fn=lambda out, y: loop_token_loss(out, y, shift=True))
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9


def test_gpt2_chosen_position_and_token_scores_match_the_loop_reference(lm_run):
    _, traj = lm_run
    ids, _ = lm_data(3, seed=9)
    chosen = [(2, int(ids[0, 3])), (5, 7), (0, int(ids[2, 1]))]  # (position, next token) per test input
    att = explaind.InfluenceEstimator(keep=("train",), target=chosen, tol=1e-11, device="cpu").fit(traj).transform(
        {"input_ids": ids})
    flat = [pos * VOCAB + tok for pos, tok in chosen]
    ref = MappingReference(traj, {"input_ids": ids}, target=flat)
    assert att.values.shape == (3, traj.n_train, 1)
    assert rel_err(att.values, ref.kept(("train",))) <= 1e-9
    with pytest.raises(ConfigError, match=r"within the output shape \(8, 30\)"):
        explaind.InfluenceEstimator(keep=("train",), target=[(8, 0)] * 3, device="cpu").fit(traj).transform(
            {"input_ids": ids})


def _accumulate(weights_of):
    """Two micro-batches per step, each normalised by the step's total tokens (Hugging Face's num_items_in_batch)."""
    model = tiny_gpt2()
    ids, labels = lm_data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = ({"input_ids": ids}, labels)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=data, check_gradients=True)
    micro = [torch.arange(0, 3), torch.arange(3, 8)]
    total = sum(int((labels[m, 1:] != -100).sum()) for m in micro)
    with rec:
        opt.zero_grad()
        for m in micro:
            logits = model(input_ids=ids[m]).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[m, 1:].reshape(-1), ignore_index=-100,
                                   reduction="sum") / total
            loss.backward()
        for m, w in zip(micro, weights_of(rec, data, micro)):
            rec.log_batch(m, w)
        opt.step()
    return rec.trajectory


def test_token_accumulation_over_a_step_is_exact_with_step_weights():
    traj = _accumulate(lambda rec, data, micro: step_weights("causal_lm", data, micro, "step", torch.float64))
    # the check's own floor is ~sqrt(eps) (a difference of squares); the scale is exact
    assert float(traj.gradient_check()[0]) <= 1e-7 and abs(traj.grad_scale(0) - 1.0) <= 1e-12


def test_token_accumulation_with_per_micro_batch_weights_is_refused():
    with pytest.raises(TrajectoryError, match="Step 0"):
        _accumulate(lambda rec, data, micro: [None, None])  # token shares of each micro-batch: wrong scale per part


def test_token_loss_without_train_data_needs_weights():
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", check_gradients=False)
    with rec, pytest.raises(TrajectoryError, match="without train_data the recorder cannot count"):
        rec.log_batch(torch.arange(3))


def record_bert(mask_kind: str):
    model = tiny_bert()
    ids, mask, y = cls_data()
    X = {"input_ids": ids, "attention_mask": mask_4d(mask) if mask_kind == "4d" else mask}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    with rec:
        for s in range(4):
            idx = torch.arange(s * 6, s * 6 + 6)
            opt.zero_grad()
            model(input_ids=ids[idx], attention_mask=mask[idx], labels=y[idx]).loss.backward()  # HF's own loss
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory


def test_bert_classifier_is_explained_exactly_with_a_4d_mask():
    model, traj = record_bert("4d")
    assert_classifier_exact(model, traj)


def test_a_2d_attention_mask_that_vmap_cannot_trace_is_a_clear_error():
    _, traj = record_bert("2d")
    ids, mask, _ = cls_data(2, seed=7)
    with pytest.raises(UnsupportedModelError, match="four_d_attention_mask"):
        explaind.KernelReplica(device="cpu").fit(traj).predict({"input_ids": ids, "attention_mask": mask})
