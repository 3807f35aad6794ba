"""Flat parameter layout, per-step coefficients and memory planning helpers."""

from __future__ import annotations

import pytest
import torch

from explaind.exceptions import ConfigError
from explaind.kernel.accumulate import make_blocks
from explaind.kernel.budget import parse_bytes, plan_sweep
from explaind.kernel.layout import ParamLayout
from explaind.kernel.split import is_zero, step_coefficients
from explaind.recurrence import LinearUpdate


def _tensors():
    return {"a.weight": torch.arange(6.0).reshape(2, 3), "a.bias": torch.tensor([6.0, 7.0]),
            "scale": torch.tensor(8.0)}


def test_flatten_unflatten_and_labels():
    t = _tensors()
    lay = ParamLayout.from_tensors(t)
    assert lay.size == 9 and lay.offsets == (0, 6, 8, 9) and lay.numels == (6, 2, 1)
    flat = lay.flatten(t)
    assert flat.tolist() == list(range(9))
    back = lay.unflatten(flat)
    for k, v in t.items():
        assert torch.equal(back[k], v)
    batched = lay.flatten({k: torch.stack([v, 2 * v]) for k, v in t.items()}, lead=1)
    assert batched.shape == (2, 9) and torch.equal(batched[1], 2 * flat)
    assert [lay.label(i) for i in (0, 4, 5, 7, 8)] == ["a.weight[0,0]", "a.weight[1,1]", "a.weight[1,2]",
                                                       "a.bias[1]", "scale"]
    assert lay.group_ids().tolist() == [0] * 6 + [1, 1, 2]
    assert ParamLayout.from_json(lay.to_json()) == lay
    with pytest.raises(IndexError):
        lay.label(9)


def test_blocks_are_runs_of_whole_tensors():
    lay = ParamLayout.from_tensors(_tensors())
    assert [b.names for b in lay.blocks(None)] == [lay.names]
    assert [b.names for b in lay.blocks(3)] == [("a.weight",), ("a.bias", "scale")]
    blocks = make_blocks(lay, 3)
    assert [(b.offset, b.first_group) for b in blocks] == [(0, 0), (6, 1)]
    assert blocks[1].groups() == [(1, slice(0, 2)), (2, slice(2, 3))]


def test_step_coefficients_broadcast_and_keep_uniform_floats():
    lay = ParamLayout.from_tensors(_tensors())
    P = torch.full((2,), 0.5)
    ups = {"a.weight": LinearUpdate(a=0.9, P=0.1), "a.bias": LinearUpdate(a=0.9, P=P)}  # "scale" did not move
    co = step_coefficients(ups, 2.0, lay, "cpu", torch.float64)
    assert co.c == 2.0 and co.q == 1.0 and co.lambda_d == 0.0
    assert co.a.tolist() == [0.9] * 8 + [1.0]
    assert co.b.tolist() == [1.0] * 8 + [0.0]
    assert co.P.tolist() == [0.1] * 6 + [0.5, 0.5, 0.0] and co.P.dtype == torch.float64
    assert is_zero(0.0) and is_zero(torch.zeros(3)) and not is_zero(torch.tensor([0.0, 1e-30]))


@pytest.mark.parametrize("text, expected", [("2GB", 2 * 10**9), ("512 MiB", 512 * 2**20), ("1.5e3", 1500),
                                            (4096, 4096), ("10kb", 10_000)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", 0, "5 parsecs", True])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_bytes(bad)


def test_plan_sweep_prefers_reverse_and_shrinks_test_chunks_first():
    kw = dict(T=20, O=10, D=10_000, largest_tensor=4_000, B=50, M=200, elem=8, chunk_size=256, test_chunk=None,
              block_size=None)
    roomy = plan_sweep(momentum="auto", keep_step=False, budget=10**10, **kw)
    assert (roomy.mode, roomy.test_chunk, roomy.block_size) == ("reverse", 20, 10_000)
    assert plan_sweep(momentum="auto", keep_step=True, budget=10**10, **kw).mode == "forward"
    tight = plan_sweep(momentum="reverse", keep_step=False, budget=2 * 10**7, **kw)
    assert 1 < tight.test_chunk < 20 and tight.block_size == 10_000 and tight.estimate_bytes <= 2 * 10**7
    tighter = plan_sweep(momentum="reverse", keep_step=False, budget=10**6, **kw)
    assert tighter.test_chunk == 1 and tighter.block_size < 10_000


@pytest.mark.parametrize("value", [float("inf"), float("nan"), "1e400", 1e30])
def test_parse_bytes_refuses_unbounded_budgets(value):
    with pytest.raises(ConfigError, match="invalid value for 'memory_budget'"):
        parse_bytes(value)
