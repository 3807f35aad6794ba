"""Record a Hugging Face ``Trainer`` run and explain a causal language model's next-token loss by training sequence.

A tiny GPT-2 (built from a config, no download, float64, dropout 0) learns to count modulo the
vocabulary in steps of 3 from padded sequences of different lengths. The only explaind lines in the
training script are the :class:`~explaind.integrations.IndexedDataset` around the training set and the
callback (plus its ``compute_loss``, which keeps the loss in float64). The Trainer does gradient
accumulation, gradient clipping and a warm-up schedule as usual; the recorder measures all three.

Run ``python examples/hf_trainer.py`` (well under a minute) or with ``--tiny`` (used by the tests).
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import explaind
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

VOCAB, LENGTH = 16, 8


def sequences(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counting sequences, right-padded to LENGTH: input ids (pad 0) and labels (-100 at the padding)."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randint(1, VOCAB, (n, 1), generator=gen)
    ids = 1 + (start + 3 * torch.arange(LENGTH)) % (VOCAB - 1)
    lengths = torch.randint(4, LENGTH + 1, (n,), generator=gen)
    pad = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    return ids.masked_fill(pad, 0), ids.masked_fill(pad, -100)


def main(tiny: bool = False) -> dict:
    n_train, steps = (16, 3) if tiny else (64, 30)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    model = GPT2LMHeadModel(config).double()
    ids, labels = sequences(n_train, seed=1)
    train = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(n_train)])

    callback = ExplaindTrainerCallback(train, loss="causal_lm")
    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="explaind-hf-"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=steps, learning_rate=1e-2, warmup_steps=2,
                             max_grad_norm=1.0, weight_decay=0.01, optim="adamw_torch", use_cpu=True, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=train, callbacks=[callback],
            compute_loss_func=callback.compute_loss).train()
    traj = callback.trajectory

    test_ids, test_labels = sequences(4, seed=2)
    X = {"input_ids": test_ids}  # right padding needs no attention mask in a causal model
    fidelity = explaind.KernelReplica().fit(traj).fidelity_report(X, model=model.eval())
    att = explaind.InfluenceEstimator(keep=("train",), target="loss").fit(traj).transform(X, test_labels)
    scores = att.values[..., 0]  # (test, train): contribution of each training sequence to each test loss
    print(f"{traj.n_steps} steps recorded; replica vs the trained model: max rel. error "
          f"{fidelity['model_max_rel_error']:.1e}; residual share {att.meta['residual_share']:.1e}; "
          f"completeness gap {att.completeness_error():.1e}")
    for t in range(scores.shape[0]):
        order = torch.argsort(scores[t])
        print(f"test {t}: loss {float(att.total()[t, 0]):.3f}; most loss-lowering training sequences "
              f"{order[:3].tolist()}, most loss-raising {order[-2:].tolist()}")
    return {"fidelity": fidelity, "completeness_gap": att.completeness_error(),
            "residual_share": att.meta["residual_share"], "n_steps": traj.n_steps, "scores": scores}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    main(tiny=parser.parse_args().tiny)
