"""The demo's pruning stage in a second process: the same files as the serial demo, its warnings raised here."""

from __future__ import annotations

import json
import warnings
from typing import Any

import pytest

from explaind.exceptions import ExplaindWarning
from explaind.studies import demo


def _untimed(value: Any) -> Any:
    """``value`` without the entries that measure time (they differ from run to run)."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if not any(word in k for word in ("time", "seconds", "elapsed"))}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.fixture(scope="module")
def two_demos(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parallel = demo.run_demo(root / "parallel", size="tiny", parallel=True)
        serial = demo.run_demo(root / "serial", size="tiny", parallel=False)
    return root, parallel, serial


def test_the_parallel_demo_writes_the_serial_demos_pruning_results(two_demos):
    root, parallel, serial = two_demos
    results = [json.loads((root / name / "pruning" / "results.json").read_text()) for name in ("parallel", "serial")]
    assert results[0]
    assert _untimed(results[0]) == _untimed(results[1])
    for name in ("parallel", "serial"):
        assert (root / name / "pruning" / "pruning.png").stat().st_size > 0
    assert _untimed(parallel["fidelity"]) == _untimed(serial["fidelity"])
    assert set(parallel["timings"]) == set(serial["timings"]) == {"train", "fidelity", "pruning", "report"}


def test_the_childs_warnings_are_raised_again_with_their_categories():
    caught_in_child = [["ExplaindWarning", "quadrature error above tol"], ["RuntimeWarning", "overflow"],
                       ["SomeThirdPartyWarning", "from a library"]]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        demo._rewarn(caught_in_child)
    assert [(w.category, str(w.message)) for w in caught] == [
        (ExplaindWarning, "quadrature error above tol"), (RuntimeWarning, "overflow"),
        (UserWarning, "from a library")]
    assert issubclass(caught[0].category, ExplaindWarning)


def test_a_failing_pruning_process_fails_the_demo_with_its_error(tmp_path, monkeypatch):
    """The child's error reaches the caller (through the future), after the stages it ran beside."""
    from explaind.exceptions import ConfigError

    monkeypatch.setitem(demo.DEMO_SIZES, "tiny", dict(demo.DEMO_SIZES["tiny"], pruning="no-such-preset"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ConfigError, match="no-such-preset"):
            demo.run_demo(tmp_path / "report", size="tiny", parallel=True)
    assert (tmp_path / "report" / "run").is_dir()  # training ran beside the failing process
