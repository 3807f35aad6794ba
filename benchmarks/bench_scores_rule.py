"""Cost and quadrature share of the influence scores' rules on a recorded run (the CLI's default rule).

For each rule given as ``QUADRATURE:NODES:TOL`` it runs, in this process on one CPU thread, the
query of ``explaind influence RUN --keep step,group`` (the correct-class logit of the first 64
validation inputs) and, with ``--data-view``, the data view of ``explaind report RUN`` (24 inputs
spread over the classes, ``keep=("step", "train")`` over the first 32 steps), and with ``--prune``
the ExPLAIND pruning scores of ``explaind prune`` (``keep=("param",)``, ``split=False`` on the small
preset's digits MLP). Prints one table: query, rule, CPU seconds of the query (``time.process_time``),
path-gradient evaluations per step and input, the quadrature share of the explained change
(``meta["quadrature_share"]``, measured) and the warnings of explaind (``ExplaindWarning``) it gave.

Run: ``python benchmarks/bench_scores_rule.py RUN [--rules adaptive:2:1e-4 gauss-legendre:2:0 ...]
[--data-view] [--prune]``, where ``RUN`` is the folder of ``explaind train`` (the quickstart's
``runs/grok``). State the machine's load (printed) next to the figures: CPU seconds grow with it too.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from typing import Any

import torch

import explaind
from explaind.exceptions import ExplaindWarning


def _query(name: str, traj: Any, X: torch.Tensor, rule: str, **options: Any) -> dict[str, Any]:
    quadrature, nodes, tol = rule.split(":")
    est = explaind.InfluenceEstimator(quadrature=quadrature, nodes=int(nodes), tol=float(tol) or 1e-7, device="cpu",
                                      **options)
    start = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        att = est.fit(traj).transform(X)
    seconds = time.process_time() - start
    evals = att.meta["evals_per_step"]
    warned = [str(w.message)[:90] for w in caught if issubclass(w.category, ExplaindWarning)]
    return {"query": name, "rule": rule, "cpu_s": seconds, "evals": sum(evals) / len(evals),
            "share": att.meta["quadrature_share"], "warnings": len(warned), "first": warned[0] if warned else ""}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder of 'explaind train'")
    p.add_argument("--rules", nargs="+", default=["adaptive:2:1e-4", "gauss-legendre:2:0"],
                   help="QUADRATURE:NODES:TOL (TOL 0: the estimator's default)")
    p.add_argument("--data-view", action="store_true", help="also the report's data view")
    p.add_argument("--prune", action="store_true", help="also the ExPLAIND pruning scores of 'explaind prune'")
    args = p.parse_args()
    torch.set_num_threads(1)
    from explaind.studies.report import pick_kernel_inputs
    from explaind.studies.runs import load_run

    print(f"# load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores")
    run = load_run(args.run)
    X, y = run.dataset.val
    rows = []
    for rule in args.rules:
        rows.append(_query("influence step,group", run.trajectory, X[:64], rule, keep=("step", "group"),
                           target=[int(v) for v in y[:64]]))
        if args.data_view:
            pick = pick_kernel_inputs(y.numpy(), 24)
            rows.append(_query("report data view", run.trajectory, X[pick], rule, keep=("step", "train"),
                               target=[int(v) for v in y[pick]], steps=(0, 32)))
        if args.prune:
            from explaind.pruning.digits import load_digits_splits, train_digits_model

            splits = load_digits_splits("mlp")
            _, traj = train_digits_model("mlp", seed=0, epochs=3, lr=0.05, momentum=0.9, hidden_sizes=(64, 32),
                                         splits=splits)
            rows.append(_query("prune scores", traj, splits["scoring"][0], rule, keep=("param",), split=False,
                               dtype="float32"))
    print(f"{'query':22} {'rule':22} {'CPU s':>7} {'evals/step':>10} {'quad share':>10} {'warnings':>8}  first")
    for r in rows:
        print(f"{r['query']:22} {r['rule']:22} {r['cpu_s']:7.1f} {r['evals']:10.2f} {r['share']:10.3g} "
              f"{r['warnings']:8d}  {r['first']}")
    print(f"# load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
