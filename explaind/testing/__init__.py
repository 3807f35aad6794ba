"""Conformance checks for explaind plugins and estimators (like scikit-learn's ``check_estimator``).

Plugin authors run the whole suite on their package with one call::

    from explaind.testing import check_plugin
    import my_plugin
    check_plugin(my_plugin)            # raises PluginCheckError listing every failed check

or, inside pytest, one test per check::

    from explaind.testing import parametrize_plugin_checks

    @parametrize_plugin_checks("my_plugin")
    def test_my_plugin(plugin_check):
        plugin_check()

Names are imported lazily from the submodules listed in :data:`_EXPORTS` (so importing
``explaind.testing`` stays cheap and pytest is only imported when a parametrizer is used).
To export a new name, add one ``"name": "submodule"`` line to :data:`_EXPORTS`.
"""

from __future__ import annotations

from .. import _lazy_exports

#: public name -> submodule of ``explaind.testing`` defining it
_EXPORTS: dict[str, str] = {
    "PluginCheckError": "plugins",
    "check_plugin": "plugins",
    "plugin_checks": "plugins",
    "parametrize_plugin_checks": "plugins",
    "EstimatorCheckError": "estimators",
    "check_estimator": "estimators",
    "estimator_checks": "estimators",
    "parametrize_with_checks": "estimators",
    "architecture_checks": "architectures",
    "loss_checks": "losses",
    "check_optimizer_adapter": "adapters",
    "optimizer_adapter_checks": "adapter_start",
    "check_adapter_start_state": "adapter_start",
    "AdapterScenario": "adapters",
    "check_pruning_strategy": "pruning",
    "pruning_strategy_checks": "pruning",
    "tiny_pruning_problem": "pruning",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = _lazy_exports(__name__, _EXPORTS, globals())
