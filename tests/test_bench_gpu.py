"""``benchmarks/bench_gpu.py --quick`` runs every section at tiny size on the CPU and prints a complete table."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _rows(text: str) -> dict[tuple[str, str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 8 and cells[0] != "workload":
            rows[tuple(cells[:3])] = cells[3:]
    return rows


def test_quick_run_prints_every_row(capsys):
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    module.main(["--quick"])
    out = capsys.readouterr().out
    assert out.startswith("device: CPU")
    assert "failed" not in out and "skipped" not in out
    rows = _rows(out)
    for dtype in ("float32", "float64"):
        for what in ("train + record", "replica, 8 inputs", "step x group, 8 inputs", "bare batched JVPs, 8 inputs",
                     "train axis, 4 inputs"):
            assert ("MOD-7", dtype, what) in rows, (dtype, what)
        for what in ("replica, 2 sequences", "step x group, 2 sequences", "bare batched JVPs, 2 sequences"):
            assert ("GPT-2", dtype, what) in rows, (dtype, what)
        # the fixed 2-node rule evaluates (input, node) pairs like the bare JVPs: 6 steps x 2 nodes x 8 inputs
        for workload, n in (("MOD-7", "8 inputs"), ("GPT-2", "2 sequences")):
            counts = {rows[(workload, dtype, f"{what}, {n}")][1] for what in ("replica", "bare batched JVPs")}
            assert len(counts) == 1, (workload, dtype, counts)
        assert rows[("MOD-7", dtype, "replica, 8 inputs")][1] == "96"
    for workload, what in (("MOD-7", "step x group, 8 inputs"), ("MOD-7", "train axis, 4 inputs"),
                           ("GPT-2", "step x group, 2 sequences")):
        gap = float(re.search(r"completeness ([0-9.e+-]+)", rows[(workload, "float64", what)][4]).group(1))
        assert gap <= 1e-10, (workload, what, gap)
    assert re.search(r"total [0-9.]+ s", out)
