"""The loop-thread checks moved or fused for speed keep their answers.

* A CPU gradient snapshot is checked finite by ``all_finite`` (its sum, then element by element when
  the sum is not finite), against a Python loop over the float64 values. Huge but finite gradients
  (whose squared norm overflows float32) are finite: recorded, not refused as NaN or inf.
* The check that no parameter changed outside ``optimizer.step()`` runs on the state copier's thread
  while the loop's thread compares the gradients: its error still comes first.
* theta_{s+1} is copied on that thread too, and the post-step hook waits for it: an edit right after the
  step is still found, also when the copy is slow.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import TrajectoryError
from explaind.trajectory import _theta_copy
from explaind.trajectory._gradients import GradientTap, all_finite


def _reference(t: torch.Tensor) -> bool:
    return all(math.isfinite(v) for v in t.double().flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_all_finite_matches_an_element_loop_for_every_position_and_kind_of_non_finite(dtype, n):
    base = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
    assert all_finite(base) is True and _reference(base)
    for pos in sorted({0, n // 2, n - 1}):
        for bad in (math.nan, math.inf, -math.inf):
            t = base.clone()
            t[pos] = bad
            assert all_finite(t) is _reference(t) is False, (pos, bad)
    if n > 1:  # +inf and -inf together sum to NaN: still not finite
        t = base.clone()
        t[0], t[-1] = math.inf, -math.inf
        assert all_finite(t) is False


@pytest.mark.parametrize("dtype, value", [(torch.float32, 3e38), (torch.float16, 6e4), (torch.bfloat16, 3e38)])
def test_all_finite_is_true_when_only_the_sum_of_finite_values_overflows(dtype, value):
    t = torch.full((64,), value, dtype=dtype)
    assert not math.isfinite(float(t.sum()))  # the sum overflows...
    assert _reference(t) and all_finite(t) is True  # ...the elements are finite


def test_all_finite_of_a_2d_non_contiguous_tensor():
    t = torch.randn(30, 40).t()
    assert all_finite(t)
    t[3, 5] = math.nan
    assert not all_finite(t)


def test_the_tap_finds_its_snapshots_finite_exactly():
    lin = nn.Linear(3, 2)
    tap = GradientTap(dict(lin.named_parameters()))
    tap.attach()
    lin(torch.full((4, 3), 1e20)).sum().backward()  # finite; the weight's squared norm overflows float32
    assert tap.finite_since(-1) is True
    (lin(torch.ones(4, 3)).sum() * math.inf).backward()  # accumulated: the gradients become inf
    assert tap.finite_since(-1) is False
    tap.detach()


def _huge_gradient_run(clip: bool) -> explaind.Trajectory:
    """A linear model whose weight gradient is 2e20 (finite in float32; its square overflows)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)
    X, y = torch.full((2, 3), 1e20), torch.zeros(2)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=False)
    with rec:
        for _ in range(2):
            opt.zero_grad()
            model(X).sum().backward()
            rec.log_batch(torch.arange(2))
            if clip:  # a global rescale: the gradient the optimizer sees is not the snapshot
                with torch.no_grad():
                    for p in model.parameters():
                        p.grad.mul_(0.75)
            opt.step()
    return rec.trajectory


@pytest.mark.parametrize("clip", [False, True], ids=["unchanged", "rescaled"])
def test_a_huge_finite_gradient_is_recorded_not_refused_as_non_finite(clip):
    traj = _huge_gradient_run(clip)
    assert traj.n_steps == 2
    assert traj.grad_scale(0) == traj.grad_scale(1) == (0.75 if clip else 1.0)


@pytest.mark.parametrize("edit, message", [
    (True, r"Step 0: the parameter\(s\) weight \(relative change"),
    (False, r"Step 0: between backward\(\) and optimizer\.step\(\) the gradient of weight was changed by more than "
            r"a global factor")], ids=["edit-and-gradient-change", "gradient-change-alone"])
def test_an_edit_is_named_before_a_gradient_change_of_the_same_step(edit, message):
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    X, y = torch.randn(8, 3), torch.randn(8, 1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=False)
    with pytest.raises(TrajectoryError, match=message), rec:
        opt.zero_grad()
        F.mse_loss(model(X), y).backward()
        rec.log_batch(torch.arange(8))
        with torch.no_grad():
            if edit:
                model.weight.data.add_(1.0)  # an edit outside the step...
            model.weight.grad[0, 0] += 1.0  # ...and a per-coordinate change of the gradient
        opt.step()


@pytest.mark.parametrize("store", [None, "dense", "sparse"])
def test_an_edit_right_after_the_step_is_caught_while_theta_is_copied_on_another_thread(tmp_path, monkeypatch, store):
    """theta_{s+1} is copied on the state copier's thread; the post-step hook waits for it, so a slow copy still
    holds the values the step left, and an edit made right after ``optimizer.step()`` is refused at the next step."""
    real = _theta_copy._copy

    def slow(pairs):
        time.sleep(0.05)
        real(pairs)

    monkeypatch.setattr(_theta_copy, "_copy", slow)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, y = torch.randn(8, 3), torch.randn(8, 1)
    options = {} if store is None else {"store": tmp_path / "run"}
    if store == "sparse":
        options["checkpoint_every"] = 2
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), check_gradients=False, **options)
    with pytest.raises(TrajectoryError, match=r"Step 3: the parameter\(s\) 0\.weight.*changed outside"), rec:
        for s in range(4):
            opt.zero_grad()
            F.mse_loss(model(X), y).backward()
            rec.log_batch(torch.arange(8))
            opt.step()
            if s == 2:
                with torch.no_grad():
                    model[0].weight.data.mul_(0.5)
    assert rec.n_steps == 3
