"""Adapter records that name their optimizer classes (``optimizer_class_names``) instead of importing them."""

from __future__ import annotations

import types

import pytest
import torch
from explaind_optimizers.sgd import SGDAdapter, SGDConfig

import explaind
from explaind.exceptions import UnknownEntryError
from explaind.plugins import adapter_optimizer_classes, resolve_optimizer_adapter, unregister_plugin
from explaind.records import OptimizerAdapterRecord
from explaind.testing.adapter_start import optimizer_adapter_checks


class Fancy(torch.optim.SGD):
    """An optimizer class that claims to live in a package that is not installed."""


Fancy.__module__ = "not_installed_pkg.optim"

RECORD = OptimizerAdapterRecord(name="fancy", implementation=SGDAdapter, config=SGDConfig, description="test",
                                optimizer_class_names=("not_installed_pkg.optim.Fancy",))


@pytest.fixture
def fancy_plugin():
    plugin = types.SimpleNamespace(explaind_optimizer_adapters=explaind.hookimpl(lambda: [RECORD]))
    explaind.register_plugin(plugin, name="fancy_plugin")
    try:
        yield
    finally:
        unregister_plugin("fancy_plugin")


def test_a_named_class_resolves_without_its_module_and_is_listed(fancy_plugin):
    model = torch.nn.Linear(2, 2)
    assert resolve_optimizer_adapter(Fancy(model.parameters(), lr=0.1)).name == "fancy"
    with pytest.raises(UnknownEntryError, match=r"fancy.*not_installed_pkg.optim.Fancy"):
        resolve_optimizer_adapter(torch.optim.LBFGS(model.parameters()))


def test_a_class_whose_module_does_not_import_is_left_out_and_not_checked(fancy_plugin):
    record = explaind.get_entry("optimizer_adapter", "fancy")
    assert adapter_optimizer_classes(record) == ()
    assert list(optimizer_adapter_checks(record)) == []


def test_an_installed_named_class_is_imported_for_the_checks():
    pytest.importorskip("transformers")
    record = explaind.get_entry("optimizer_adapter", "hf_adafactor")
    (cls,) = adapter_optimizer_classes(record)
    assert (cls.__module__, cls.__name__) == ("transformers.optimization", "Adafactor")
    assert [name for name, _ in optimizer_adapter_checks(record)] == ["replay_float64", "replay_float32",
                                                                      "start_state"]


def test_the_plugin_suite_refuses_class_names_without_a_module():
    from explaind.testing import PluginCheckError, check_plugin

    bad = OptimizerAdapterRecord(name="fancy", implementation=SGDAdapter, config=SGDConfig, description="test",
                                 optimizer_class_names=("Fancy",))
    plugin = types.SimpleNamespace(explaind_optimizer_adapters=explaind.hookimpl(lambda: [bad]))
    with pytest.raises(PluginCheckError, match=r"optimizer_class_names must be a tuple of 'module.ClassName' "
                                               r"strings, got \('Fancy',\)"):
        check_plugin(plugin, name="bad_names")
