"""Training configs of the quickstart's grokking run: when they stop, and whether AdamW spikes on the way.

The quickstart's ``explaind train`` command (and ``grokking.PRESETS["small"]``, which ``explaind study grokking``
and ``explaind demo`` train) stops once train and validation accuracy both reach 1.0 at one of its evaluations
(every 10 steps). In float32 where that happens follows the CPU's rounding: a config with AdamW loss spikes near
its end may stop early on one machine and run to its cap on another. This script trains each config as
``explaind.studies.runs.train_run`` does (same model, data split, full batch, optimizer and evaluation), without
the recorder (which only observes the optimizer), for each seed, parameter dtype and CPU thread count, and prints
one table row per run:

* ``stop``: the step at which ``--stop-at 1.0`` ends the run (both accuracies 1.0 at an evaluation every 10 steps),
  or ``-`` when it runs to its cap;
* ``mem``: the first evaluation with train accuracy >= 0.99 (memorisation) and ``grok``: the first with validation
  accuracy >= 0.99 (the grokking delay is ``grok - mem``; :func:`explaind.studies.phases.run_outcome`);
* ``final``: train / validation accuracy at the stop (or the cap);
* ``spikes``: loss spikes before the stop: episodes (runs of consecutive steps, accuracies evaluated at every step)
  in which the train accuracy falls more than 0.05 below its best so far, counted from the first step whose train
  accuracy reached 0.5 (a fall at initialisation is not a spike);
* ``tail``: training continued ``--tail`` steps past the stop: the spikes there and the smallest validation accuracy
  (a config that stays at 1.0 there does not depend on where exactly the stop fires).

``--check`` first compares the loop's evaluations with ``train_run``'s history for the first config and seed (they
must agree exactly, or the table does not describe the command). Step counts are deterministic per machine and
config, so the machine's load does not change them; the CPU does (float32 rounding).

Run: ``python benchmarks/bench_quickstart_configs.py [--configs NAME ...] [--seeds 0 1 2] [--dtypes float32 float64]
[--threads 1 2] [--tail 200] [--check]``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Any

import torch

#: name -> TrainConfig fields that differ from the quickstart's command (p=23, 60 % of the pairs for training,
#: d_model 48, 4 heads, MLP width 192, AdamW with betas (0.9, 0.98), full batch, evaluated every 10 steps).
BASE: dict[str, Any] = {
    "architecture": "modular_transformer", "dataset": "modular", "data": {"p": 23, "n_train": 0.6, "n_val": None},
    "model": {"d_model": 48, "d_mlp": 192}, "optimizer": "adamw", "betas": (0.9, 0.98), "eval_every": 10,
    "stop_at": 1.0,
}


def _named(lr: float, wd: float, beta2: float = 0.98, n_train: float = 0.6, steps: int = 800,
           p: int = 23) -> tuple[str, dict]:
    name = (f"lr{lr:g}_wd{wd:g}" + (f"_b{beta2:g}" if beta2 != 0.98 else "")
            + (f"_f{n_train:g}" if n_train != 0.6 else "") + (f"_s{steps}" if steps != 800 else "")
            + (f"_p{p}" if p != 23 else ""))
    return name, {"lr": lr, "weight_decay": wd, "betas": (0.9, beta2), "steps": steps,
                  "data": {**BASE["data"], "n_train": n_train, "p": p}}


#: The configs of the sweep: the quickstart's command until this release (``lr0.01_wd2``), its command now
#: (``lr0.01_wd1``), and the others tried (docs/cli.md, "The quickstart's training run").
CONFIGS: dict[str, dict[str, Any]] = dict([
    _named(1e-2, 2.0), _named(1e-2, 1.0), _named(1e-2, 1.5), _named(1e-2, 1.0, 0.95), _named(1e-2, 1.0, n_train=0.7),
    _named(1e-2, 1.0, p=31), _named(1e-2, 2.0, 0.95), _named(1e-2, 2.0, n_train=0.7), _named(1e-2, 2.0, n_train=0.8),
    _named(5e-3, 2.0), _named(5e-3, 5.0), _named(5e-3, 5.0, 0.95), _named(5e-3, 5.0, 0.95, n_train=0.7),
    _named(3e-3, 2.0), _named(3e-3, 10.0), _named(3e-3, 5.0, n_train=0.7), _named(3e-3, 5.0, n_train=0.8),
    _named(3e-3, 10.0, n_train=0.7),
])


def _parse(name: str) -> dict[str, Any]:
    """A config from its name, e.g. ``lr0.01_wd2_b0.95_f0.7_s600_p31`` (lr, weight decay, beta2, train fraction,
    steps, modulus)."""
    keys = {"lr": "lr", "wd": "wd", "b": "beta2", "f": "n_train", "s": "steps", "p": "p"}
    values: dict[str, float] = {}
    for part in name.split("_"):
        key = part.rstrip("0123456789.e-")
        if key not in keys or key == part:
            raise SystemExit(f"config {name!r}: cannot read {part!r}; write e.g. lr0.01_wd2_b0.95_f0.7_s600")
        values[keys[key]] = float(part[len(key):])
    for key in ("steps", "p"):
        if key in values:
            values[key] = int(values[key])
    return _named(**values)[1]


def _config(name: str, seed: int, dtype: str) -> dict[str, Any]:
    return {**BASE, **(CONFIGS[name] if name in CONFIGS else _parse(name)), "seed": seed, "dtype": dtype}


def train_curves(cfg: dict[str, Any], tail: int) -> dict[str, Any]:
    """Train as ``train_run`` does, evaluating at every step; the stop of ``--stop-at`` on its 10-step grid."""
    import explaind
    from explaind.config import resolve_dtype
    from explaind.datasets import load_dataset
    from explaind.studies.runs import TrainConfig, _batches, _optimizer, evaluate, model_config_for

    config = TrainConfig(**cfg)
    dataset = load_dataset(config.dataset, **config.data)
    model_cfg = model_config_for(config.architecture, dataset, config.model)
    model = explaind.build_model(config.architecture, model_cfg, seed=config.seed, dtype=resolve_dtype(config.dtype))
    optimizer = _optimizer(config, model)
    batches = _batches(dataset.n_train, dataset.n_train, config.seed)
    X_tr, y_tr, X_va, y_va = dataset.X_train, dataset.y_train, dataset.X_val, dataset.y_val
    rows = [(0, *evaluate(model, X_tr, y_tr), *evaluate(model, X_va, y_va))]
    stop = None
    last = config.steps
    step = 0
    while step < last:
        step += 1
        idx = next(batches)
        model.train()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(X_tr[idx]), y_tr[idx]).backward()
        optimizer.step()
        rows.append((step, *evaluate(model, X_tr, y_tr), *evaluate(model, X_va, y_va)))
        if stop is None and step % config.eval_every == 0 and rows[-1][2] >= 1.0 and rows[-1][4] >= 1.0:
            stop, last = step, min(step + tail, config.steps + tail)
    return {"rows": rows, "stop": stop, "cap": config.steps}


def spikes(rows: list[tuple], start: int, stop: int, drop: float = 0.05) -> int:
    """Episodes in rows ``start <= step < stop`` where train accuracy is ``drop`` below its best so far."""
    best, inside, count = 0.0, False, 0
    armed = False
    for step, _, acc, _, _ in rows:
        armed = armed or acc >= 0.5
        if step >= start and step < stop and armed:
            low = acc < best - drop
            count += low and not inside
            inside = low
        best = max(best, acc)
    return count


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    rows, stop, cap = result["rows"], result["stop"], result["cap"]
    end = stop if stop is not None else cap
    grid = [r for r in rows if r[0] % 10 == 0 and r[0] <= end]
    mem = next((r[0] for r in grid if r[2] >= 0.99), None)
    grok = next((r[0] for r in grid if r[4] >= 0.99 and mem is not None and r[0] >= mem), None)
    final = rows[end]
    tail = [r for r in rows if r[0] > end]
    return {"stop": stop, "mem": mem, "grok": grok, "final": (final[2], final[4]),
            "spikes": spikes(rows, 0, end + 1), "tail_spikes": spikes(rows, end + 1, rows[-1][0] + 1) if tail else 0,
            "tail_min_val": min((r[4] for r in tail), default=float("nan")), "tail_steps": len(tail)}


def check(name: str, seed: int, dtype: str) -> None:
    """The loop's evaluations against ``train_run``'s recorded history (same config, in memory)."""
    from explaind.studies.runs import train_run

    cfg = _config(name, seed, dtype)
    run = train_run(cfg, None, progress=False)
    mine = {r[0]: r[1:] for r in train_curves(cfg, tail=0)["rows"]}
    h = run.history
    theirs = {s: (a, b, c, d) for s, a, b, c, d in zip(h.step, h.train_loss, h.train_acc, h.val_loss, h.val_acc)}
    bad = [s for s in theirs if mine.get(s) != theirs[s]]
    if bad:
        raise SystemExit(f"check failed: the loop differs from train_run at steps {bad[:5]} ({name}, seed {seed})")
    print(f"# check: {len(theirs)} evaluations of train_run ({name}, seed {seed}, {dtype}) equal the loop's, "
          f"{run.trajectory.n_steps} steps", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS),
                   help="names of CONFIGS, or any name of that form (default: all of CONFIGS)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--tail", type=int, default=200, help="steps trained past the stop (default 200)")
    p.add_argument("--check", action="store_true", help="first compare the loop with train_run")
    p.add_argument("--curve", type=int, default=0, metavar="K",
                   help="also print train / validation accuracy every K steps of each run")
    args = p.parse_args(argv)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}", flush=True)
    if args.check:
        torch.set_num_threads(args.threads[0])
        check(args.configs[0], args.seeds[0], args.dtypes[0])
    head = ("| config | seed | dtype | threads | stop | mem | grok | final train / val | spikes | tail spikes "
            "| tail min val | s |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in args.configs:
        for dtype in args.dtypes:
            for threads in args.threads:
                torch.set_num_threads(threads)
                for seed in args.seeds:
                    t = time.process_time()
                    result = train_curves(_config(name, seed, dtype), args.tail)
                    s = summarise(result)
                    cpu = time.process_time() - t
                    line = (f"| {name} | {seed} | {dtype} | {threads} | {s['stop'] or '-'} | {s['mem'] or '-'} | "
                            f"{s['grok'] or '-'} | {s['final'][0]:.3f} / {s['final'][1]:.3f} | {s['spikes']} | "
                            f"{s['tail_spikes']} | {s['tail_min_val']:.3f} | {cpu:.0f} |")
                    lines.append(line)
                    print("#", line, flush=True)
                    if args.curve:
                        print("#   " + " ".join(f"{r[0]}:{r[2]:.2f}/{r[4]:.2f}" for r in result["rows"][::args.curve]),
                              flush=True)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
