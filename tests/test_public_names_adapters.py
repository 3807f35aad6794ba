"""An optimizer adapter's ``fresh_tensors`` attribute in the adapter conformance check.

``fresh_tensors = True`` lets the recorder keep ``after_step``'s tensors without a copy; the check
refuses a value other than True/False, and an adapter that claims it but changes a returned tensor later.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import explaind
from explaind.testing.adapters import AdapterScenario, check_optimizer_adapter
from explaind.testing.plugins import PluginCheckError

pytestmark = pytest.mark.usefixtures("one_thread")

SHORT = [AdapterScenario("short", {"lr": 2e-2}, n_steps=3)]


def _adam_with(**attrs):
    """The built-in Adam record whose adapter class has ``attrs`` set."""
    record = explaind.get_entry("optimizer_adapter", "adam")
    return dataclasses.replace(record, implementation=type("Variant", (record.implementation,), attrs))


def test_the_built_in_adam_keeps_its_promise():
    record = explaind.get_entry("optimizer_adapter", "adam")
    assert record.implementation.fresh_tensors is True
    check_optimizer_adapter(record, SHORT, dtype=torch.float64, tol=1e-12)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_a_fresh_tensors_value_other_than_a_bool_is_refused(bad):
    with pytest.raises(PluginCheckError, match=rf"fresh_tensors={bad!r} is not allowed\. Choose True .* or False"
                                               r".*Fix: set it to one of these"):
        check_optimizer_adapter(_adam_with(fresh_tensors=bad), SHORT, dtype=torch.float64, tol=1e-12)


def _reusing_after_step(self, optimizer, before):
    """Adam's coefficients, with every tensor written into one buffer per parameter kept across steps."""
    out = {}
    for key, u in type(self).__mro__[1].after_step(self, optimizer, before).items():
        if torch.is_tensor(u.P):
            buf = self.bufs.setdefault(key, torch.empty_like(u.P))
            u = dataclasses.replace(u, P=buf.copy_(u.P))
        out[key] = u
    return out


def test_an_adapter_that_reuses_a_returned_tensor_is_refused():
    record = _adam_with(fresh_tensors=True, after_step=_reusing_after_step, bufs={})
    with pytest.raises(PluginCheckError, match=r"fresh_tensors=True, but tensors after_step returned at steps \[0, 1\] "
                                               r"were changed afterwards.*Fix: return new tensors, or set "
                                               r"fresh_tensors = False"):
        check_optimizer_adapter(record, SHORT, dtype=torch.float64, tol=1e-12)
    reusing_but_honest = _adam_with(fresh_tensors=False, after_step=_reusing_after_step, bufs={})
    check_optimizer_adapter(reusing_but_honest, SHORT, dtype=torch.float64, tol=1e-12)
