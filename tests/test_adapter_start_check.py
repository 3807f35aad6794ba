"""``explaind.testing.check_adapter_start_state``: the plugin suite's check of recordings opened on optimizer state.

It passes the built-in adapters, passes an adapter without ``start_state`` (the recorder refuses held state for it),
and fails an adapter whose ``start_state`` is wrong (the audit sees the missing momentum) or that breaks the refusal.
"""

from __future__ import annotations

import pytest
import torch
from explaind_optimizers.sgd import SGDAdapter

from explaind import get_entry
from explaind.exceptions import ExplaindError
from explaind.testing import check_adapter_start_state, optimizer_adapter_checks

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_the_built_in_adapters_record_from_optimizer_state_at_rounding_level(name):
    worst = check_adapter_start_state(get_entry("optimizer_adapter", name))
    assert len(worst) >= 5 and max(worst.values()) <= 1e-12


def test_the_plugin_suite_runs_the_start_state_check():
    names = [n for n, _ in optimizer_adapter_checks(get_entry("optimizer_adapter", "sgd"))]
    assert names == ["replay_float64", "replay_float32", "start_state"]


def test_an_adapter_without_start_state_passes_because_the_recorder_refuses_held_state(monkeypatch):
    monkeypatch.delattr(SGDAdapter, "start_state")
    worst = check_adapter_start_state(get_entry("optimizer_adapter", "sgd"))
    assert set(worst) == {"SGD:sgd_plain"}  # plain SGD holds no state; every momentum run was refused


def test_a_start_state_that_forgets_the_buffers_fails_naming_the_residual(monkeypatch):
    monkeypatch.setattr(SGDAdapter, "start_state", lambda self, optimizer: {})
    with pytest.raises(ExplaindError, match=r"SGD:sgd_momentum_dampening: audit residual .* > tol 1.0e-12"):
        check_adapter_start_state(get_entry("optimizer_adapter", "sgd"))


def test_a_start_state_with_the_wrong_sign_fails(monkeypatch):
    original = SGDAdapter.start_state
    monkeypatch.setattr(SGDAdapter, "start_state",
                        lambda self, optimizer: {k: -v for k, v in original(self, optimizer).items()})
    with pytest.raises(ExplaindError, match=r"audit residual"):
        check_adapter_start_state(get_entry("optimizer_adapter", "sgd"), dtype=torch.float64)
