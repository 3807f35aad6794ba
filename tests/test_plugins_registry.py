"""The plugin manager: listings, look-ups, in-process plugins and their error messages."""

from __future__ import annotations

import types

import pytest
import torch

import explaind
from explaind import plugins
from explaind.config import StrictModel
from explaind.exceptions import ExplaindError, PluginError, UnknownEntryError
from explaind.records import ArchitectureRecord, LossRecord, OptimizerAdapterRecord


@pytest.fixture(autouse=True)
def _clean_registry(monkeypatch):
    # third-party plugins installed in the environment must not change these tests
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", "1")
    monkeypatch.delenv("EXPLAIND_LOAD_PLUGINS", raising=False)
    plugins.reset_plugins()
    before = list(plugins._extra_plugins)
    yield
    plugins._extra_plugins[:] = before
    plugins.reset_plugins()


class _AdapterConfig(StrictModel):
    lr: float = 0.1


class _FakeAdam(torch.optim.Adam):
    pass


def _adapter_plugin(*names: str, description: str = "A fake adapter for tests.") -> types.SimpleNamespace:
    @explaind.hookimpl
    def explaind_optimizer_adapters():
        return [
            OptimizerAdapterRecord(name=n, implementation=object, config=_AdapterConfig, description=description,
                                   optimizer_classes=(_FakeAdam,))
            for n in names
        ]

    return types.SimpleNamespace(explaind_optimizer_adapters=explaind_optimizer_adapters)


def _loss_plugin(name: str) -> types.SimpleNamespace:
    @explaind.hookimpl
    def explaind_losses():
        return [LossRecord(name=name, implementation=lambda o, t: (o - t).abs().mean(1), description="test loss")]

    return types.SimpleNamespace(explaind_losses=explaind_losses)


def test_get_plugins_lists_builtins_with_versions_and_entries():
    listed = explaind.get_plugins()
    by_name = {p["name"]: p for p in listed}
    assert [p["name"] for p in listed[:4]] == list(plugins.BUILTIN_PLUGINS)
    for name in plugins.BUILTIN_PLUGINS:
        assert by_name[name]["version"] == explaind.__version__
        assert set(by_name[name]) == {"name", "version", "entries"}
    losses = ["causal_lm", "cross_entropy", "mse", "nll", "token_cross_entropy"]
    assert by_name["explaind_losses"]["entries"]["loss"] == losses
    assert by_name["explaind_architectures"]["entries"]["architecture"] == ["cnn", "mlp", "modular_transformer"]


def test_get_plugins_returns_copies():
    listed = explaind.get_plugins()
    listed[0]["entries"]["loss"].append("tampered")
    listed[0]["name"] = "tampered"
    again = explaind.get_plugins()
    assert again[0]["name"] == "explaind_losses"
    assert "tampered" not in again[0]["entries"]["loss"]


def test_get_entry_returns_the_record():
    record = explaind.get_entry("loss", "mse")
    assert isinstance(record, LossRecord) and record.name == "mse"
    assert isinstance(explaind.get_entry("architecture", "mlp"), ArchitectureRecord)
    assert explaind.list_entries("loss") == ["causal_lm", "cross_entropy", "mse", "nll", "token_cross_entropy"]


def test_unknown_optimizer_adapter_message_lists_choices_and_suggests(monkeypatch):
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", "1,explaind_optimizers")  # its own 'adam' would clash
    explaind.register_plugin(_adapter_plugin("adam", "sgd_test"), name="fake_adapters")
    with pytest.raises(UnknownEntryError) as info:
        explaind.get_entry("optimizer_adapter", "adamx")
    message = str(info.value)
    assert message.startswith("Unknown optimizer adapter 'adamx'. Choose one of: adam, sgd_test. Did you mean 'adam'?")
    assert "'explaind' entry-point group" in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, ExplaindError)


def test_unknown_name_without_close_match_has_no_suggestion():
    with pytest.raises(UnknownEntryError) as info:
        explaind.get_entry("loss", "zzzzzz")
    message = str(info.value)
    assert "Unknown loss 'zzzzzz'. Choose one of: causal_lm, cross_entropy, mse, nll, token_cross_entropy." in message
    assert "Did you mean" not in message


def test_unknown_kind_message():
    with pytest.raises(UnknownEntryError) as info:
        explaind.get_entry("losses", "mse")
    message = str(info.value)
    assert "Unknown entry kind 'losses'." in message
    assert "Choose one of: architecture, loss, optimizer_adapter, pruning_strategy." in message
    assert "Did you mean 'loss'?" in message
    with pytest.raises(UnknownEntryError, match="Unknown entry kind 'nope'"):
        explaind.list_entries("nope")


def test_kind_with_no_entries_says_none_registered(monkeypatch):
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", ("explaind_losses",))
    plugins.reset_plugins()
    with pytest.raises(UnknownEntryError, match=r"Unknown architecture 'mlp'. Choose one of: \(none registered\)"):
        explaind.get_entry("architecture", "mlp")


def test_register_plugin_adds_entries_and_unregister_removes_them():
    explaind.register_plugin(_loss_plugin("l1_test"), name="fake_losses")
    names = [p["name"] for p in explaind.get_plugins()]
    assert names[-1] == "fake_losses"
    assert explaind.get_plugins()[-1]["entries"] == {"loss": ["l1_test"]}
    assert explaind.get_entry("loss", "l1_test").description == "test loss"
    plugins.unregister_plugin("fake_losses")
    with pytest.raises(UnknownEntryError, match="l1_test"):
        explaind.get_entry("loss", "l1_test")


def test_duplicate_names_raise_naming_both_plugins():
    explaind.register_plugin(_loss_plugin("dup_loss"), name="first_plugin")
    with pytest.raises(PluginError) as info:
        explaind.register_plugin(_loss_plugin("dup_loss"), name="second_plugin")
    message = str(info.value)
    assert "Duplicate loss 'dup_loss'" in message
    assert "'first_plugin'" in message and "'second_plugin'" in message
    assert "EXPLAIND_DISABLE_PLUGINS=second_plugin" in message
    # the failed registration is rolled back: the registry still works
    assert explaind.get_entry("loss", "dup_loss") is not None
    assert [p["name"] for p in explaind.get_plugins()][-1] == "first_plugin"


def test_duplicate_of_a_builtin_name():
    with pytest.raises(PluginError, match="Duplicate loss 'mse': registered by plugin 'explaind_losses' and by "
                                          "plugin 'shadow'"):
        explaind.register_plugin(_loss_plugin("mse"), name="shadow")


def test_register_plugin_name_clash():
    explaind.register_plugin(_loss_plugin("a_test"), name="clash")
    with pytest.raises(PluginError, match="A plugin named 'clash' is already registered"):
        explaind.register_plugin(_loss_plugin("b_test"), name="clash")
    with pytest.raises(PluginError, match="A plugin named 'explaind_losses' is already registered"):
        explaind.register_plugin(_loss_plugin("c_test"), name="explaind_losses")


def test_wrong_record_type_is_rejected_with_plugin_name():
    @explaind.hookimpl
    def explaind_losses():
        return [ArchitectureRecord(name="x", implementation=object, config=_AdapterConfig, description="d")]

    with pytest.raises(PluginError) as info:
        explaind.register_plugin(types.SimpleNamespace(explaind_losses=explaind_losses), name="typo_plugin")
    assert str(info.value) == (
        "Plugin 'typo_plugin' returned ArchitectureRecord from explaind_losses(); expected LossRecord records."
    )


def test_bad_entry_name_is_rejected():
    with pytest.raises(PluginError) as info:
        explaind.register_plugin(_loss_plugin("Bad Name"), name="badname")
    message = str(info.value)
    assert "Plugin 'badname' registered the loss name 'Bad Name'" in message
    assert "lower case letters, digits" in message


def test_hook_returning_non_list_is_rejected():
    @explaind.hookimpl
    def explaind_losses():
        return LossRecord(name="single", implementation=abs, description="d")

    with pytest.raises(PluginError, match=r"returned LossRecord from explaind_losses\(\); expected a list"):
        explaind.register_plugin(types.SimpleNamespace(explaind_losses=explaind_losses), name="nolist")


def test_hook_argument_mismatch_is_rejected():
    @explaind.hookimpl
    def explaind_resolve_optimizer_adapter(opt):  # the spec's argument is `optimizer`
        return None

    with pytest.raises(PluginError) as info:
        explaind.register_plugin(
            types.SimpleNamespace(explaind_resolve_optimizer_adapter=explaind_resolve_optimizer_adapter),
            name="argmismatch",
        )
    message = str(info.value)
    assert message.startswith("Plugin 'argmismatch' cannot be registered:")
    assert "opt" in message


def test_unknown_hook_name_is_rejected():
    @explaind.hookimpl
    def explaind_loses():
        return []

    with pytest.raises(PluginError, match="Plugin 'misspelled' cannot be registered:.*explaind_loses"):
        explaind.register_plugin(types.SimpleNamespace(explaind_loses=explaind_loses), name="misspelled")
    # nothing of it is left behind
    assert "misspelled" not in [p["name"] for p in explaind.get_plugins()]


def test_in_process_hook_raising_is_a_plugin_error():
    @explaind.hookimpl
    def explaind_losses():
        raise RuntimeError("boom")

    with pytest.raises(PluginError, match=r"'raiser' failed while registering its entries: RuntimeError\('boom'"):
        explaind.register_plugin(types.SimpleNamespace(explaind_losses=explaind_losses), name="raiser")


def test_resolve_optimizer_adapter_uses_classes_and_reports_unknown():
    explaind.register_plugin(_adapter_plugin("fakeadam"), name="fake_adapters")
    model = torch.nn.Linear(2, 1)
    record = plugins.resolve_optimizer_adapter(_FakeAdam(model.parameters()))
    assert record.name == "fakeadam"
    with pytest.raises(UnknownEntryError) as info:
        plugins.resolve_optimizer_adapter(torch.optim.LBFGS(model.parameters()))
    message = str(info.value)
    assert "No optimizer adapter handles torch.optim.lbfgs.LBFGS." in message
    assert "fakeadam" in message and "_FakeAdam" in message


def test_disable_builtin_by_name(monkeypatch):
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", "1, explaind_architectures, explaind_pruning")
    plugins.reset_plugins()
    names = [p["name"] for p in explaind.get_plugins()]
    assert "explaind_architectures" not in names and "explaind_pruning" not in names
    assert "explaind_losses" in names
    with pytest.raises(UnknownEntryError, match="Unknown architecture 'mlp'"):
        explaind.get_entry("architecture", "mlp")
