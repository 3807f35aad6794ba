"""Run explaind's plugin conformance suite on this plugin: one pytest test per check."""

from explaind.testing import parametrize_plugin_checks


@parametrize_plugin_checks("explaind_plugin_template")
def test_conformance(plugin_check):
    plugin_check()
