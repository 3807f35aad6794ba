"""What Hugging Face's own causal-LM loss leaves in a float64 recording: the gradient check's mismatch per step.

Run from the repository root: ``PYTHONPATH=.:plugins:tests python benchmarks/bench_hf_own_loss.py [--steps 4]``.
Trains the tiny float64 GPT-2 of the tests (``tests/_hf_testkit.py``: one layer, 16 wide, 24 padded sequences of 8
tokens) with AdamW twice, 4 sequences per step, recorded with ``loss="causal_lm"`` and the gradient check on every
step: once on the model's own loss (``model(input_ids=..., labels=...).loss``, which transformers computes in float32
whatever the model's dtype), once on the same loss written in float64 (docs/guide_own_model.md, "The plain loop").
Prints the check's mismatch ``||g_loop - sigma g_recomputed|| / ||g_loop||`` per step for both, next to the check's
tolerance, and the residual share of ``keep=("train",)`` on 2 held-out sequences. The figures are errors, not times.
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from _hf_testkit import VOCAB, lm_data, tiny_gpt2

import explaind
from explaind.trajectory._checks import default_tolerance


def record(own_loss: bool, steps: int) -> tuple[list[float], float]:
    """Per-step gradient-check mismatches and the residual share of one run."""
    ids, labels = lm_data()
    model = tiny_gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": ids}, labels),
                                      check_gradients=True)
    with rec:
        for s in range(steps):
            idx = torch.arange(4 * s, 4 * s + 4) % ids.shape[0]
            opt.zero_grad()
            if own_loss:
                model(input_ids=ids[idx], labels=labels[idx]).loss.backward()
            else:
                logits = model(input_ids=ids[idx]).logits
                F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[idx, 1:].reshape(-1)).backward()
            rec.log_batch(idx)
            opt.step()
    test_ids, test_labels = lm_data(2, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        att = explaind.InfluenceEstimator(keep=("train",), target="loss").fit(rec.trajectory).transform(
            {"input_ids": test_ids}, test_labels)
    return [float(v) for v in rec.trajectory.gradient_check()], float(att.meta["residual_share"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}; gradient check tolerance {default_tolerance(torch.float64):.0e} (relative)")
    print(f"| loss | mismatch per step (steps 0..{args.steps - 1}) | residual share |")
    print("|---|---|---|")
    for name, own in (("model's own (float32 inside)", True), ("written in float64", False)):
        mismatch, share = record(own, args.steps)
        print(f"| {name} | {', '.join(f'{m:.1e}' for m in mismatch)} | {share:.1e} |")


if __name__ == "__main__":
    main()
