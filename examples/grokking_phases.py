"""Grokking, step by step: train the modular-addition transformer, split training into phases
and ask which layer groups carry the influence in each phase.

This is what ``explaind study grokking`` does, written with the library API so that each stage
can be changed. ``--tiny`` runs in seconds; the default is the CPU preset (a few minutes);
``--out DIR`` also writes the figures and an HTML page.
"""

from __future__ import annotations

import argparse

import numpy as np

from explaind import viz
from explaind.studies.analysis import influence, step_group_scores
from explaind.studies.grokking import grokking_config
from explaind.studies.phases import detect_phases
from explaind.studies.runs import train_run


def main(tiny: bool = False, out: str | None = None) -> dict:
    config, options = grokking_config("tiny" if tiny else "small")
    run = train_run(config, None, progress=not tiny)  # None: record in memory
    h = run.history
    print(f"p={config['data']['p']}: {run.trajectory.n_steps} steps, train acc {h.train_acc[-1]:.2f}, "
          f"validation acc {h.val_acc[-1]:.2f}")

    phases = detect_phases(h, n_steps=run.trajectory.n_steps)
    print("phases: " + ", ".join(f"{p.name} [{p.start}, {p.stop})" for p in phases))

    # One query gives every (step, parameter tensor) contribution to the correct-class logit.
    att = influence(run, keep=("step", "group"), target="label", n_test=options.n_test, device="cpu",
                    quadrature=options.quadrature, nodes=options.nodes)
    scores = step_group_scores(att)
    shares = {}
    for phase in phases:
        in_phase = (scores.steps >= phase.start) & (scores.steps < phase.stop)
        per_group = scores.influence[in_phase].sum(0)
        shares[phase.name] = dict(zip(scores.groups, per_group / max(per_group.sum(), 1e-300)))
        leaders = sorted(shares[phase.name].items(), key=lambda kv: -kv[1])[:3]
        print(f"  {phase.name:18s} " + ", ".join(f"{g} {s:.0%}" for g, s in leaders))

    # Weight decay against data: the share of each group's update contribution that comes from data.
    data_share = scores.kernel.sum(0) / np.maximum(scores.kernel.sum(0) + scores.regularization.sum(0), 1e-300)
    print("data share over the run: " + ", ".join(f"{g} {s:.2f}" for g, s in zip(scores.groups, data_share)))

    if out is not None:
        figures = [
            viz.training_curves(h, f"{out}/curves.png", phases=phases),
            viz.step_group_heatmap(scores.steps, scores.groups, scores.influence, f"{out}/heatmap.png", phases=phases),
            viz.balance_plot(scores.steps, scores.groups, scores.kernel, scores.regularization, f"{out}/balance.png",
                             phases=phases),
        ]
        page = viz.write_report(out, [viz.ReportSection("Grokking", "Curves, influence and balance.", figures)])
        print(f"wrote {page}")
    return {"phases": phases, "shares": shares, "completeness_gap": scores.completeness_gap}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (seconds)")
    parser.add_argument("--out", default=None, help="folder for the figures and an HTML page")
    args = parser.parse_args()
    main(args.tiny, args.out)
