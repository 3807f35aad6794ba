"""The scores' default rule (adaptive, 2-node panels, tol 1e-3) on kink-dense early steps: gaps cut at kinks vs kinks.

For ``tol >= explaind.kernel.gaps.GAP_TOL`` the adaptive rule integrates the (step, input) pairs that miss its
first estimate on gaps between evaluated nodes, each cut at its kink and bisected where it errs
(``docs/engine.md``, section 2, *loose tolerances*); before, it located the kinks one by one (``kinks`` below: the
same code with ``GAP_TOL`` set above ``tol``). Both run in this process, taking turns per workload, on one CPU
thread, float64:

* ``quickstart replica`` / ``quickstart influence``: ``KernelReplica(quadrature="adaptive", nodes=2, tol=1e-3)``
  and ``InfluenceEstimator(..., keep=("step", "group"))`` (the query of ``explaind influence RUN``: the
  correct-class logit) on the first 64 validation inputs of a run of ``explaind train`` (the quickstart's
  ``runs/grok``; ``--run``), over the windows ``0-16`` (kink-dense: large early AdamW updates) and ``16-STOP``;
* ``relu-mlp`` and ``resnet``: the ReLU MLP and GroupNorm ResNet of ``benchmarks/bench_kink_dense.py`` (10 steps,
  16 held-out digits, every output), the same rule;
* ``tanh-mlp``: a smooth model (a Tanh MLP 64-128-128-10, SGD lr 2.0, 32 steps, 16 digits), the same rule.

Printed per row: evaluations per step and input (mean, and most for one), CPU seconds (``time.process_time``), the
largest error of one (step, input) relative to its change ``max_o |est_o - Δg_o| / max_o |Δg_o|`` (the plans'
estimate against the exact difference) and how many pairs are above ``tol``, and whether an ``ExplaindWarning``
was given. Evaluation counts and errors are deterministic; CPU seconds grow with the machine's load (printed).

Run: ``python benchmarks/bench_loose_tol.py [--run runs/grok] [--stop 64] [--tol 1e-3] [--gap-tol 1e-3]
[--workloads ...]`` (``--tol 1e-4 --gap-tol 1e-4``: what the gaps would do below the library's ``GAP_TOL``)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel import adaptive, gaps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kink_dense import digits, record, train_recorded  # noqa: E402

RULES = ("kinks", "gaps")


def _run(rule: str, fn, gap_tol: float) -> dict:
    """Run ``fn`` with the adaptive rule's loose-tolerance path from ``gap_tol`` (``gaps``) or off (``kinks``)."""
    plans = []
    original, default = adaptive.adaptive_plan, adaptive.GAP_TOL

    def counting(*a, **k):
        plan = original(*a, **k)
        plans.append(plan)
        return plan

    adaptive.adaptive_plan = counting
    adaptive.GAP_TOL = math.inf if rule == "kinks" else gap_tol
    start = time.process_time()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ExplaindWarning)
            fn()
    finally:
        adaptive.adaptive_plan, adaptive.GAP_TOL = original, default
    cpu = time.process_time() - start
    evals = torch.cat([p.evals for p in plans]).double()
    exact = torch.cat([p.exact for p in plans])
    rel = (torch.cat([p.estimate for p in plans]) - exact).abs().amax(-1) / exact.abs().amax(-1).clamp_min(1e-300)
    warned = any(issubclass(w.category, ExplaindWarning) for w in caught)
    return {"evals": float(evals.mean()), "most": int(evals.max()), "cpu": cpu, "worst": float(rel.max()),
            "rel": rel, "warned": warned}


def quickstart(run_dir: str, stop: int, tol: float):
    from explaind.studies.runs import load_run

    run = load_run(run_dir)
    X, y = run.dataset.val
    X, target = X[:64], [int(v) for v in y[:64]]
    stop = min(stop, run.trajectory.n_steps) if hasattr(run.trajectory, "n_steps") else stop
    for lo, hi in ((0, 16), (16, stop)):
        def replica(lo=lo, hi=hi):
            explaind.KernelReplica(quadrature="adaptive", nodes=2, tol=tol, steps=(lo, hi)).fit(
                run.trajectory).predict(X)

        def influence(lo=lo, hi=hi):
            explaind.InfluenceEstimator(quadrature="adaptive", nodes=2, tol=tol, device="cpu", keep=("step", "group"),
                                        target=target, steps=(lo, hi)).fit(run.trajectory).transform(X)

        yield f"quickstart replica {lo}-{hi}", replica
        yield f"quickstart influence {lo}-{hi}", influence


def tanh_mlp():
    X, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 128), nn.Tanh(),
                          nn.Linear(128, 10)).double()
    model, traj = train_recorded(model, torch.optim.SGD(model.parameters(), lr=2.0), X, y, 32)
    return traj, X[1000:1016]


def models(names: list[str], tol: float):
    for name in names:
        if name == "tanh-mlp":
            traj, X = tanh_mlp()
        else:
            _, traj, X = record(10, "mlp" if name == "relu-mlp" else "resnet")
            X = X[:16]

        def replica(traj=traj, X=X):
            explaind.KernelReplica(quadrature="adaptive", nodes=2, tol=tol).fit(traj).predict(X)

        yield name, replica


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default=None, help="run folder of 'explaind train' (the quickstart's runs/grok)")
    ap.add_argument("--stop", type=int, default=64, help="last step of the quickstart's second window")
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--gap-tol", type=float, default=gaps.GAP_TOL,
                    help="GAP_TOL of the 'gaps' rows (default: the library's); a --tol below it runs 'kinks' twice")
    ap.add_argument("--workloads", nargs="+", default=["relu-mlp", "resnet", "tanh-mlp"],
                    choices=("relu-mlp", "resnet", "tanh-mlp"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"# load average before: {', '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} cores; "
          f"adaptive, 2-node panels, tol={args.tol:g}")
    print("| workload | rule | evaluations per step and input | most for one | CPU s | worst (step, input) error "
          "/ its change | pairs above tol | ExplaindWarning |\n|---|---|---|---|---|---|---|---|")
    jobs = list(quickstart(args.run, args.stop, args.tol)) if args.run else []
    jobs += list(models(args.workloads, args.tol))
    for k, (name, fn) in enumerate(jobs):
        for rule in (RULES if k % 2 == 0 else RULES[::-1]):  # take turns: a changing load falls on both
            r = _run(rule, fn, args.gap_tol)
            above = int((r["rel"] > args.tol).sum())
            print(f"| {name} | {rule} | {r['evals']:.1f} | {r['most']} | {r['cpu']:.1f} | {r['worst']:.2e} | "
                  f"{above}/{r['rel'].numel()} | {'yes' if r['warned'] else 'no'} |", flush=True)
    print(f"# load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
