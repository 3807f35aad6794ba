"""``import explaind`` is cheap: no plugin import, no entry-point scan, no CUDA initialisation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r'''
import importlib.metadata as md
import json
import sys

scans = []
_original = md.entry_points

def _spy(*args, **kwargs):
    scans.append(repr((args, kwargs)))
    return _original(*args, **kwargs)

md.entry_points = _spy

import explaind

report = {
    "plugins_imported": sorted(m for m in sys.modules if m.startswith("explaind_")),
    "core_modules": sorted(m for m in sys.modules if m.startswith("explaind")),
    "scans_after_import": list(scans),
}
import torch

report["cuda_initialized"] = torch.cuda.is_initialized()
explaind.get_entry("loss", "mse")
report["explaind_scans_after_lookup"] = sum("'explaind'" in call for call in scans)
report["plugins_after_lookup"] = sorted(m for m in sys.modules if m.startswith("explaind_"))
report["cuda_initialized_after_lookup"] = torch.cuda.is_initialized()
print(json.dumps(report))
'''


def _run_probe() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPLAIND_")}
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_is_lazy_then_lookup_loads_plugins():
    report = _run_probe()
    assert report["plugins_imported"] == []
    assert report["scans_after_import"] == []
    assert report["cuda_initialized"] is False
    assert report["core_modules"] == ["explaind", "explaind.exceptions", "explaind.hookspecs"]
    # the probe itself is sensitive: a look-up does import the plugins and scan the entry points
    assert report["explaind_scans_after_lookup"] == 1
    assert {"explaind_losses", "explaind_architectures"} <= set(report["plugins_after_lookup"])
    assert report["cuda_initialized_after_lookup"] is False
