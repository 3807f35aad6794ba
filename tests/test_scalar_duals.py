"""Forward-mode arithmetic between a dual tensor and a Python number (explaind.kernel.scalar_duals).

Inside :class:`~explaind.kernel.scalar_duals.ScalarDuals` each form (``x + c``, ``c + x``, ``x - c``, ``x * c``,
``c * x``, ``x / c`` and their method and ``torch.`` spellings) must give torch's own primal and tangent bit for
bit, the reference being torch's forward mode outside the block (its slow path), on values that include
negative zeros, infinities and NaNs; what the block does not split (no tangent, integer tensors, keywords, a
number divided by a tensor, two tensors) must be torch's own result too.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.overrides import TorchFunctionMode

from explaind.kernel.scalar_duals import ScalarDuals, without_scalar_duals

pytestmark = pytest.mark.usefixtures("one_thread")
DT = torch.float64

FORMS = {
    "x + c": lambda x, c: x + c, "c + x": lambda x, c: c + x, "x - c": lambda x, c: x - c,
    "c - x": lambda x, c: c - x, "x * c": lambda x, c: x * c, "c * x": lambda x, c: c * x,
    "x / c": lambda x, c: x / c, "c / x": lambda x, c: c / x, "x.add(c)": lambda x, c: x.add(c),
    "torch.add(x, c)": lambda x, c: torch.add(x, c), "x.sub(c)": lambda x, c: x.sub(c),
    "torch.sub(x, c)": lambda x, c: torch.sub(x, c), "x.mul(c)": lambda x, c: x.mul(c),
    "torch.mul(c, x)": lambda x, c: torch.mul(c, x), "x.div(c)": lambda x, c: x.div(c),
    "torch.div(x, c)": lambda x, c: torch.div(x, c), "torch.true_divide(x, c)": lambda x, c: torch.true_divide(x, c),
    "x.true_divide(c)": lambda x, c: x.true_divide(c),
    "torch.add(x, c, alpha=2)": lambda x, c: torch.add(x, c, alpha=2),
}
NUMBERS = [0, 3, -2, math.sqrt(32), 1 / math.sqrt(8), -0.0, 1e-300, 2.5e300]


def _values(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 4, 5, generator=gen, dtype=DT) * 10
    t = torch.randn(6, 4, 5, generator=gen, dtype=DT) * 1e3
    p[0, 0, :4] = torch.tensor([-0.0, math.inf, -math.inf, math.nan])
    t[1, 0, :4] = torch.tensor([-0.0, math.inf, math.nan, 1e-310])
    return p.to(dtype), t.to(dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: equal values, NaNs at the same places, the same signs of zero, dtype and shape."""
    return (a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.isnan(), b.isnan())
            and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)) and torch.equal(a.signbit(), b.signbit()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", sorted(FORMS))
def test_each_form_is_torch_forward_mode_bit_for_bit(form, dtype):
    p, t = _values(dtype)
    f = FORMS[form]
    for c in NUMBERS:
        with fwad.dual_level():
            want = fwad.unpack_dual(f(fwad.make_dual(p, t), c))
            with ScalarDuals():
                got = fwad.unpack_dual(f(fwad.make_dual(p, t), c))
            assert _same(got.primal, want.primal), (form, c)
            assert _same(got.tangent, want.tangent), (form, c)


def test_what_is_not_split_is_torch_own():
    p, t = _values(DT)
    i = torch.arange(6)
    with fwad.dual_level():
        x, y = fwad.make_dual(p, t), fwad.make_dual(2 * p, -t)
        cases = [lambda: p * 3.0, lambda: i * 2, lambda: i / 2, lambda: x * y, lambda: x + torch.ones(5, dtype=DT),
                 lambda: x * True, lambda: torch.add(x, 1.5, alpha=3)]
        for k, f in enumerate(cases):
            want = fwad.unpack_dual(f())
            with ScalarDuals():
                got = fwad.unpack_dual(f())
            assert _same(got.primal, want.primal), k
            assert (got.tangent is None) == (want.tangent is None), k
            assert want.tangent is None or _same(got.tangent, want.tangent), k


def test_the_split_forms_run_no_python_meta_kernel():
    """torch's slow path for a number runs torch._refs in Python; the split forms do not."""
    p, t = _values(DT)
    entered: list[str] = []

    def spy(frame, event, arg):
        if event == "call" and "torch/_refs" in frame.f_code.co_filename.replace("\\", "/"):
            entered.append(frame.f_code.co_name)

    with fwad.dual_level():
        x = fwad.make_dual(p, t)
        for inside in (False, True):
            entered.clear()
            sys.setprofile(spy)
            try:
                if inside:
                    with ScalarDuals():
                        x * math.sqrt(32) / math.sqrt(8) + 0
                else:
                    x * math.sqrt(32) / math.sqrt(8) + 0
            finally:
                sys.setprofile(None)
            assert bool(entered) != inside, (inside, entered[:5])


def _counting(base: type) -> type:
    """``base`` (ScalarDuals, or a mode that runs torch's own) counting the torch functions it sees."""

    class Counting(base):
        def __init__(self) -> None:
            super().__init__()
            self.seen = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen += 1
            if base is TorchFunctionMode:
                return func(*args, **(kwargs or {}))
            return super().__torch_function__(func, types, args, kwargs)

    return Counting


_Counting, _Other = _counting(ScalarDuals), _counting(TorchFunctionMode)


class _Sub(torch.Tensor):
    pass


def test_without_scalar_duals_skips_only_a_lone_mode_on_plain_tensors():
    x = torch.randn(3, dtype=DT)
    with _Counting() as mode:
        with without_scalar_duals(x):
            y = x * 2.0 + 1
        assert mode.seen == 0 and torch.equal(y, x * 2.0 + 1)
        with without_scalar_duals(x.as_subclass(_Sub)):  # a subclass keeps torch's dispatch
            x + 1
        assert mode.seen > 0
    with _Other() as other, _Counting() as mode:  # another mode on the stack keeps seeing every function
        with without_scalar_duals(x):
            x + 1
        assert other.seen > 0
    with without_scalar_duals(x):  # no mode: a no-op
        assert torch.equal(x + 1, x + 1)
