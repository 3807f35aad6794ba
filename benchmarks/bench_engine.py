"""Cost and accuracy of the kernel engine on the ExPLAIND paper's workload shape.

Workload: the one-layer modular-arithmetic transformer (p = 23, d_model 32, 4 heads, MLP 64; about
10k parameters), 200 training pairs, batches of 50, AdamW (weight decay 1), 40 recorded steps; 20 test
pairs and all p = 23 outputs are explained.

Measured (one table, markdown):

* ``KernelReplica`` with the adaptive rule, fixed Gauss–Legendre and the paper's 100-point midpoint
  rule: wall time, relative error against the trained model ``max|replica - f(x; theta_N)| / max|f|``
  and evaluations per step and input;
* the adaptive and 4-node Gauss–Legendre replicas on the smooth variant of the workload (GELU
  instead of ReLU in the MLP; goal: <= 1 s at <= 1e-6);
* the same number of bare forward-mode JVPs (plus the ``N + 1`` forward passes at the step ends),
  once with all nodes of a step in one ``vmap`` call (the practical limit; goal: replica <= 2x) and
  once as a plain Python loop over nodes;
* ``InfluenceEstimator(keep=("train",))`` for all outputs, forward and reverse momentum sweeps;
  goal: <= 5 s;
* a paper-style reference implementation written here from the maths: per-sample gradients of
  every training sample at every step (``vmap(grad)``), a per-sample momentum buffer, ``phi_s`` by the
  100-point midpoint rule with full Jacobians (``jacrev``), and the test x train kernel materialised
  per step; reported as the ratio engine / baseline, with the agreement of the two score tensors.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above the level before the call; on the CPU
the peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident set
before the call, falling back to ``resource.getrusage`` (process lifetime peak) where the reset is not
available. (``tracemalloc`` does not see torch's allocations, so it is not used.)

``--workload reference`` measures instead the paper's own transformer shape (``reference_shape.py``:
four heads of one shared query/key/value projection each, no residual around attention, two ReLU
layers, log-probabilities out; d_model 32 and MLP 128 unless ``--d-model``/``--d-mlp``), 12 AdamW steps
(lr 1e-3) from initialisation, 20 test inputs, all 25 outputs, side by side with two baselines written
here: the replica by the 100-point midpoint rule with one JVP per node and step (batched over the
inputs) and the ``train`` axis by :func:`paper_baseline`. Columns: evaluations per step and input,
time, peak memory, the replica's error against the trained model (for ``train`` rows the
quadrature error and the agreement with the baseline's scores), the ratio to the baseline and the
ratio to bare batched JVPs of the same node count.

Rows marked ``factored='never'`` repeat a measurement on the generic paths (``vmap`` over per-row
parameters, ``vmap(jacrev)``) for comparison with the layer-factored ones used by default.

Run: ``python benchmarks/bench_engine.py [--device cpu|cuda] [--dtype float64|float32]
[--baseline-nodes 100] [--steps 40] [--repeats 2] [--threads N] [--skip-baseline] [--skip-generic]
[--workload repository|reference] [--d-model 32] [--d-mlp 128] [--seed 0] [--clock wall|cpu]``

Every time is the fastest of ``--repeats`` runs (the first run includes one-off set-up costs of
``torch.func``), except the baseline's, which runs once. ``--clock cpu`` times by the process's CPU time
instead of the wall clock: with ``--threads 1`` on the CPU it barely moves when other jobs share the
machine, where wall times vary by 1.5x or more.
"""

from __future__ import annotations

import argparse
import copy
import math
import resource
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from explaind_architectures.transformer import modular_arithmetic_dataset
from reference_shape import ReferenceShapeTransformer, midpoint_replica, relu_kinks
from torch.func import functional_call, grad, jacrev, jvp, vmap

import explaind
from explaind.kernel import dense
from explaind.models import build_model

P = 23
CONFIG = {"p": P, "d_model": 32, "n_heads": 4, "d_mlp": 64}
N_TRAIN, BATCH, N_TEST = 200, 50, 20


# ------------------------------------------------------------------------------------------ measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


REPEATS = 2
#: ``time.perf_counter`` (wall) or ``time.process_time`` (this process's CPU time: steadier on a shared machine).
CLOCK = time.perf_counter


def measure(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """``(result, seconds, peak MB above the level before the call)`` of the fastest of :data:`REPEATS` runs."""
    best: tuple[Any, float, float] | None = None
    for _ in range(REPEATS):
        out = _measure_once(fn, device)
        if best is None or out[1] < best[1]:
            best = out
    return best


def _measure_once(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        exact = _reset_hwm()
        base = _rss_kb("VmRSS") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = CLOCK()
    out = fn()
    _sync(device)
    dt = CLOCK() - t0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        hwm = _rss_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = max(0, (hwm or 0) - (base or 0)) / 1024
    return out, dt, peak


# ------------------------------------------------------------------------------------------ workload
def record(steps: int, dtype: torch.dtype, seed: int = 0, activation: str = "relu"):
    """Train the transformer (MLP ``activation``) with AdamW and record the run (on the CPU)."""
    model = build_model("modular_transformer", {**CONFIG, "activation": activation}, seed=seed, dtype=dtype)
    return record_model(model, steps, seed, "cross_entropy")


def record_model(model: torch.nn.Module, steps: int, seed: int, loss: str):
    """Record ``steps`` AdamW steps (lr 1e-3) of ``model`` on the modular-arithmetic pairs; ``(traj, X_test)``."""
    X_all, y_all = modular_arithmetic_dataset(P)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X_all.shape[0], generator=gen)
    X_train, y_train = X_all[perm[:N_TRAIN]], y_all[perm[:N_TRAIN]]
    X_test = X_all[perm[N_TRAIN : N_TRAIN + N_TEST]]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    loss_fn = F.cross_entropy if loss == "cross_entropy" else F.nll_loss
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X_train, y_train))
    with rec:
        for s in range(steps):
            if s % (N_TRAIN // BATCH) == 0:
                order = torch.randperm(N_TRAIN, generator=gen)
            j = s % (N_TRAIN // BATCH)
            idx = order[j * BATCH : (j + 1) * BATCH]
            opt.zero_grad()
            loss_fn(model(X_train[idx]), y_train[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory, X_test


class Flat:
    """The trajectory's parameters as flat vectors on one device (written for the baselines here)."""

    def __init__(self, traj, device: torch.device, dtype: torch.dtype):
        self.traj, self.device, self.dtype = traj, device, dtype
        self.names = list(traj.param_names)
        p0 = traj.params(0)
        self.shapes = [p0[n].shape for n in self.names]
        self.sizes = [p0[n].numel() for n in self.names]
        self.model = copy.deepcopy(traj.model).to(device=device, dtype=dtype)
        self.constants = {k: v.to(device) for k, v in traj.constants().items()}

    def theta(self, s: int) -> torch.Tensor:
        p = self.traj.params(s)
        return torch.cat([p[n].reshape(-1) for n in self.names]).to(device=self.device, dtype=self.dtype)

    def unflat(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(vec, self.sizes)
        return {**self.constants, **{n: t.reshape(sh) for n, t, sh in zip(self.names, parts, self.shapes)}}

    def f(self, vec: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, self.unflat(vec), (X,))

    def coefficient(self, s: int, field: str) -> torch.Tensor:
        ups = self.traj.updates(s)
        out = []
        for n, sh in zip(self.names, self.shapes):
            v = torch.as_tensor(getattr(ups[n], field), dtype=self.dtype)
            out.append(v.expand(sh).reshape(-1))
        return torch.cat(out).to(self.device)


def bare_jvp_loop(flat: Flat, X: torch.Tensor, n_steps: int, jvps_per_step: int) -> None:
    """``jvps_per_step`` batched JVPs along ``Delta theta_s`` per step, plus forward passes at the ends."""
    t = torch.linspace(0.0, 1.0, jvps_per_step + 2, dtype=flat.dtype, device=flat.device)[1:-1]
    with torch.no_grad():
        prev = flat.theta(0)
        flat.f(prev, X)
        for s in range(n_steps):
            nxt = flat.theta(s + 1)
            delta = nxt - prev
            flat.f(nxt, X)
            for q in range(jvps_per_step):
                jvp(lambda v: flat.f(v, X), (prev + t[q] * delta,), (delta,))
            prev = nxt


def bare_jvp_batched(flat: Flat, X: torch.Tensor, n_steps: int, jvps_per_step: int) -> None:
    """As :func:`bare_jvp_loop`, but all nodes of a step in one ``vmap``-ed JVP (the practical limit)."""
    t = torch.linspace(0.0, 1.0, jvps_per_step + 2, dtype=flat.dtype, device=flat.device)[1:-1]

    def along(tq: torch.Tensor, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return jvp(lambda v: flat.f(v, X), (theta + tq * delta,), (delta,))[1]

    batched = vmap(along, in_dims=(0, None, None))
    with torch.no_grad():
        prev = flat.theta(0)
        flat.f(prev, X)
        for s in range(n_steps):
            nxt = flat.theta(s + 1)
            flat.f(nxt, X)
            batched(t, prev, nxt - prev)
            prev = nxt


def paper_baseline(flat: Flat, X: torch.Tensor, n_steps: int, nodes: int) -> torch.Tensor:
    """The full-kernel approach: scores ``(T, n_train, O)`` of every training sample, all outputs."""
    traj = flat.traj
    X_train, y_train = traj.train_samples(torch.arange(traj.n_train))
    X_train, y_train = X_train.to(flat.device), y_train.to(flat.device)
    loss = traj.loss.implementation

    def sample_loss(vec, x, y):
        return loss(flat.f(vec, x[None]), y[None]).sum()

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    jac = jacrev(lambda vec: flat.f(vec, X))
    K = traj.n_train
    buf = torch.zeros(K, sum(flat.sizes), dtype=flat.dtype, device=flat.device)
    with torch.no_grad():
        n_out = flat.f(flat.theta(0), X[:1]).shape[-1]
    scores = torch.zeros(X.shape[0], K, n_out, dtype=flat.dtype, device=flat.device)
    mids = (torch.arange(nodes, dtype=flat.dtype) + 0.5) / nodes
    for s in range(n_steps):
        theta, delta = flat.theta(s), flat.theta(s + 1) - flat.theta(s)
        idx, w = traj.batch(s)
        weights = torch.zeros(K, dtype=flat.dtype, device=flat.device)
        weights.index_add_(0, idx.to(flat.device), w.to(device=flat.device, dtype=flat.dtype))
        G = per_sample(theta, X_train, y_train) * (traj.grad_scale(s) * weights)[:, None]
        a, b, P_s = flat.coefficient(s, "a"), flat.coefficient(s, "b"), flat.coefficient(s, "P")
        q, n = flat.coefficient(s, "q"), flat.coefficient(s, "n")
        buf = a * buf + b * G
        D = -P_s * (q * buf + n * G)
        phi = sum(jac(theta + float(t) * delta) for t in mids) / nodes  # (T, O, D)
        scores += torch.einsum("tod,kd->tko", phi, D)
    return scores


# ------------------------------------------------------------------------------------------ reference shape
def reference_case(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
    """The paper's transformer shape (``reference_shape.py``) side by side with the midpoint-100 baselines."""
    torch.manual_seed(args.seed)
    model = ReferenceShapeTransformer(P, args.d_model, args.d_mlp).to(dtype)
    traj, X_test = record_model(model, args.steps, args.seed, "nll")
    X = X_test.to(device)
    flat = Flat(traj, device, dtype)
    thetas = [flat.theta(s) for s in range(traj.n_steps + 1)]
    with torch.no_grad():
        truth = flat.f(thetas[-1], X)
    D, N, T = sum(flat.sizes), traj.n_steps, X.shape[0]
    print(f"workload: reference-shaped transformer p={P} (d_model {args.d_model}, 4 heads, MLP {args.d_mlp}, two "
          f"ReLU layers), D={D} params, N={N} steps (AdamW lr 1e-3 from initialisation), {N_TRAIN} train, batch "
          f"{BATCH}, T={T} test inputs x O={P + 2} outputs; device={device}, dtype={args.dtype}, "
          f"torch threads={torch.get_num_threads()}, clock={args.clock}", flush=True)
    kw = {"device": str(device), "dtype": args.dtype}

    def rel(pred: Any) -> float:
        pred = torch.as_tensor(pred, device=device, dtype=dtype)
        return float((pred - truth).abs().max() / truth.abs().max())

    if args.dense_off:  # the adaptive rule alone: no batch is ever judged kink-dense (docs/engine.md, section 2)
        dense.DENSE_MIN = 2**62
    if args.kinks:
        theta = [{k: v.to(dtype) for k, v in traj.params(s).items()} for s in range(N + 1)]
        counts = relu_kinks(model, theta, X_test)
        print("\nReLU kinks crossed per step and test input (min / median / max):")
        print("| step | " + " | ".join(str(s) for s in range(N)) + " |")
        print("|---" * (N + 1) + "|")
        print("| kinks | " + " | ".join(f"{a} / {m} / {b}" for a, m, b in counts) + " |", flush=True)
        return
    explaind.KernelReplica(quadrature="gauss-legendre", nodes=1, steps=(0, 1), **kw).fit(traj).predict(X)
    print()
    print("| measurement | evals/step/input | time (s) | peak mem (MB) | rel. error | vs midpoint-100 baseline "
          "| vs bare batched JVPs |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def emit(*row: str) -> None:
        print("| " + " | ".join(row) + " |", flush=True)

    n = args.baseline_nodes
    base, base_dt, base_mem = measure(lambda: midpoint_replica(flat.f, thetas, X, n), device)
    emit(f"baseline replica: midpoint {n}, one JVP per node", str(n), f"{base_dt:.3f}", f"{base_mem:.0f}",
         f"{rel(base):.1e}", "1", "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", explaind.exceptions.ExplaindWarning)
        # tol 1e-4: the adaptive rule asked for about the baseline's error (relative to each unit's change)
        for label, rule, nodes, tol in (("adaptive (tol 1e-7)", "adaptive", None, 1e-7),
                                        ("adaptive (tol 1e-4)", "adaptive", None, 1e-4),
                                        ("midpoint 100", "midpoint", 100, 1e-7),
                                        ("gauss-legendre 4", "gauss-legendre", 4, 1e-7)):
            rep = explaind.KernelReplica(quadrature=rule, nodes=nodes, tol=tol, **kw).fit(traj)
            pred, dt, mem = measure(lambda rep=rep: rep.predict(X), device)
            evals = rep.fidelity_report(X)["total_evals"] / (N * T)
            per_step = max(1, math.ceil(evals))
            _, bare, _ = measure(lambda k=per_step: bare_jvp_batched(flat, X, N, k), device)
            emit(f"replica, {label}", f"{evals:.1f}", f"{dt:.3f}", f"{mem:.0f}", f"{rel(pred):.1e}",
                 f"{base_dt / dt:.1f}x faster, {mem / max(base_mem, 1):.2f}x memory",
                 f"{dt / bare:.2f}x ({bare:.3f} s)")
        if args.skip_baseline:
            return
        scores, base_dt, base_mem = _measure_once(lambda: paper_baseline(flat, X, N, n), device)
        emit(f"baseline train axis: midpoint {n}, per-sample gradients, Jacobian per node", str(n), f"{base_dt:.3f}",
             f"{base_mem:.0f}", "", "1", "")
        for label, rule, nodes in (("adaptive", "adaptive", None), ("midpoint 100", "midpoint", 100)):
            est = explaind.InfluenceEstimator(keep=("train",), quadrature=rule, nodes=nodes, **kw).fit(traj)
            att, dt, mem = measure(lambda est=est: est.transform(X), device)
            evals = sum(att.meta["evals_per_step"]) / N
            quad = float(att.quadrature_error.sum(1).abs().max() / truth.abs().max())
            agree = float((att.values.to(scores) - scores).abs().max() / scores.abs().max())
            emit(f"influence keep=(train,), {label}", f"{evals:.1f}", f"{dt:.3f}", f"{mem:.0f}",
                 f"{quad:.1e} (quadrature); {agree:.1e} vs baseline scores",
                 f"{base_dt / dt:.1f}x faster, {mem / max(base_mem, 1):.2f}x memory", "")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--steps", type=int, default=None,
                    help="recorded steps (default: 40; 12 with --workload reference)")
    ap.add_argument("--baseline-nodes", type=int, default=100)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per measurement (the fastest is shown)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--skip-generic", action="store_true",
                    help="skip the comparison rows with factored='never' (generic vmap/jacrev paths)")
    ap.add_argument("--workload", default="repository", choices=["repository", "reference"],
                    help="the repository's transformer (default) or the paper's transformer shape")
    ap.add_argument("--d-model", type=int, default=32, help="--workload reference: width of the residual stream")
    ap.add_argument("--d-mlp", type=int, default=128, help="--workload reference: hidden width of the MLP")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dense-off", action="store_true",
                    help="--workload reference: switch off the kink-dense fallback of the adaptive rule")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                    help="time by the wall clock (default) or by this process's CPU time (with --threads 1, "
                         "steadier when other jobs share the machine; CPU only)")
    ap.add_argument("--kinks", action="store_true",
                    help="--workload reference: count the ReLU kinks each step crosses per input, then stop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global REPEATS, CLOCK
    REPEATS = max(1, args.repeats)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    if args.steps is None:
        args.steps = 12 if args.workload == "reference" else 40
    if args.workload == "reference":
        reference_case(args, device, dtype)
        return
    traj, X_test = record(args.steps, dtype, args.seed)
    X = X_test.to(device)
    flat = Flat(traj, device, dtype)
    with torch.no_grad():
        truth = flat.f(flat.theta(traj.n_steps), X)
    D, N, T = sum(flat.sizes), traj.n_steps, X.shape[0]
    print(f"workload: modular transformer p={P}, D={D} params, N={N} steps (AdamW), {N_TRAIN} train, batch {BATCH}, "
          f"T={T} test inputs x O={P} outputs; device={device}, dtype={args.dtype}, "
          f"torch threads={torch.get_num_threads()}", flush=True)
    kw = {"device": str(device), "dtype": args.dtype}
    print()
    print("| measurement | time (s) | rel. error | evals/step/input | peak mem (MB) | ratio | goal |")
    print("|---|---|---|---|---|---|---|", flush=True)

    def emit(*row: str) -> None:  # each row is printed as soon as it is measured
        print("| " + " | ".join(row) + " |", flush=True)

    def rel(pred: Any) -> float:
        pred = torch.as_tensor(pred, device=device, dtype=dtype)
        return float((pred - truth).abs().max() / truth.abs().max())

    # warm-up (first calls of torch.func transforms)
    explaind.KernelReplica(quadrature="gauss-legendre", nodes=1, steps=(0, 1), **kw).fit(traj).predict(X)

    replicas = [("adaptive (tol 1e-7)", "adaptive", None, "auto"), ("gauss-legendre 4", "gauss-legendre", 4, "auto"),
                ("gauss-legendre 16", "gauss-legendre", 16, "auto"), ("midpoint 100", "midpoint", 100, "auto")]
    if not args.skip_generic:
        replicas.insert(1, ("adaptive (tol 1e-7), factored='never'", "adaptive", None, "never"))
    for label, rule, nodes, factored in replicas:
        rep = explaind.KernelReplica(quadrature=rule, nodes=nodes, factored=factored, **kw).fit(traj)
        pred, dt, mem = measure(lambda rep=rep: rep.predict(X), device)
        evals = rep.fidelity_report(X)["total_evals"] / (N * T)
        per_step = max(1, math.ceil(evals))
        _, loop, _ = measure(lambda n=per_step: bare_jvp_loop(flat, X, N, n), device)
        _, bare, _ = measure(lambda n=per_step: bare_jvp_batched(flat, X, N, n), device)
        emit(f"replica, {label}", f"{dt:.3f}", f"{rel(pred):.1e}", f"{evals:.1f}", f"{mem:.0f}",
                     f"{dt / bare:.2f}x batched JVPs ({bare:.3f} s); {dt / loop:.2f}x JVP loop ({loop:.3f} s)",
                     "<= 2x")

    # the smooth variant of the same workload (GELU MLP): no kinks, Gauss-Legendre converges fast
    traj_s, _ = record(args.steps, dtype, activation="gelu")
    flat_s = Flat(traj_s, device, dtype)
    with torch.no_grad():
        truth_s = flat_s.f(flat_s.theta(traj_s.n_steps), X)
    for label, rule, nodes in (("adaptive (tol 1e-7)", "adaptive", None), ("gauss-legendre 4", "gauss-legendre", 4)):
        rep = explaind.KernelReplica(quadrature=rule, nodes=nodes, **kw).fit(traj_s)
        pred, dt, mem = measure(lambda rep=rep: rep.predict(X), device)
        err = float((torch.as_tensor(pred, device=device, dtype=dtype) - truth_s).abs().max() / truth_s.abs().max())
        evals = rep.fidelity_report(X)["total_evals"] / (N * T)
        emit(f"replica, GELU variant, {label}", f"{dt:.3f}", f"{err:.1e}", f"{evals:.1f}", f"{mem:.0f}", "",
             "<= 1 s at <= 1e-6")

    results = {}
    queries = [("forward", "auto"), ("reverse", "auto")]
    if not args.skip_generic:
        queries += [("reverse", "never")]
    for mode, factored in queries:
        est = explaind.InfluenceEstimator(keep=("train",), momentum=mode, factored=factored, **kw).fit(traj)
        att, dt, mem = measure(lambda est=est: est.transform(X), device)
        results[mode, factored] = (att, dt)
        evals = sum(att.meta["evals_per_step"]) / N
        label = f"influence keep=(train,), {mode}" + (", factored='never'" if factored == "never" else "")
        emit(label, f"{dt:.3f}", f"{att.completeness_error():.1e} (compl.)", f"{evals:.1f}", f"{mem:.0f}",
             f"Phi by {est.sweep_['jacobian']}", "<= 5 s")
    fwd, rev = results["forward", "auto"][0].values, results["reverse", "auto"][0].values
    agree = float((fwd - rev).abs().max() / fwd.abs().max())
    emit("forward vs reverse scores", "", f"{agree:.1e}", "", "", "", "rounding")

    if not args.skip_baseline:
        scores, dt, mem = _measure_once(lambda: paper_baseline(flat, X, N, args.baseline_nodes), device)
        ref = results["forward", "auto"][0].values.to(device=device, dtype=dtype)
        diff = float((scores - ref).abs().max() / ref.abs().max())
        best = min(r[1] for key, r in results.items() if key[1] == "auto")
        emit(f"paper-style baseline (midpoint {args.baseline_nodes}, full kernel)", f"{dt:.3f}",
                     f"{diff:.1e} (vs engine)", str(args.baseline_nodes), f"{mem:.0f}",
                     f"engine/baseline = {best / dt:.3f}", "< 1")


if __name__ == "__main__":
    main()
