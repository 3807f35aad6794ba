"""The command-line section of docs/quickstart.md, run in order at a reduced size.

The documented commands (train -> replicate --table -> influence -> report) are read from the
page (by the parser of ``benchmarks/bench_quickstart.py``, which times them at full size) and run
with the same options except the sizes (:data:`SIZES`: modulus 7, a narrow model, 30 steps), so
that the chain runs in seconds: each command announces its cost before computing, and the
defaults that keep the documented sizes within minutes (64 / 32 test inputs, the evaluation
budget of ``--table``, the data view's first steps) are visible in the results. ``demo --tiny``
and ``study grokking --tiny`` run in ``tests/test_cli_demo.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
import warnings
from pathlib import Path

import pytest

from explaind.cli import default_threads, main
from explaind.studies import fidelity

STEPS = 30
#: The only changes to the documented commands: the sizes (a model width of 8 wants 2 heads).
SIZES = {"--data p=23": "--data p=7", "--model d_model=48": "--model d_model=8 --model n_heads=2",
         "--model d_mlp=192": "--model d_mlp=16", "--steps 800": f"--steps {STEPS}"}
_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quickstart.py"


def _documented() -> list[str]:
    spec = importlib.util.spec_from_file_location("bench_quickstart", _BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quickstart"] = module
    spec.loader.exec_module(module)
    return module.quickstart_commands()


DOCUMENTED = _documented()


def documented(command: str, run: Path) -> list[str]:
    """The page's ``explaind COMMAND ...`` line as arguments, at the reduced sizes, on the run ``run``."""
    (line,) = [c for c in DOCUMENTED if c.split()[1] == command]
    for full, reduced in SIZES.items():
        line = line.replace(full, reduced)
    return [str(run) + a[len("runs/grok"):] if a.startswith("runs/grok") else a for a in shlex.split(line)[1:]]


def test_the_page_documents_the_commands_run_here():
    assert [c.split()[1] for c in DOCUMENTED] == ["demo", "train", "replicate", "influence", "report", "study"]
    train = next(c for c in DOCUMENTED if c.split()[1] == "train")
    assert all(full in train for full in SIZES), "the documented train command changed: update SIZES"


def test_the_quickstarts_train_command_is_the_runs_of_study_grokking_and_demo():
    # docs/quickstart.md and docs/cli.md ("The quickstart's training run") say the three train one run: the page's
    # command, parsed by the command line's own parser, against grokking_config("small")
    import explaind
    from explaind.cli import build_parser
    from explaind.studies.grokking import grokking_config

    (train,) = [c for c in DOCUMENTED if c.split()[1] == "train"]
    args = build_parser().parse_args(shlex.split(train)[1:])
    data = dict(item.split("=", 1) for item in args.data)
    model = dict(item.split("=", 1) for item in args.model)
    config, _ = grokking_config("small")
    assert (args.architecture, args.dataset, args.optimizer) == (config["architecture"], config["dataset"], "adamw")
    assert json.loads(data["p"]) == config["data"]["p"] and json.loads(data["n_train"]) == config["data"]["n_train"]
    assert json.loads(data["n_val"]) is config["data"]["n_val"] is None
    # the page leaves n_heads at the architecture's default, which is the preset's
    fields = explaind.get_entry("architecture", "modular_transformer").config.model_fields
    assert fields["n_heads"].default == config["model"]["n_heads"]
    assert {k: json.loads(v) for k, v in model.items()} == {k: v for k, v in config["model"].items() if k != "n_heads"}
    assert (args.lr, args.weight_decay, tuple(args.betas)) == (config["lr"], config["weight_decay"], config["betas"])
    assert (args.steps, args.stop_at, args.seed) == (config["steps"], config["stop_at"], config["seed"])
    assert args.batch_size is config["batch_size"] is None
    assert args.weight_decay == 1.0  # not the 2 of earlier releases, whose run spiked (docs/cli.md)
    assert args.dtype == config["dtype"] == "float64"  # float32 gradients left 0.34 % residual (docs/cli.md)


@pytest.fixture(scope="module")
def grok(tmp_path_factory):
    run = tmp_path_factory.mktemp("quickstart") / "runs" / "grok"
    argv = documented("train", run)
    assert argv[:3] == ["train", "--out", str(run)] and "p=7" in argv and str(STEPS) in argv
    assert main(["-q", *argv]) == 0
    return run


def test_replicate_table_announces_the_cost_of_each_rule(grok, capsys):
    assert documented("replicate", grok) == ["replicate", str(grok), "--table"]
    assert main([*documented("replicate", grok), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    # 20 validation pairs (< 32): every rule of the table fits the default budget
    assert [r["rule"] for r in rows] == [r.label for r in fidelity.all_rules()]
    assert data["skipped"] == []
    assert all(r["n_test"] == 20 and r["n_steps"] == STEPS for r in rows)
    assert all(r["argmax agreement"] == 1.0 for r in rows)


def test_replicate_table_skips_what_exceeds_the_budget(grok, capsys):
    assert main(["--threads", "1", "replicate", str(grok), "--table", "--max-evals", "20000", "--steps", "10:"]) == 0
    captured = capsys.readouterr()
    # the announcement comes before the computation, on stderr; the skipped rules are named with their cost
    assert "replicate: midpoint-10 over 20 steps x 20 inputs = 4,000 path-gradient evaluations" in captured.err
    assert "skipped midpoint-100: 40,000 evaluations exceed --max-evals 20,000" in captured.out
    assert "gauss-legendre-4" in captured.out and "adaptive" in captured.out
    assert main(["-q", "replicate", str(grok), "--table", "--max-evals", "-1"]) == 2


def test_replicate_table_says_when_a_rule_fits_alone_but_not_after_the_others(grok, capsys):
    # 20 steps x 20 inputs: gauss-legendre-4 1,600 + midpoint-10 4,000 computed; adaptive's 4,800 fits 8,000 alone
    assert main(["--threads", "1", "replicate", str(grok), "--table", "--max-evals", "8000", "--steps", "10:"]) == 0
    out = capsys.readouterr().out
    assert ("skipped adaptive: at least 4,800 evaluations, with the 5,600 of the rules computed, exceed "
            "--max-evals 8,000") in out
    assert "skipped midpoint-100: 40,000 evaluations exceed --max-evals 8,000" in out


def _main_warned(argv: list[str]) -> list[str]:
    """Run the command line on ``argv`` (exit code 0) and return the explaind warnings it gave (on stderr outside
    pytest, where pytest records them)."""
    from explaind.exceptions import ExplaindWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(argv) == 0
    return [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


def test_replicate_table_states_each_rules_error_and_names_the_inexact_rules_under_it(grok, capsys):
    # every fixed rule on this ReLU model leaves steps above the replica's tolerance: the table says how far in a
    # column, and one line under it names them all (printed with the result, as the table's reading) instead of
    # one warning per row
    warned = _main_warned([*documented("replicate", grok), "--json"])
    data = json.loads(capsys.readouterr().out)
    rows = data["rows"]
    inexact = [r["rule"] for r in rows if r["warned"]]
    assert set(inexact) >= {"midpoint-10", "gauss-legendre-4"}
    assert all(r["rule"] != "adaptive" for r in rows if r["warned"])
    for row in rows:  # the column is the rule's measured error, above the tolerance where the rule was held back
        assert 0.0 <= row["step error"] < 1.0
        assert (row["step error"] > row["tol"]) or not row["warned"]
    worst = max(r["step error"] for r in rows if r["warned"])
    assert data["note"].startswith("the fixed rules of the table (") and all(rule in data["note"] for rule in inexact)
    assert f"by up to {worst:.2g}:" in data["note"]
    assert not [w for w in warned if w.startswith(("quadrature=", "the fixed rules of the table"))]
    assert len(warned) == sum(1 for w in warned if "adaptive quadrature left" in w)
    # the text table has the column, and the note under it
    assert main(["-q", *documented("replicate", grok)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "step error" in lines[0]
    assert [line for line in lines if line.startswith("note: ")] == [f"note: {data['note']}"]


def test_replicate_with_one_fixed_rule_keeps_its_own_warning(grok, capsys):
    warned = _main_warned(["-q", "replicate", str(grok), "--quadrature", "midpoint", "--nodes", "10"])
    assert len([w for w in warned if w.startswith("quadrature='midpoint' with 10 nodes left")]) == 1
    assert not [w for w in warned if w.startswith("the fixed rules of the table")]


def _left_out_share(out_dir: Path) -> float:
    """The share of the explained change the saved scores do not hold, from the saved terms alone."""
    from safetensors.torch import load_file

    t = load_file(str(out_dir / "attribution.safetensors"))
    parts = sum(t[k].reshape(t[k].shape[0], -1, t[k].shape[-1]).sum(1)
                for k in ("values", "regularization", "residual") + (("buffers",) if "buffers" in t else ()))
    change = t["final"] - t["initial"]
    return float((change - parts).abs().sum() / change.abs().sum())


def test_influence_defaults_to_the_adaptive_rule_under_the_warning_threshold(grok, tmp_path, capsys):
    out_dir = grok / "scores"
    assert documented("influence", grok) == ["influence", str(grok), "--keep", "step,group", "--out", str(out_dir)]
    assert _main_warned(documented("influence", grok)) == []
    captured = capsys.readouterr()
    nodes = fidelity.SCORES_RULE.nodes
    cost = f"influence: adaptive-{nodes} over {STEPS} steps x 20 inputs = at least {nodes * STEPS * 20:,}"
    assert cost in captured.err
    assert "above 0.1%" not in captured.out
    assert f"adaptive-{nodes}, tol {fidelity.SCORES_TOL:g})" in captured.out
    # the share printed (and stored in attribution.json) is what the saved scores leave out of the change
    meta = json.loads((out_dir / "attribution.json").read_text())["meta"]
    assert meta["quadrature"] == "adaptive" and meta["nodes"] == nodes and meta["tol"] == fidelity.SCORES_TOL
    assert f"quadrature error share {100 * meta['quadrature_share']:.3g}%, residual share" in captured.out
    left_out = _left_out_share(out_dir)
    assert left_out == pytest.approx(meta["quadrature_share"], rel=1e-6, abs=1e-12)
    assert meta["quadrature_share"] < 1e-3
    # a path that is not smooth: the adaptive rule refined some steps beyond its first 2-node estimate
    assert max(meta["evals_per_step"]) > nodes
    assert (out_dir / "scores.csv").exists()
    assert main(["-q", "--json", "influence", str(grok), "--out", str(tmp_path / "json")]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["meta"]["quadrature"] == "adaptive" and summary["meta"]["nodes"] == nodes
    assert summary["completeness_gap"] < 1e-9


def test_influence_with_a_coarse_rule_forced_still_warns(grok, tmp_path, capsys):
    out_dir = tmp_path / "coarse"
    argv = [*documented("influence", grok)[:-2], "--out", str(out_dir), "--quadrature", "gauss-legendre", "--nodes",
            "1"]
    (warned,) = _main_warned(argv)
    captured = capsys.readouterr()
    meta = json.loads((out_dir / "attribution.json").read_text())["meta"]
    assert meta["quadrature_share"] > 1e-3
    assert _left_out_share(out_dir) == pytest.approx(meta["quadrature_share"], rel=1e-6)
    assert warned.startswith(f"InfluenceEstimator: quadrature error share {meta['quadrature_share']:.3g} > 0.001 "
                             f"with quadrature='gauss-legendre'") and "more nodes" in warned
    assert "above 0.1%: more --nodes or --quadrature adaptive shrink the quadrature error" in captured.out
    # the adaptive rule with a loose --tol (1-node panels whose first estimate passes it) warns too, naming --tol
    (warned,) = _main_warned([*argv[:-4], "--tol", "0.5", "--nodes", "1"])
    captured = capsys.readouterr()
    assert json.loads((out_dir / "attribution.json").read_text())["meta"]["quadrature_share"] > 1e-3
    assert "with quadrature='adaptive'" in warned and "Use a smaller tol" in warned
    assert "stopped at the cap" in warned and "quadrature='midpoint', nodes=N" in warned  # what to do on kinky paths
    assert "above 0.1%: a smaller --tol shrinks the quadrature error" in captured.out
    assert main(["-q", *argv[:-4], "--tol", "0"]) == 2
    assert "--tol 0 must be a relative error between 0 and 1" in capsys.readouterr().err


def test_report_covers_a_prefix_of_the_run_in_its_data_view(grok, capsys):
    assert documented("report", grok) == ["report", str(grok)]
    # 12 < STEPS: a prefix; neither view's quadrature share is above the threshold
    assert _main_warned([*documented("report", grok), "--data-steps", "12"]) == []
    captured = capsys.readouterr()
    assert "report, data view: adaptive-2 over 12 steps" in captured.err
    # each view says its evaluations again as it starts (so do the demo and the grokking study, which call it too)
    assert (f"step x group influence on 20 validation inputs (adaptive-2: at least {STEPS * 20 * 2:,} path-gradient "
            f"evaluations)") in captured.err
    assert f"of {STEPS} (adaptive-2: at least {12 * 20 * 2:,} path-gradient evaluations)" in captured.err
    scores = json.loads((grok / "report" / "scores.json").read_text())
    assert scores["data_view"]["data_steps"] == [0, 12]
    assert all(s < 12 for s in scores["data_view"]["kernel_steps"])
    page = (grok / "report" / "index.html").read_text()
    assert f"Only the first 12 of the {STEPS} steps" in page
    assert main(["-q", "report", str(grok), "--data-steps", "some"]) == 2


def test_replicate_without_a_rule_uses_adaptive_within_the_budget(grok, capsys):
    assert main(["--threads", "1", "replicate", str(grok)]) == 0
    captured = capsys.readouterr()
    assert "adaptive" in captured.out and "gauss-legendre" not in captured.out + captured.err
    assert (f"replicate: adaptive, tol 1e-07 over {STEPS} steps x 20 inputs = at least {12 * STEPS * 20:,}"
            in captured.err)
    assert "adaptive at tol 1e-07: largest step error " in captured.out
    # a budget below the adaptive rule's lower bound at 1e-7 (12 per step and input) and above the 2-node one's
    assert main(["--threads", "1", "replicate", str(grok), "--max-evals", str(12 * STEPS * 20 - 1)]) == 0
    captured = capsys.readouterr()
    assert (f"replicate: adaptive-2, tol 0.001 over {STEPS} steps x 20 inputs = at least {2 * STEPS * 20:,}"
            in captured.err)
    assert "adaptive-2 at tol 0.001: largest step error " in captured.out


def test_replicate_without_a_rule_falls_back_to_the_fixed_rule_by_cost(grok, capsys):
    adaptive = 2 * STEPS * 20  # the announced lower bound, and the fixed rule's exact cost
    assert main(["--threads", "1", "replicate", str(grok), "--max-evals", str(adaptive - 1)]) == 0
    captured = capsys.readouterr()
    assert "gauss-legendre-2" in captured.out and "adaptive" not in captured.out
    assert (f"adaptive, tol 1e-07 would take at least {6 * adaptive:,} path-gradient evaluations, more than "
            f"--max-evals {adaptive - 1:,}; using gauss-legendre-2") in captured.err
    assert (f"adaptive-2, tol 0.001 would take at least {adaptive:,} path-gradient evaluations, more than "
            f"--max-evals {adaptive - 1:,}; using gauss-legendre-2") in captured.err
    assert f"replicate: gauss-legendre-2 over {STEPS} steps x 20 inputs = {adaptive:,}" in captured.err
    assert main(["-q", "replicate", str(grok), "--max-evals", "10", "--json", "--steps", "0:4"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"][0]["rule"] == "gauss-legendre-2"


def test_replicate_with_a_rule_or_nodes_keeps_it_whatever_the_budget(grok, capsys):
    assert main(["-q", "replicate", str(grok), "--quadrature", "adaptive", "--max-evals", "10", "--steps", "0:4",
                 "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["rule"] == "adaptive" and row["tol"] == 1e-7  # the replica's own tolerance without --tol
    assert main(["-q", "replicate", str(grok), "--nodes", "3", "--max-evals", "10", "--steps", "0:4", "--json",
                 "--tol", "1e-6"]) == 0
    row = json.loads(capsys.readouterr().out)["rows"][0]
    assert row["rule"] == "adaptive-3" and row["tol"] == 1e-6
    assert main(["-q", "replicate", str(grok), "--tol", "2"]) == 2
    assert "--tol 2 must be a relative error between 0 and 1" in capsys.readouterr().err


def test_replicate_shows_a_progress_bar_with_the_time_left(grok, capsys):
    assert main(["--threads", "1", "replicate", str(grok), "--quadrature", "gauss-legendre", "--nodes", "2"]) == 0
    err = capsys.readouterr().err
    assert "quadrature" in err and "<" in err.split("quadrature")[-1]  # tqdm's [elapsed<remaining]


def test_commands_use_one_cpu_thread_unless_told_otherwise(monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        assert main(["-q", "plugins"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["-q", "--threads", "2", "plugins"]) == 0
        assert torch.get_num_threads() == 2
        # an OMP_NUM_THREADS of the user's, or a GPU device, keeps torch's choice
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert main(["-q", "plugins"]) == 0
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert default_threads(argparse.Namespace(threads=None, device="cuda:0")) is None
        assert default_threads(argparse.Namespace(threads=None, device="cpu")) == 1
        assert default_threads(argparse.Namespace(threads=3, device="cuda")) == 3
    finally:
        torch.set_num_threads(before)


#: Commands docs/cli.md writes out that the benchmark does not time as written, and why.
NOT_TIMED = {
    "explaind validate": "the 27-minute measurement of docs/scores_meaning.md, timed as 'explaind validate --quick'",
    "explaind demo --threads 1 --out report": "'make demo': 'explaind demo' with its defaults spelled out",
    "explaind replicate runs/grok --tabel": "an error example, refused at once like the timed '--dataset digit'",
    "explaind study grokking --steps 780": "a comparison of rules at the timed table's run length (docs/cli.md "
                                           "section explaind study grokking); the study is timed at its defaults",
}


def test_every_command_written_on_the_pages_is_timed_by_the_benchmark():
    module = sys.modules["bench_quickstart"]
    root = _BENCH.parents[1]
    timed = set(DOCUMENTED) | set(module.CLI_COMMANDS) | set(module.THREAD_COMMANDS)
    written = set()
    for page in (root / "docs" / "cli.md", root / "docs" / "quickstart.md"):
        written |= set(module.quickstart_commands(page))  # code-block lines, continuations joined
        written |= {" ".join(c.split()) for c in re.findall(r"`(explaind [^`]*)`", page.read_text())}
    # synopses and sentences name placeholders (RUN, DIR, N), elisions or a bare command; an error line is output
    written = {c for c in written if not c.split()[1].endswith(":")}
    runnable = {c for c in written if not re.search(r"\[|\.\.\.|\b[A-Z]{1,}\b", c) and len(c.split()) > 2
                or c in ("explaind demo", "explaind prune", "explaind plugins", "explaind validate")}
    assert {"explaind replicate runs/grok --steps 570:670", "explaind train --out runs/a --dataset digit",
            "explaind influence runs/cli --out runs/cli/scores", "explaind prune"} <= runnable
    missing = sorted(runnable - timed - set(NOT_TIMED))
    assert not missing, f"documented but not timed by benchmarks/bench_quickstart.py: {missing}"
