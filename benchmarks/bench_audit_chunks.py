"""The update audit in chunks against the audit of whole tensors, on a ResNet-18: values and peak memory.

Records ``--steps`` steps of bench_real_models.py's ResNet-18 (11.2M float32 parameters, SGD momentum) in
memory, twice in fresh child processes: with the audit's default chunks (``_audit.CHUNK_ELEMENTS``, 2**17
elements) and with chunks larger than any tensor (the audit of whole tensors, as before chunking). Prints
each step's audit value from both runs, their relative difference (float64 summation order only), and each
run's peak resident set above its start (``VmHWM``; the in-memory trajectory's growth included, so compare
the two rows, not the plain loop).

Run: ``python benchmarks/bench_audit_chunks.py [--steps N]``
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_models import _case, _status_kb  # noqa: E402  (the same model, data and optimizer)


def child(chunk: int, steps: int) -> dict[str, object]:
    import explaind
    from explaind.trajectory import _audit

    if chunk:
        _audit.CHUNK_ELEMENTS = chunk
    torch.set_num_threads(1)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current resident set
    base = _status_kb("VmRSS")
    model, opt, X, y, batch, forward, loss = _case("resnet18", torch.device("cpu"))
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=False)
    with rec:
        for i in range(steps):
            idx = torch.arange(i * batch, (i + 1) * batch) % X.shape[0]
            opt.zero_grad()
            F.cross_entropy(forward(model, X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    audit = [float(v) for v in rec.trajectory.audit()]
    return {"audit": audit, "peak_mb": (_status_kb("VmHWM") - base) / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.steps)))
        return
    runs = {}
    for label, chunk in (("chunks", 0), ("whole", 1 << 62)):
        cmd = [sys.executable, __file__, "--child", str(chunk), "--steps", str(args.steps)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        runs[label] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'step':>4}{'audit, chunks':>24}{'audit, whole':>24}{'relative difference':>22}")
    for s, (a, b) in enumerate(zip(runs["chunks"]["audit"], runs["whole"]["audit"])):
        print(f"{s:>4}{a:>24.17g}{b:>24.17g}{abs(a - b) / abs(b) if b else abs(a - b):>22.2e}")
    print(f"peak MB above the start: chunks {runs['chunks']['peak_mb']:.0f}, whole {runs['whole']['peak_mb']:.0f}")


if __name__ == "__main__":
    main()
