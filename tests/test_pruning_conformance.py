"""The pruning-strategy conformance suite runs on every registered strategy and catches broken ones."""

from __future__ import annotations

import pytest
import torch

import explaind
from explaind.pruning import PruningConfig, PruningStrategy
from explaind.records import PruningStrategyRecord
from explaind.testing import PluginCheckError, check_plugin, check_pruning_strategy, pruning_strategy_checks

# faster settings that keep every code path (synflow's schedule is still iterative)
_FAST = {"synflow": {"n_iterations": 10}}


@pytest.mark.parametrize("name", ["random", "magnitude", "snip", "grasp", "synflow", "explaind"])
def test_every_first_party_strategy_passes(name):
    ran = check_pruning_strategy(name, options=_FAST.get(name))
    assert {"mask_shapes_and_dtype", "sparsity_met", "deterministic", "inputs_not_mutated",
            "excluded_untouched"} <= set(ran)


def test_the_plugin_suite_includes_the_pruning_checks():
    from explaind.testing import plugin_checks

    names = [n for n, _ in plugin_checks("explaind_pruning")]
    assert "pruning_strategy:snip:sparsity_met" in names
    assert "pruning_strategy:synflow:nested_masks" not in names  # iterative: masks need not nest


class _SloppyConfig(PruningConfig):
    pass


class _Sloppy(PruningStrategy):
    """Ignores exclusion and mutates its own scores when asked for masks."""

    _config_model = _SloppyConfig

    def __init__(self, *, sparsity=0.9, scope="global", exclude=(), granularity="unstructured", prune_biases=False,
                 random_state=None):
        self.sparsity = sparsity
        self.scope = scope
        self.exclude = exclude
        self.granularity = granularity
        self.prune_biases = prune_biases
        self.random_state = random_state

    def _score(self, cfg, model, data, trajectory):
        return {n: p.detach().abs() for n, p in model.named_parameters()}

    def _masks_at(self, sparsity):
        for s in self.scores_.values():
            s.add_(1.0)  # mutation
        flat = torch.cat([s.reshape(-1) for s in self.scores_.values()])
        k = int(sparsity * flat.numel())
        threshold = flat.sort().values[k] if k > 0 else -1.0
        return {n: s > threshold for n, s in self.scores_.items()}  # prunes excluded tensors too


def test_a_broken_strategy_fails_the_relevant_checks():
    record = PruningStrategyRecord(name="sloppy", implementation=_Sloppy, config=_SloppyConfig,
                                   description="broken on purpose", needs_data=False)
    with pytest.raises(PluginCheckError) as info:
        check_pruning_strategy(record)
    failed = {name for name, _ in info.value.failures}
    assert {"inputs_not_mutated", "excluded_untouched", "sparsity_met"} <= failed
    assert "not_fitted" not in failed
    assert len(list(pruning_strategy_checks(record))) == 9


class _ShiftedDefault(_Sloppy):
    """Declares ``sparsity=0.5`` while its config (``PruningConfig``) defaults to 0.9."""

    def __init__(self, *, sparsity=0.5, scope="global", exclude=(), granularity="unstructured", prune_biases=False,
                 random_state=None):
        super().__init__(sparsity=sparsity, scope=scope, exclude=exclude, granularity=granularity,
                         prune_biases=prune_biases, random_state=random_state)


def test_a_strategy_whose_defaults_differ_from_its_config_fails_the_clone_check():
    record = PruningStrategyRecord(name="shifted", implementation=_ShiftedDefault, config=_SloppyConfig,
                                   description="wrong default on purpose", needs_data=False)
    with pytest.raises(PluginCheckError) as info:
        check_pruning_strategy(record)
    messages = dict(info.value.failures)
    assert "parameter 'sparsity': the __init__ default 0.5 differs from the _SloppyConfig default 0.9" in \
        messages["clone"]


@pytest.mark.parametrize("name", ["random", "magnitude", "snip", "grasp", "synflow", "explaind"])
def test_first_party_strategy_defaults_match_their_configs(name):
    from explaind.testing.estimators import config_default_mismatches

    record = explaind.get_entry("pruning_strategy", name)
    assert config_default_mismatches(record.implementation, record.config) == []


def test_the_registered_plugin_passes_the_generic_plugin_checks():
    ran = check_plugin("explaind_pruning")
    assert any(n.startswith("pruning_strategy:explaind:") for n in ran)
    assert explaind.get_entry("pruning_strategy", "explaind").implementation.__name__ == "ExplaindPruning"


class _MovementConfig(PruningConfig):
    pass


class _Movement(PruningStrategy):
    """The third-party example of docs/pruning.md: |theta_N - theta_0|."""

    _config_model = _MovementConfig
    needs_trajectory = True

    def __init__(self, *, sparsity=0.9, scope="global", exclude=(), granularity="unstructured", prune_biases=False,
                 random_state=None):
        self.sparsity, self.scope, self.exclude = sparsity, scope, exclude
        self.granularity, self.prune_biases, self.random_state = granularity, prune_biases, random_state

    def _score(self, cfg, model, data, trajectory):
        first, last = trajectory.params(0), trajectory.params(trajectory.n_steps)
        return {n: (last[n] - first[n]).abs() for n in trajectory.param_names}


class _MovementPlugin:
    @explaind.hookimpl
    def explaind_pruning_strategies(self):
        return [PruningStrategyRecord(name="movement", implementation=_Movement, config=_MovementConfig,
                                      description="Distance travelled in training.", needs_data=False,
                                      needs_trajectory=True)]


def test_a_third_party_strategy_is_registered_checked_and_benchmarked():
    from explaind.plugins import register_plugin, unregister_plugin
    from explaind.pruning import run_pruning_benchmark
    from explaind.testing import tiny_pruning_problem

    register_plugin(_MovementPlugin(), name="movement_plugin")
    try:
        assert "movement" in explaind.list_entries("pruning_strategy")
        check_pruning_strategy("movement")
        model, (X, y), traj = tiny_pruning_problem()
        res = run_pruning_benchmark(model, test_data=(X, y), trajectory=traj, strategies=["movement"],
                                    sparsities=(0.5,), seeds=(0,))
        assert res.strategies == ["movement"]
    finally:
        unregister_plugin("movement_plugin")
    assert "movement" not in explaind.list_entries("pruning_strategy")
