"""The third-party plugin template installs with pip and is discovered through its entry point.

The template is copied to a temporary directory (the source tree stays clean), installed offline
with ``pip install --no-deps --no-build-isolation --no-index --target`` and exercised in one
subprocess whose ``PYTHONPATH`` holds the install target. The subprocess looks the plugin up
under several environment-switch settings (``reset_plugins()`` between them).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = Path(__file__).resolve().parents[1] / "examples" / "plugin_template"

SETTINGS = {
    "default": {},
    "disabled_by_name": {"EXPLAIND_DISABLE_PLUGINS": "plugin_template"},
    "all_disabled": {"EXPLAIND_DISABLE_PLUGINS": "1"},
    "load_other": {"EXPLAIND_LOAD_PLUGINS": "something_else"},
    "load_it": {"EXPLAIND_LOAD_PLUGINS": "plugin_template"},
}

PROBE = r'''
import json
import os
import sys
import warnings

import torch

import explaind
from explaind.exceptions import ExplaindWarning, UnknownEntryError
from explaind.plugins import reset_plugins
from explaind.testing import check_plugin

reports = {}
for label, env in json.loads(sys.argv[1]).items():
    for key in ("EXPLAIND_DISABLE_PLUGINS", "EXPLAIND_LOAD_PLUGINS"):
        os.environ.pop(key, None)
    os.environ.update(env)
    reset_plugins()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        report = {"plugins": explaind.get_plugins()}
    report["warnings"] = [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]
    try:
        record = explaind.get_entry("loss", "huber")
    except UnknownEntryError as exc:
        report["huber"] = None
        report["error"] = str(exc)
    else:
        report["huber"] = record.description
        report["value"] = record.implementation(torch.tensor([[0.5, 3.0]]), torch.zeros(1, 2)).tolist()
        report["spec"] = explaind.build_model("linear", {"in_features": 5}, seed=2).explaind_spec
    reports[label] = report

reports["checks"] = check_plugin("explaind_plugin_template")
import explaind_plugin_template

reports["module"] = explaind_plugin_template.__file__
print(json.dumps(reports))
'''

BUILTINS = ["explaind_losses", "explaind_optimizers", "explaind_architectures", "explaind_pruning"]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("template")
    source = root / "src"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = root / "site"
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
         "--target", str(target), str(source)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPLAIND_")}
    # the explaind under test (and its first-party plugins) ahead of any other installed copy
    tree = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(target), str(tree), str(tree / "plugins")])
    done = subprocess.run([sys.executable, "-c", PROBE, json.dumps(SETTINGS)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=str(root))
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["target"] = str(target)
    return result


@pytest.mark.slow
@pytest.mark.parametrize("label", ["default", "load_it"])
def test_installed_template_is_discovered_listed_and_usable(reports, label):
    report = reports[label]
    assert report["warnings"] == []
    assert [p["name"] for p in report["plugins"]] == [*BUILTINS, "plugin_template"]
    assert report["plugins"][-1] == {
        "name": "plugin_template",
        "version": "0.3.0",
        "entries": {"architecture": ["linear"], "loss": ["huber"]},
    }
    assert report["huber"] == "Huber loss (delta = 1) averaged over the outputs of each sample."
    assert report["value"] == [pytest.approx((0.125 + 2.5) / 2)]
    assert report["spec"] == {"name": "linear", "config": {"in_features": 5, "out_features": 2}, "seed": 2}


@pytest.mark.slow
def test_installed_template_comes_from_the_install_and_passes_the_suite(reports):
    assert reports["module"].startswith(reports["target"])
    assert "architecture:linear:per_sample_gradients" in reports["checks"]
    assert "loss:huber:mean_matches_reference" in reports["checks"]


@pytest.mark.slow
@pytest.mark.parametrize("label", ["disabled_by_name", "all_disabled", "load_other"])
def test_installed_template_is_hidden_by_the_env_switches(reports, label):
    report = reports[label]
    assert report["huber"] is None
    assert [p["name"] for p in report["plugins"]] == BUILTINS
    assert "Unknown loss 'huber'" in report["error"]
    if label == "load_other":
        assert report["warnings"] == [
            "EXPLAIND_LOAD_PLUGINS names 'something_else', but no installed plugin has that entry-point name. "
            "Installed: plugin_template."
        ]
    else:
        assert report["warnings"] == []
