"""What the recorder's gradient check adds to a training step: its time and its peak memory.

Records ``--steps`` steps of bench_real_models.py's cases (tiny GPT-2, ResNet-18) with the store on and the
gradient check at the last step only (``check_gradients=[steps - 1]``), each case in a fresh child process. A
sampling thread reads the resident set every 2 ms and keeps its maximum per phase: the loop's ``forward``,
``backward`` and ``step`` (``log_batch`` and ``optimizer.step()``) over the steps before the check, then the
``check`` (the recorder's gradient check inside the last ``optimizer.step()``). The allocator keeps freed memory,
so a phase's peak includes what earlier phases left resident: the loop phases come before the check so that
theirs are not the check's. Prints per case: the check's time over the median time of the loop's forward +
backward (the check recomputes one), the peaks in MB above the start of the run, and ``check - loop``: how far
the check's peak exceeds the loop's own. With ``--every`` every step is checked (``check_gradients=True``, the
check's time is then the median over steps 1..N-1) and ``run MB`` (the peak of the whole run, as ``VmHWM``) is
the figure to compare.

Run: ``python benchmarks/bench_gradient_check.py [--steps N] [--every] [--cases gpt2 resnet18]``; to compare two
versions of explaind, run it with each on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_models import _case  # noqa: E402  (the same models, data and optimizers)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


class PhasePeaks:
    """Peak resident set per phase, sampled every 2 ms on a daemon thread."""

    def __init__(self) -> None:
        self.phase = "setup"
        self.peak: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, phase = _rss_mb(), self.phase
            self.peak[phase] = max(self.peak.get(phase, 0.0), rss)
            time.sleep(0.002)

    def __enter__(self) -> PhasePeaks:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(name: str, steps: int, every: bool) -> dict[str, object]:
    """One recorded run; per-phase peaks (MB above the start) and the check's time over the loop's."""
    import explaind
    from explaind.trajectory import _recorder_checks

    torch.set_num_threads(1)
    base = _rss_mb()
    check_s: list[float] = []
    loop_s: list[float] = []
    with PhasePeaks() as peaks, tempfile.TemporaryDirectory() as root:
        original = _recorder_checks.RecorderChecksMixin._check_gradient

        def timed(self, *args, **kwargs):
            before, peaks.phase = peaks.phase, "check"
            start = time.perf_counter()
            try:
                return original(self, *args, **kwargs)
            finally:
                check_s.append(time.perf_counter() - start)
                peaks.phase = before

        _recorder_checks.RecorderChecksMixin._check_gradient = timed
        model, opt, X, y, batch, forward, loss = _case(name, torch.device("cpu"))
        model.train()
        rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), store=Path(root) / "run",
                                          check_gradients=True if every else [steps - 1])
        with rec:
            for i in range(steps):
                idx = torch.arange(i * batch, (i + 1) * batch) % X.shape[0]
                opt.zero_grad()
                start = time.perf_counter()
                peaks.phase = "forward"
                out = forward(model, X[idx])
                value = F.cross_entropy(out, y[idx]) if loss == "cross_entropy" else loss(out, y[idx])
                peaks.phase = "backward"
                value.backward()
                del out, value
                loop_s.append(time.perf_counter() - start)
                peaks.phase = "step"
                rec.log_batch(idx)
                opt.step()
            peaks.phase = "exit"
    mb = {k: v - base for k, v in peaks.peak.items()}
    check = statistics.median(check_s[1:] if every else check_s)
    return {"check_over_loop": check / statistics.median(loop_s[1:]), "peaks": mb}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--cases", nargs="+", choices=("gpt2", "resnet18"), default=["gpt2", "resnet18"])
    parser.add_argument("--every", action="store_true", help="check every step (default: the last one only)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.every)))
        return
    checked = "every step" if args.every else "the last step"
    print(f"steps={args.steps} ({checked} checked, store on; step 0 not timed)  torch threads=1  "
          f"load average={os.getloadavg()[0]:.1f}")
    header = f"{'model':<10}{'check/loop time':>16}{'forward MB':>12}{'backward MB':>13}{'step MB':>9}{'check MB':>10}"
    print(header + f"{'check - loop MB':>17}{'run MB':>8}")
    print("-" * (len(header) + 25))
    for name in args.cases:
        done = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps)]
                              + (["--every"] if args.every else []),
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{name} failed:\n{done.stderr[-4000:]}")
        got = json.loads(done.stdout.strip().splitlines()[-1])
        p = got["peaks"]
        loop = max(p["forward"], p["backward"], p["step"])
        print(f"{name:<10}{got['check_over_loop']:>16.2f}{p['forward']:>12.0f}{p['backward']:>13.0f}{p['step']:>9.0f}"
              f"{p['check']:>10.0f}{p['check'] - loop:>17.0f}{max(p.values()):>8.0f}")


if __name__ == "__main__":
    main()
