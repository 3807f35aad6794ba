"""The end-to-end demo behind ``make demo`` / ``explaind demo``.

1. trains the modular-arithmetic transformer with AdamW and weight decay on a small modulus
   (lr 1e-2, weight decay 1, 60% of the pairs: with seed 0 it groks in under 800 steps, without AdamW loss
   spikes; ``grokking.PRESETS["small"]``) and records its trajectory;
2. computes the fidelity table of its kernel replica (midpoint 10, Gauss–Legendre 4, adaptive;
   the command prints it once, at the end);
3. runs the digits pruning benchmark (in a second process, beside stages 1 and 2, on a machine with
   a second core: it needs nothing from them);
4. writes the report folder: ``index.html`` (figures embedded) and the PNG files.

``size="tiny"`` does the same in seconds (tests); ``size="full"`` is the paper-scale grokking
run (GPU).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .. import exceptions
from ..exceptions import ConfigError
from . import fidelity, pruning_run
from .grokking import grokking_config
from .phases import run_outcome
from .report import build_report
from .run_file import clear_run_folder
from .runs import train_run

__all__ = ["DEMO_RULES", "DEMO_SIZES", "run_demo"]

#: Rules compared by the CPU demo (midpoint-100 costs 100 evaluations per step; ``replicate --table`` has it); the
#: adaptive one is the scores' rule and ``explaind replicate``'s default on runs as long as the demo's (2-node
#: panels, tol 1e-3 per step and input), which reaches its tolerance on the demo's run where the adaptive rule at
#: the replica's 1e-7 integrates kink-dense pairs on a grid that misses it (docs/cli.md, "explaind demo").
DEMO_RULES = [fidelity.Rule("midpoint", 10), fidelity.Rule("gauss-legendre", 4),
              fidelity.Rule(fidelity.SCORES_RULE.quadrature, fidelity.SCORES_RULE.nodes, fidelity.SCORES_TOL)]

#: size -> (fidelity inputs, fidelity rules, pruning preset)
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"n_fidelity": 4, "rules": DEMO_RULES, "pruning": "tiny"},
    "small": {"n_fidelity": 4, "rules": DEMO_RULES, "pruning": "small"},
    "full": {"n_fidelity": 256, "rules": fidelity.all_rules(), "pruning": "full"},
}


def _pruning_job(prune_dir: str, size: str, seed: int, threads: int) -> tuple[dict[str, Any], list[list[str]]]:
    """The pruning stage in a child process: its summary and the warnings it raised, as (category, message).

    Only JSON-ready values cross the process boundary; the parent raises the warnings again.
    """
    import torch

    torch.set_num_threads(threads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summary = pruning_run.run_benchmark(prune_dir, size=size, seed=seed, progress=False)
    return summary, [[w.category.__name__, str(w.message)] for w in caught]


def _rewarn(caught: list[list[str]]) -> None:
    """Raise in this process the warnings the pruning child recorded (explaind's and Python's categories kept)."""
    import builtins

    for name, message in caught:
        category = getattr(exceptions, name, None) or getattr(builtins, name, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = UserWarning
        warnings.warn(message, category, stacklevel=3)


def run_demo(out_dir: str | Path = "report", *, size: str = "small", seed: int = 0, device: str = "cpu",
             progress: bool = False, log: Callable[[str], None] | None = None,
             parallel: bool | None = None) -> dict[str, Any]:
    """Run the demo; returns the fidelity table, timings and the report path.

    Parameters
    ----------
    out_dir : str or Path
        Report folder; the run is recorded to ``out_dir/run`` and the pruning benchmark to
        ``out_dir/pruning`` (both replaced when they exist from an earlier demo).
    size : {"tiny", "small", "full"}
    seed : int
    device : str
    progress : bool
    log : callable, optional
        Receives one line per stage.
    parallel : bool, optional
        Run the pruning benchmark in a second process (``spawn``, torch's current thread count) while
        the run trains and its fidelity is measured. ``None``: where the machine has more CPU cores
        than torch uses and ``size`` is not ``"tiny"``. The results are those of the serial demo but
        for rounding that depends on the thread count; the child's warnings are raised again here.

    Returns
    -------
    dict
        ``fidelity`` (rows), ``fidelity_text`` (the printed table), ``timings`` (seconds per
        stage), ``seconds`` (total), ``report`` (path of ``index.html``), ``run`` (run folder),
        ``n_steps`` and ``outcome`` (:meth:`explaind.studies.phases.Outcome.to_dict`: whether
        and when the run memorised and generalised).
    """
    import shutil

    if size not in DEMO_SIZES:
        raise ConfigError(f"Unknown size {size!r}. Choose one of: {', '.join(DEMO_SIZES)}.")
    say = log or (lambda message: None)
    preset = DEMO_SIZES[size]
    out = Path(out_dir)
    run_dir = out / "run"
    clear_run_folder(run_dir)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    import torch

    threads = torch.get_num_threads()
    if parallel is None:
        parallel = size != "tiny" and (os.cpu_count() or 1) > threads
    prune_dir = out / "pruning"
    if prune_dir.exists():
        shutil.rmtree(prune_dir)
    pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) if parallel else None
    job: Future | None = None
    if pool is not None:
        job = pool.submit(_pruning_job, str(prune_dir), preset["pruning"], seed, threads)
        say(f"[3/4, beside 1 and 2] pruning benchmark on digits ({preset['pruning']}) in a second process")

    try:
        config, options = grokking_config(size, seed=seed, device=device)
        say(f"[1/4] training the modular transformer on (a + b) mod {config['data']['p']} with AdamW "
            f"(weight decay {config['weight_decay']}) for up to {config['steps']} steps and recording it to {run_dir}")
        t = time.perf_counter()
        run = train_run(config, run_dir, progress=progress)
        timings["train"] = round(time.perf_counter() - t, 2)
        say(f"      {run.trajectory.n_steps} steps, train acc {run.history.train_acc[-1]:.3f}, "
            f"validation acc {run.history.val_acc[-1]:.3f} ({timings['train']:.0f} s)")
        outcome = run_outcome(run.history)
        say(f"      {outcome.describe()}")

        n_fidelity = min(preset["n_fidelity"], run.dataset.n_val)
        say(f"[2/4] fidelity of the kernel replica: "
            f"{fidelity.rules_cost(preset['rules'], int(run.trajectory.n_steps), n_fidelity)}")
        t = time.perf_counter()
        rows = fidelity.run_fidelity(run, preset["rules"], n_test=preset["n_fidelity"],
                                     device=device, progress=progress, setup="modular transformer, AdamW", warn=False)
        timings["fidelity"] = round(time.perf_counter() - t, 2)
        # printed once, by the caller, after the report (so that -q still shows it); the fixed rules' errors are the
        # table's 'step error' column, and the sentence that reads it is printed under the table, not warned
        note = fidelity.inexact_rules_note(rows)
        table = fidelity.format_table(rows, fidelity.TABLE_COLUMNS) + ("" if note is None else f"\nnote: {note}")

        t = time.perf_counter()
        if job is None:
            say(f"[3/4] pruning benchmark on digits ({preset['pruning']})")
            pruning_run.run_benchmark(prune_dir, size=preset["pruning"], seed=seed, progress=progress)
        else:
            say("[3/4] waiting for the pruning benchmark's process")
            _, caught = job.result()
            _rewarn(caught)
        timings["pruning"] = round(time.perf_counter() - t, 2)  # with parallel: the wait after stages 1 and 2
    finally:  # a failed stage waits for the pruning process rather than leave it behind
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    say("[4/4] influence figures and the HTML report")
    t = time.perf_counter()
    page = build_report(run, out, progress=progress, options=options, fidelity_rows=rows, pruning_dir=prune_dir,
                        log=lambda m: say("      " + m), title=f"explaind demo: the modular transformer on "
                                                             f"(a + b) mod {config['data']['p']}")
    timings["report"] = round(time.perf_counter() - t, 2)
    total = round(time.perf_counter() - start, 2)
    return {"fidelity": rows, "fidelity_text": table, "timings": timings, "seconds": total, "report": str(page),
            "run": str(run_dir), "n_steps": int(run.trajectory.n_steps), "outcome": outcome.to_dict()}
