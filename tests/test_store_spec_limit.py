"""Architecture specs are sized before anything is built: a stranger's store cannot make explaind allocate 40 GB."""

from __future__ import annotations

import json
import types

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict

import explaind
import explaind.models
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.plugins import register_plugin, unregister_plugin
from explaind.records import ArchitectureRecord

HUGE = [100_000, 100_000]  # 1e10 weights: 40 GB in float32


def _mlp_elements(sizes):
    """Weights and biases of a chain of Linear layers (independent of the plugin's meta count)."""
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


@pytest.fixture()
def store(tmp_path):
    X, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    model = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [5], "out_features": 3})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), store=tmp_path / "run")
    with rec:
        for idx in (torch.arange(4), torch.arange(4, 8)):
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return tmp_path / "run"


def _edit(store, edit):
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.fixture()
def no_build(monkeypatch):
    """Fail the test if a model is built."""
    def refuse(*args, **kwargs):
        raise AssertionError("build_model was called: the spec was not checked before building")

    monkeypatch.setattr(explaind.models, "build_model", refuse)


def test_the_registry_counts_match_an_independent_count():
    assert explaind.models.count_parameters("mlp", {"in_features": 784, "hidden_sizes": HUGE, "out_features": 10}) \
        == _mlp_elements([784, *HUGE, 10])
    for name in ("mlp", "cnn", "modular_transformer"):
        model = explaind.build_model(name)
        assert explaind.models.count_parameters(name) == sum(p.numel() for p in model.parameters())


def test_build_model_refuses_an_oversized_config_before_allocating():
    count = _mlp_elements([784, *HUGE, 3])
    with pytest.raises(ConfigError, match=f"has {count:,} parameter and buffer elements") as err:
        explaind.build_model("mlp", {"in_features": 784, "hidden_sizes": HUGE})
    assert "max_parameters=<n>" in str(err.value) and "EXPLAIND_MAX_PARAMETERS" in str(err.value)
    with pytest.raises(ConfigError, match="limit of 10"):
        explaind.build_model("mlp", max_parameters=10)
    assert sum(p.numel() for p in explaind.build_model("mlp", max_parameters=10**6).parameters()) > 10


@pytest.mark.parametrize("value", [0, -5, 1.5, "many", True])
def test_a_bad_limit_is_a_config_error(value):
    with pytest.raises(ConfigError, match="must be a positive integer"):
        explaind.build_model("mlp", max_parameters=value)


def test_the_limit_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("EXPLAIND_MAX_PARAMETERS", "10")
    with pytest.raises(ConfigError, match="limit of 10 "):
        explaind.build_model("mlp")
    monkeypatch.setenv("EXPLAIND_MAX_PARAMETERS", "lots")
    with pytest.raises(ConfigError, match=r"\$EXPLAIND_MAX_PARAMETERS='lots' is not an integer"):
        explaind.build_model("mlp")


def test_a_huge_spec_in_a_store_is_refused_before_building(store, no_build):
    _edit(store, lambda m: m["architecture"]["config"].update(hidden_sizes=HUGE))
    with pytest.raises(TrajectoryError, match="the store was modified"):
        explaind.Trajectory.load(store)


def test_huge_declared_shapes_are_refused_before_building(store, no_build):
    def grow(manifest):
        manifest["architecture"]["config"].update(hidden_sizes=HUGE)
        manifest["params"][0]["shape"] = [HUGE[0], 4]
        manifest["params"][2]["shape"] = [HUGE[0], HUGE[0]]

    _edit(store, grow)
    with pytest.raises(TrajectoryError, match="more than the limit of 250,000,000; nothing was built") as err:
        explaind.Trajectory.load(store)
    assert "max_parameters=<n>" in str(err.value) and "model=" in str(err.value)


def test_a_negative_declared_shape_is_refused(store, no_build):
    _edit(store, lambda m: m["params"][0].update(shape=[-5, 4]))
    with pytest.raises(TrajectoryError, match=r"params\.0\.shape\.0 = -5: Input should be greater than or equal to 0"):
        explaind.Trajectory.load(store)


def test_the_store_limit_is_configurable(store):
    with pytest.raises(TrajectoryError, match="limit of 20"):
        explaind.Trajectory.load(store, max_parameters=20)
    assert explaind.Trajectory.load(store, max_parameters=1000).n_steps == 2


def test_an_invalid_spec_is_a_trajectory_error(store):
    _edit(store, lambda m: m["architecture"]["config"].update(hidden_sizes=[-3]))
    with pytest.raises(TrajectoryError, match="hidden_sizes"):
        explaind.Trajectory.load(store)
    _edit(store, lambda m: m["architecture"].update(name="mlpp"))
    with pytest.raises(TrajectoryError, match="Did you mean 'mlp'") as err:
        explaind.Trajectory.load(store)
    assert "model=" in str(err.value)


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    width: int = 3


def test_an_architecture_without_a_count_is_checked_after_building():
    plugin = types.SimpleNamespace()

    @explaind.hookimpl
    def explaind_architectures():
        return [ArchitectureRecord(name="uncounted", implementation=lambda config, seed=0: torch.nn.Linear(
            config.width, 2), config=_Cfg, description="No parameter_count.")]

    plugin.explaind_architectures = explaind_architectures
    register_plugin(plugin, name="tests_uncounted")
    try:
        assert explaind.models.count_parameters("uncounted") is None
        with pytest.raises(ConfigError, match="with this config has 8 parameter and buffer elements"):
            explaind.build_model("uncounted", {"width": 3}, max_parameters=5)
        assert explaind.build_model("uncounted", max_parameters=8).weight.shape == (2, 3)
    finally:
        unregister_plugin("tests_uncounted")
