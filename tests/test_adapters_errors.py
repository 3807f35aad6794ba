"""Optimizer adapters: resolution, refused options and their messages, hyperparameter records."""

from __future__ import annotations

import json
import re
import warnings
from types import SimpleNamespace

import pytest
import torch
from explaind_optimizers.adam import _warn_fused_cuda_low_precision

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, UnknownEntryError
from explaind.plugins import resolve_optimizer_adapter
from explaind.recurrence import OptimizerAdapter


def _param(dtype=torch.float64):
    return torch.nn.Parameter(torch.ones(3, dtype=dtype))


def _adapter(optimizer):
    return resolve_optimizer_adapter(optimizer).implementation.from_optimizer(optimizer)


# ------------------------------------------------------------------ resolution
@pytest.mark.parametrize(
    ("cls", "name"), [(torch.optim.SGD, "sgd"), (torch.optim.Adam, "adam"), (torch.optim.AdamW, "adamw")]
)
def test_resolution_by_exact_class(cls, name):
    record = resolve_optimizer_adapter(cls([_param()], lr=0.1))
    assert record.name == name
    assert record is explaind.get_entry("optimizer_adapter", name)
    assert record.optimizer_classes == (cls,)
    assert record.config().param_groups  # every config field has a default
    assert isinstance(_adapter(cls([_param()], lr=0.1)), OptimizerAdapter)


def test_unknown_optimizer_lists_adapters_and_how_to_add_one():
    with pytest.raises(UnknownEntryError) as info:
        resolve_optimizer_adapter(torch.optim.LBFGS([_param()], lr=0.1))
    msg = str(info.value)
    assert "torch.optim.lbfgs.LBFGS" in msg
    assert re.search(r"Registered adapters: adadelta, adafactor, adagrad, adam, adamax, adamw, asgd, hf_adafactor, "
                     r"nadam, radam, rmsprop, rprop, sgd \(", msg)
    assert "explaind_optimizer_adapters" in msg and "entry-point" in msg


def test_subclass_is_not_silently_handled():
    class MyAdam(torch.optim.Adam):
        pass

    with pytest.raises(UnknownEntryError, match="MyAdam"):
        resolve_optimizer_adapter(MyAdam([_param()]))
    with pytest.raises(ConfigError, match=r"handles exactly torch\.optim\.adam\.Adam.*MyAdam"):
        explaind.get_entry("optimizer_adapter", "adam").implementation.from_optimizer(MyAdam([_param()]))


def test_adapter_for_another_class_refuses():
    with pytest.raises(ConfigError, match=r"handles exactly torch\.optim\.sgd\.SGD, got torch\.optim\.adamw\.AdamW"):
        explaind.get_entry("optimizer_adapter", "sgd").implementation.from_optimizer(torch.optim.AdamW([_param()]))


# ------------------------------------------------------------------ refused options
def test_sgd_differentiable_refused_with_value_allowed_and_fix():
    opt = torch.optim.SGD([_param()], lr=0.1, differentiable=True)
    with pytest.raises(ConfigError) as info:
        _adapter(opt)
    msg = str(info.value)
    assert "'sgd'" in msg and "1 problem(s)" in msg
    assert "param_groups[0]['differentiable']=True" in msg
    assert "Allowed: False" in msg and "Fix: build the optimizer with differentiable=False" in msg


def test_adam_capturable_refused():
    opt = torch.optim.Adam([_param()], capturable=True)
    with pytest.raises(ConfigError, match=r"\['capturable'\]=True is not supported.*capturable=False"):
        _adapter(opt)


def test_tensor_hyperparameters_refused():
    opt = torch.optim.SGD([_param()], lr=torch.tensor(0.1))
    with pytest.raises(ConfigError, match=r"\['lr'\]=tensor\(0\.1000\) is a tensor.*Fix: pass lr=float"):
        _adapter(opt)
    opt = torch.optim.Adam([_param()], betas=(torch.tensor(0.9), torch.tensor(0.99)))
    with pytest.raises(ConfigError, match=r"\['betas'\]=.*is a tensor.*Python floats"):
        _adapter(opt)


def test_all_problems_reported_at_once():
    groups = [{"params": [_param()]}, {"params": [_param()], "lr": torch.tensor(0.01)}]
    opt = torch.optim.Adam(groups, differentiable=True, capturable=True)
    with pytest.raises(ConfigError) as info:
        _adapter(opt)
    msg = str(info.value)
    assert "5 problem(s)" in msg  # differentiable and capturable in both groups, tensor lr in group 1
    assert msg.count("['differentiable']=True") == 2 and msg.count("['capturable']=True") == 2
    assert "param_groups[1]['lr']" in msg


def test_optimizer_with_state_is_accepted_and_its_start_buffers_are_read():
    """An optimizer restored from a checkpoint starts the recurrence from its buffers (docs/maths.md §4)."""
    p = _param()
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    start = _adapter(opt).start_state(opt)
    assert list(start) == [id(p)] and torch.equal(start[id(p)], opt.state[p]["exp_avg"])
    assert start[id(p)] is not opt.state[p]["exp_avg"]  # a copy: the next step changes the buffer in place
    sgd = torch.optim.SGD([p], lr=0.1)  # plain SGD keeps no buffer: nothing to start from
    sgd.step()
    assert _adapter(sgd).start_state(sgd) == {}


def test_complex_parameters_refused_by_adam():
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(2, dtype=torch.complex128))])
    with pytest.raises(ConfigError, match="complex parameter"):
        _adapter(opt)


def test_option_switched_on_mid_run_refused_at_the_step():
    p = _param()
    opt = torch.optim.SGD([p], lr=0.1)
    adapter = _adapter(opt)
    opt.param_groups[0]["differentiable"] = True
    with pytest.raises(ConfigError, match="differentiable"):
        adapter.before_step(opt)


def test_grad_scaler_inside_fused_step_refused():
    p = _param(torch.float32)
    opt = torch.optim.Adam([p], fused=True)
    adapter = _adapter(opt)
    opt.grad_scale = torch.tensor(1024.0)  # what GradScaler.step hands to fused optimizers
    opt.found_inf = torch.tensor(0.0)
    with pytest.raises(ConfigError, match=r"GradScaler.*scaler\.unscale_\(optimizer\)"):
        adapter.before_step(opt)


# ------------------------------------------------------------------ hyperparameters
@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_hyperparameters_json_and_config(name):
    record = explaind.get_entry("optimizer_adapter", name)
    cls = record.optimizer_classes[0]
    extra = {"sgd": {"momentum": 0.9, "nesterov": True}, "adam": {"amsgrad": True}, "adamw": {"maximize": True}}[name]
    groups = [{"params": [_param()]}, {"params": [_param(), _param()], "lr": 0.5, "weight_decay": 0.25}]
    opt = cls(groups, lr=0.1, **extra)
    hyper = record.implementation.from_optimizer(opt).hyperparameters()
    again = json.loads(json.dumps(hyper))
    config = record.config.model_validate(again)
    assert [g.n_params for g in config.param_groups] == [1, 2]
    assert [g.lr for g in config.param_groups] == [0.1, 0.5]
    assert config.param_groups[1].weight_decay == 0.25
    for key, value in extra.items():
        assert getattr(config.param_groups[0], key) == value
    if name == "adamw":
        assert all(g.decoupled_weight_decay for g in config.param_groups)


def test_config_defaults_match_torch_defaults():
    sgd, adam, adamw = (explaind.get_entry("optimizer_adapter", n).config() for n in ("sgd", "adam", "adamw"))
    assert (sgd.param_groups[0].lr, sgd.param_groups[0].momentum) == (1e-3, 0.0)
    assert (adam.param_groups[0].betas, adam.param_groups[0].weight_decay) == ((0.9, 0.999), 0.0)
    assert (adamw.param_groups[0].weight_decay, adamw.param_groups[0].decoupled_weight_decay) == (1e-2, True)


def test_fused_cuda_single_precision_warns():
    cuda32 = SimpleNamespace(is_cuda=True, dtype=torch.float32)  # stands in for a CUDA float32 parameter
    cuda64 = SimpleNamespace(is_cuda=True, dtype=torch.float64)
    fake = SimpleNamespace(param_groups=[{"fused": True, "params": [cuda32]}])
    with pytest.warns(ExplaindWarning, match=r"fused=True on CUDA with torch\.float32.*fused=False"):
        _warn_fused_cuda_low_precision("adam", fake)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_fused_cuda_low_precision("adam", SimpleNamespace(param_groups=[{"fused": True, "params": [cuda64]}]))
        _warn_fused_cuda_low_precision("adam", SimpleNamespace(param_groups=[{"fused": False, "params": [cuda32]}]))
        _adapter(torch.optim.AdamW([_param(torch.float32)], fused=True))  # CPU fused: no warning
