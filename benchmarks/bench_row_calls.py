"""Where the adaptive replica's time goes on the paper-shaped transformer: row evaluations and the rest.

Records ``KernelReplica(quadrature="adaptive")`` on the workload of ``bench_engine.py --workload
reference`` (``reference_shape.py``; 12 AdamW steps, 20 test inputs, all 25 outputs, float64), keeps every
batch of refinement rows the rule evaluates, and prints, in CPU time of this process (one torch
thread; steady when other jobs share the machine):

* the replica's ``predict``; the same with every row evaluation answered from the kept results (the
  rule's bookkeeping, the first estimate and the step ends); the row evaluations replayed alone;
* a least-squares fit of each batch's time against its rows: a fixed cost per batched evaluation
  and a cost per row;
* bare batched JVPs of the same node count (``bench_engine.bare_jvp_batched``) and their cost per row.

``--split`` adds the same number of rows three more ways, to separate what a row costs from what a level
costs: every kept row in one call (each at its own step and ``t``: no per-level cost), the same rows with
``t`` shared by all of a step's rows (still one row each, at that many nodes per step: what a per-row
``t`` costs beyond a shared one) and the engine's own grid evaluation of that many nodes per step (the
first estimate's path, nodes shared by every input). ``--profile N`` prints the ``N`` operations and
functions that take most of one ``predict`` (``cProfile``, by own time), and its time grouped into the
row evaluations, the grid evaluations and the rest.

``--save FILE`` writes the replica's predictions and evaluation count (``torch.save``, tensors only);
``--compare FILE`` prints their largest relative difference from those in ``FILE`` (written by another checkout,
say) and both counts: a change that should only make the rule faster must leave both as they were.

Run: ``python benchmarks/bench_row_calls.py [--tol 1e-7] [--repeats 3] [--split] [--profile 25] [--save FILE]
[--compare FILE]``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import math
import pstats
import time
import warnings

import bench_engine as be
import torch
from reference_shape import ReferenceShapeTransformer

import explaind
from explaind.kernel import layers
from explaind.kernel.evaluate import Grid, Rows


def best(fn, repeats: int) -> float:
    """The least CPU time of ``repeats`` calls of ``fn``."""
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tol", type=float, default=1e-7)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--split", action="store_true", help="rows in one call, with shared t, and the grid path")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    ap.add_argument("--save", help="write the predictions and evaluation count to this file")
    ap.add_argument("--compare", help="compare the predictions and evaluation count with those of this file")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = ReferenceShapeTransformer(be.P, 32, 128).to(torch.float64)
    traj, X = be.record_model(model, 12, 0, "nll")
    flat = be.Flat(traj, torch.device("cpu"), torch.float64)
    warnings.simplefilter("ignore", explaind.exceptions.ExplaindWarning)
    explaind.KernelReplica(quadrature="gauss-legendre", nodes=1, steps=(0, 1), dtype="float64").fit(traj).predict(X)
    rep = explaind.KernelReplica(quadrature="adaptive", tol=args.tol, dtype="float64").fit(traj)
    values = torch.as_tensor(rep.predict(X))  # start-up checks
    count = int(rep.fidelity_report(X)["total_evals"])
    if args.save:
        torch.save({"values": values, "evals": torch.tensor(count)}, args.save)
    if args.compare:
        old = torch.load(args.compare, weights_only=True)
        diff = float((values - old["values"]).abs().max() / old["values"].abs().max())
        print(f"against {args.compare}: largest relative difference {diff:.3g} (bit for bit: "
              f"{torch.equal(values, old['values'])}), evaluations {count} here, {int(old['evals'])} there\n")
    calls = []
    plain = layers.LayerEvaluator.slopes

    def keep(self, stack, rows):
        out = plain(self, stack, rows)
        if isinstance(rows, Rows):
            calls.append((self, stack, rows, out))
        return out

    layers.LayerEvaluator.slopes = keep
    try:
        rep.predict(X)
    finally:
        layers.LayerEvaluator.slopes = plain
    kept = iter(())

    def answered(self, stack, rows):
        return next(kept)[3] if isinstance(rows, Rows) else plain(self, stack, rows)

    def rest() -> None:
        nonlocal kept
        kept = iter(calls)
        layers.LayerEvaluator.slopes = answered
        try:
            rep.predict(X)
        finally:
            layers.LayerEvaluator.slopes = plain

    total = best(lambda: rep.predict(X), args.repeats)
    other = best(rest, args.repeats)
    replay = best(lambda: [ev.slopes(st, rows) for ev, st, rows, _ in calls], args.repeats)
    each = [best(lambda c=c: c[0].slopes(c[1], c[2]), args.repeats) for c in calls]
    E = torch.tensor([float(c[2].t.numel()) for c in calls], dtype=torch.float64)
    A = torch.stack([torch.ones_like(E), E], 1)
    fixed, per_row = torch.linalg.lstsq(A, torch.tensor(each, dtype=torch.float64)[:, None]).solution[:, 0].tolist()
    evals = rep.fidelity_report(X)["total_evals"] / (traj.n_steps * X.shape[0])
    nodes = max(1, math.ceil(evals))
    bare = best(lambda: be.bare_jvp_batched(flat, X, traj.n_steps, nodes), args.repeats)
    bare_rows = nodes * traj.n_steps * X.shape[0]
    print(f"adaptive replica, tol {args.tol:g}: {evals:.1f} evaluations per step and input, CPU time of one torch "
          f"thread, best of {args.repeats}\n")
    print("| measurement | CPU time (s) | calls | rows | per call (ms) | per row (ms) |")
    print("|---|---|---|---|---|---|")
    print(f"| predict | {total:.3f} |  |  |  |  |")
    print(f"| predict, row evaluations answered from kept results | {other:.3f} |  |  |  |  |")
    print(f"| row evaluations replayed | {replay:.3f} | {len(calls)} | {int(E.sum())} | {fixed * 1e3:.2f} (fit) "
          f"| {per_row * 1e3:.4f} (fit) |")
    print(f"| bare batched JVPs, {nodes} nodes per step | {bare:.3f} | {traj.n_steps} | {bare_rows} |  "
          f"| {bare / bare_rows * 1e3:.4f} (all in) |")
    if args.split:
        split_rows(calls, bare_rows, args.repeats)
    print(f"\npredict / bare = {total / bare:.2f}x")
    if args.profile:
        profile(lambda: rep.predict(X), args.profile)


def split_rows(calls: list, bare_rows: int, repeats: int) -> None:
    """Time the kept rows in one call, with ``t`` shared per step, and the grid path at as many nodes per step."""
    ev, stack = calls[0][0], calls[0][1]
    if any(c[1] is not stack for c in calls):  # several groups of steps: the first group's rows only
        calls = [c for c in calls if c[1] is stack]
    rows = Rows(*(torch.cat([getattr(c[2], f) for c in calls]) for f in ("steps", "inputs", "t")))
    E, S, T = rows.t.numel(), stack.n_steps, stack.X.shape[0]
    q = max(1, round(E / (S * T)))
    grid_t = (torch.arange(q, dtype=rows.t.dtype) + 0.5) / q
    steps = torch.arange(S).repeat_interleave(q * T)
    shared = Rows(steps, torch.arange(T).repeat(S * q), grid_t.repeat_interleave(T).repeat(S))
    one = best(lambda: ev.slopes(stack, rows), repeats)
    same_t = best(lambda: ev.slopes(stack, shared), repeats)
    grid = best(lambda: ev.slopes(stack, Grid(grid_t)), repeats)
    n = shared.t.numel()
    print(f"\nthe same rows three more ways ({S} steps x {T} inputs; grid: {q} nodes per step)\n")
    print("| measurement | CPU time (s) | rows | per row (ms) |")
    print("|---|---|---|---|")
    print(f"| kept rows in one call, each at its own t | {one:.3f} | {E} | {one / E * 1e3:.4f} |")
    print(f"| rows in one call, t shared by a step's rows | {same_t:.3f} | {n} | {same_t / n * 1e3:.4f} |")
    print(f"| grid evaluation (the first estimate's path) | {grid:.3f} | {n} | {grid / n * 1e3:.4f} |")


def profile(fn, top: int) -> None:
    """One call of ``fn`` under ``cProfile``: the ``top`` functions by own time, and the time by part."""
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt
    parts = {"row evaluations (LayerEvaluator._rows)": "_rows", "grid evaluations (slopes of a Grid)": "_slopes_grid"}
    print(f"\none predict under cProfile: {total:.3f} s (profiler overhead included)\n")
    print("| part | cumulative (s) | share |")
    print("|---|---|---|")
    for label, name in parts.items():
        cum = sum(v[3] for k, v in stats.stats.items() if k[2] == name)
        print(f"| {label} | {cum:.3f} | {cum / total:.0%} |")
    stats.sort_stats("tottime").print_stats(top)
    print(out.getvalue())


if __name__ == "__main__":
    main()
