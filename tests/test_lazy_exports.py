"""One lazy-export helper (``explaind._lazy_exports``) serves the package and its subpackages."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import explaind

PACKAGES = ("explaind", "explaind.pruning", "explaind.testing", "explaind.integrations")


@pytest.mark.parametrize("name", PACKAGES)
def test_every_lazy_package_uses_the_shared_helper(name):
    package = importlib.import_module(name)
    assert package.__getattr__.__qualname__ == "_lazy_exports.<locals>.__getattr__"
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match=f"module '{name}' has no attribute 'no_such_name'"):
        package.no_such_name  # noqa: B018


def test_first_access_imports_and_caches():
    code = ("import sys, explaind\n"
            "assert 'explaind.recurrence' not in sys.modules\n"
            "value = explaind.LinearUpdate\n"
            "assert 'explaind.recurrence' in sys.modules and vars(explaind)['LinearUpdate'] is value\n"
            "from explaind.recurrence import LinearUpdate\n"
            "assert value is LinearUpdate\n"
            "import explaind.integrations\n"  # the framework callbacks load their framework on first use
            "assert not any(m.split('.')[0] in ('transformers', 'lightning') for m in sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_exports_resolve_to_the_named_submodules():
    for name, submodule in explaind._EXPORTS.items():
        assert getattr(explaind, name).__module__.startswith(f"explaind.{submodule}"), name
