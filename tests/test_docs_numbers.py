"""The numbers the docs quote about runs are those the docs script produced (docs/numbers.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from explaind.studies.docs_numbers import NUMBER, TABLE, fill_docs, markdown_table

DOCS = Path(__file__).resolve().parent.parent / "docs"
#: pages that describe runs, and the least number of generated values each must quote
RUN_PAGES = {"guide_reports.md": 10, "guide_replica.md": 4, "quickstart.md": 3}


@pytest.fixture(scope="module")
def numbers():
    path = DOCS / "numbers.json"
    assert path.is_file(), "docs/numbers.json is missing: run 'python -m explaind.studies.docs_numbers --write-docs'"
    return json.loads(path.read_text(encoding="utf-8"))


def test_numbers_file_names_its_commands(numbers):
    assert set(numbers["commands"]) == {"demo", "replicate", "quickstart", "engine"}
    assert numbers["commands"]["demo"] == "explaind demo --threads 1"
    assert all(isinstance(v, str) and v for v in numbers["values"].values())


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_every_marked_number_matches_the_file(page, numbers):
    text = (DOCS / page).read_text(encoding="utf-8")
    marked = NUMBER.findall(text)
    for key, quoted in marked:
        assert key in numbers["values"], f"{page}: marker {key!r} is not in docs/numbers.json"
        assert quoted == numbers["values"][key], (f"{page}: {key} is quoted as {quoted!r} but the docs script "
                                                  f"produced {numbers['values'][key]!r}")
    for key, block in TABLE.findall(text):
        assert block == numbers["tables"][key], f"{page}: table {key} differs from docs/numbers.json"
    assert len(marked) >= RUN_PAGES.get(page, 0), f"{page} quotes only {len(marked)} generated numbers"


def test_fill_docs_writes_values_and_tables(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("a <!--n:x.y-->old<!--/n--> b\n<!--table:t-->\nold\n<!--/table-->\n")
    table = markdown_table([{"setup": "s", "rule": "r", "evals/step": 10, "KL": 3.1e-8},
                            {"setup": "s", "rule": "q", "evals/step": 24.25, "KL": 0.0}],
                           ["setup", "rule", "evals/step", "KL"])
    assert table.splitlines()[2:] == ["| s | r | 10 | 3.1e-8 |", "|  | q | 24.2 | 0 |"]
    assert fill_docs({"values": {"x.y": "1.5"}, "tables": {"t": table}}, [page]) == [page]
    assert page.read_text() == f"a <!--n:x.y-->1.5<!--/n--> b\n<!--table:t-->\n{table}<!--/table-->\n"
    assert fill_docs({"values": {"x.y": "1.5"}, "tables": {"t": table}}, [page]) == []


def test_the_default_run_keeps_the_parts_it_does_not_rerun(tmp_path, monkeypatch):
    """``python -m explaind.studies.docs_numbers`` reruns demo, replicate and quickstart only: the engine's
    numbers already in the file stay (before: they were dropped, and the file no longer named its commands)."""
    from explaind.studies import docs_numbers

    (tmp_path / "docs").mkdir()
    target = tmp_path / "docs" / "numbers.json"
    old = {"values": {"engine.gl4.seconds": "0.099", "quickstart.completeness_gap": "9.6e-16"},
           "tables": {"engine.cost": "| a |\n"}, "commands": {"engine": "bench", "quickstart": "q"},
           "seconds": {"engine": 1.0}}
    target.write_text(json.dumps(old))
    rerun = {"values": {"quickstart.completeness_gap": "7.4e-16"}, "tables": {}, "commands": {"quickstart": "q"},
             "seconds": {"quickstart": 3.3}}
    monkeypatch.setattr(docs_numbers, "collect", lambda root, size, parts: json.loads(json.dumps(rerun)))
    assert docs_numbers.main(["--root", str(tmp_path)]) == 0
    got = json.loads(target.read_text())
    assert got["values"] == {"engine.gl4.seconds": "0.099", "quickstart.completeness_gap": "7.4e-16"}
    assert got["tables"] == old["tables"] and got["commands"] == old["commands"]
    assert got["seconds"] == {"engine": 1.0, "quickstart": 3.3}


def test_the_documented_demo_run_grokked_and_its_phases_and_stop_are_right(numbers):
    """Phase detection and the stop rule, validated on the recorded curves of the documented demo run."""
    from explaind.studies.grokking import PRESETS
    from explaind.studies.phases import History, detect_phases, run_outcome

    history = History.from_dict(numbers["demo_history"])
    outcome = run_outcome(history)
    assert outcome.grokked and outcome.val_step > outcome.train_step
    # the done-criterion of the demo: validation reaches 0.99 after training did
    assert numbers["values"]["demo.val_step"] == str(outcome.val_step)
    n_steps = int(numbers["values"]["demo.n_steps"])
    phases = detect_phases(history, n_steps=n_steps)
    assert [p.name for p in phases] == ["memorisation", "circuit formation", "cleanup"]
    assert phases[0].start == 0 and phases[0].stop == outcome.train_step and phases[-1].stop == outcome.val_step
    assert all(a.stop == b.start for a, b in zip(phases, phases[1:]))
    assert numbers["values"]["demo.phases"] == ", ".join(f"{p.name} {p.start}–{p.stop}" for p in phases)
    # stop rule: training ended at the first evaluation where both accuracies reached stop_at (1.0), before the cap
    stop = 1.0
    both = [s for s, a, v in zip(history.step, history.train_acc, history.val_acc) if a >= stop and v >= stop]
    assert both and both[0] == history.step[-1] == n_steps < PRESETS["small"]["steps"]
