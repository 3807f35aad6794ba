"""The replica's memory on models with many outputs, bounded by bytes and not by the number of outputs.

A causal language model explains ``sequence x vocabulary`` outputs per input, and the adaptive rule evaluated its
rows ``chunk_size x 16`` at a time whatever that size: 2.5 GB for a GPT-2 of 536,064 parameters
(``benchmarks/bench_scale.py --cases gpt2 --gpt2-layers 2 --gpt2-width 128 --no-train-axis --where``; docs/scaling.md,
*Real widths*). Each evaluation now takes at most ``OUTPUT_BYTES`` of outputs
(:func:`explaind.kernel.evaluate.rows_for_outputs`). The tests shrink that budget so that a tiny GPT-2 meets it,
count the rows of every evaluation, and hold the replica to the unbounded run (rounding level) and to the trained
model.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from _hf_testkit import lm_data
from reference import rel_err
from test_token_models import _record_lm
from torch import nn

import explaind
from explaind.kernel import adaptive, adaptive_chunks, autograd, evaluate, layers, planning

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
ROWS = 3  # rows of outputs OUTPUT_BYTES is shrunk to
COPIES = 16  # output-sized tensors a row holds in an evaluation (evaluate.ROW_OUTPUT_COPIES)
UNIT_COPIES = 1024  # output-sized vectors the adaptive rule holds per unit (adaptive_chunks.UNIT_OUTPUT_COPIES)
QUAD = {"quadrature": "adaptive", "tol": 1e-10}


@pytest.fixture(scope="module")
def run():
    """A tiny float64 GPT-2 (vocabulary 30, sequences of 8: 240 outputs per input) after three AdamW steps (the
    token models' run); its trajectory, four test sequences and the trained model's logits on them."""
    model, traj = _record_lm(steps=STEPS)
    test_ids, _ = lm_data(4, seed=11)
    with torch.no_grad():
        truth = model(input_ids=test_ids).logits.reshape(4, -1)
    return traj, {"input_ids": test_ids}, truth


@pytest.fixture(scope="module")
def unbounded(run):
    """The replica with the default budget (every evaluation of this tiny model in one call)."""
    traj, X, _ = run
    return torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))


def spy_rows(monkeypatch: pytest.MonkeyPatch, n_outputs: int) -> list[tuple[str, int]]:
    """``OUTPUT_BYTES`` shrunk to ``ROWS`` rows of ``n_outputs`` float64 outputs; the rows of every evaluation."""
    monkeypatch.setattr(evaluate, "OUTPUT_BYTES", ROWS * COPIES * 8 * n_outputs, raising=False)
    seen: list[tuple[str, int]] = []

    def watch(cls: type, name: str, rows_of) -> None:
        original = getattr(cls, name)

        def spy(self, *args, _original=original):
            seen.append((name, rows_of(*args)))
            return _original(self, *args)

        monkeypatch.setattr(cls, name, spy)

    watch(layers.LayerEvaluator, "_row_batch", lambda stack, sidx, idx, t: int(t.shape[0]))
    watch(autograd.AutogradEvaluator, "_slopes_rows", lambda stack, sidx, idx, t: int(t.shape[0]))
    watch(autograd.AutogradEvaluator, "_grid", lambda stack, t: stack.n_steps * int(t.shape[0]) * stack.X.shape[0])
    return seen


@pytest.mark.parametrize("factored", ["auto", "never"])
def test_every_evaluation_of_the_replica_holds_at_most_output_bytes_and_the_replica_is_unchanged(
        run, unbounded, monkeypatch, factored):
    traj, X, truth = run
    seen = spy_rows(monkeypatch, truth.shape[1])
    replica = torch.as_tensor(explaind.KernelReplica(device="cpu", factored=factored, **QUAD).fit(traj).predict(X))
    kinds = {name for name, _ in seen}
    assert "_grid" in kinds and ({"_row_batch", "_slopes_rows"} & kinds), kinds  # first estimates and refinement
    assert max(rows for _, rows in seen) <= ROWS, seen  # 4096 rows (16 x chunk_size) a call before
    assert rel_err(replica, unbounded) <= 1e-13
    assert rel_err(replica, truth) <= 1e-6 and rel_err(unbounded, truth) <= 1e-6


def test_rows_for_outputs_takes_the_budget_in_rows_of_outputs_and_never_less_than_one():
    assert evaluate.ROW_OUTPUT_COPIES == COPIES
    per_row = COPIES * 8 * 64 * 1024  # a GPT-2 row: 64 positions x 1,024 tokens, float64
    assert evaluate.rows_for_outputs(64 * 1024, torch.float64) == evaluate.OUTPUT_BYTES // per_row
    assert evaluate.rows_for_outputs(64 * 1024, torch.float32) == evaluate.OUTPUT_BYTES // (per_row // 2)
    assert evaluate.rows_for_outputs(64 * 50_257, torch.float64) == 1  # GPT-2's vocabulary: one row a call
    assert evaluate.rows_for_outputs(10, torch.float64) > 16 * 256  # a classifier keeps chunk_size's rows


def spy_units(monkeypatch: pytest.MonkeyPatch, units: int, n_outputs: int) -> list[int]:
    """``RULE_BYTES`` shrunk to ``units`` (step, input) pairs; the units of every call of the adaptive rule."""
    monkeypatch.setattr(adaptive_chunks, "RULE_BYTES", units * UNIT_COPIES * 8 * n_outputs, raising=False)
    return spy_pairs(monkeypatch)


def spy_pairs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The (step, input) pairs of every call of the adaptive rule."""
    seen: list[int] = []
    original = adaptive.adaptive_plan

    def spy(est0, *args, **kwargs):
        seen.append(int(est0.shape[0]))
        return original(est0, *args, **kwargs)

    monkeypatch.setattr(adaptive, "adaptive_plan", spy)
    if hasattr(planning, "adaptive_plan"):  # where the rule was called from before (its own name)
        monkeypatch.setattr(planning, "adaptive_plan", spy)
    return seen


@pytest.mark.parametrize(("units", "calls"), [(1, [1] * 4 * STEPS), (4, [4] * STEPS), (9, [8, 4])])
def test_the_adaptive_rule_refines_the_inputs_in_chunks_within_rule_bytes_and_the_replica_is_unchanged(
        run, unbounded, monkeypatch, units, calls):
    """One (step, input) pair a call, one step's four inputs a call, two steps then one; all 12 pairs in one call
    before."""
    traj, X, truth = run
    seen = spy_units(monkeypatch, units, truth.shape[1])
    replica = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen == calls
    assert rel_err(replica, unbounded) <= 1e-13
    assert rel_err(replica, truth) <= 1e-6


def relu_mlp(width: int, lr: float):
    """A float64 ReLU MLP (8-width-width-3) after three SGD-momentum steps of learning rate ``lr``: the trained
    model in evaluation mode, its trajectory and eight test inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                          nn.Linear(width, 3)).double()
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(24, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:16], y[:16]))
    with rec:
        for _ in range(STEPS):
            idx = torch.randperm(16, generator=gen)[:8]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, X[16:]


def test_kinks_are_located_the_same_in_chunks_of_inputs(monkeypatch, caplog):
    """A ReLU MLP whose paths cross a few kinks each: every unit's kinks, panels and errors are its own."""
    model, traj, X = relu_mlp(32, 0.05)
    whole = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    seen = spy_units(monkeypatch, 2, 3)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.adaptive_chunks"):
        chunked = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen == [2] * 4 * STEPS and not caplog.records  # each step's inputs two at a time, none planned again
    assert rel_err(chunked, whole) <= 1e-13
    with torch.no_grad():
        assert rel_err(chunked, model(X)) <= 1e-6


def spy_evaluated_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The (step, input, node) rows of every evaluation of the factored evaluator (first estimates and refinement)."""
    seen: list[int] = []
    original = layers.LayerEvaluator._row_batch

    def spy(self, stack, sidx, idx, t):
        seen.append(int(t.shape[0]))
        return original(self, stack, sidx, idx, t)

    monkeypatch.setattr(layers.LayerEvaluator, "_row_batch", spy)
    return seen


def test_a_batch_kink_dense_at_its_first_estimates_is_planned_whole_before_any_chunk_is_refined(monkeypatch, caplog):
    """Its far units share a grid of nodes per step over the inputs: a decision over the whole batch that its first
    estimates take (the probe's). Every chunk's first estimate is taken first, the batch is then planned whole from
    them: one call of the rule, and not one row evaluated more than unchunked (before: six chunks of two pairs
    refined, then the batch planned again, its first estimates evaluated twice)."""
    _, traj, X = relu_mlp(128, 1.0)
    rows = spy_evaluated_rows(monkeypatch)
    with pytest.warns(explaind.exceptions.ExplaindWarning, match="crossed too many activation kinks"):
        whole = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    whole_rows, rows[:] = sum(rows), []
    seen = spy_units(monkeypatch, 2, 3)
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.adaptive_chunks"), \
            pytest.warns(explaind.exceptions.ExplaindWarning, match="crossed too many activation kinks"):
        chunked = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen == [8 * STEPS], seen
    assert sum(rows) == whole_rows, (sum(rows), whole_rows)
    assert any("first estimates" in r.getMessage() and "kink-dense" in r.getMessage() for r in caplog.records)
    assert rel_err(chunked, whole) <= 1e-13


def test_a_batch_found_kink_dense_only_by_its_chunks_refinement_is_planned_whole_from_their_first_estimates(
        monkeypatch, caplog):
    """The other way to the same decision: the first-estimate counts hidden from the early test (as for a batch
    that only a refinement level finds kink-dense), the chunks are refined until their summed counts make it
    certain, then the batch is planned whole, from the chunks' first estimates, equal to the unchunked plan."""
    _, traj, X = relu_mlp(128, 1.0)
    with pytest.warns(explaind.exceptions.ExplaindWarning, match="crossed too many activation kinks"):
        whole = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    seen = spy_units(monkeypatch, 2, 3)
    counts = adaptive_chunks.probe_counts
    monkeypatch.setattr(adaptive_chunks, "probe_counts", lambda *args: (counts(*args)[0], 0))  # none far
    with caplog.at_level(logging.WARNING, logger="explaind.kernel.adaptive_chunks"), \
            pytest.warns(explaind.exceptions.ExplaindWarning, match="crossed too many activation kinks"):
        chunked = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen[-1] == 8 * STEPS and set(seen[:-1]) == {2} and len(seen) <= 4 * STEPS, seen
    assert any("planned again as one batch" in r.getMessage() for r in caplog.records)
    assert rel_err(chunked, whole) <= 1e-13


@pytest.mark.parametrize(("width", "lr", "calls"), [(32, 0.05, [1] * 8 * STEPS), (128, 1.0, [8 * STEPS])])
def test_first_estimates_past_the_budget_are_evaluated_again_and_the_plans_are_unchanged(monkeypatch, width, lr,
                                                                                       calls):
    """``RULE_BYTES`` of one byte: chunks of one pair, no first estimate kept for the refinement (a few kinks) or
    for the whole plan (kink-dense); each is evaluated again where needed, the plans the same."""
    model, traj, X = relu_mlp(width, lr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", explaind.exceptions.ExplaindWarning)
        whole = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
        monkeypatch.setattr(adaptive_chunks, "RULE_BYTES", 1)
        seen = spy_pairs(monkeypatch)
        chunked = torch.as_tensor(explaind.KernelReplica(device="cpu", **QUAD).fit(traj).predict(X))
    assert seen == calls
    assert rel_err(chunked, whole) <= 1e-13


def test_unit_chunks_take_whole_steps_while_they_fit_else_even_slices_of_one_steps_inputs():
    assert adaptive_chunks.UNIT_OUTPUT_COPIES == UNIT_COPIES
    per_unit = UNIT_COPIES * 8 * 64 * 1024  # a GPT-2 (step, input) pair: 64 tokens of 1,024, float64
    assert adaptive_chunks.RULE_BYTES // per_unit == 2  # 1 GiB: two pairs
    assert adaptive_chunks.unit_chunks(3, 4, 64 * 1024, torch.float64) == [
        (s, s + 1, lo, lo + 2) for s in range(3) for lo in (0, 2)]
    assert adaptive_chunks.unit_chunks(3, 3, 64 * 1024, torch.float64) == [
        (s, s + 1, lo, hi) for s in range(3) for lo, hi in ((0, 2), (2, 3))]
    assert adaptive_chunks.unit_chunks(16, 7, 10, torch.float64) == [(0, 16, 0, 7)]  # a classifier: one chunk
    assert adaptive_chunks.unit_chunks(5, 2, 64 * 512, torch.float64) == [(0, 2, 0, 2), (2, 4, 0, 2), (4, 5, 0, 2)]
    assert adaptive_chunks.unit_chunks(2, 2, 64 * 50_257, torch.float64) == [  # never below one pair
        (0, 1, 0, 1), (0, 1, 1, 2), (1, 2, 0, 1), (1, 2, 1, 2)]
