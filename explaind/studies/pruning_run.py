"""Size presets for the pruning benchmark (:func:`explaind.pruning.run_digits_benchmark`).

``explaind prune`` and the demo call :func:`run_benchmark`; the benchmark itself (training,
recording, scoring with every registered strategy, the table and the plot) lives in
:mod:`explaind.pruning`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..exceptions import ConfigError

__all__ = ["PRESETS", "run_benchmark", "format_result", "PLOT_FILE"]

#: File name of the benchmark's figure inside its output folder.
PLOT_FILE = "pruning.png"

#: size -> keyword arguments of ``run_digits_benchmark``
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"epochs": 1, "hidden_sizes": (16,), "sparsities": (0.5, 0.9), "batch_size": 100,
             "strategies": ("magnitude", "random")},
    "small": {"epochs": 3, "hidden_sizes": (64, 32), "sparsities": (0.5, 0.7, 0.8, 0.9, 0.95, 0.98)},
    "full": {},
}


def run_benchmark(out_dir: str | Path, *, size: str = "small", seed: int = 0, progress: bool = False) -> dict[str, Any]:
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
    progress : bool
        Progress bars.
    """
    from ..pruning import run_digits_benchmark

    if size not in PRESETS:
        raise ConfigError(f"Unknown size {size!r}. Choose one of: {', '.join(PRESETS)}.")
    options = dict(PRESETS[size])
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


def format_result(result: dict[str, Any]) -> str:
    """The benchmark's table and where its files are."""
    return f"{result['table']}\n\nresults and {PLOT_FILE} written to {result['out_dir']}"
