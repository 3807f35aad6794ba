"""The adaptive rule's chunks of (step, input) pairs on a kink-dense ReLU MLP: what the chunked regime costs.

The rule refines a group's pairs in chunks within ``RULE_BYTES`` (``explaind.kernel.adaptive_chunks``); a batch the
chunks' summed counts find kink-dense is planned whole. This script trains a float64 ReLU MLP ``8-W-W-3``
(``--width``, default 512; ``tests/test_replica_output_chunks.py``'s ``relu_mlp``) for three SGD-momentum steps
at an untuned learning rate 1.0 (its paths cross many kinks), then times the replica of eight test inputs twice:
``whole`` (the default budget: one chunk) and ``chunked`` (``RULE_BYTES`` shrunk to ``--pairs`` pairs of three
outputs, the regime of a language model's logits at the default budget). ``--hide-probe`` hides the far units of
the first estimates from the chunked rule's first decision (``adaptive_chunks.probe_counts`` counts none far), as
for a batch that only a refinement level finds kink-dense: the chunks are refined until their levels' counts decide.

Printed, one row per run: the checkout (``after``: this one; ``before``: ``--before DIR``), the mode, the wall and
CPU time (``time.process_time``) of ``predict``, the calls of the rule (``adaptive.adaptive_plan``) with their
pairs, the rows evaluated by the factored evaluator, and the relative error ``max |a - b| / max |b|`` of the
replica against the trained model and of the chunked replica against the whole one. ``--before DIR`` runs the same
rows against another checkout (``PYTHONPATH=DIR``, e.g. ``git worktree add /tmp/before <commit>``) in
subprocesses, alternated with this checkout's ``--repeats`` times, so that both come from one run on one machine.

Run: ``python benchmarks/bench_rule_chunks.py [--width 512] [--pairs 2] [--tol 1e-10]
[--threads 1] [--repeats 2] [--hide-probe] [--before DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings

import torch


def rows(args: argparse.Namespace) -> list[dict]:
    """The two runs (whole, chunked) of this process's explaind."""
    import explaind
    from explaind.kernel import adaptive, adaptive_chunks, layers

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    from test_replica_output_chunks import relu_mlp  # the tests' MLP: three steps, eight test inputs

    model, traj, X = relu_mlp(args.width, 1.0)
    with torch.no_grad():
        truth = model(X)
    calls: list[int] = []
    evaluated: list[int] = []
    plan, batch = adaptive.adaptive_plan, layers.LayerEvaluator._row_batch

    def spy_plan(est0, *a, **k):
        calls.append(int(est0.shape[0]))
        return plan(est0, *a, **k)

    def spy_rows(self, stack, sidx, idx, t):
        evaluated.append(int(t.shape[0]))
        return batch(self, stack, sidx, idx, t)

    adaptive.adaptive_plan, layers.LayerEvaluator._row_batch = spy_plan, spy_rows
    if args.hide_probe:
        counts = adaptive_chunks.probe_counts
        adaptive_chunks.probe_counts = lambda *a: (counts(*a)[0], 0)
    out, whole = [], None
    default = adaptive_chunks.RULE_BYTES
    for mode in ("whole", "chunked"):
        adaptive_chunks.RULE_BYTES = default if mode == "whole" else args.pairs * 1024 * 8 * 3
        calls.clear(), evaluated.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = torch.as_tensor(explaind.KernelReplica(device="cpu", quadrature="adaptive", tol=args.tol)
                                  .fit(traj).predict(X))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        whole = rep if whole is None else whole
        out.append({"mode": mode, "wall_s": wall, "cpu_s": cpu, "rule_calls": len(calls),
                    "rule_pairs": sum(calls), "rows": sum(evaluated),
                    "err_trained": float((rep - truth).abs().max() / truth.abs().max()),
                    "err_whole": float((rep - whole).abs().max() / whole.abs().max())})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--tol", type=float, default=1e-10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hide-probe", action="store_true", help="no unit far at the first estimates")
    ap.add_argument("--before", default=None)
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one checkout's rows, for --before
    args = ap.parse_args()
    if args.json:
        print(json.dumps(rows(args)))
        return
    print(f"load {open('/proc/loadavg').read().split()[:3]}" + (", --hide-probe" if args.hide_probe else ""))
    print(f"{'checkout':8} {'mode':8} {'wall s':>7} {'cpu s':>7} {'calls':>5} {'pairs':>5} {'rows':>8} "
          f"{'vs trained':>10} {'vs whole':>9}")
    argv = [a for a in sys.argv[1:] if a != "--json"]
    for _ in range(args.repeats):
        for name, path in [("after", os.path.dirname(os.path.dirname(os.path.abspath(__file__))))] + (
                [("before", args.before)] if args.before else []):
            env = dict(os.environ, PYTHONPATH=f"{path}:{path}/plugins", OMP_NUM_THREADS=str(args.threads))
            got = subprocess.run([sys.executable, __file__, *argv, "--json"], env=env, check=True,
                                 capture_output=True, text=True).stdout
            for r in json.loads(got.strip().splitlines()[-1]):
                print(f"{name:8} {r['mode']:8} {r['wall_s']:7.2f} {r['cpu_s']:7.2f} {r['rule_calls']:5d} "
                      f"{r['rule_pairs']:5d} {r['rows']:8d} {r['err_trained']:10.2e} {r['err_whole']:9.2e}")


if __name__ == "__main__":
    main()
