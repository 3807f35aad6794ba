"""RMSprop and Adagrad in the plugin listing and in ``explaind train --optimizer`` (the training-run config)."""

from __future__ import annotations

import re

import pytest
import torch

from explaind.cli import main
from explaind.studies.runs import train_run


def test_the_plugin_listing_names_both_adapters(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    listed = re.search(r"optimizer_adapter: ([a-z_, ]+)\n", out)
    assert listed and {"adagrad", "rmsprop"} <= set(listed.group(1).split(", ")), out


@pytest.mark.parametrize("optimizer, momentum", [("rmsprop", 0.5), ("adagrad", 0.0)])
def test_a_training_run_records_with_the_chosen_optimizer_at_rounding_level(optimizer, momentum):
    config = {"architecture": "mlp", "dataset": "digits", "data": {"classes": [0, 1]}, "model": {"hidden_sizes": [4]},
              "optimizer": optimizer, "lr": 0.01, "momentum": momentum, "weight_decay": 0.01, "steps": 3,
              "eval_every": 3, "dtype": "float64"}
    run = train_run(config, None, progress=False)
    traj = run.trajectory
    assert traj.manifest.adapter == optimizer and traj.n_steps == 3
    group = traj.manifest.adapter_hyperparameters["param_groups"][0]
    assert group["weight_decay"] == 0.01 and group.get("momentum", 0.0) == momentum
    residuals = traj.audit()
    assert float(torch.as_tensor(residuals).max()) <= 1e-12
