"""Quickstart: record your own training loop, then replicate, attribute and prune.

Run ``python examples/quickstart.py`` (about a minute on a laptop CPU) or with ``--tiny``
(seconds; used by the tests).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import explaind
from explaind.datasets import digits
from explaind.pruning import get_strategy


def main(tiny: bool = False) -> dict:
    steps, hidden, n_test = (6, 8, 4) if tiny else (60, 32, 64)
    data = digits(flatten=True, dtype=torch.float64)  # scikit-learn's 8x8 digits, no download
    X, y = data.train
    X_val, y_val = data.X_val[:n_test], data.y_val[:n_test]

    # 1. Record your own loop: the recorder only observes it (10 lines).
    model = explaind.build_model("mlp", {"in_features": 64, "hidden_sizes": [hidden], "out_features": 10},
                                 seed=0, dtype="float64")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    batches = torch.randint(len(X), (steps, 64), generator=torch.Generator().manual_seed(0))
    recorder = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y))
    with recorder:
        for idx in batches:
            optimizer.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            recorder.log_batch(idx)  # after backward(), before step()
            optimizer.step()
    traj = recorder.trajectory

    # 2. The kernel replica reproduces the trained model from the recorded path.
    replica = explaind.KernelReplica(device="cpu").fit(traj)
    report = replica.fidelity_report(X_val)
    print(f"replica: argmax agreement {report['argmax_agreement']:.3f}, "
          f"max relative error {report['max_rel_error']:.2e}, {report['evals_per_step'].mean():.1f} evals/step")

    # 3. Influence: which training samples pushed the correct-class logit of each validation input?
    target = [int(c) for c in y_val]
    by_sample = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu").fit(traj).transform(X_val)
    scores = by_sample.values[0, :, 0]
    top = torch.topk(scores, 3)
    print(f"validation input 0 (class {target[0]}): top proponents {top.indices.tolist()} "
          f"(classes {y[top.indices].tolist()}), completeness gap {by_sample.completeness_error():.1e}")

    # ... and which layers, at which steps (same decomposition, other axes kept).
    by_layer = explaind.InfluenceEstimator(keep=("step", "group"), target=target, device="cpu").fit(traj)
    att = by_layer.transform(X_val)
    per_group = att.values.abs().sum((0, 1, 3))
    for name, value in zip(att.coords["group"], per_group.tolist()):
        print(f"  {name:14s} |influence| {value:.3g}")

    # 4. Prune with ExPLAIND's parameter scores, compared with weight magnitude.
    def accuracy(net):
        with torch.no_grad():
            return float((net(data.X_val).argmax(-1) == data.y_val).double().mean())

    results = {"unpruned": accuracy(model)}
    for name in ("explaind", "magnitude"):
        strategy = get_strategy(name, sparsity=0.7, exclude=("net.2",))
        pruned = strategy.fit(model, data=(X_val, y_val), trajectory=traj).transform(model)
        results[name] = accuracy(pruned)
    print("validation accuracy at 70% sparsity: " + ", ".join(f"{k} {v:.3f}" for k, v in results.items()))
    return {"fidelity": report, "pruning": results, "completeness_gap": by_sample.completeness_error()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds)")
    main(parser.parse_args().tiny)
