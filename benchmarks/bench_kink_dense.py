"""The kernel replica on ReLU-dense models nobody tuned for: a small GroupNorm ResNet and a ReLU MLP.

Workloads (``--model``): ``resnet``, a hand-written ResNet (Conv2d 3x3 + GroupNorm + ReLU stem, two
residual blocks of two convolutions with GroupNorm, global average pooling, a linear head; 16 channels,
9,770 parameters) trained with SGD, momentum 0.9, lr 0.05; ``mlp``, a ReLU MLP 64-256-256-10 (85,002
parameters) trained with plain SGD at an untuned lr 1.0. Both from initialisation on sklearn's 8x8
digits, 1,000 training images, batches of 64, recorded in float64; the replica explains every output
of held-out test images.

Printed (one table): for the adaptive rule (at each tolerance of ``--tols``, by default its own 1e-7; panels of
``--nodes`` nodes, by default its own 4) and the paper's 100-point midpoint rule, the wall time, the process's CPU
time (``time.process_time``: steadier than the wall time on a shared machine), evaluations per step and test input,
the relative error of the replica against the trained model, ``max |replica - f(x; theta_N)| / max |f|``, and
whether an ``ExplaindWarning`` about the quadrature was given. The path of each step crosses
thousands of ReLU kinks; ``docs/engine.md`` (section 2, *kink-dense paths*) describes what the
adaptive rule does then. ``--before DIR`` first runs the same rows in a subprocess against another
checkout of explaind (``PYTHONPATH=DIR``; e.g. ``git worktree add /tmp/before <commit>``), so a
before/after table comes from one run on one machine.

``--per-eval`` prints instead the cost of one evaluation (one JVP of one test input at one point) for
each way the engine evaluates: shared nodes one call per (step, node) (convolutions fused, and by
``torch.func.jvp``), shared nodes by ``vmap`` over steps
and nodes, rows by ``vmap`` over rows, and a bare forward pass.

``--profile`` prints, for each replica, the operators that took the most time (``torch.profiler``).

Run: ``python benchmarks/bench_kink_dense.py [--model resnet] [--steps 40] [--inputs 64] [--threads 1]
[--rules midpoint adaptive] [--tols 1e-7 1e-3] [--nodes 2] [--gap-tol 1e-4] [--before DIR] [--per-eval] [--profile]``
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning
from explaind.kernel import adaptive, dense


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c)
        self.c2, self.n2 = nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(4, c)

    def forward(self, x):
        return F.relu(x + self.n2(self.c2(F.relu(self.n1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self, c: int = 16):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(4, c)
        self.b1, self.b2, self.head = Block(c), Block(c), nn.Linear(c, 10)

    def forward(self, x):
        return self.head(self.b2(self.b1(F.relu(self.norm(self.stem(x))))).mean((2, 3)))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits: float64 images ``(1797, 1, 8, 8)`` in [0, 1] and their labels."""
    data = load_digits()
    return torch.tensor(data.data, dtype=torch.float64).reshape(-1, 1, 8, 8) / 16, torch.tensor(data.target)


def train_recorded(model: nn.Module, opt: torch.optim.Optimizer, X: torch.Tensor, y: torch.Tensor, steps: int,
                   sched=None):
    """``steps`` steps on 64 random images of the first 1000 under the recorder; the model (evaluation mode), run."""
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:1000], y[:1000]))
    gen = torch.Generator().manual_seed(0)
    model.train()
    with rec:
        for _ in range(steps):
            idx = torch.randint(0, 1000, (64,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if sched is not None:
                sched.step()
    return model.eval(), rec.trajectory


def record(steps: int, kind: str = "resnet"):
    X, y = digits()
    torch.manual_seed(0)
    if kind == "resnet":
        model = ResNet().double()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    else:
        model = mlp().double()
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    model, traj = train_recorded(model, opt, X, y, steps)
    return model, traj, X[1000:]


def measure(args: argparse.Namespace, label: str) -> list[str]:
    """Table rows ``| label | rule | time | CPU time | evals | error | warned |`` of the rules on the recorded run."""
    torch.set_num_threads(args.threads)
    if args.gap_tol is not None:  # where the adaptive rule switches to the loose-tolerance gaps (kernel/gaps.py)
        adaptive.GAP_TOL = args.gap_tol
    model, traj, X_test = record(args.steps, args.model)
    X = X_test[: args.inputs]
    with torch.no_grad():
        target = model(X)
    evals: list[torch.Tensor] = []
    original = adaptive.adaptive_plan

    def counting(*a, **k):
        plan = original(*a, **k)
        evals.append(plan.evals)
        return plan

    adaptive.adaptive_plan = counting
    if args.breakdown and hasattr(dense, "shortfall"):  # each batch's shortfall R (docs/engine.md, section 2)
        plain = dense.shortfall

        def told(cuts, sizes, n):
            ratio = plain(cuts, sizes, n)
            print(f"{label}: shortfall R = {ratio:.3f} over {len(sizes)} grids", file=sys.stderr, flush=True)
            return ratio

        dense.shortfall = told
    rows = []
    runs = [("adaptive", args.nodes, tol) for tol in args.tols] if "adaptive" in args.rules else []
    for rule, nodes, tol in ([("midpoint", 100, 1e-7)] if "midpoint" in args.rules else []) + runs:
        evals.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        with warnings.catch_warnings(record=True) as caught, profiled(args.profile) as prof:
            warnings.simplefilter("always")
            out = explaind.KernelReplica(quadrature=rule, nodes=nodes, tol=tol).fit(traj).predict(X)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if prof is not None:
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), file=sys.stderr)
        warned = any(issubclass(w.category, ExplaindWarning) and "quadrature" in str(w.message) for w in caught)
        err = float((torch.as_tensor(out) - target).abs().max() / target.abs().max())
        per = f"{float(torch.cat(evals).double().mean()):.1f}" if evals else str(nodes)
        name = f"{rule}-{nodes}" if rule == "midpoint" else (
            f"adaptive tol={tol:g}" + ("" if nodes is None else f" nodes={nodes}"))
        rows.append(f"| {label} | {name} | {wall:.1f} | {cpu:.1f} | {per} | {err:.2e} | {'yes' if warned else 'no'} |")
        print(rows[-1], flush=True)
        if args.breakdown and evals:
            print(f"{label}, {rule}: {breakdown(torch.cat(evals))}", file=sys.stderr, flush=True)
    return rows


def profiled(on: bool):
    """``torch.profiler.profile`` of the CPU when ``on``, else a context that yields ``None``."""
    import contextlib

    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU]) if on else contextlib.nullcontext()


def per_eval(args: argparse.Namespace) -> None:
    """Microseconds per evaluation (one JVP of one test input at one point) of the ways the engine evaluates.

    On the first 4 steps and ``--inputs`` test inputs, 16 nodes per step: a grid of nodes shared by every input
    of a step, one call per (step, node) with the step's parameters shared by the batch of inputs (what the
    kink-dense rule and the fixed rules use for convolutional models on the CPU; each convolution's primal and
    kernel tangent in one call, :mod:`explaind.kernel.fused_jvp`, each group norm's tangent in closed form,
    :mod:`explaind.kernel.norm_jvp`; for comparison with the group norms by forward mode, and by ``torch.func.jvp``,
    three convolutions per layer) and by one ``vmap`` over steps
    and nodes (per-node parameters: grouped convolutions); rows, each at its own point (``vmap`` over rows,
    parameters per row: the adaptive rule's refinement); and a bare forward pass per (step, node) without
    derivatives, for scale. All on the ``torch.func`` evaluator (``factored="never"``); each the least CPU time of
    this process (``time.process_time``, one thread) of five runs, the ways taking turns (so that a changing load
    falls on all of them alike).
    """
    from explaind.kernel import autograd
    from explaind.kernel import fused_jvp as fused_module
    from explaind.kernel.engine import PathEngine
    from explaind.kernel.evaluate import Grid, Rows
    from explaind.kernel.fused_jvp import fused_jvp

    torch.set_num_threads(args.threads)
    _, traj, X_test = record(4, args.model)
    X = X_test[: args.inputs]
    engine = PathEngine(traj, device=torch.device("cpu"), dtype=torch.float64, chunk_size=256, factored="never")
    explained = engine.explained(X, None, None, "bench")
    stack = engine.stack(0, 4, X, explained)
    ev, (S, T, n) = engine.evaluator, (4, X.shape[0], 16)
    t = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    units = torch.arange(S * T).repeat_interleave(n)

    def grid(per_node: bool, fused: bool = True, norms: bool = True):
        ev.per_node = per_node
        autograd.fused_jvp = fused_jvp if fused else autograd._jvp  # torch.func.jvp: three convolutions per layer
        rules = dict(fused_module._RULES)
        if not norms:  # group norms by forward mode's own derivative
            for f in (F.group_norm, torch.group_norm):
                del fused_module._RULES[f]
        try:
            return ev.slopes(stack, Grid(t))[1]
        finally:
            autograd.fused_jvp = fused_jvp
            fused_module._RULES.update(rules)

    def forward():
        with torch.no_grad():
            for s in range(S):
                for tq in t:
                    explained(engine.fm, {k: v[s] + tq * stack.delta[k][s] for k, v in stack.base.items()}, X,
                              explained.aux)

    ways = [("grid, one call per (step, node), parameters shared, convolutions fused, group norms in closed form",
             lambda: grid(True)),
            ("grid, one call per (step, node), parameters shared, convolutions fused, group norms by forward mode",
             lambda: grid(True, norms=False)),
            ("grid, one call per (step, node), parameters shared, torch.func.jvp", lambda: grid(True, False)),
            ("grid, vmap over steps and nodes, parameters per node", lambda: grid(False)),
            ("rows, vmap over rows, parameters per row", lambda: ev.slopes(stack, Rows(units // T, units % T,
                                                                                       t.repeat(S * T)))[1]),
            ("bare forward per (step, node), no derivative", forward)]
    print(f"per evaluation, {S} steps x {n} nodes x {T} inputs, float64, threads={args.threads}; "
          f"load {os.getloadavg()[0]:.1f}; CPU time, least of five\n| evaluation | us per evaluation |\n|---|---|")
    ref = None
    for name, fn in ways:
        out = fn()  # warm-up, and the result compared below
        if isinstance(out, torch.Tensor):
            out = out.reshape(S * T, n, -1)
            ref = out if ref is None else ref
            assert float((out - ref).abs().max()) <= 1e-10 * float(ref.abs().max()), name
    walls = [float("inf")] * len(ways)
    for _ in range(5):  # the ways interleaved, the fastest of five each: a shared machine's load only ever adds time
        for k, (_, fn) in enumerate(ways):
            t0 = time.process_time()  # CPU time of this process: on a shared machine wall time measures the others
            fn()
            walls[k] = min(walls[k], time.process_time() - t0)
    for (name, _), wall in zip(ways, walls):
        print(f"| {name} | {1e6 * wall / (S * n * T):.0f} |", flush=True)


def breakdown(evals: torch.Tensor) -> str:
    """Where a plan's evaluations per (step, input) lie: how many units spent at most 100, how many more."""
    above = evals > 100
    counts = torch.bincount(evals).nonzero().reshape(-1)
    common = int(counts[torch.bincount(evals)[counts].argmax()])
    return (f"{int((evals <= 4).sum())} units at <= 4, {int(((evals > 4) & ~above).sum())} at 5-100, "
            f"{int(above.sum())} above 100 with {int(evals[above].sum())} evaluations in all "
            f"({int((evals[above] - 100).sum())} above 100); {int(evals.sum())} in all for {evals.numel()} units; "
            f"most common count {common}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("resnet", "mlp"), default="resnet")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--inputs", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--breakdown", action="store_true",
                    help="print where the adaptive rule's evaluations lie (units at <= 100 and above) and each batch's "
                         "shortfall R")
    ap.add_argument("--rules", nargs="+", choices=("midpoint", "adaptive"), default=["midpoint", "adaptive"],
                    help="the rules measured (both by default)")
    ap.add_argument("--tols", type=float, nargs="+", default=[1e-7],
                    help="tolerances of the adaptive rule, one row each (default: its own 1e-7)")
    ap.add_argument("--nodes", type=int, default=None,
                    help="nodes per panel of the adaptive rule (default: its own 4; the scores' rule uses 2)")
    ap.add_argument("--gap-tol", type=float, default=None,
                    help="the tolerance from which the adaptive rule integrates on gaps cut at kinks (default: the "
                         "library's explaind.kernel.gaps.GAP_TOL, 1e-3); lower it to try that rule at tighter tols")
    ap.add_argument("--before", default=None, help="another explaind checkout, measured first in a subprocess")
    ap.add_argument("--per-eval", action="store_true",
                    help="print the cost per evaluation of the engine's ways to evaluate, and nothing else")
    ap.add_argument("--profile", action="store_true",
                    help="print to stderr the operators that took the most time in each replica (torch.profiler)")
    ap.add_argument("--label", default="this checkout", help=argparse.SUPPRESS)
    ap.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.per_eval:
        per_eval(args)
        return
    if args.rows_only:
        measure(args, args.label)
        return
    model = ResNet() if args.model == "resnet" else mlp()
    name = "GroupNorm ResNet" if args.model == "resnet" else "ReLU MLP (SGD lr 1.0)"
    print(f"{name}, {sum(p.numel() for p in model.parameters())} parameters, {args.steps} steps, {args.inputs} test "
          f"inputs x 10 outputs, float64, torch threads={args.threads}; load {os.getloadavg()[0]:.1f}", flush=True)
    head = ("| code | rule | time s | CPU s | evaluations per step and input | relative error | quadrature warning |\n"
            "|---|---|---|---|---|---|---|")
    print(head, flush=True)
    rows = []
    if args.before:
        cmd = [sys.executable, __file__, "--rows-only", "--label", "before", "--model", args.model, "--steps",
               str(args.steps), "--inputs", str(args.inputs), "--threads", str(args.threads), "--rules", *args.rules,
               "--tols", *map(str, args.tols), *([] if args.nodes is None else ["--nodes", str(args.nodes)]),
               *([] if args.gap_tol is None else ["--gap-tol", str(args.gap_tol)]),
               *(["--breakdown"] if args.breakdown else [])]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.before, os.path.join(args.before, "plugins")])}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        if args.breakdown:
            print("\n".join(line for line in done.stderr.splitlines() if line.startswith("before")), flush=True)
        rows = [line for line in done.stdout.splitlines() if line.startswith("| before")]
        print("\n".join(rows), flush=True)
    rows += measure(args, "after" if args.before else args.label)
    if args.before:  # the table once more, in one piece
        print(f"\n{head}\n" + "\n".join(rows))
    print(f"load {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
