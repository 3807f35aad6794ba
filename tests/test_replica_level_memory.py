"""The adaptive rule's open panels between refinement levels: each distinct output-sized value of a level held once.

An open panel keeps 13 output-sized vectors between levels (``h, h'`` at its ends, at the samples beside them and at
its bracket's ends, and its estimate); on a wide-output model with many open panels a pair they passed any budget.
Adjacent panels share an end, and most side samples and bracket ends are ends: the open panels are now packed
(``explaind/kernel/adaptive_pool.py``), each distinct value once, taken for another only where equal bit for bit.
The tests count the bytes the open panels hold, hold the plans to those of the unpacked state (the packing replaced
by keeping every panel whole) bit for bit, the estimates to a slow float64 loop over the plan's nodes, and a
language model's replica to the trained model.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from reference import rel_err
from test_replica_pair_memory import TOL, Kinked

import explaind
from explaind.kernel import adaptive, adaptive_memory, adaptive_pool
from explaind.kernel.adaptive_jobs import Jobs

pytestmark = pytest.mark.usefixtures("one_thread")

OUTPUTS = 64


class Whole:
    """Open panels kept whole, every field its own tensor: the state before the packing (the test's reference)."""

    def __init__(self, jobs: Jobs) -> None:
        self.jobs, self.est, self.chunks = jobs, jobs.est, torch.zeros(0, dtype=torch.long)

    unit = property(lambda self: self.jobs.unit)
    err = property(lambda self: self.jobs.err)

    def take(self, sel: torch.Tensor) -> Whole:
        return Whole(self.jobs.take(sel))

    def nbytes(self) -> int:
        return 0


def unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the open panels whole between levels (no pool)."""
    monkeypatch.setattr(adaptive_memory, "pack", lambda jobs, pool: Whole(jobs))
    monkeypatch.setattr(adaptive_memory, "unpack", lambda p, pool: p.jobs)
    monkeypatch.setattr(adaptive_memory, "ends", lambda p, pool: (p.jobs.f_A, p.jobs.f_B))


def held_bytes(groups: object, outputs: int) -> tuple[int, int]:
    """The open panels of ``groups`` and the bytes of the distinct storages of ``outputs``-wide tensors it reaches."""
    seen: dict[int, int] = {}

    def visit(obj: object) -> None:
        if isinstance(obj, torch.Tensor):  # the storage, whatever the view (a view keeps all of it alive)
            s = obj.untyped_storage()
            if s.nbytes() >= 8 * outputs:
                seen[s.data_ptr()] = s.nbytes()
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v)
        elif dataclasses.is_dataclass(obj) or type(obj).__module__.startswith(("explaind", "test_replica_level")):
            for v in vars(obj).values():
                visit(v)

    visit(groups)
    parts = groups if isinstance(groups, list) else groups.parts
    return sum(int(p.unit.numel()) for p in parts), sum(seen.values())


def spy_held(monkeypatch: pytest.MonkeyPatch, outputs: int) -> list[tuple[int, int]]:
    """``(open panels, bytes)`` after every refinement level."""
    seen: list[tuple[int, int]] = []
    level = adaptive_memory.Groups.level

    def spy(self, *args, **kwargs):
        level(self, *args, **kwargs)
        seen.append(held_bytes(self, outputs))

    monkeypatch.setattr(adaptive_memory.Groups, "level", spy)
    return seen


@pytest.fixture(scope="module")
def kinked():
    return Kinked(units=2, kinks=16, outputs=OUTPUTS)


@pytest.mark.parametrize("coarsen", [False, True])
@pytest.mark.parametrize("level_bytes", [None, 1])
def test_open_panels_hold_each_distinct_value_once_and_the_plan_is_the_unpacked_one(kinked, monkeypatch, coarsen,
                                                                                    level_bytes):
    """Before, 13 vectors an open panel between levels; now at most nine on average on a path with many kinks, and
    the same nodes, weights and evaluations bit for bit as with every panel kept whole (one group a level or one
    panel a group). Failed before the packing: 13.0 vectors a panel."""
    seen = spy_held(monkeypatch, OUTPUTS)
    packed = kinked.plan(coarsen=coarsen, level_bytes=level_bytes)
    panels = sum(n for n, _ in seen)
    vectors = sum(b for _, b in seen) / (8 * OUTPUTS * panels)
    assert panels > 200 and max(n for n, _ in seen) > 20, seen
    assert vectors <= 9.0, vectors
    monkeypatch.undo()
    unpacked(monkeypatch)
    seen = spy_held(monkeypatch, OUTPUTS)
    whole = kinked.plan(coarsen=coarsen, level_bytes=level_bytes)
    assert sum(b for _, b in seen) == 13 * 8 * OUTPUTS * panels  # the reference holds 13 vectors a panel
    assert torch.equal(packed.t, whole.t) and torch.equal(packed.w, whole.w)
    assert torch.equal(packed.evals, whole.evals)
    assert rel_err(packed.estimate, whole.estimate) <= 1e-13
    for u in range(2):
        exact = kinked.change(u)
        loop = kinked.loop(u, packed.t[u].tolist(), packed.w[u].tolist())
        scale = max(abs(v) for v in exact)
        assert max(abs(a - b) for a, b in zip(loop, exact)) <= 2 * TOL * scale
        assert max(abs(float(a) - b) for a, b in zip(packed.estimate[u], loop)) <= 1e-12 * scale


def _jobs(rows: int, outputs: int) -> Jobs:
    """Open panels of one unit tiling ``[0, 1]`` with every value of its own (no two fields share a value yet)."""
    gen = torch.Generator().manual_seed(3)
    edges = torch.linspace(0, 1, rows + 1, dtype=torch.float64)
    unit = torch.zeros(rows, dtype=torch.long)
    vec = [torch.randn(rows, outputs, generator=gen, dtype=torch.float64) for _ in range(3)]
    j = Jobs.whole(unit, vec[0], vec[1], vec[0].clone(), vec[1].clone(), vec[2], vec[2][:, 0].abs(),
                   torch.ones(rows, dtype=torch.float64), torch.ones(rows, dtype=torch.float64))
    j.A, j.B, j.s_A, j.s_B = edges[:-1].clone(), edges[1:].clone(), edges[:-1].clone(), edges[1:].clone()
    j.p, j.q = edges[:-1] + 0.25 / rows, edges[1:] - 0.25 / rows
    for name in ("f_A", "f_B", "d_A", "d_B", "f_p", "f_q", "d_p", "d_q"):
        setattr(j, name, torch.randn(rows, outputs, generator=gen, dtype=torch.float64))
    j.f_sA, j.f_sB, j.d_sA, j.d_sB = j.f_A.clone(), j.f_B.clone(), j.d_A.clone(), j.d_B.clone()
    return j


def test_a_value_is_shared_only_where_equal_bit_for_bit():
    """Adjacent panels' common ends are stored once; a value at the same point that differs in one bit (a ``h'`` from
    the other side of a kink, ``-0.0`` for ``0.0``) or is ``nan`` (an unknown ``h'``) is kept as it is."""
    rows, outputs = 6, 5
    j = _jobs(rows, outputs)
    j.f_A[1:], j.d_A[1:] = j.f_B[:-1].clone(), j.d_B[:-1].clone()  # shared ends: equal values at the same point
    j.f_sA, j.d_sA = j.f_A.clone(), j.d_A.clone()
    j.d_A[2, 0] = torch.nextafter(j.d_A[2, 0], torch.tensor(9.0, dtype=torch.float64))  # one ulp from d_B[1]
    j.f_A[3, 1], j.f_B[2, 1] = -0.0, 0.0
    j.d_A[0, :], j.d_sA[0, :], j.d_p[0, :] = torch.nan, torch.nan, torch.nan  # h'(0) unknown
    j.p[0] = j.A[0]
    pool = adaptive_pool.Pool()
    back = adaptive_pool.unpack(adaptive_pool.pack(j, pool), pool)
    for f in dataclasses.fields(Jobs):
        a, b = getattr(j, f.name), getattr(back, f.name)
        assert a.dtype == b.dtype and a.shape == b.shape, f.name
        if a.is_floating_point():
            assert torch.equal(a.view(torch.int64), b.view(torch.int64)), f.name
        else:
            assert torch.equal(a, b), f.name
    # of the 72 values, stored: f_A 2 (rows 0 and 3: -0.0, the first value at its point), f_B 6 (f_B[2] is 0.0),
    # f_sA 1 (row 3: the -0.0 stored first at its point), f_sB 1 (row 2, likewise), d_A 2 (rows 0 and 2: one ulp),
    # d_B 6, d_sA 1 (row 2), d_sB 1 (row 1, the point of d_A[2]), the brackets 6 each but d_p[0] (nan, as d_A[0])
    distinct = 2 + 6 + 1 + 1 + 2 + 6 + 1 + 1 + 6 + 6 + 5 + 6
    assert pool.size == distinct, pool.size
    assert pool.nbytes() == distinct * outputs * 8


def test_a_chunk_is_freed_once_no_group_refers_to_it(monkeypatch):
    """A level releases each group's values as it takes the group, so that the open panels of two levels are never
    all held at once."""
    pool = adaptive_pool.Pool()
    a, b = adaptive_pool.pack(_jobs(3, 4), pool), adaptive_pool.pack(_jobs(2, 4), pool)
    halves = [a.take(torch.tensor([0, 1])), a.take(torch.tensor([2]))]  # two groups of one output share its chunk
    for p in (*halves, b):
        pool.hold(p.chunks)
    assert pool.refs == [2, 1]
    pool.release(halves[0].chunks)
    assert pool.chunks[0] is not None
    pool.release(halves[1].chunks)
    assert pool.chunks[0] is None and pool.chunks[1] is not None
    assert pool.nbytes() == b.ids.unique().numel() * 4 * 8


@pytest.fixture(scope="module")
def lm():
    """A tiny float64 GPT-2 (vocabulary 30, sequences of 8) after three AdamW steps and four test sequences."""
    from _hf_testkit import lm_data
    from test_token_models import _record_lm

    model, traj = _record_lm(steps=3)
    test_ids, _ = lm_data(4, seed=11)
    with torch.no_grad():
        truth = model(input_ids=test_ids).logits.reshape(4, -1)
    return traj, {"input_ids": test_ids}, truth


def test_a_language_models_replica_is_the_unpacked_one_and_the_trained_models(lm, monkeypatch):
    """The replica of all 240 logits at ``tol=1e-10`` with the open panels packed equals, bit for bit, the one with
    every panel kept whole, and the trained model within 1e-6."""
    traj, X, truth = lm
    seen = spy_held(monkeypatch, truth.shape[1])
    packed = torch.as_tensor(explaind.KernelReplica(device="cpu", quadrature="adaptive", tol=TOL).fit(traj).predict(X))
    assert seen and sum(n for n, _ in seen) > 0
    panels, held = sum(n for n, _ in seen), sum(b for _, b in seen)
    assert held < 13 * 8 * truth.shape[1] * panels, (held, panels)
    monkeypatch.undo()
    unpacked(monkeypatch)
    whole = torch.as_tensor(explaind.KernelReplica(device="cpu", quadrature="adaptive", tol=TOL).fit(traj).predict(X))
    assert torch.equal(packed, whole)
    assert rel_err(packed, truth) <= 1e-6


def test_accepted_panels_keep_no_output_sized_storage(kinked, monkeypatch):
    """An accepted panel's estimate goes into its unit's sum at once and the panel keeps its scalars only: before, its
    empty estimate and ends were views of the estimate, which kept every accepted panel's vector alive (the test
    failed on 18b3503 with 56,832 bytes kept: 111 estimates of 64 outputs)."""
    made = []
    original = adaptive_memory.Accepted

    def spy(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(adaptive, "Accepted", spy)
    kinked.plan()
    (acc,) = made
    assert sum(int(p.unit.numel()) for p in acc.parts) > 40
    _, kept = held_bytes(acc.parts, OUTPUTS)
    assert kept == 0, kept
