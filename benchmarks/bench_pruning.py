"""The digits pruning benchmark and the cost of the ExPLAIND scores.

1. ``run_digits_benchmark`` with its defaults (MLP 64-64-10 trained with SGD + momentum for 10
   epochs while recording, three seeds, all six strategies, eight sparsities from 70% to 99.9%,
   output layer never pruned, no retraining); prints test accuracy, agreement with the unpruned
   model and mean KL(unpruned || pruned) at 90%, 95% and 99% sparsity (mean ± std over seeds), and
   the wall time of the whole benchmark.
2. The cost of the ExPLAIND scores on one recorded run (seed 0, ``--epochs`` epochs): the path backend with factored
   ``nn.Linear`` gradients, the same with ``vmap(jacrev)`` Jacobians, and the engine
   (``InfluenceEstimator(keep=("param",))``, midpoint rule, float32) — each as wall time and as a
   ratio to the bare passes the scores need at least (one forward pass and one batched backward pass
   for all outputs per step and node on the evaluation set), plus the largest relative difference of
   the scores to the path backend's.

3. With ``--rules``: the pruning quality of the ExPLAIND scores under each path-integral rule, at the
   settings of ``explaind prune`` (its ``small`` preset: MLP 64-64-32-10, 3 epochs, six sparsities),
   side by side in one run: accuracy, agreement and KL of the pruned models per sparsity (mean over
   ``--seeds``), the scores' fit time and the warnings of explaind they gave. A rule is
   ``QUADRATURE:NODES[:TOL[:DTYPE]]``, e.g. ``gauss-legendre:1::float32`` (the rule of ``explaind prune``
   before it took the scores' rule of ``explaind influence``) and ``adaptive:2:1e-3:float64`` (that rule).

Run: ``python benchmarks/bench_pruning.py [--out DIR] [--seeds 0 1 2] [--skip-benchmark] [--epochs 2]
[--rules RULE ...]``
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
from torch.func import functional_call

from explaind.pruning import get_strategy, run_digits_benchmark
from explaind.pruning.digits import load_digits_splits, train_digits_model


def bare_passes(model: torch.nn.Module, trajectory, X: torch.Tensor, nodes: int) -> float:
    """Seconds for N * nodes forward + batched all-output backward passes over ``X`` (no accumulation)."""
    template = copy.deepcopy(model).eval()
    names = list(trajectory.param_names)
    O = model(X[:1]).numel()
    eye = torch.eye(O).unsqueeze(1).expand(O, X.shape[0], O)
    start = time.perf_counter()
    current = trajectory.params(0)
    for s in range(trajectory.n_steps):
        following = trajectory.params(s + 1)
        for q in range(nodes):
            t = (q + 0.5) / nodes
            theta = {n: (current[n] + t * (following[n] - current[n])).requires_grad_(True) for n in names}
            out = functional_call(template, theta, (X,))
            torch.autograd.grad(out, list(theta.values()), grad_outputs=eye, is_grads_batched=True)
        current = following
    return time.perf_counter() - start


def relative_difference(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-300)) for k in b)


def compare_rules(rules: list[str], seeds: list[int], out: str) -> None:
    """Part 3: the ``explaind`` strategy's pruning quality under each rule, at ``explaind prune``'s small preset."""
    from explaind.exceptions import ExplaindWarning
    from explaind.studies.pruning_run import PRESETS

    preset = {k: v for k, v in PRESETS["small"].items() if k != "strategies"}
    results = {}
    for rule in rules:
        quadrature, nodes, tol, dtype = (rule.split(":") + ["", "", ""])[:4]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ExplaindWarning)
            result = run_digits_benchmark(f"{out}/rule-{rule.replace(':', '_')}", strategies=("explaind",),
                                          seeds=seeds, quadrature=quadrature, quadrature_nodes=int(nodes),
                                          tol=float(tol) if tol else None, scores_dtype=dtype or None, **preset)
        fit = [r["fit_seconds"] for r in result.rows if r["strategy"] == "explaind"]
        warned = [str(w.message)[:70] for w in caught if issubclass(w.category, ExplaindWarning)]
        results[rule] = (result, sum(fit) / len(fit), warned)
    print(f"## The ExPLAIND scores' rule and the pruning quality (explaind prune's small preset, seeds {seeds})")
    print("| rule | sparsity | accuracy | agreement | KL | fit s (mean per seed) | explaind warnings |")
    print("|---|---|---|---|---|---|---|")
    for rule, (result, fit, warned) in results.items():
        for sparsity in result.sparsities:
            rows = [r for r in result.rows if r["strategy"] == "explaind" and r["sparsity"] == sparsity]
            mean = {m: sum(float(r[m]) for r in rows) / len(rows) for m in ("accuracy", "agreement", "kl")}
            print(f"| {rule} | {sparsity:g} | {mean['accuracy']:.4f} | {mean['agreement']:.4f} | {mean['kl']:.4g} | "
                  f"{fit:.1f} | {len(warned)}{': ' + warned[0] if warned else ''} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="pruning-digits")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-benchmark", action="store_true", help="only the cost table")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the run timed in part 2 (default 2)")
    parser.add_argument("--rules", nargs="+", default=None, metavar="RULE",
                        help="only part 3: QUADRATURE:NODES[:TOL[:DTYPE]] rules of the ExPLAIND scores compared")
    args = parser.parse_args()
    if args.rules:
        compare_rules(args.rules, args.seeds, args.out)
        return

    if not args.skip_benchmark:
        start = time.perf_counter()
        result = run_digits_benchmark(args.out, seeds=args.seeds)
        total = time.perf_counter() - start
        print("## Digits pruning benchmark (no retraining), mean ± std over seeds", args.seeds)
        print(result.table([0.9, 0.95, 0.99]))
        fit = {}
        for row in result.rows:
            fit.setdefault(row["strategy"], set()).add((row["seed"], row["fit_seconds"]))
        print("\nfit seconds per strategy (mean over seeds): "
              + ", ".join(f"{k} {sum(v for _, v in s) / len(s):.2f}" for k, s in fit.items()))
        print(f"whole benchmark: {total:.1f} s (files in {args.out})\n")

    splits = load_digits_splits("mlp")
    model, traj = train_digits_model("mlp", seed=0, epochs=args.epochs, splits=splits)
    X = splits["scoring"][0]
    nodes = 1
    bare = bare_passes(model, traj, X, nodes)
    rows = []
    reference = None
    for label, options in (
        ("path, factored Linear", {"backend": "path", "jacobian": "factored"}),
        ("path, vmap(jacrev)", {"backend": "path", "jacobian": "vmap"}),
        ("engine (midpoint, float32)", {"backend": "engine",
                                        "engine_options": {"quadrature": "midpoint", "nodes": nodes,
                                                           "dtype": "float32"}}),
    ):
        start = time.perf_counter()
        est = get_strategy("explaind", quadrature_nodes=nodes, **options).fit(model, X, traj)
        seconds = time.perf_counter() - start
        reference = reference or est.scores_
        rows.append((label, seconds, seconds / bare, relative_difference(est.scores_, reference)))
    print(f"## Cost of the ExPLAIND scores: {traj.n_steps} steps, {X.shape[0]} evaluation inputs, 10 outputs, "
          f"{sum(p.numel() for p in model.parameters())} parameters, {nodes} node(s) per step")
    print(f"bare passes (forward + batched backward per step and node): {bare:.2f} s")
    print(f"| {'method':<28} | {'seconds':>8} | {'x bare':>7} | {'max rel. diff':>13} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 9}|{'-' * 15}|")
    for label, seconds, ratio, diff in rows:
        print(f"| {label:<28} | {seconds:>8.2f} | {ratio:>7.1f} | {diff:>13.2e} |")


if __name__ == "__main__":
    main()
