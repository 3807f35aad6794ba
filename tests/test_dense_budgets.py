"""The kink-dense rule's budget shared out over the steps by their first-estimate errors (``dense.step_budgets``).

Expected budgets are worked out by hand from the rule in docs/engine.md (section 2): :math:`n_g \\propto E_g^{1/2}`,
clipped to :math:`[n/4, 4n]`, the batch's :math:`n \\sum_g F_g` evaluations kept.
"""

from __future__ import annotations

import torch

from explaind.kernel import dense


def _steps(counts: list[int]) -> list[torch.Tensor]:
    """Bool masks over the units of consecutive steps with ``counts`` failing units each."""
    U = sum(counts)
    out, lo = [], 0
    for c in counts:
        mask = torch.zeros(U, dtype=torch.bool)
        mask[lo:lo + c] = True
        out.append(mask)
        lo += c
    return out


def test_without_errors_or_with_one_step_every_step_gets_the_mean():
    assert dense.step_budgets(_steps([3, 5]), None, 100) == [100, 100]
    assert dense.step_budgets(_steps([4]), torch.rand(4), 100) == [100]


def test_a_step_erring_four_times_more_gets_twice_the_nodes():
    need = torch.cat([torch.full((10,), 4e-3), torch.full((10,), 1e-3)])
    # weights 2 : 1, 2000 evaluations over 10 + 10 units: 2000 * 2 / 30 and 2000 / 30
    assert dense.step_budgets(_steps([10, 10]), need, 100) == [133, 66]


def test_the_root_mean_square_of_a_step_s_errors_sets_its_share():
    need = torch.tensor([3e-3, 5e-3, 2e-3, 4e-3, 4e-3, 2e-3])  # rms sqrt(17) e-3 and sqrt(10) e-3
    weights = [17 ** 0.25, 10 ** 0.25]
    expect = [int(100 * 6 * w / (2 * weights[0] + 4 * weights[1])) for w in weights]
    assert dense.step_budgets(_steps([2, 4]), need, 100) == expect


def test_budgets_are_clipped_and_the_rest_goes_to_the_other_steps():
    need = torch.cat([torch.full((10,), 1.0), torch.full((10,), 1e-4)])
    # weights 100 : 1 would give 198 and 1.98; the second is raised to 100 / 4, the first gets (2000 - 250) / 10
    assert dense.step_budgets(_steps([10, 10]), need, 100) == [175, 25]


def test_budgets_keep_the_batch_total_and_the_spread():
    gen = torch.Generator().manual_seed(0)
    counts = [3, 17, 8, 1, 30, 12]
    need = torch.rand(sum(counts), generator=gen, dtype=torch.float64) ** 6
    got = dense.step_budgets(_steps(counts), need, 100)
    assert sum(c * b for c, b in zip(counts, got)) <= 100 * sum(counts)
    assert sum(c * b for c, b in zip(counts, got)) >= 100 * sum(counts) - sum(counts)  # only the rounding down lost
    assert all(int(100 / dense.BUDGET_SPREAD) <= b <= 100 * dense.BUDGET_SPREAD for b in got)
    assert len(set(got)) > 1


def test_a_step_without_error_falls_back_to_the_mean_for_all():
    need = torch.cat([torch.zeros(4), torch.full((4,), 1e-3)])
    assert dense.step_budgets(_steps([4, 4]), need, 100) == [100, 100]


def _fallback(n_steps: int, per_step: int = 5):
    """``dense_fallback`` on ``n_steps`` steps of far units whose first estimates err more in later steps."""
    from explaind.kernel.quadrature import rule_nodes

    U, m, O = n_steps * per_step, 4, 2
    steps = torch.arange(n_steps).repeat_interleave(per_step)
    x = torch.tensor(rule_nodes("gauss-legendre", m)[0])
    gen = torch.Generator().manual_seed(0)
    h, d = (torch.randn(U, m, O, generator=gen, dtype=torch.float64) for _ in range(2))

    def shared(units, t):
        k = torch.stack([torch.sin(t * (u + 1)) for u in units.tolist()])
        return torch.stack([k, -k], -1), torch.stack([k + 1, k - 1], -1)

    need = ((steps + 1).double() ** 2) * 1e-3  # rms per step (g + 1)^2 e-3: budgets in proportion to g + 1
    every = torch.arange(U)
    fb = dense.dense_fallback(every, steps, every, torch.full((U,), m), shared, x, (h, d), h[:, 0] * 0,
                              h[:, 0] * 0 + 1, need=need)
    per_unit = {u: n + m for u, n in zip(fb.unit.tolist(), fb.new.tolist())}
    return [per_unit[u] for u in range(U)], steps


def test_a_batch_of_share_steps_kink_dense_steps_spends_grid_evals_on_average_shared_by_error(monkeypatch):
    # the budgets as shared out, before the grids grow where they miss the midpoint rule (test_dense_growth.py):
    # the synthetic values here are no path (h and h' unrelated), so what the grids err by means nothing
    monkeypatch.setattr(dense, "SHORTFALL_TARGET", float("inf"))
    cells, steps = _fallback(dense.SHARE_STEPS)
    assert sum(cells) <= dense.GRID_EVALS * len(cells)
    per_step = [cells[int(torch.nonzero(steps == g)[0])] for g in range(dense.SHARE_STEPS)]
    assert per_step == sorted(per_step) and per_step[-1] > 2 * per_step[1]  # later steps err more: more nodes


def test_fewer_kink_dense_steps_keep_dense_evals_each_on_average():
    cells, _ = _fallback(dense.SHARE_STEPS - 1)
    assert dense.GRID_EVALS * len(cells) < sum(cells) <= dense.DENSE_EVALS * len(cells)
