"""Fixtures shared by the test modules (pytest finds them here; no test imports a fixture).

Helper functions and recorded runs live in importable helper modules (``engine_fixtures``,
``reference``, ...); only pytest fixtures belong in this file.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run a module's tests with one intra-op thread (restored afterwards).

    The tensors of the engine tests are tiny: with several threads per test worker on a small shared
    machine the threads mostly spin-wait, which made those tests ~20x slower in CPU time. Modules opt
    in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
