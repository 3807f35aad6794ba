"""The third-party adapter example of docs/optimizers.md (a user's heavy-ball optimizer) works as documented."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch

import explaind
from explaind.exceptions import ConfigError
from explaind.plugins import resolve_optimizer_adapter, unregister_plugin
from explaind.testing import check_adapter_start_state, check_optimizer_adapter

DOC = Path(__file__).resolve().parents[1] / "docs" / "optimizers.md"


@pytest.fixture(scope="module")
def example():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    source = next(b for b in blocks if b.startswith("# my_explaind_heavyball.py"))
    module = types.ModuleType("my_explaind_heavyball")
    sys.modules[module.__name__] = module  # as if imported: pydantic resolves names through sys.modules
    try:
        exec(compile(source, str(DOC), "exec"), module.__dict__)
        yield module
    finally:
        del sys.modules[module.__name__]


def test_documented_adapter_passes_the_replay_check(example):
    [record] = example.explaind_optimizer_adapters()
    rep64 = check_optimizer_adapter(record)
    rep32 = check_optimizer_adapter(record, dtype=torch.float32, tol=1e-4)
    assert set(rep64.residuals) == {
        "plain", "two_groups", "step_lr", "one_cycle", "accumulation_3", "clip_grad_norm", "frozen_and_unused"
    }
    assert max(rep64.max_residual.values()) <= 1e-12 and max(rep32.max_residual.values()) <= 1e-4


def test_documented_adapter_starts_from_held_state(example):
    [record] = example.explaind_optimizer_adapters()
    explaind.register_plugin(example, name="my_explaind_heavyball")
    try:
        assert max(check_adapter_start_state(record).values()) <= 1e-12
    finally:
        unregister_plugin("my_explaind_heavyball")


def test_documented_adapter_registers_and_resolves(example):
    explaind.register_plugin(example, name="my_explaind_heavyball")
    try:
        optimizer = example.HeavyBall([torch.nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.5)
        record = resolve_optimizer_adapter(optimizer)
        assert record.name == "heavyball"
        assert "heavyball" in explaind.list_entries("optimizer_adapter")
        with pytest.raises(ConfigError, match=r"param_groups\[0\]\['lr'\] is a tensor; allowed: a float\. "
                                              r"Fix: lr=float\(lr\)"):
            record.implementation.from_optimizer(example.HeavyBall([torch.nn.Parameter(torch.ones(2))],
                                                                   lr=torch.tensor(0.1)))
        with pytest.raises(ConfigError, match=r"got SGD; allowed: HeavyBall"):
            record.implementation.from_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1))
    finally:
        unregister_plugin("my_explaind_heavyball")
    assert "heavyball" not in explaind.list_entries("optimizer_adapter")
