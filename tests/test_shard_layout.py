"""The shard arrangement: every (test input, step, parameter block) lands in exactly one process's cell."""

from __future__ import annotations

import itertools

import pytest

from explaind.kernel.shard import ShardLayout, choose_layout


@pytest.mark.parametrize(("size", "n_tests", "n_steps", "blocks", "steps"), [
    (2, 4, 6, True, True), (2, 3, 6, True, False), (2, 1, 6, True, False), (2, 1, 6, False, True),
    (4, 3, 5, True, True), (3, 2, 1, True, True), (3, 1, 2, False, True), (6, 2, 3, True, True),
    (5, 1, 1, False, False), (4, 1, 2, True, True), (8, 3, 100, True, False)])
def test_cells_cover_every_input_step_and_block_once(size, n_tests, n_steps, blocks, steps):
    layout = choose_layout(size, n_tests, n_steps, blocks=blocks, steps=steps)
    assert layout.tests * layout.blocks * layout.steps == size
    assert layout.blocks == 1 or blocks
    assert layout.steps == 1 or steps or not blocks
    n_blocks = 7
    seen: dict[tuple[int, int, int], int] = {}
    leads: dict[tuple[int, int], int] = {}
    for rank in range(size):
        cell = layout.cell(rank, n_tests, (10, 10 + n_steps))
        mine = cell.my_blocks(list(range(n_blocks)))
        for t, s in itertools.product(range(cell.rows.start, cell.rows.stop), range(*cell.window)):
            for b in mine:
                seen[(t, s, b)] = seen.get((t, s, b), 0) + 1
            if cell.lead:
                leads[(t, s)] = leads.get((t, s), 0) + 1
    everything = set(itertools.product(range(n_tests), range(10, 10 + n_steps), range(n_blocks)))
    assert set(seen) == everything and set(seen.values()) == {1}
    assert set(leads) == {(t, s) for t, s, _ in everything} and set(leads.values()) == {1}


def test_test_shards_first_then_steps_then_blocks():
    assert choose_layout(4, 10, 6, blocks=True, steps=True) == ShardLayout(4, 1, 1)
    assert choose_layout(4, 2, 6, blocks=True, steps=True) == ShardLayout(2, 1, 2)
    assert choose_layout(4, 2, 1, blocks=True, steps=True) == ShardLayout(2, 2, 1)
    assert choose_layout(2, 1, 6, blocks=True, steps=False) == ShardLayout(1, 2, 1)
    assert choose_layout(3, 1, 2, blocks=False, steps=False) == ShardLayout(3, 1, 1)
