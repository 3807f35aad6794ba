"""Size presets for the pruning benchmark (:func:`explaind.pruning.run_digits_benchmark`).

``explaind prune`` and the demo call :func:`run_benchmark`; the benchmark itself (training,
recording, scoring with every registered strategy, the table and the plot) lives in
:mod:`explaind.pruning`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..exceptions import ConfigError

__all__ = ["PRESETS", "run_benchmark", "format_result", "cost_text", "PLOT_FILE"]

#: File name of the benchmark's figure inside its output folder.
PLOT_FILE = "pruning.png"

#: size -> keyword arguments of ``run_digits_benchmark``
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 1, "hidden_sizes": (16,), "sparsities": (0.5, 0.9), "batch_size": 100,
             "strategies": ("magnitude", "random")},
    "small": {"epochs": 3, "hidden_sizes": (64, 32), "sparsities": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)},
    "full": {},
}


def run_benchmark(out_dir: str | Path, *, size: str = "small", seed: int = 0, nodes: int | None = None,
                  quadrature: str | None = None, tol: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Run the digits pruning benchmark at a size preset and return a JSON-ready summary.

    Parameters
    ----------
    out_dir : str or Path
        Receives the benchmark's ``results.json``, CSV files, ``table.txt`` and ``pruning.png``.
    size : {"tiny", "small", "full"}
        ``tiny``: one epoch, magnitude and random only, two sparsities (seconds); ``small``: one seed,
        every strategy; ``full``: the benchmark's defaults (three seeds, ten epochs).
    seed : int
        Seed of the single model trained by ``tiny`` and ``small`` (``full`` uses seeds 0, 1, 2).
    nodes : int, optional
        Nodes per step of the ExPLAIND scores' path-integral rule (per panel for ``adaptive``; ``None``:
        the benchmark's default for the rule).
    quadrature : str, optional
        The scores' rule (``None``: the benchmark's default, the adaptive rule of ``explaind influence``).
    tol : float, optional
        The adaptive rule's relative tolerance per step and input (``None``: the benchmark's default,
        :data:`~explaind.studies.fidelity.SCORES_TOL`). The scores' estimator warns when the quadrature
        error they leave out is above 0.1% of the explained change.
    progress : bool
        Progress bars.
    """
    from ..pruning import run_digits_benchmark

    if size not in PRESETS:
        raise ConfigError(f"Unknown size {size!r}. Choose one of: {', '.join(PRESETS)}.")
    options = dict(PRESETS[size])
    if nodes is not None:
        if isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1:
            raise ConfigError(f"nodes={nodes!r} must be a positive integer (Gauss-Legendre nodes per step), e.g. 4.")
        options["quadrature_nodes"] = nodes
    for key, value in (("quadrature", quadrature), ("tol", tol)):
        if value is not None:
            options[key] = value
    if size != "full":
        options["seeds"] = (seed,)
    result = run_digits_benchmark(out_dir, progress=progress, **options)
    out = Path(out_dir)
    return {
        "out_dir": str(out),
        "plot": str(out / PLOT_FILE),
        "table": result.table(),
        "summary": result.summary(),
        "baseline": result.baseline,
    }


def cost_text(size: str = "small") -> str:
    """What ``run_benchmark`` at ``size`` will do, counted before it starts (the CLI says it up front).

    The count follows ``run_digits_benchmark``'s defaults for what a preset leaves out: models trained
    (one per seed) and their SGD steps over the training digits, the strategies that score each
    model (all registered ones unless the preset names them) and the pruned models evaluated
    (strategies x sparsities per trained model).
    """
    import inspect

    from ..plugins import list_entries
    from ..pruning import run_digits_benchmark
    from ..pruning.digits import load_digits_splits

    if size not in PRESETS:
        raise ConfigError(f"Unknown size {size!r}. Choose one of: {', '.join(PRESETS)}.")
    defaults = {k: v.default for k, v in inspect.signature(run_digits_benchmark).parameters.items()
                if v.default is not inspect.Parameter.empty}
    options = {**defaults, **PRESETS[size]}
    n_models = 1 if size != "full" else len(tuple(options["seeds"]))
    n_train = int(load_digits_splits(options["architecture"])["train"][0].shape[0])
    steps = int(options["epochs"]) * -(-n_train // int(options["batch_size"]))
    names = list(options["strategies"]) if options["strategies"] is not None else list_entries("pruning_strategy")
    pruned = n_models * len(names) * len(tuple(options["sparsities"]))
    each = " each" if n_models != 1 else ""
    return (f"prune ({size}): trains {n_models} model{'s' if n_models != 1 else ''} of {steps} steps{each}, scores "
            f"{'it' if n_models == 1 else 'each'} with {len(names)} strategies ({', '.join(names)}) and evaluates "
            f"{pruned} pruned models, without retraining")


def format_result(result: dict[str, Any]) -> str:
    """The benchmark's table and where its files are."""
    return f"{result['table']}\n\nresults and {PLOT_FILE} written to {result['out_dir']}"
