"""What the step files' binding (store schema 3, docs/recording.md "Strangers' files, round 7") costs a recording.

Since schema 3 every step file carries the run's identity (one string, built once per writer) and, on the
steps whose optimizer state is written, the name, dtype and shape of every tensor of that state and the
checksum of its description (``explaind.trajectory._binding.state_binding``); every step read compares the
identity, a resume compares the state. The cost grows with the number of state tensors, not their size, so
the model here has many small ones: ``--layers`` Linear(16, 16) layers (two tensors each) trained with Adam
(three state tensors per parameter; the state file adds the recorder audit's momentum, one per parameter): 100
layers, 200 parameters, 600 optimizer state tensors, 800 tensors in each state file.

Printed: CPU seconds of the whole process (all threads) and wall seconds to record ``--steps`` steps into a
dense store (``fsync=False``: the flushes would hide the CPU work), per step in ms, and, where this explaind
has it (schema 3), the time of ``state_binding`` alone on the final state, of reading every step file
back (``params`` of each step) and of ``verify()`` of the whole store. Run it with the code before and after
the change on ``PYTHONPATH``, in turn:

``python benchmarks/bench_store_binding.py [--layers 100] [--steps 100] [--threads 1]``
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.trajectory import manifest as manifest_module


def _model(layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks: list[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(16, 16), nn.Tanh()]
    return nn.Sequential(*blocks).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    X = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(64, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _model(args.layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    root = Path(tempfile.mkdtemp(prefix="bench-binding-"))
    try:
        rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=root / "run", fsync=False,
                                          check_gradients=False)
        cpu, wall = time.process_time(), time.perf_counter()
        with rec:
            for s in range(args.steps):
                idx = torch.arange(s % 8 * 8, s % 8 * 8 + 8)
                opt.zero_grad()
                F.mse_loss(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        n_state = len(opt.state_dict()["state"]) and sum(len(v) for v in opt.state_dict()["state"].values())
        print(f"schema {manifest_module.SCHEMA_VERSION}: {args.layers} layers, {2 * args.layers} parameters, "
              f"{n_state} optimizer state tensors, {args.steps} steps, threads {args.threads}")
        print("| what | CPU s | wall s | CPU ms per step |")
        print("|---|---|---|---|")
        print(f"| record | {cpu:.3f} | {wall:.3f} | {1e3 * cpu / args.steps:.2f} |")
        traj = explaind.Trajectory.load(root / "run", model=_model(args.layers))
        cpu, wall = time.process_time(), time.perf_counter()
        for s in range(1, traj.n_steps + 1):
            traj.params(s)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"| read every step file | {cpu:.3f} | {wall:.3f} | {1e3 * cpu / args.steps:.2f} |")
        traj = explaind.Trajectory.load(root / "run", model=_model(args.layers))
        cpu, wall = time.process_time(), time.perf_counter()
        traj.verify()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        print(f"| verify() | {cpu:.3f} | {wall:.3f} | {1e3 * cpu / args.steps:.2f} |")
        try:
            from explaind.trajectory._binding import state_binding
            from explaind.trajectory._io import encode_optimizer_state
        except ImportError:
            return  # before schema 3
        tensors, meta = encode_optimizer_state(opt.state_dict())
        reps = 50
        cpu = time.process_time()
        for _ in range(reps):
            state_binding(tensors, meta)
        cpu = time.process_time() - cpu
        print(f"| state_binding alone ({len(tensors)} tensors) | {cpu / reps:.4f} | | {1e3 * cpu / reps:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
