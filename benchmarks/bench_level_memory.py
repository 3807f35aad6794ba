"""The adaptive rule's state between refinement levels on pairs with many open panels and wide outputs.

Each (step, input) pair's path crosses ``--kinks`` kinks shared by its ``--outputs`` outputs (as a ReLU language
model's logits: 65,536 outputs are 64 positions of a 1,024-token vocabulary), plus a smooth term; at ``--tol`` each
pair opens tens of panels at once. The rule (``explaind.kernel.adaptive.adaptive_plan``) plans ``--units`` pairs in
one call; a level takes its open panels a group at a time (the default ``LEVEL_BYTES``), so that what grows with the
open panels is what stays between levels.

Printed, one row per run: the checkout (``after``: this one; ``before``: ``--before DIR``), the wall time of the
plan, its peak resident memory above the process's start (``ru_maxrss``, each run in its own process), the most open
panels between two levels, their output-sized state there at 13 vectors a panel (what the open panels held before
``explaind.kernel.adaptive_pool``) and what they hold (``after`` only: ``Groups.held``), and a digest of the plan's
nodes, weights and evaluations (equal digests: the same plan bit for bit) with the largest relative difference of the
estimate from the first row's. ``--before DIR`` alternates the runs of another checkout (``PYTHONPATH=DIR``, e.g.
``git worktree add /tmp/before <commit>``) with this one's, ``--repeats`` times each, on one machine.

Run: ``python benchmarks/bench_level_memory.py [--outputs 65536] [--units 2] [--kinks 24] [--tol 1e-10]
[--repeats 2] [--before DIR]``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch


class Kinked:
    r"""Units whose :math:`h_o(t) = \sum_k W_{ko} \max(0, t - c_k) + \sin(a_o t)` cross ``K`` kinks on ``[0, 1]``."""

    def __init__(self, units: int, kinks: int, outputs: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.c = torch.rand(units, kinks, generator=gen, dtype=torch.float64)
        self.W = torch.randn(units, kinks, outputs, generator=gen, dtype=torch.float64) / kinks
        self.a = 1 + 3 * torch.rand(units, outputs, generator=gen, dtype=torch.float64)

    def refine(self, units: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:math:`h, h'` of ``units`` at ``t``, unit by unit (no ``(rows, kinks, outputs)`` gather)."""
        h = torch.empty(units.numel(), self.W.shape[2], dtype=torch.float64)
        d = torch.empty_like(h)
        for u in units.unique().tolist():
            rows = torch.nonzero(units == u).reshape(-1)
            tt = t[rows, None]
            h[rows] = (tt - self.c[u]).clamp_min(0) @ self.W[u] + torch.sin(self.a[u] * tt)
            d[rows] = (tt > self.c[u]).double() @ self.W[u] + self.a[u] * torch.cos(self.a[u] * tt)
        return h, d


def run(args: argparse.Namespace, out: str) -> dict:
    """One plan in this process: its time, peak, open panels and digest (the estimate saved to ``out``)."""
    from explaind.kernel import adaptive, adaptive_memory
    from explaind.kernel.quadrature import rule_nodes

    torch.set_num_threads(1)
    start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    k = Kinked(args.units, args.kinks, args.outputs)
    U = args.units
    x, w = (torch.tensor(v, dtype=torch.float64) for v in rule_nodes("gauss-legendre", 4))
    h, d = k.refine(torch.arange(U).repeat_interleave(4), x.repeat(U))
    h, d = h.reshape(U, 4, -1), d.reshape(U, 4, -1)
    g_a, g_b = k.refine(torch.arange(U), torch.zeros(U))[0], k.refine(torch.arange(U), torch.ones(U))[0]
    est0 = torch.einsum("q,uqo->uo", w, d)
    opened, held = [0], [0]
    level = adaptive_memory.Groups.level

    def spy(self, *a, **kw):
        level(self, *a, **kw)
        opened[0] = max(opened[0], sum(int(p.unit.numel()) for p in self.parts))
        if hasattr(self, "held"):
            held[0] = max(held[0], self.held())

    adaptive_memory.Groups.level = spy
    t0 = time.perf_counter()
    plan = adaptive.adaptive_plan(est0, g_a, g_b, k.refine, tol=args.tol, nodes=4, first=(x, h, d), dense_after=0)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - start
    digest = hashlib.sha256(b"".join(v.contiguous().numpy().tobytes() for v in (plan.t, plan.w, plan.evals)))
    torch.save(plan.estimate, out)
    return {"wall s": wall, "peak MB": peak, "open panels": opened[0],
            "13 vectors MB": opened[0] * 13 * 8 * args.outputs / 1e6, "held MB": held[0] / 1e6 if held[0] else None,
            "plan": digest.hexdigest()[:12], "evals": int(plan.evals.sum())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--outputs", type=int, default=65536)
    p.add_argument("--units", type=int, default=2)
    p.add_argument("--kinks", type=int, default=24)
    p.add_argument("--tol", type=float, default=1e-10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--before", help="another checkout to alternate with this one")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run(args, args.child)))
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    trees = [("after", here)] + ([("before", os.path.abspath(args.before))] if args.before else [])
    with open("/proc/loadavg") as f:
        print(f"torch {torch.__version__}, 1 thread, load average {f.read().split()[0]}, outputs {args.outputs}, "
              f"units {args.units}, kinks {args.kinks}, tol {args.tol:g}")
    cols = ["wall s", "peak MB", "open panels", "13 vectors MB", "held MB", "plan", "evals", "estimate vs first"]
    print("| checkout | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    first = None
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, tree in trees:
                out = os.path.join(tmp, f"{name}{r}.pt")
                env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, os.path.join(tree, "plugins")]),
                           OMP_NUM_THREADS="1")
                argv = [sys.executable, os.path.abspath(__file__), "--child", out] + sys.argv[1:]
                done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
                row = json.loads(done.stdout.strip().splitlines()[-1])
                est = torch.load(out, weights_only=True)
                first = est if first is None else first
                row["estimate vs first"] = float((est - first).abs().max() / first.abs().max())
                cells = [f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in cols]
                print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
