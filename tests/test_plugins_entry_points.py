"""Third-party plugins discovered through the ``explaind`` entry-point group, and the env switches.

The entry points are simulated in-process: small modules written to a temporary directory and
``importlib.metadata.entry_points`` patched to return entry points naming them (the real
installation path is covered by ``test_plugins_template.py``).
"""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap

import pytest

import explaind
from explaind import plugins
from explaind.exceptions import ExplaindWarning, PluginError, UnknownEntryError

GOOD = '''
import explaind
from explaind.records import LossRecord

__version__ = "2.5.0"

@explaind.hookimpl
def explaind_losses():
    return [LossRecord(name="{loss}", implementation=lambda o, t: (o - t).abs().mean(1), description="L1.")]
'''

MODULES = {
    "ep_good": GOOD.format(loss="l1_ep"),
    "ep_other": GOOD.format(loss="l2_ep"),
    "ep_import_error": "import a_module_that_does_not_exist_anywhere\n",
    "ep_bad_args": textwrap.dedent('''
        import explaind

        @explaind.hookimpl
        def explaind_resolve_optimizer_adapter(optim):
            return None
    '''),
    "ep_typo_hook": textwrap.dedent('''
        import explaind

        @explaind.hookimpl
        def explaind_loss():
            return []
    '''),
    "ep_raises": textwrap.dedent('''
        import explaind

        @explaind.hookimpl
        def explaind_losses():
            raise RuntimeError("lazy dependency missing")
    '''),
    "ep_malformed": textwrap.dedent('''
        import explaind

        @explaind.hookimpl
        def explaind_losses():
            return ["not a record"]
    '''),
    "ep_shadow": GOOD.format(loss="mse"),
    "ep_object": textwrap.dedent('''
        import explaind
        from explaind.records import LossRecord

        class _Plugin:
            @explaind.hookimpl
            def explaind_losses(self):
                return [LossRecord(name="obj_loss", implementation=abs, description="From an object.")]

        plugin = _Plugin()
    '''),
}


@pytest.fixture
def fake_entry_points(tmp_path, monkeypatch):
    """Write the plugin modules and make ``entry_points(group=...)`` return the chosen ones."""
    for name, source in MODULES.items():
        (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("EXPLAIND_DISABLE_PLUGINS", raising=False)
    monkeypatch.delenv("EXPLAIND_LOAD_PLUGINS", raising=False)
    calls = []

    def install(*specs: tuple[str, str]) -> list:
        eps = [md.EntryPoint(name=n, value=v, group=plugins.ENTRY_POINT_GROUP) for n, v in specs]

        def entry_points(**kwargs):
            calls.append(kwargs)
            assert kwargs == {"group": "explaind"}
            return eps

        monkeypatch.setattr(md, "entry_points", entry_points)
        plugins.reset_plugins()
        return calls

    yield install
    for name in MODULES:
        sys.modules.pop(name, None)
    plugins.reset_plugins()


def _names() -> list[str]:
    return [p["name"] for p in explaind.get_plugins()]


def test_third_party_plugin_is_listed_with_version_and_usable(fake_entry_points):
    calls = fake_entry_points(("good", "ep_good"))
    listed = explaind.get_plugins()
    assert listed[-1] == {"name": "good", "version": "2.5.0", "entries": {"loss": ["l1_ep"]}}
    assert explaind.get_entry("loss", "l1_ep").description == "L1."
    explaind.get_entry("loss", "mse")
    assert len(calls) == 1  # scanned once, then cached


def test_entry_point_to_an_object(fake_entry_points):
    fake_entry_points(("objplugin", "ep_object:plugin"))
    assert explaind.get_entry("loss", "obj_loss").description == "From an object."
    assert explaind.get_plugins()[-1]["entries"] == {"loss": ["obj_loss"]}


@pytest.mark.parametrize(
    ("module", "fragment"),
    [
        ("ep_import_error", "ModuleNotFoundError: No module named 'a_module_that_does_not_exist_anywhere'"),
        ("ep_bad_args", "PluginValidationError"),
        ("ep_typo_hook", "explaind_loss"),
        ("ep_raises", "RuntimeError: lazy dependency missing"),
        ("ep_malformed", "returned str from explaind_losses(); expected LossRecord records"),
    ],
)
def test_broken_plugin_is_skipped_with_a_warning(fake_entry_points, module, fragment):
    fake_entry_points(("good", "ep_good"), ("broken", module), ("other", "ep_other"))
    with pytest.warns(ExplaindWarning) as record:
        names = _names()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert messages[0].startswith("Skipping plugin 'broken' (")
    assert fragment in messages[0]
    assert "EXPLAIND_DISABLE_PLUGINS=broken" in messages[0]
    # the plugins before and after the broken one, and the built-ins, are intact
    assert names[-2:] == ["good", "other"]
    assert "broken" not in names
    assert explaind.get_entry("loss", "l1_ep") and explaind.get_entry("loss", "l2_ep")
    assert explaind.get_entry("loss", "cross_entropy")
    pm = plugins.get_plugin_manager()
    assert "broken" not in [pm.get_name(p) for p in pm.get_plugins()]


def test_third_party_duplicate_of_builtin_is_an_error(fake_entry_points):
    fake_entry_points(("shadow", "ep_shadow"))
    with pytest.raises(PluginError) as info:
        explaind.get_entry("loss", "mse")
    message = str(info.value)
    assert "Duplicate loss 'mse': registered by plugin 'explaind_losses' and by plugin 'shadow'" in message
    assert "EXPLAIND_DISABLE_PLUGINS=shadow" in message


@pytest.mark.parametrize("value", ["1", "all", "*", "true", "ALL"])
def test_disable_all_third_party(fake_entry_points, monkeypatch, value):
    calls = fake_entry_points(("good", "ep_good"), ("broken", "ep_import_error"))
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", value)
    plugins.reset_plugins()
    assert _names() == list(plugins.BUILTIN_PLUGINS)
    assert calls == []  # the entry points are not even scanned
    with pytest.raises(UnknownEntryError, match="Unknown loss 'l1_ep'"):
        explaind.get_entry("loss", "l1_ep")


def test_disable_by_name(fake_entry_points, monkeypatch):
    fake_entry_points(("good", "ep_good"), ("broken", "ep_import_error"), ("other", "ep_other"))
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", "broken,good")
    plugins.reset_plugins()
    assert _names()[-1] == "other" and "good" not in _names()
    assert "ep_import_error" not in sys.modules and "ep_good" not in sys.modules


def test_load_only_selected(fake_entry_points, monkeypatch):
    fake_entry_points(("good", "ep_good"), ("broken", "ep_import_error"), ("other", "ep_other"))
    monkeypatch.setenv("EXPLAIND_LOAD_PLUGINS", " other ")
    plugins.reset_plugins()
    assert _names() == [*plugins.BUILTIN_PLUGINS, "other"]
    assert "ep_good" not in sys.modules


def test_load_unknown_name_warns(fake_entry_points, monkeypatch):
    fake_entry_points(("good", "ep_good"))
    monkeypatch.setenv("EXPLAIND_LOAD_PLUGINS", "good,goood")
    plugins.reset_plugins()
    with pytest.warns(ExplaindWarning) as record:
        names = _names()
    assert names[-1] == "good"
    assert [str(w.message) for w in record] == [
        "EXPLAIND_LOAD_PLUGINS names 'goood', but no installed plugin has that entry-point name. Installed: good."
    ]


def test_env_switches_apply_after_reset(fake_entry_points, monkeypatch):
    fake_entry_points(("good", "ep_good"))
    assert "good" in _names()
    monkeypatch.setenv("EXPLAIND_DISABLE_PLUGINS", "good")
    assert "good" in _names()  # cached until reset
    plugins.reset_plugins()
    assert "good" not in _names()
