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

import pytest
import torch
from _hf_testkit import lm_data, tiny_gpt2
from reference import rel_err

import explaind
from explaind.kernel import autograd, evaluate, layers

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH = 3, 6
ROWS = 3  # rows of outputs OUTPUT_BYTES is shrunk to
COPIES = 16  # output-sized tensors a row holds in an evaluation (evaluate.ROW_OUTPUT_COPIES)
QUAD = {"quadrature": "adaptive", "tol": 1e-10}


def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)


@pytest.fixture(scope="module")
def run():
    """A tiny float64 GPT-2 (vocabulary 30, sequences of 8: 240 outputs per input) after three SGD-momentum steps;
    the trained model in evaluation mode, its trajectory, four test sequences and the model's logits on them."""
    model = tiny_gpt2()
    ids, labels = lm_data()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": ids}, labels))
    order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(5))
    with rec:
        for s in range(STEPS):
            idx = order[s * BATCH:(s + 1) * BATCH]
            opt.zero_grad()
            _lm_loss(model(input_ids=ids[idx]).logits, labels[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    test_ids, _ = lm_data(4, seed=11)
    model.eval()
    with torch.no_grad():
        truth = model(input_ids=test_ids).logits.reshape(4, -1)
    return rec.trajectory, {"input_ids": test_ids}, truth


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
