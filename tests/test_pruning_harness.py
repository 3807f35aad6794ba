"""The pruning benchmark harness: metrics by hand, a tiny end-to-end run, files, plot, command line."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from explaind.exceptions import ConfigError
from explaind.pruning import PruningBenchmarkResult, evaluate_pruned, run_pruning_benchmark
from explaind.testing import tiny_pruning_problem


def test_metrics_by_hand():
    reference = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    pruned = torch.tensor([[0.0, 0.0], [0.0, 2.0], [0.0, 3.0]])
    targets = torch.tensor([0, 1, 1])
    out = evaluate_pruned(pruned, reference, targets)
    # argmax (ties -> first): pruned (0, 1, 1), reference (0, 0, 1)
    assert out["accuracy"] == pytest.approx(3 / 3)
    assert out["agreement"] == pytest.approx(2 / 3)
    # KL(p || q) per row with p = softmax(reference), q = softmax(pruned)
    def kl(a, b):
        p = [math.exp(v) / sum(math.exp(u) for u in a) for v in a]
        q = [math.exp(v) / sum(math.exp(u) for u in b) for v in b]
        return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))

    expected = (kl([0, 0], [0, 0]) + kl([2, 0], [0, 2]) + kl([0, 1], [0, 3])) / 3
    assert out["kl"] == pytest.approx(expected, rel=1e-12)


def test_non_finite_outputs_count_as_wrong():
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pruned = torch.tensor([[float("nan"), 0.0], [0.0, 1.0]])
    out = evaluate_pruned(pruned, reference, torch.tensor([0, 1]))
    assert out["accuracy"] == 0.5 and out["agreement"] == 0.5 and math.isinf(out["kl"])


@pytest.fixture(scope="module")
def tiny_result():
    model, (X, y), traj = tiny_pruning_problem(with_trajectory=True)
    gen = torch.Generator().manual_seed(9)
    X_test = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    y_test = torch.randint(0, 3, (30,), generator=gen)
    return run_pruning_benchmark(
        model, test_data=(X_test, y_test), scoring_data=(X, y), trajectory=traj, sparsities=(0.5, 0.9),
        seeds=(0, 1), exclude=("4",), scoring_size=16, strategy_options={"synflow": {"n_iterations": 5}},
    )


def test_tiny_benchmark_covers_every_strategy_sparsity_and_seed(tiny_result):
    res = tiny_result
    assert set(res.strategies) == {"random", "magnitude", "snip", "grasp", "synflow", "explaind"}
    assert len(res.rows) == 6 * 2 * 2
    for row in res.rows:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["agreement"] <= 1.0 and row["kl"] >= 0.0
        assert abs(row["achieved_sparsity"] - row["sparsity"]) <= 0.5 / 77 + 1e-12  # 77 prunable weights
    # random depends on the seed; magnitude does not
    mag = [r for r in res.rows if r["strategy"] == "magnitude" and r["sparsity"] == 0.9]
    assert mag[0]["kl"] == mag[1]["kl"]
    summary = res.summary()
    assert len(summary) == 12 and all(e["n_seeds"] == 2 for e in summary)
    assert res.baseline[0]["agreement"] == 1.0 and res.baseline[0]["kl"] == 0.0


def test_files_round_trip_and_plot(tiny_result, tmp_path):
    res = tiny_result
    js = res.to_json(tmp_path / "r.json")
    again = PruningBenchmarkResult.from_json(js)
    assert again.rows == json.loads(json.dumps(res.rows)) and again.summary() == res.summary()
    csv_text = res.to_csv(tmp_path / "r.csv").read_text().splitlines()
    assert csv_text[0].startswith("strategy,sparsity,kept_fraction,achieved_sparsity,seed,accuracy")
    assert len(csv_text) == 1 + len(res.rows)
    assert len(res.to_csv(tmp_path / "s.csv", summary=True).read_text().splitlines()) == 13
    png = res.plot(tmp_path / "p.png", title="tiny")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = res.table([0.9])
    assert "explaind" in table and "0.9" in table and "±" in table
    with pytest.raises(ConfigError, match=r"sparsities \[0.3\] were not measured"):
        res.table([0.3])
    joined = PruningBenchmarkResult.concat([res, res])
    assert len(joined.rows) == 2 * len(res.rows)


def test_harness_errors_are_explained():
    model, (X, y), traj = tiny_pruning_problem(with_trajectory=False)
    with pytest.raises(ConfigError, match="needs the recorded trajectory"):
        run_pruning_benchmark(model, test_data=(X, y), scoring_data=(X, y), strategies=["explaind"])
    with pytest.raises(ConfigError, match="needs scoring data"):
        run_pruning_benchmark(model, test_data=(X, y), strategies=["snip"])
    with pytest.raises(ConfigError, match="0 <= sparsity < 1"):
        run_pruning_benchmark(model, test_data=(X, y), strategies=["magnitude"], sparsities=(0.5, 1.0))
    with pytest.raises(ConfigError, match=r"strategy_options names strategies not benchmarked: \['snip'\]"):
        run_pruning_benchmark(model, test_data=(X, y), strategies=["magnitude"], strategy_options={"snip": {}})
    # without a trajectory the default list leaves out the strategies that need one
    res = run_pruning_benchmark(model, test_data=(X, y), scoring_data=(X, y), sparsities=(0.5,), seeds=(0,),
                                strategy_options={"synflow": {"n_iterations": 2}})
    assert "explaind" not in res.strategies and "magnitude" in res.strategies


def test_digits_command_runs_a_tiny_benchmark(tmp_path, capsys):
    from explaind.pruning.__main__ import main

    status = main(["--out", str(tmp_path), "--seeds", "0", "--epochs", "1", "--hidden", "8", "--sparsities", "0.5",
                   "0.9", "--show", "0.9", "--batch-size", "100"])
    assert status == 0
    out = capsys.readouterr().out
    assert "explaind" in out and "synflow" in out
    for name in ("results.json", "results.csv", "summary.csv", "table.txt", "pruning.png"):
        assert (tmp_path / name).is_file()
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["config"]["architecture"] == "mlp" and len(payload["rows"]) == 6 * 2
    assert {r["strategy"] for r in payload["rows"]} >= {"random", "magnitude", "snip", "grasp", "synflow", "explaind"}


def test_digits_cnn_model_trains_and_records():
    from explaind.pruning.digits import output_layer, train_digits_model

    model, traj = train_digits_model("cnn", seed=0, epochs=1, batch_size=250, channels=(2,))
    assert output_layer(model) == "head"
    assert traj.n_steps == 4
    final = traj.params(traj.n_steps)
    assert all(torch.equal(final[n], p.detach()) for n, p in model.named_parameters())
    assert isinstance(model, nn.Module)
