"""The NAdam, RAdam and Adamax adapters: conformance suites, defaults, resolution, refused options, CLI and listing."""

from __future__ import annotations

import json

import pytest
import torch

import explaind
from explaind.cli import main
from explaind.exceptions import ConfigError
from explaind.plugins import resolve_optimizer_adapter
from explaind.testing import check_adapter_start_state, check_optimizer_adapter
from explaind.testing.adapters import default_scenarios

CLASSES = {"nadam": torch.optim.NAdam, "radam": torch.optim.RAdam, "adamax": torch.optim.Adamax}
#: option scenarios each family sweep must hold beyond the generic runs
OPTIONS = {
    "nadam": {"nadam_l2_momentum_decay", "nadam_decoupled", "nadam_maximize", "nadam_foreach",
              "nadam_foreach_decoupled_maximize"},
    "radam": {"radam_l2", "radam_decoupled", "radam_maximize", "radam_never_rectified", "radam_foreach",
              "radam_foreach_decoupled_maximize"},
    "adamax": {"adamax_l2", "adamax_maximize", "adamax_foreach"},
}
GENERIC = ("two_groups", "step_lr", "one_cycle", "accumulation_3", "clip_grad_norm", "frozen_and_unused")


def _param(dtype=torch.float64):
    return torch.nn.Parameter(torch.ones(3, dtype=dtype))


@pytest.fixture(scope="module", params=[(n, d) for n in sorted(CLASSES) for d in ("float64", "float32")])
def report(request):
    name, dtype = request.param
    tol = 1e-12 if dtype == "float64" else 1e-5
    rep = check_optimizer_adapter(explaind.get_entry("optimizer_adapter", name), dtype=getattr(torch, dtype), tol=tol,
                                  raise_on_failure=False)
    return name, tol, rep


def test_every_scenario_replays_torch_within_tolerance(report):
    name, tol, rep = report
    assert OPTIONS[name] | {f"{name}_{g}" for g in GENERIC} <= set(rep.residuals)
    assert rep.failures() == []
    for scenario, residuals in rep.residuals.items():
        assert residuals.shape == (12,) and float(residuals.max()) <= tol, scenario
    assert rep.clipped_steps[f"{name}_clip_grad_norm"] > 0 and rep.steps_without_grad[f"{name}_frozen_and_unused"] > 0


def test_pure_updates_replay_every_scenario_but_groups_with_different_statistics(report):
    name, tol, rep = report
    assert set(rep.pure_refused) == {f"{name}_two_groups"}
    assert "differ in betas[1] or eps" in rep.pure_refused[f"{name}_two_groups"]
    assert set(rep.pure_residuals) == set(rep.residuals) - {f"{name}_two_groups"}
    assert max(float(v.max()) for v in rep.pure_residuals.values()) <= tol


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_recordings_from_held_state_are_exact_for_every_option_set(name):
    got = check_adapter_start_state(explaind.get_entry("optimizer_adapter", name))
    distinct = {json.dumps(dict(s.optimizer_kwargs), sort_keys=True) for s in default_scenarios(CLASSES[name])}
    assert len(got) == len(distinct) and max(got.values()) <= 1e-12


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_resolution_and_config_defaults_are_torchs(name):
    cls = CLASSES[name]
    opt = cls([_param()])
    record = resolve_optimizer_adapter(opt)
    assert record is explaind.get_entry("optimizer_adapter", name) and record.optimizer_classes == (cls,)
    assert record.update_fn is not None
    default = record.config().param_groups[0]
    for key, value in opt.defaults.items():
        if key in type(default).model_fields:
            assert getattr(default, key) == (tuple(value) if isinstance(value, tuple) else value), key
    hyper = record.implementation.from_optimizer(opt).hyperparameters()
    assert hyper["param_groups"][0]["n_params"] == 1 and record.config.model_validate(hyper)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_capturable_differentiable_and_tensor_lr_are_all_refused_at_once_naming_the_fix(name):
    opt = CLASSES[name]([_param()], lr=torch.tensor(0.01), capturable=True, differentiable=True)
    with pytest.raises(ConfigError) as info:
        explaind.get_entry("optimizer_adapter", name).implementation.from_optimizer(opt)
    msg = str(info.value)
    assert f"Optimizer adapter {name!r} cannot model this torch.optim.{name}.{CLASSES[name].__name__} (3 problem(s))" \
        in msg
    assert "['capturable']=True is not supported" in msg and "Fix: build the optimizer with capturable=False" in msg
    assert "['differentiable']=True is not supported" in msg and "Allowed: False" in msg
    assert "['lr']=tensor(0.0100) is a tensor" in msg and "Fix: pass lr=float(...)" in msg


def test_nadam_tensor_momentum_decay_and_complex_parameters_are_refused():
    z = torch.nn.Parameter(torch.ones(2, dtype=torch.complex128))
    opt = torch.optim.NAdam([{"params": [_param()], "momentum_decay": torch.tensor(0.004)}, {"params": [z]}])
    with pytest.raises(ConfigError, match=r"(?s)\(2 problem\(s\)\).*\['momentum_decay'\]=tensor\(0\.0040\) is a "
                                          r"tensor.*param_groups\[1\] holds a complex parameter.*Fix: split"):
        explaind.get_entry("optimizer_adapter", "nadam").implementation.from_optimizer(opt)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_a_subclass_is_refused(name):
    sub = type(f"My{CLASSES[name].__name__}", (CLASSES[name],), {})
    with pytest.raises(ConfigError, match=rf"handles exactly torch\.optim\.{name}\.{CLASSES[name].__name__}, got .*"
                                          rf"My{CLASSES[name].__name__}"):
        explaind.get_entry("optimizer_adapter", name).implementation.from_optimizer(sub([_param()]))


def _loop(name, switch):
    """Three steps of a one-parameter run; ``switch(opt)`` before the third."""
    p = _param()
    opt = CLASSES[name]([p], lr=0.1)
    adapter = explaind.get_entry("optimizer_adapter", name).implementation.from_optimizer(opt)
    for s in range(3):
        if s == 2:
            switch(opt)
        opt.zero_grad()
        (p * torch.arange(3.0, dtype=torch.float64)).sum().backward()
        before = adapter.before_step(opt)
        opt.step()
        adapter.after_step(opt, before)


@pytest.mark.parametrize("name", sorted(CLASSES))
@pytest.mark.parametrize(("key", "message"), [
    ("maximize", r"\['maximize'\] was switched from False to True while its parameters hold 'exp_avg'.*Fix: keep "
                 r"maximize fixed"),
    ("capturable", r"\['capturable'\]=True is not supported.*Fix: build the optimizer with capturable=False"),
])
def test_an_option_switched_on_mid_run_is_refused_at_that_step(name, key, message):
    def switch(opt):
        opt.param_groups[0][key] = True

    with pytest.raises(ConfigError, match=message):
        _loop(name, switch)


def test_plugin_listing_names_the_adapters(capsys):
    assert main(["plugins", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    adapters = {n for p in data["plugins"] for n in p["entries"].get("optimizer_adapter", [])}
    assert {"sgd", "adam", "adamw", "nadam", "radam", "adamax"} <= adapters


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_explaind_train_records_with_the_optimizer(tmp_path, name):
    out = tmp_path / "run"
    assert main(["train", "-q", "--out", str(out), "--architecture", "mlp", "--dataset", "digits", "--model",
                 "hidden_sizes=[4]", "--optimizer", name, "--lr", "0.01", "--weight-decay", "0.01", "--batch-size",
                 "64", "--steps", "3", "--eval-every", "3", "--dtype", "float64"]) == 0
    traj = explaind.Trajectory.load(out / "trajectory")
    assert traj.manifest.adapter == name and traj.n_steps == 3 and float(traj.audit().max()) <= 1e-12
    assert json.loads((out / "run.json").read_text())["config"]["optimizer"] == name
