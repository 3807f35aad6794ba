"""Where a recorded step's peak memory is, and what the recorder holds there.

Runs bench_real_models.py's cases (tiny GPT-2, ResNet-18) for ``--steps`` steps in a fresh child process per
mode, with glibc's ``MALLOC_MMAP_THRESHOLD_=65536`` (every allocation of 64 KiB or more is a memory map of its
own, unmapped when freed), so the resident set follows the bytes alive rather than what the heap keeps. The
resident set is read synchronously at every module's forward (before and after), at every parameter's
gradient accumulation in ``backward()``, and around ``log_batch`` and ``optimizer.step()``; each reading is
labelled with the phase (``forward``, ``backward``, ``step``) and the module or parameter. Prints, per mode,
the peak above the start of the run (steps after the first two), where it was, and the recorder's step-to-step
copies alive at that moment, in MB: ``theta`` (its copy of the parameters before the step), ``grad`` (the
gradient snapshots), ``state`` (the pool's copies of the optimizer state, in use or idle), ``audit`` (the update
audit's momentum), ``coef`` (pooled coefficient tensors).

The modes: ``plain`` (no recorder), ``disk`` (the recorder's defaults with a dense store), ``disk-nocheck``
(without the gradient check), ``disk-lean`` (without the gradient check and the update audit), ``disk-sparse10``
(as ``disk-lean``, with a sparse store: ``checkpoint_every=10``).

Run: ``python benchmarks/bench_recording_peak.py [--steps N] [--cases gpt2 resnet18] [--modes plain disk ...]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_real_models import LIVE_MMAP_THRESHOLD, _case  # noqa: E402  (the same models, data and optimizers)

MODES = ("plain", "disk", "disk-nocheck", "disk-lean", "disk-sparse10")
OPTIONS = {"disk-nocheck": {"check_gradients": False}, "disk-lean": {"audit": False, "check_gradients": False},
           "disk-sparse10": {"audit": False, "check_gradients": False, "checkpoint_every": 10}}


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20


def _mb(tensors: object) -> float:
    seen: dict[int, int] = {}
    for t in tensors:  # type: ignore[attr-defined]
        if isinstance(t, Tensor) and t.device.type == "cpu":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values()) / 2**20


def held(rec: object) -> dict[str, float]:
    """The recorder's step-to-step copies alive now, MB by kind (reads its private attributes: a probe)."""
    if rec is None:
        return {}
    pool = rec._pool._free  # type: ignore[attr-defined]
    idle = {p: [t for k, bufs in pool.items() if k.startswith(p) for t in bufs] for p in ("param.", "state.", "coef.")}
    theta = list((rec._theta or {}).values()) + idle["param."]  # type: ignore[attr-defined]
    state = list(idle["state."])
    for copy in getattr(rec, "_probe_states", []):  # the latest step's copies: a StateCopy's pool buffers, or
        state += list(copy.pooled.values()) if hasattr(copy, "pooled") else list(copy.values())  # the encoded state
    return {"theta": _mb(theta), "grad": _mb(rec._tap._raw.values()),  # type: ignore[attr-defined]
            "state": _mb(state), "audit": _mb(rec._auditor.momentum.values()),  # type: ignore[attr-defined]
            "coef": _mb(idle["coef."])}


def child(name: str, mode: str, steps: int) -> dict[str, object]:
    """One run in this process: the peak above the start (steps 2..), its place and the recorder's copies then."""
    import explaind
    from explaind.trajectory import _recorder_store

    torch.set_num_threads(1)
    base = _rss_mb()
    best = {"mb": 0.0, "where": "", "held": {}}
    state = {"phase": "setup", "step": 0, "rec": None}

    def sample(label: str) -> None:
        mb = _rss_mb() - base
        if state["step"] >= 2 and mb > best["mb"]:
            best.update(mb=mb, where=f"{state['phase']} {label}", held=held(state["rec"]))

    original = _recorder_store.RecorderStoreMixin._optimizer_state_async

    def noted(self, *args):  # the state copy handed to the writer, for held() (any version of explaind)
        out = original(self, *args)
        self._probe_states = [out[2] if len(out) == 3 else out[0][0]]
        return out

    _recorder_store.RecorderStoreMixin._optimizer_state_async = noted
    model, opt, X, y, batch, forward, loss = _case(name, torch.device("cpu"))
    model.train()
    for mod_name, module in model.named_modules():
        if not list(module.children()):
            module.register_forward_pre_hook(lambda m, a, n=mod_name: sample(f"{n} (in)"))
            module.register_forward_hook(lambda m, a, o, n=mod_name: sample(f"{n} (out)"))
    for p_name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(lambda t, n=p_name: sample(n))
    opt.register_step_pre_hook(lambda *a: sample("optimizer.step() start"))
    opt.register_step_post_hook(lambda *a: sample("optimizer.step() end"))
    with tempfile.TemporaryDirectory() as root:
        rec = None
        if mode != "plain":
            rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), store=Path(root) / "run",
                                              **OPTIONS.get(mode, {}))
            rec.__enter__()
            state["rec"] = rec
        for i in range(steps):
            state["step"] = i
            idx = torch.arange(i * batch, (i + 1) * batch) % X.shape[0]
            opt.zero_grad()
            state["phase"] = "forward"
            out = forward(model, X[idx])
            value = F.cross_entropy(out, y[idx]) if loss == "cross_entropy" else loss(out, y[idx])
            state["phase"] = "backward"
            value.backward()
            del out, value
            state["phase"] = "step"
            sample("before log_batch")
            if rec is not None:
                rec.log_batch(idx)
            opt.step()
            sample("after optimizer.step()")
        if rec is not None:
            rec.__exit__(None, None, None)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cases", nargs="+", choices=("gpt2", "resnet18"), default=["resnet18"])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.steps)))
        return
    print(f"steps={args.steps} (peak over steps 2..)  torch threads=1  live bytes (MALLOC_MMAP_THRESHOLD_="
          f"{LIVE_MMAP_THRESHOLD})  load average={os.getloadavg()[0]:.1f}")
    kinds = ("theta", "grad", "state", "audit", "coef")
    header = f"{'model':<10}{'mode':<14}{'peak MB':>8}{'/ plain':>8}" + "".join(f"{k:>7}" for k in kinds)
    print(header + "  where")
    print("-" * (len(header) + 40))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(LIVE_MMAP_THRESHOLD)}
    for name in args.cases:
        plain = None
        for mode in args.modes:
            done = subprocess.run([sys.executable, __file__, "--child", name, mode, "--steps", str(args.steps)],
                                  capture_output=True, text=True, check=False, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"{name}/{mode} failed:\n{done.stderr[-4000:]}")
            got = json.loads(done.stdout.strip().splitlines()[-1])
            plain = got["mb"] if mode == "plain" else plain
            ratio = f"{got['mb'] / plain:>8.2f}" if plain else f"{'':>8}"
            cells = "".join(f"{got['held'].get(k, 0.0):>7.0f}" for k in kinds)
            print(f"{name:<10}{mode:<14}{got['mb']:>8.0f}{ratio}{cells}  {got['where']}")


if __name__ == "__main__":
    main()
