"""The GPU benchmark: the full MOD-113 grokking run and a GPT-2-small-sized window, float32 and float64.

One prepared script to run whenever a CUDA card is available (``--quick`` runs everything at a tiny
size on the CPU in well under a minute; the tests run it). It prints the card's name, then one
table row per measurement, in float32 and in float64:

**MOD-113** (the ExPLAIND paper's grokking setting): the modular-addition transformer with
``p = 113``, ``d_model 64``, 4 heads, MLP width 512, AdamW ``lr 1e-3``, ``betas (0.9, 0.98)``,
weight decay 4, 4,000 training and 2,000 validation pairs, full batch, 2,000 recorded steps
(trained in the row's dtype, recorded in memory). Explained: the replica
(``KernelReplica.fidelity_report``) and ``step × group`` scores of the correct-class logit on 256
validation inputs, and the ``train`` axis on 64.

**GPT-2 small** (``transformers.GPT2Config()``: 12 layers, width 768, 50,257 tokens, 124M
parameters; random initialisation, no dropout): 50 AdamW steps on random token sequences of
length 128 (batches of 8), saved after every step and read back with
``Trajectory.from_checkpoints``; the replica and ``step × group`` scores (``split=False``) of the
correct next-token logit at the last position, on 4 sequences.

Every explained row is followed by **bare batched JVPs** on the same card: for each step, one
``vmap`` over the rule's nodes of ``torch.func.jvp`` of the model along :math:`\\Delta\\theta_s` at
:math:`\\theta_s + t_q\\Delta\\theta_s` for the same inputs — the least any path-kernel method evaluates. Columns:
wall seconds, path-gradient evaluations ((input, node) pairs summed over steps; for the bare JVPs
inputs × nodes × steps), evaluations per second, peak memory (CUDA: ``max_memory_allocated``; CPU:
the process's peak resident set so far) and a check (the replica's relative error against
:math:`f(x;\\theta_{stop})`, or the largest completeness gap of the scores relative to the largest
output change).

Run: ``python benchmarks/bench_gpu.py [--quick] [--device cuda] [--dtypes float32 float64]
[--time-limit 420] [--nodes 2] [--steps N] [--gpt2-steps N]`` (the last two shorten the runs, for
estimates). Sections that would start after ``--time-limit`` seconds are
printed as skipped, and a section that fails (e.g. out of memory) prints its error and the
script goes on, so one run always ends with a table.
"""

from __future__ import annotations

import argparse
import copy
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.func import functional_call, jvp, vmap

import explaind
from explaind.kernel.quadrature import rule_nodes

#: size -> settings (quick: seconds on a CPU; full: the workloads named in the module docstring)
SIZES: dict[str, dict[str, Any]] = {
    "full": {"p": 113, "n_train": 4000, "n_val": 2000, "model": {"d_model": 64, "n_heads": 4, "d_mlp": 512},
             "steps": 2000, "n_replica": 256, "n_train_axis": 64,
             "gpt2": {}, "gpt2_steps": 50, "seq": 128, "batch": 8, "n_seq": 4, "budget": "24GB"},
    "quick": {"p": 7, "n_train": 30, "n_val": 19, "model": {"d_model": 8, "n_heads": 2, "d_mlp": 16},
              "steps": 6, "n_replica": 8, "n_train_axis": 4,
              "gpt2": {"n_layer": 2, "n_embd": 16, "n_head": 2, "vocab_size": 37, "n_positions": 16,
                       "bos_token_id": 0, "eos_token_id": 0},
              "gpt2_steps": 3, "seq": 8, "batch": 4, "n_seq": 2, "budget": "1GB"},
}
COLUMNS = ("workload", "dtype", "measurement", "seconds", "evals", "evals/s", "peak GB", "check")


@dataclass
class Bench:
    """Where and how long: device, time limit and the rows printed so far."""

    device: torch.device
    limit: float
    nodes: int
    start: float

    def sync(self) -> None:
        """Wait for the card (CUDA) so that wall times are complete."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def peak_reset(self) -> None:
        """Start a new peak-memory window (CUDA)."""
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gb(self) -> float:
        """Peak memory since :meth:`peak_reset` (CUDA) or the process's peak resident set (CPU), GB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9

    def row(self, workload: str, dtype: str, what: str, fn: Callable[[], tuple[int, str]]) -> None:
        """Time ``fn() -> (evaluations, check)`` and print its row (or why it was skipped or failed)."""
        head = f"| {workload} | {dtype} | {what} |"
        if time.perf_counter() - self.start > self.limit:
            print(f"{head} skipped: past --time-limit {self.limit:.0f} s | | | | |", flush=True)
            return
        self.peak_reset()
        self.sync()
        t0 = time.perf_counter()
        try:
            evals, check = fn()
        except Exception as exc:  # report and go on: one run must end with a table
            print(f"{head} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]} | | | | |", flush=True)
            traceback.print_exc(limit=3)
            return
        self.sync()
        seconds = time.perf_counter() - t0
        rate = f"{evals / seconds:,.0f}" if evals else ""
        print(f"{head} {seconds:.2f} | {evals:,} | {rate} | {self.peak_gb():.2f} | {check} |", flush=True)


def bare_jvps(model: torch.nn.Module, traj: Any, X: Any, window: range, nodes: int, device: torch.device,
              dtype: torch.dtype, pick: Callable[[Any], torch.Tensor]) -> int:
    r"""Batched JVPs along :math:`\Delta\theta_s` at the rule's nodes for each step of ``window``; returns the count."""
    t = torch.as_tensor(rule_nodes("gauss-legendre", nodes)[0], dtype=dtype, device=device)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    module = copy.deepcopy(model).to(device=device, dtype=dtype).eval()

    def f(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return pick(functional_call(module, params, (X,)))

    after = {n: v.to(device=device, dtype=dtype) for n, v in traj.params(window.start).items() if n in names}
    for s in window:
        before = after
        after = {n: v.to(device=device, dtype=dtype) for n, v in traj.params(s + 1).items() if n in names}
        delta = {n: after[n] - before[n] for n in names}

        def along(tq: torch.Tensor, before=before, delta=delta) -> torch.Tensor:
            return jvp(f, ({n: before[n] + tq * delta[n] for n in names},), (delta,))[1]

        with torch.no_grad():
            vmap(along)(t)
    return len(window) * nodes * int(X.shape[0])


def _completeness(att: Any) -> str:
    change = (att.final - att.initial).abs().max().clamp_min(1e-300)
    return f"completeness {float(att.completeness_error()) / float(change):.1e}"


def mod113(bench: Bench, size: dict[str, Any], dtype: str) -> None:
    """Train and record the grokking run in ``dtype``, then explain it and time bare JVPs."""
    from explaind.studies.grokking import grokking_config
    from explaind.studies.runs import train_run

    config, _ = grokking_config("full" if size["p"] == 113 else "tiny", device=str(bench.device))
    config.update(data={"p": size["p"], "n_train": size["n_train"], "n_val": size["n_val"]}, model=size["model"],
                  lr=1e-3, weight_decay=4.0, betas=(0.9, 0.98), steps=size["steps"], stop_at=None, dtype=dtype,
                  eval_every=max(1, size["steps"] // 4))
    holder: dict[str, Any] = {}

    def train() -> tuple[int, str]:
        holder["run"] = train_run(config, None, progress=False)
        traj = holder["run"].trajectory
        return 0, f"{traj.n_steps} steps recorded, {sum(v.numel() for v in traj.params(0).values()):,} params"

    name = f"MOD-{size['p']}"
    bench.row(name, dtype, "train + record", train)
    if "run" not in holder:
        return
    run = holder["run"]
    X, y = run.dataset.val
    X, y = X.to(bench.device), y.to(bench.device)
    Xr, yr = X[:size["n_replica"]], y[:size["n_replica"]]
    Xt, yt = X[:size["n_train_axis"]], y[:size["n_train_axis"]]
    common = {"quadrature": "gauss-legendre", "nodes": bench.nodes, "device": str(bench.device), "dtype": dtype}
    traj = run.trajectory

    def replica() -> tuple[int, str]:
        report = explaind.KernelReplica(**common).fit(traj).fidelity_report(Xr)
        return int(report["total_evals"]), f"replica rel err {report['max_rel_error']:.1e}"

    def scores(keep: tuple[str, ...], Xq: Any, yq: Any) -> Callable[[], tuple[int, str]]:
        def go() -> tuple[int, str]:
            est = explaind.InfluenceEstimator(keep=keep, target=yq.tolist(), memory_budget=size["budget"],
                                              residual_tol=1.0, **common)
            att = est.fit(traj).transform(Xq)
            evals = round(sum(att.meta["evals_per_step"]) * Xq.shape[0])
            return evals, _completeness(att)
        return go

    def bare(Xq: Any) -> Callable[[], tuple[int, str]]:
        return lambda: (bare_jvps(traj.model, traj, Xq, range(traj.n_steps), bench.nodes, bench.device,
                                  explaind.config.resolve_dtype(dtype), lambda out: out), "")

    bench.row(name, dtype, f"replica, {len(Xr)} inputs", replica)
    bench.row(name, dtype, f"step x group, {len(Xr)} inputs", scores(("step", "group"), Xr, yr))
    bench.row(name, dtype, f"bare batched JVPs, {len(Xr)} inputs", bare(Xr))
    bench.row(name, dtype, f"train axis, {len(Xt)} inputs", scores(("train",), Xt, yt))


def gpt2_checkpoints(bench: Bench, size: dict[str, Any]) -> tuple[Any, list[dict[str, torch.Tensor]], Any, Any]:
    """A randomly initialised GPT-2 trained ``gpt2_steps`` AdamW steps; its parameters after every step (CPU)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**size["gpt2"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).to(bench.device)
    model.config._attn_implementation = "eager"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
    gen = torch.Generator().manual_seed(1)
    vocab, seq = config.vocab_size, size["seq"]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters()}

    states = [snapshot()]
    for _ in range(size["gpt2_steps"]):
        tokens = torch.randint(vocab, (size["batch"], seq + 1), generator=gen).to(bench.device)
        loss = model(tokens[:, :-1], labels=tokens[:, :-1]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        states.append(snapshot())
    test = torch.randint(vocab, (size["n_seq"], seq + 1), generator=gen)
    template = GPT2LMHeadModel(config)
    template.config._attn_implementation = "eager"
    return template, states, test[:, :-1].to(bench.device), test[:, -1]


def gpt2(bench: Bench, size: dict[str, Any], dtype: str, holder: dict[str, Any]) -> None:
    """The GPT-2-sized window in ``dtype``: replica, step x group scores and bare JVPs (trained once, float32)."""
    if "ckpt" not in holder:
        def train() -> tuple[int, str]:
            holder["ckpt"] = gpt2_checkpoints(bench, size)
            n = sum(v.numel() for v in holder["ckpt"][1][0].values())
            return 0, f"{len(holder['ckpt'][1]) - 1} steps saved, {n:,} params"

        bench.row("GPT-2", "float32", "train + checkpoint", train)
        if "ckpt" not in holder:
            return
    template, states, X, next_token = holder["ckpt"]
    seq, vocab = X.shape[1], template.config.vocab_size
    traj = explaind.Trajectory.from_checkpoints(states, model=template)
    target = ((seq - 1) * vocab + next_token).tolist()  # the correct next-token logit at the last position
    common = {"quadrature": "gauss-legendre", "nodes": bench.nodes, "device": str(bench.device), "dtype": dtype}

    def replica() -> tuple[int, str]:
        report = explaind.KernelReplica(**common).fit(traj).fidelity_report(X)
        return int(report["total_evals"]), f"replica rel err {report['max_rel_error']:.1e}"

    def scores() -> tuple[int, str]:
        est = explaind.InfluenceEstimator(keep=("step", "group"), split=False, target=target,
                                          memory_budget=size["budget"], **common)
        att = est.fit(traj).transform(X)
        return round(sum(att.meta["evals_per_step"]) * X.shape[0]), _completeness(att)

    def bare() -> tuple[int, str]:
        idx = torch.as_tensor(target, device=bench.device)
        pick = lambda out: out.logits.reshape(out.logits.shape[0], -1).gather(1, idx[:, None])  # noqa: E731
        evals = bare_jvps(template, traj, X, range(traj.n_steps), bench.nodes, bench.device,
                          explaind.config.resolve_dtype(dtype), pick)
        return evals, ""

    bench.row("GPT-2", dtype, f"replica, {len(X)} sequences", replica)
    bench.row("GPT-2", dtype, f"step x group, {len(X)} sequences", scores)
    bench.row("GPT-2", dtype, f"bare batched JVPs, {len(X)} sequences", bare)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU (a smoke test, not a measurement)")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --quick)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--nodes", type=int, default=2, help="Gauss-Legendre nodes per step (default 2)")
    parser.add_argument("--time-limit", type=float, default=420.0, help="start no section after this many seconds")
    parser.add_argument("--skip", nargs="*", default=[], choices=["mod113", "gpt2"])
    parser.add_argument("--steps", type=int, default=None, help="override the MOD-113 steps (for estimates)")
    parser.add_argument("--gpt2-steps", type=int, default=None, help="override the GPT-2 window (for estimates)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda"))
    size = dict(SIZES["quick" if args.quick else "full"])
    size.update({k: v for k, v in (("steps", args.steps), ("gpt2_steps", args.gpt2_steps)) if v is not None})
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {card}; torch {torch.__version__}; {'quick sizes' if args.quick else 'full sizes'}; "
          f"gauss-legendre {args.nodes} nodes per step; time limit {args.time_limit:.0f} s", flush=True)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    bench = Bench(device, args.time_limit, args.nodes, time.perf_counter())
    checkpoints: dict[str, Any] = {}
    for dtype in args.dtypes:  # every workload in the first dtype before the second
        if "mod113" not in args.skip:
            mod113(bench, size, dtype)
        if "gpt2" not in args.skip:
            gpt2(bench, size, dtype, checkpoints)
    print(f"total {time.perf_counter() - bench.start:.1f} s", flush=True)


if __name__ == "__main__":
    main()
