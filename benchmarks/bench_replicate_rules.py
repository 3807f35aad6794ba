"""The replica of a run folder under several rules and tolerances: cost, errors and warnings, in one process.

Each rule is given as ``QUADRATURE:NODES:TOL`` (``NODES`` empty: the rule's default; ``TOL``: the adaptive
rule's relative tolerance per step and input, the replica's tolerance for the fixed rules' warnings), e.g.
``adaptive:2:1e-3`` (the default rule of ``explaind replicate RUN``), ``adaptive::1e-7`` (``--quadrature
adaptive --tol 1e-7``) or ``gauss-legendre:4:1e-7``. For each, one ``KernelReplica(...).fidelity_report`` on the
first ``--n-test`` validation inputs of the window ``--steps START:STOP``: the computation of ``explaind
replicate RUN --steps START:STOP`` with that rule, without the command's start-up.

Prints one table: CPU seconds of the replica (``time.process_time``, one thread), evaluations per step and
input, the largest step error (a step's largest quadrature error relative to its largest change), the replica's
maximum relative error against the trained model, the steps above ``TOL`` and the ExplaindWarnings it gave (each
printed in full below the table). State the load printed next to any figure.

Run: ``python benchmarks/bench_replicate_rules.py RUN --steps 0:160 --n-test 64 adaptive:2:1e-3 adaptive::1e-7``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np
import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="run folder written by 'explaind train'")
    p.add_argument("rules", nargs="+", help="QUADRATURE:NODES:TOL, e.g. adaptive:2:1e-3")
    p.add_argument("--steps", default=None, help="window START:STOP (default: the whole run)")
    p.add_argument("--n-test", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    import explaind
    from explaind.exceptions import ExplaindWarning
    from explaind.studies.analysis import parse_steps
    from explaind.studies.runs import load_run

    run = load_run(args.run)
    X = run.dataset.val[0][:args.n_test]
    print(f"# {args.run}, steps {args.steps or 'all'}, {len(X)} inputs; load before {os.getloadavg()[0]:.2f}")
    lines = ["| rule | tol | CPU s | evals/step | step error | max rel error | steps > tol | warnings |",
             "|---|---|---|---|---|---|---|---|"]
    said = []
    for spec in args.rules:
        quadrature, nodes, tol = spec.split(":")
        replica = explaind.KernelReplica(quadrature=quadrature, nodes=int(nodes) if nodes else None, tol=float(tol),
                                         device="cpu", steps=parse_steps(args.steps))
        start = time.process_time()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = replica.fit(run.trajectory).fidelity_report(X)
        cpu = time.process_time() - start
        step_error = np.asarray(report["relative_quadrature_error"])
        warned = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
        said += [f"{spec}: {w}" for w in warned]
        lines.append(f"| {quadrature}-{nodes or 'default'} | {float(tol):g} | {cpu:.1f} | "
                     f"{np.mean(report['evals_per_step']):.2f} | {step_error.max():.3g} | "
                     f"{report['max_rel_error']:.3g} | {int((step_error > float(tol)).sum())} | {len(warned)} |")
        print(f"#   {lines[-1]}", flush=True)
    print(f"# load after {os.getloadavg()[0]:.2f}")
    print("\n".join(lines))
    for w in said:
        print(w)
    return 0


if __name__ == "__main__":
    sys.exit(main())
