"""Training runs: configs derived from the data, early stopping, run folders."""

from __future__ import annotations

import json

import pytest
import torch

from explaind.datasets import digits, modular_arithmetic
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.studies.runs import TrainConfig, load_run, model_config_for, train_run


def test_model_config_is_filled_from_the_data():
    cnn = model_config_for("cnn", digits())
    assert (cnn.in_channels, cnn.image_size, cnn.out_features) == (1, 8, 10)
    mlp = model_config_for("mlp", digits(flatten=True, classes=(3, 8)), {"hidden_sizes": (5,)})
    assert (mlp.in_features, mlp.out_features, mlp.hidden_sizes) == (64, 2, (5,))
    tr = model_config_for("modular_transformer", modular_arithmetic(7, n_train=20, n_val=10), {"d_model": 8})
    assert (tr.p, tr.d_model) == (7, 8)
    with pytest.raises(ConfigError, match="hidden"):
        model_config_for("mlp", digits(flatten=True), {"hidden": 3})


def test_train_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="'optimizer'.*'lbfgs'"):
        train_run({"optimizer": "lbfgs"})
    with pytest.raises(ConfigError, match="'stop_at'"):
        train_run({"stop_at": 1.5})
    assert TrainConfig().optimizer == "adamw"


def test_in_memory_run_stops_early_and_records_every_step():
    config = {"architecture": "mlp", "dataset": "digits", "data": {"classes": [0, 1]}, "model": {"hidden_sizes": [4]},
              "optimizer": "sgd", "lr": 0.5, "steps": 50, "eval_every": 2, "stop_at": 0.9, "dtype": "float64"}
    run = train_run(config, None, progress=False)
    assert run.path is None
    h = run.history
    stopped = h.step[-1]
    assert stopped < 50 and run.trajectory.n_steps == stopped
    assert h.train_acc[-1] >= 0.9 and h.val_acc[-1] >= 0.9
    assert all(a < 0.9 or b < 0.9 for a, b in zip(h.train_acc[:-1], h.val_acc[:-1]))
    # the final model of the run is the recorded theta_N
    final = run.final_model()
    X, y = run.dataset.val
    with torch.no_grad():
        acc = float((final(X).argmax(-1) == y).double().mean())
    assert acc == pytest.approx(h.val_acc[-1], abs=1e-12)


def test_load_run_errors(tmp_path):
    with pytest.raises(TrajectoryError, match="not a run folder"):
        load_run(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(TrajectoryError, match="not an explaind run description"):
        load_run(tmp_path)
