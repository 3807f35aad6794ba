"""Record the same run with two versions of explaind and compare the stores file by file, byte by byte.

``--record DIR`` records the ~1M-parameter MLP of ``bench_recording.py`` (784-1024-256-10, batch 64)
with the recorder's defaults into ``DIR/sgd`` (SGD with momentum) and ``DIR/adam``: a dense store,
the audit on, the scheduled gradient check, ``fsync=False``. Run it once with each version on
``PYTHONPATH``; ``--diff A B`` then compares the two directories: every start and step file byte for
byte, the manifests without their creation time, the per-step records without the optimizer-state
slot they name (which steps the two slots hold depends on the writer's timing), and the optimizer
states that both stores hold for the same step.

Run: ``PYTHONPATH=<checkout>:<checkout>/plugins python benchmarks/store_diff.py --record DIR [--steps N]``,
then ``python benchmarks/store_diff.py --diff DIR_A DIR_B``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

OPTIMIZERS = ("sgd", "adam")


def record(root: Path, steps: int) -> None:
    import explaind
    from explaind.models import build_model
    from explaind.plugins import get_entry

    torch.set_num_threads(1)
    config = {"in_features": 784, "hidden_sizes": [1024, 256], "out_features": 10}
    entry = get_entry("architecture", "mlp")
    X, y = entry.example_input(entry.config(**config), 512, torch.Generator().manual_seed(0))
    for name in OPTIMIZERS:
        model = build_model("mlp", config, seed=0)
        opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if name == "adam"
               else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
        path = root / name
        shutil.rmtree(path, ignore_errors=True)
        rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=path,
                                          fsync=False)
        with rec:
            for s in range(steps):
                idx = torch.arange(64 * s, 64 * (s + 1)) % X.shape[0]
                opt.zero_grad()
                F.cross_entropy(model(X[idx]), y[idx]).backward()
                rec.log_batch(idx)
                opt.step()
        print(f"recorded {path} with explaind from {Path(explaind.__file__).parent}")


def _slot_step(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        return fh.metadata()["n_steps"]


def diff(a_root: Path, b_root: Path) -> int:
    failures = 0
    for name in OPTIMIZERS:
        a_dir, b_dir = a_root / name, b_root / name
        a = {str(p.relative_to(a_dir)): p.read_bytes() for p in sorted(a_dir.rglob("*")) if p.is_file()}
        b = {str(p.relative_to(b_dir)): p.read_bytes() for p in sorted(b_dir.rglob("*")) if p.is_file()}
        timed = {"journal.jsonl", "manifest.json"} | {k for k in a | b if k.startswith("optimizer/")}
        same = [k for k in sorted(a.keys() - timed) if a.get(k) == b.get(k)]
        differ = sorted((a.keys() | b.keys()) - timed - set(same))
        ma, mb = json.loads(a["manifest.json"]), json.loads(b["manifest.json"])
        ma.pop("created"), mb.pop("created")
        for m in (ma, mb):
            m["steps"] = [{k: v for k, v in r.items() if k != "optimizer_state"} for r in m["steps"]]
        held = {_slot_step(b_dir / k): b[k] for k in b if k.startswith("optimizer/")}
        slots = [k for k in a if k.startswith("optimizer/") and _slot_step(a_dir / k) in held]
        slot_diff = [k for k in slots if a[k] != held[_slot_step(a_dir / k)]]
        print(f"{name}: {len(same)} files byte-identical, differing {differ or 'none'}; manifests (steps' audit, "
              f"check, scales) {'equal' if ma == mb else 'DIFFER'}; optimizer states of the same step: {len(slots)} "
              f"compared, differing {slot_diff or 'none'}")
        failures += len(differ) + (ma != mb) + len(slot_diff) + (not slots)
    return failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--diff", type=Path, nargs=2)
    args = parser.parse_args()
    if args.record is not None:
        record(args.record, args.steps)
    if args.diff is not None:
        sys.exit(1 if diff(*args.diff) else 0)


if __name__ == "__main__":
    main()
