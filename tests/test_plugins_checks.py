"""The conformance suite catches broken plugins: each deliberately broken plugin fails the right check."""

from __future__ import annotations

import types

import pytest
import torch
from pydantic import BaseModel, ConfigDict, field_serializer
from torch import nn

import explaind
from explaind.exceptions import ExplaindError
from explaind.records import ArchitectureRecord, LossRecord
from explaind.testing import PluginCheckError, check_plugin, plugin_checks


class Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    width: int = 3


def _failures(plugin) -> dict[str, str]:
    with pytest.raises(PluginCheckError) as info:
        check_plugin(plugin, name="broken")
    assert isinstance(info.value, AssertionError) and isinstance(info.value, ExplaindError)
    assert str(info.value).startswith(f"Plugin 'broken' failed {len(info.value.failures)} of ")
    failures = dict(info.value.failures)
    return failures


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: explaind.hookimpl(fn) for name, fn in hooks.items()})


# ----------------------------------------------------------------------------- losses
def _mean_abs(o, t):
    return (o - t).abs().mean(1)


def _example(n, g):
    return torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g)


def _loss_plugin(**fields) -> types.SimpleNamespace:
    base = dict(name="l1", implementation=_mean_abs, description="L1.", example=_example,
                reference=torch.nn.functional.l1_loss)
    base.update(fields)
    return _plugin(explaind_losses=lambda: [LossRecord(**base)])


def test_a_good_loss_plugin_passes():
    assert "loss:l1:vmap" in check_plugin(_loss_plugin())


def test_loss_with_sum_reduction_fails_the_mean_check():
    failures = _failures(_loss_plugin(implementation=lambda o, t: (o - t).abs().sum(1)))
    assert set(failures) == {"loss:l1:mean_matches_reference"}
    assert "differs from the reference batch loss" in failures["loss:l1:mean_matches_reference"]


def test_loss_without_example_or_reference():
    failures = _failures(_loss_plugin(example=None, reference=None))
    assert "has no example" in failures["loss:l1:example"]
    assert "has no reference" in failures["loss:l1:mean_matches_reference"]


def test_loss_returning_a_scalar_fails_per_sample():
    failures = _failures(_loss_plugin(implementation=lambda o, t: (o - t).abs().mean()))
    assert "per-sample losses of shape (n,); got ()" in failures["loss:l1:per_sample"]


def test_loss_that_is_not_vmappable():
    def item_loss(o, t):
        return torch.stack([((o[k] - t[k]).abs().mean().item() * torch.ones(())) for k in range(o.shape[0])])

    failures = _failures(_loss_plugin(implementation=item_loss))
    assert "does not run under torch.func.vmap/grad" in failures["loss:l1:vmap"]


def test_loss_coupling_samples_fails_vmap_check():
    def coupled(o, t):
        return (o - t).abs().mean(1) + (o - o.mean(dim=0)).pow(2).mean(1)

    failures = _failures(_loss_plugin(implementation=coupled))
    assert "vmap over single samples gives" in failures["loss:l1:vmap"]


def test_a_loss_declared_batch_coupled_passes_without_the_single_sample_checks():
    """The same coupling declared (``batch_coupled=True``): its terms are taken on whole batches only, so the
    conformance suite runs every check but the vmap over single samples."""
    def coupled(o, t):
        return (o - t).abs().mean(1) + (o - o.mean(dim=0)).pow(2).mean(1)

    ran = check_plugin(_loss_plugin(implementation=coupled, reference=lambda o, t: coupled(o, t).mean(),
                                    batch_coupled=True))
    assert "loss:l1:vmap" not in ran and {"loss:l1:per_sample", "loss:l1:mean_matches_reference"} <= set(ran)


def test_loss_example_using_global_rng():
    failures = _failures(_loss_plugin(example=lambda n, g: (torch.randn(n, 3), torch.randn(n, 3))))
    assert "not reproducible" in failures["loss:l1:example"]


# ----------------------------------------------------------------------------- hooks and records
def test_hook_argument_names_are_validated():
    failures = _failures(_plugin(explaind_resolve_optimizer_adapter=lambda optim: None))
    assert "do not match explaind.hookspecs" in failures["hooks_match_specs"]
    assert "registration failed" in failures["records_well_formed"]


def test_misspelled_and_unmarked_hooks():
    misspelled = _failures(_plugin(explaind_loss=lambda: []))
    assert "explaind_loss" in misspelled["hooks_match_specs"]
    unmarked = types.SimpleNamespace(explaind_losses=lambda: [])
    failures = _failures(unmarked)
    message = failures["hooks_match_specs"]
    assert "explaind_losses is defined but not decorated with @explaind.hookimpl" in message
    assert "no hook is implemented" in message


def test_malformed_records_are_all_listed():
    records = [
        LossRecord(name="Bad Name", implementation=_mean_abs, description="x", example=_example,
                   reference=torch.nn.functional.l1_loss),
        LossRecord(name="dup", implementation=_mean_abs, description="", example=_example),
        LossRecord(name="dup", implementation="not callable", description="y", config=dict),
        ArchitectureRecord(name="arch", implementation=nn.Linear, config=Cfg, description="wrong hook"),
    ]
    failures = _failures(_plugin(explaind_losses=lambda: records))
    message = failures["records_well_formed"]
    assert "loss 'Bad Name': the name must match" in message
    assert "loss 'dup': the description is empty" in message
    assert "loss 'dup' is registered twice" in message
    assert "implementation 'not callable' is not callable" in message
    assert "config must be a pydantic BaseModel subclass" in message
    assert "explaind_losses() returned a ArchitectureRecord; expected LossRecord" in message


def test_hook_raising_or_returning_a_non_list():
    failures = _failures(_plugin(explaind_losses=lambda: 1 / 0, explaind_architectures=lambda: None))
    message = failures["records_well_formed"]
    assert "explaind_losses() raised ZeroDivisionError" in message
    assert "explaind_architectures() returned NoneType; it must return a list of ArchitectureRecord" in message


# ----------------------------------------------------------------------------- configs
class Required(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int


class Loose(BaseModel):
    width: int = 3


class Lossy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = 0.5

    @field_serializer("rate")
    def _round(self, value: float) -> int:
        return round(value)


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        (Required, "cannot be built from defaults (fields without a usable default: ['width'])"),
        (Loose, "accepts unknown fields; set model_config = ConfigDict(extra='forbid')"),
        (Lossy, "does not round-trip through JSON"),
    ],
)
def test_config_conventions(config, fragment):
    failures = _failures(_loss_plugin(config=config))
    assert set(failures) == {"loss:l1:config"}
    assert fragment in failures["loss:l1:config"]


# ----------------------------------------------------------------------------- architectures
def _arch_example(config, n, g):
    return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n,), generator=g)


def _seeded_linear(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(4, 2, device="meta").to_empty(device="cpu")
    with torch.no_grad():
        model.weight.copy_(torch.randn(2, 4, generator=g))
        model.bias.copy_(torch.randn(2, generator=g))
    return model


def _arch_plugin(**fields) -> types.SimpleNamespace:
    base = dict(name="lin", implementation=_seeded_linear, config=Cfg, description="Linear.",
                example_input=_arch_example, parameter_count=lambda config: 4 * 2 + 2)
    base.update(fields)
    return _plugin(explaind_architectures=lambda: [ArchitectureRecord(**base)])


def test_a_good_architecture_plugin_passes():
    ran = check_plugin(_arch_plugin())
    assert "architecture:lin:per_sample_gradients" in ran and "architecture:lin:jvp" in ran


def test_architecture_using_the_global_rng():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: nn.Linear(4, 2)))
    assert set(failures) == {"architecture:lin:deterministic"}
    assert "changed the global RNG state" in failures["architecture:lin:deterministic"]


def test_architecture_ignoring_the_seed():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: _seeded_linear(config, 0)))
    assert "the seed is ignored" in failures["architecture:lin:deterministic"]


class _BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = _seeded_linear(None, 0)
        self.norm = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.norm(self.lin(x))


class _Centred(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.lin = _seeded_linear(None, seed)

    def forward(self, x):
        out = self.lin(x)
        return out - 0.5 * out.mean(dim=0)


def test_batch_coupled_architecture_fails_forward():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: _Centred(seed)))
    assert "samples are coupled" in failures["architecture:lin:forward"]
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: _BatchNormNet()))
    assert "a batch of one sample cannot be evaluated (ValueError" in failures["architecture:lin:forward"]


class _CachedWeights(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.lin = _seeded_linear(None, seed)
        self.frozen = None

    def forward(self, x):
        if self.frozen is None:
            self.frozen = self.lin.weight.detach().clone()
        return x @ self.frozen.T + self.lin.bias


def test_architecture_bypassing_its_parameters_fails_functional_call():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: _CachedWeights(seed)))
    assert "with other parameter values differs from forward of a model holding those values" in \
        failures["architecture:lin:functional_call"]


class _NoForwardAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.tanh()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - x.tanh() ** 2)


class _CustomFunctionNet(nn.Module):
    def __init__(self, seed):
        super().__init__()
        self.lin = _seeded_linear(None, seed)

    def forward(self, x):
        return _NoForwardAD.apply(self.lin(x))


def test_architecture_without_torch_func_support():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: _CustomFunctionNet(seed)))
    assert "architecture:lin:per_sample_gradients" in failures
    assert "architecture:lin:jvp" in failures


def test_architecture_output_shape_and_example_input():
    failures = _failures(_arch_plugin(implementation=lambda config, seed=0: nn.Sequential(
        _seeded_linear(config, seed), nn.Unflatten(1, (2, 1)))))
    assert "outputs must have shape (n, O); got (4, 2, 1)" in failures["architecture:lin:forward"]
    failures = _failures(_arch_plugin(example_input=None))
    assert "has no example_input" in failures["architecture:lin:example_input"]
    failures = _failures(_arch_plugin(example_input=lambda c, n, g: (torch.randn(n, 4), torch.zeros(n).long())))
    assert "not reproducible" in failures["architecture:lin:example_input"]


def test_architecture_parameter_count_is_required_and_checked():
    failures = _failures(_arch_plugin(parameter_count=None))
    assert set(failures) == {"architecture:lin:parameter_count"}
    assert "declares no parameter_count" in failures["architecture:lin:parameter_count"]
    failures = _failures(_arch_plugin(parameter_count=lambda config: 8))
    assert "returned 8, the built model has 10" in failures["architecture:lin:parameter_count"]
    failures = _failures(_arch_plugin(parameter_count=10))
    assert "parameter_count must be callable" in " ".join(failures.values())


def test_architecture_naming_an_unknown_loss():
    failures = _failures(_arch_plugin(loss="hinge"))
    assert set(failures) == {"architecture:lin:per_sample_gradients"}
    assert "names loss 'hinge', which is not registered" in failures["architecture:lin:per_sample_gradients"]


def test_architecture_can_use_its_own_plugins_loss():
    plugin = _arch_plugin(loss="l1")
    plugin.explaind_losses = _loss_plugin().explaind_losses
    ran = check_plugin(plugin)
    assert "architecture:lin:per_sample_gradients" in ran and "loss:l1:vmap" in ran


def test_plugin_checks_accepts_a_module_name():
    names = [name for name, _ in plugin_checks("explaind_losses")]
    assert "loss:nll:mean_matches_reference" in names
