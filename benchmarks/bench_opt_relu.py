"""OPT's ReLU feed-forward against the quadrature rules: what the adaptive rule's cap costs and what to pick.

Run ``python benchmarks/bench_opt_relu.py [--layers 2] [--rules ...]``. Builds from a config (no download) a tiny
Hugging Face ``OPTForCausalLM`` (16-wide, 2 heads, ReLU feed-forward 32 wide, every dropout 0), trains it in float64
with AdamW (3 steps of 4 sequences of 8 tokens, lr 0.02, the next-token loss) and replicates 2 held-out sequences'
logits (all 240 per sequence) with ``KernelReplica`` under each rule, in one process, one after the other:

* ``adaptive`` at ``tol`` 1e-7 (the default), 1e-5 and 1e-3: error-controlled; where the path crosses more kinks
  than the evaluation cap (``explaind.kernel.adaptive.MAX_EVALS`` per (step, input)) lets it locate, it stops there
  with a warning;
* ``midpoint`` with 1,000 and 4,000 nodes: a known number of evaluations at an error it reports.

Columns: seconds (process CPU time, one thread), evaluations of the explained function over all steps and inputs,
the replica's largest relative error against the trained model in evaluation mode (``fidelity_report``'s
``model_max_rel_error``), the largest relative quadrature error of a (step, input) the replica reports, and
whether an ``ExplaindWarning`` came (its first words).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

import explaind
from explaind.exceptions import ExplaindWarning

DT = torch.float64
VOCAB, LENGTH, N = 30, 8, 12
RULES = {"adaptive-1e-7": dict(quadrature="adaptive", tol=1e-7),
         "adaptive-1e-5": dict(quadrature="adaptive", tol=1e-5),
         "adaptive-1e-3": dict(quadrature="adaptive", tol=1e-3),
         "midpoint-1000": dict(quadrature="midpoint", nodes=1000),
         "midpoint-4000": dict(quadrature="midpoint", nodes=4000)}


def _opt(layers: int):
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=layers, ffn_dim=32, num_attention_heads=2,
                    max_position_embeddings=16, word_embed_proj_dim=16, dropout=0.0, attention_dropout=0.0,
                    activation_dropout=0.0, layerdrop=0.0, pad_token_id=1)
    return OPTForCausalLM(cfg).to(DT)


def _train(layers: int):
    tokens = torch.randint(1, VOCAB, (N + 2, LENGTH), generator=torch.Generator().manual_seed(1))
    model = _opt(layers).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": tokens[:N]}, tokens[:N]))
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(3):
            idx = torch.randperm(N, generator=gen)[:4]
            opt.zero_grad()
            logits = model(input_ids=tokens[idx]).logits
            F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[idx][:, 1:].reshape(-1)).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory, {"input_ids": tokens[N:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rules", default=",".join(RULES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, traj, X = _train(args.layers)
    print(f"OPT, {args.layers} layer(s), 3 AdamW steps, 2 held-out sequences, float64, one thread\n")
    print("| rule | seconds | evaluations | replica vs trained model | largest relative quadrature error | warning |")
    print("|---|---|---|---|---|---|")
    for name in args.rules.split(","):
        t0 = time.process_time()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always", ExplaindWarning)
            report = explaind.KernelReplica(device="cpu", **RULES[name]).fit(traj).fidelity_report(X, model=model)
        seconds = time.process_time() - t0
        said = [str(w.message) for w in seen if issubclass(w.category, ExplaindWarning)]
        print(f"| {name} | {seconds:.1f} | {int(report['total_evals']):,} | {report['model_max_rel_error']:.1e} | "
              f"{float(report['relative_quadrature_error'].max()):.1e} | {said[0][:60] + '...' if said else 'none'} |",
              flush=True)


if __name__ == "__main__":
    main()
