"""Float64 replays of Hugging Face models whose norms compute in float32: casts as written against kept float64.

Run ``python benchmarks/bench_casts.py [--cap N] [--models llama,t5] [--repeat R]``. Builds from configs (no
download) the tiny ``LlamaForCausalLM`` and ``T5ForConditionalGeneration`` of ``tests/test_stranger_models.py``,
trains each in float64 with AdamW (3 and 2 steps of 4 sequences, every dropout 0) and times the adaptive
``KernelReplica`` (default tolerance 1e-7) on held-out inputs in one process:

* ``as_written``: the float32 conversions of ``LlamaRMSNorm``/``T5LayerNorm`` replayed as the forward says (the
  behaviour before ``casts``): the rounding makes the integrand noisy and the adaptive rule runs to its cap;
* ``auto`` (the default): the replay finds those conversions and evaluates them in float64;
* on a twin whose norms are ``torch.nn.RMSNorm`` (no conversion at all): ``as_written`` against
  ``replay_dtype``, which enters the ``TorchFunctionMode`` although it changes nothing, so the ratio of their
  seconds per evaluation is the mode's own overhead.

Columns: seconds (the fastest of ``--repeat`` rounds, the rows alternating), evaluations of the explained
function (all steps and inputs), milliseconds per evaluation, the replica's largest relative error against the
trained model in evaluation mode (float32 norms), the largest relative quadrature error of a step, and whether
a capped-quadrature warning came. ``--cap`` lowers the adaptive rule's evaluation cap per (step, input) so that
the ``as_written`` rows end in minutes (the library's cap is ``explaind.kernel.adaptive.MAX_EVALS``).
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F

import explaind
import explaind.kernel.adaptive as adaptive

DT = torch.float64
VOCAB = 30


def _ids(n: int, seed: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _float64_norms(model: torch.nn.Module) -> torch.nn.Module:
    """A copy with ``torch.nn.RMSNorm`` (same weight, eps) for each float32-computing RMS norm."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child).__name__ in ("LlamaRMSNorm", "T5LayerNorm"):
                norm = torch.nn.RMSNorm(child.weight.shape[0], eps=child.variance_epsilon, dtype=DT)
                with torch.no_grad():
                    norm.weight.copy_(child.weight)
                setattr(module, name, norm)
    return model


def _train(model, X: dict, y, loss: str, batch_loss, steps: int):
    model = model.to(DT).train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y))
    gen = torch.Generator().manual_seed(0)
    n = y.shape[0]
    with rec:
        for _ in range(steps):
            idx = torch.randperm(n, generator=gen)[:4]
            opt.zero_grad()
            batch_loss(model(**{k: v[idx] for k, v in X.items()}).logits, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return model.eval(), rec.trajectory


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                      tie_word_embeddings=False)
    ids = _ids(14, 1, 8)

    def next_token(logits, t):
        return F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), t[:, 1:].reshape(-1))

    return LlamaForCausalLM(cfg), {"input_ids": ids}, ids, "causal_lm", next_token, 3, 12


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=VOCAB, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1, num_heads=2,
                   relative_attention_num_buckets=4, decoder_start_token_id=0, pad_token_id=0, dropout_rate=0.0)
    model = T5ForConditionalGeneration(cfg)
    src, labels = _ids(13, 4, 8), _ids(13, 5, 3)

    def tokens(logits, t):
        return F.cross_entropy(logits.reshape(-1, VOCAB), t.reshape(-1))

    X = {"input_ids": src, "decoder_input_ids": model._shift_right(labels)}
    return model, X, labels, "token_cross_entropy", tokens, 2, 12


def _replica(traj, model, X_test, casts: str) -> dict:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        start = time.perf_counter()
        report = explaind.KernelReplica(device="cpu", casts=casts).fit(traj).fidelity_report(X_test, model=model)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "evals": report["total_evals"], "model_rel": report["model_max_rel_error"],
            "quad_rel": float(report["relative_quadrature_error"].max()),
            "capped": any("stopped at the cap" in str(w.message) for w in seen)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=int, default=adaptive.MAX_EVALS)
    parser.add_argument("--models", default="llama,t5")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    adaptive.MAX_EVALS = args.cap
    torch.set_num_threads(1)
    print(f"adaptive cap {args.cap} evaluations per (step, input), tol 1e-7, float64, CPU, 1 thread")
    header = f"{'model':<6} {'norms':<8} {'casts':<12} {'s':>8} {'evals':>7} {'ms/eval':>8} {'vs model':>9} " \
             f"{'quad rel':>9} capped"
    print(header)
    for name in args.models.split(","):
        model, X, y, loss, batch_loss, steps, n = {"llama": llama, "t5": t5}[name]()
        model, traj = _train(model, {k: v[:n] for k, v in X.items()}, y[:n], loss, batch_loss, steps)
        X_test = {k: v[n:] for k, v in X.items()}
        twin, twin_traj = _train(_float64_norms(_train_start(name)), {k: v[:n] for k, v in X.items()}, y[:n], loss,
                                 batch_loss, steps)
        rows = [("float32", "as_written", traj, model), ("float32", "auto", traj, model),
                ("float64", "as_written", twin_traj, twin), ("float64", "replay_dtype", twin_traj, twin)]
        best: dict[int, dict] = {}
        for _ in range(args.repeat):
            for i, (_, casts, tr, m) in enumerate(rows):
                got = _replica(tr, m, X_test, casts)
                if i not in best or got["seconds"] < best[i]["seconds"]:
                    best[i] = got
        for i, (norms, casts, _, _) in enumerate(rows):
            r = best[i]
            print(f"{name:<6} {norms:<8} {casts:<12} {r['seconds']:>8.2f} {r['evals']:>7d} "
                  f"{1e3 * r['seconds'] / r['evals']:>8.2f} {r['model_rel']:>9.2e} {r['quad_rel']:>9.2e} {r['capped']}")
        speed, fewer = best[0]["seconds"] / best[1]["seconds"], best[0]["evals"] / best[1]["evals"]
        overhead = (best[3]["seconds"] / best[3]["evals"]) / (best[2]["seconds"] / best[2]["evals"])
        print(f"{name}: as_written / auto seconds {speed:.1f}x, evaluations {fewer:.1f}x; "
              f"mode overhead per evaluation (replay_dtype / as_written, no casts) {overhead:.2f}x")


def _train_start(name: str) -> torch.nn.Module:
    """The same untrained model again (the twin trains from the same initial weights)."""
    return {"llama": llama, "t5": t5}[name]()[0]


if __name__ == "__main__":
    main()
