"""The plugin conformance suite on every first-party plugin (one test per check).

To cover another plugin, add its module name to ``FIRST_PARTY``.
"""

from __future__ import annotations

import pytest

from explaind.testing import check_plugin, parametrize_plugin_checks, plugin_checks

FIRST_PARTY = (
    "explaind_losses",
    "explaind_architectures",
)


@parametrize_plugin_checks(*FIRST_PARTY)
def test_first_party_plugin(plugin_check):
    plugin_check()


def test_suite_covers_every_record_with_every_kind_check():
    names = [name for name, _ in plugin_checks("explaind_architectures")]
    for arch in ("mlp", "cnn", "modular_transformer"):
        for check in ("config", "deterministic", "example_input", "forward", "functional_call",
                      "per_sample_gradients", "jvp"):
            assert f"architecture:{arch}:{check}" in names
    names = [name for name, _ in plugin_checks("explaind_losses")]
    for loss in ("cross_entropy", "nll", "mse"):
        for check in ("config", "example", "per_sample", "mean_matches_reference", "vmap"):
            assert f"loss:{loss}:{check}" in names
    assert names[:2] == ["hooks_match_specs", "records_well_formed"]


def test_check_plugin_returns_the_checks_it_ran():
    import explaind_losses

    ran = check_plugin(explaind_losses)
    assert ran == [name for name, _ in plugin_checks(explaind_losses)]
    assert len(ran) == 2 + 5 * 5


def test_parametrizer_ids_name_plugin_and_check():
    mark = parametrize_plugin_checks("explaind_losses", argname="chk")
    argname, params = mark.args
    assert argname == "chk"
    assert params[0].id == "explaind_losses::hooks_match_specs"
    assert "explaind_losses::loss:mse:vmap" in [p.id for p in params]
    assert isinstance(mark, pytest.MarkDecorator)
