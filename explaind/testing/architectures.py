r"""Conformance checks for architecture records.

Every check builds the architecture from its default config (``record.config()``) and feeds
it ``record.example_input(config, n, generator)``. Exactness checks run in float64 and compare
``torch.func`` transforms with independent slow references:

``deterministic``
    Two builds with the same seed have identical parameters, another seed gives different
    ones, and building leaves the global RNG state untouched (factories must draw from a local
    ``torch.Generator``).
``example_input``
    Returns ``(inputs, targets)`` with ``n`` rows, reproducible under the generator.
``forward``
    Outputs have shape ``(n, O)`` and are finite; sample ``k`` alone gives row ``k`` of the
    batch (no coupling across the batch, e.g. no BatchNorm in training mode).
``functional_call``
    ``torch.func.functional_call`` with the module's own parameters equals ``forward``, and with
    other parameter values equals ``forward`` of a model holding those values.
``per_sample_gradients``
    ``vmap(grad(l_k))`` equals a Python loop of ``backward`` calls, one sample at a time.
``jvp``
    Forward-mode ``jvp`` agrees with reverse mode: ``<w, J t> = <J^T w, t>`` for random
    ``w``, ``t``.
``parameter_count``
    The record declares ``parameter_count(config)`` and it equals the number of parameter and
    buffer elements of the built model (``explaind.build_model`` checks it against its size limit
    before building).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ExplaindError
from .plugins import InspectedPlugin, PluginCheckError

__all__ = ["architecture_checks", "N_EXAMPLES"]

#: Samples per example batch.
N_EXAMPLES = 4
_RTOL = 1e-9
_ATOL = 1e-11


def _fail(message: str) -> None:
    raise PluginCheckError(message)


def _build(record: Any, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    module = record.implementation(record.config(), seed=seed)
    if not isinstance(module, nn.Module):
        _fail(f"architecture {record.name!r}: implementation returned {type(module).__name__}, not an nn.Module.")
    return module.to(dtype)


def _example(record: Any, seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    if record.example_input is None:
        _fail(
            f"architecture {record.name!r} has no example_input; the conformance suite needs "
            f"example_input(config, n, generator) -> (inputs, targets)."
        )
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = record.example_input(record.config(), N_EXAMPLES, generator)
    if inputs.is_floating_point():
        inputs = inputs.to(dtype)
    if targets.is_floating_point():
        targets = targets.to(dtype)
    return inputs, targets


def _loss(record: Any, inspected: InspectedPlugin) -> Callable[[Tensor, Tensor], Tensor]:
    own = inspected.own_record("loss", record.loss)
    if own is not None:
        return own.implementation
    from ..plugins import get_entry

    try:
        return get_entry("loss", record.loss).implementation
    except ExplaindError as exc:
        _fail(f"architecture {record.name!r} names loss {record.loss!r}, which is not registered: {exc}")
        raise  # unreachable, for type checkers


def _close(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a, b, rtol=_RTOL, atol=_ATOL)


def _check_deterministic(record: Any) -> None:
    state = torch.get_rng_state()
    first = _build(record, seed=0).state_dict()
    if not torch.equal(state, torch.get_rng_state()):
        _fail(
            f"architecture {record.name!r}: building the model changed the global RNG state; draw the weights "
            f"from a local torch.Generator seeded with `seed`."
        )
    again = _build(record, seed=0).state_dict()
    other = _build(record, seed=1).state_dict()
    try:
        torch.manual_seed(12345)  # a different global state must not matter
        third = _build(record, seed=0).state_dict()
    finally:
        torch.set_rng_state(state)
    for key, value in first.items():
        if not (torch.equal(value, again[key]) and torch.equal(value, third[key])):
            _fail(f"architecture {record.name!r}: tensor {key!r} differs between two builds with seed=0.")
    if all(torch.equal(value, other[key]) for key, value in first.items()):
        _fail(f"architecture {record.name!r}: seed=0 and seed=1 build identical weights; the seed is ignored.")


def _check_example_input(record: Any) -> None:
    inputs, targets = _example(record)
    if not (isinstance(inputs, Tensor) and isinstance(targets, Tensor)):
        _fail(f"architecture {record.name!r}: example_input must return two tensors (inputs, targets).")
    if inputs.shape[0] != N_EXAMPLES or targets.shape[0] != N_EXAMPLES:
        _fail(
            f"architecture {record.name!r}: example_input(config, n={N_EXAMPLES}, ...) returned "
            f"{tuple(inputs.shape)} inputs and {tuple(targets.shape)} targets; both need n rows."
        )
    inputs2, targets2 = _example(record)
    if not (torch.equal(inputs, inputs2) and torch.equal(targets, targets2)):
        _fail(f"architecture {record.name!r}: example_input is not reproducible; draw only from `generator`.")


def _check_forward(record: Any) -> None:
    model = _build(record)
    inputs, _ = _example(record)
    with torch.no_grad():
        outputs = model(inputs)
        if outputs.dim() != 2 or outputs.shape[0] != N_EXAMPLES:
            _fail(
                f"architecture {record.name!r}: outputs must have shape (n, O); got {tuple(outputs.shape)} for "
                f"n={N_EXAMPLES}."
            )
        if not torch.isfinite(outputs).all():
            _fail(f"architecture {record.name!r}: the outputs of the example batch are not finite.")
        for k in range(N_EXAMPLES):
            try:
                alone = model(inputs[k : k + 1])
            except Exception as exc:
                _fail(
                    f"architecture {record.name!r}: a batch of one sample cannot be evaluated ({type(exc).__name__}: "
                    f"{exc}); per-sample gradients need the model to run on single samples."
                )
            if not _close(alone[0], outputs[k]):
                _fail(
                    f"architecture {record.name!r}: sample {k} alone gives a different output than inside the "
                    f"batch; samples are coupled (BatchNorm?), so per-sample gradients are not defined."
                )


def _params(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def _check_functional_call(record: Any) -> None:
    model = _build(record)
    inputs, _ = _example(record)
    generator = torch.Generator().manual_seed(3)
    shifted = {n: p + 0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in _params(model).items()}
    reference = _build(record)  # the same architecture, its parameters overwritten with `shifted`
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(shifted[name])
        own = torch.func.functional_call(model, {**_params(model), **dict(model.named_buffers())}, (inputs,))
        if not _close(own, model(inputs)):
            _fail(f"architecture {record.name!r}: torch.func.functional_call with its own parameters differs from "
                  f"forward.")
        got = torch.func.functional_call(model, {**shifted, **dict(model.named_buffers())}, (inputs,))
        expected = reference(inputs)
    if not _close(got, expected):
        _fail(
            f"architecture {record.name!r}: torch.func.functional_call with other parameter values differs from "
            f"forward of a model holding those values; forward must read its parameters (no cached copies)."
        )


def _check_per_sample_gradients(record: Any, loss: Callable[[Tensor, Tensor], Tensor]) -> None:
    model = _build(record)
    inputs, targets = _example(record)
    params = _params(model)

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return loss(torch.func.functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))[0]

    batched = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    for k in range(N_EXAMPLES):
        model.zero_grad()
        loss(model(inputs[k : k + 1]), targets[k : k + 1])[0].backward()
        for name, p in model.named_parameters():
            if not _close(batched[name][k], p.grad if p.grad is not None else torch.zeros_like(p)):
                _fail(
                    f"architecture {record.name!r}: the vmap(grad) per-sample gradient of {name!r} for sample {k} "
                    f"differs from a backward pass on that sample alone (float64)."
                )


def _check_jvp(record: Any) -> None:
    model = _build(record)
    inputs, _ = _example(record)
    params = _params(model)
    generator = torch.Generator().manual_seed(7)
    tangents = {n: torch.randn(p.shape, generator=generator, dtype=p.dtype) for n, p in params.items()}

    def forward(p: dict[str, Tensor]) -> Tensor:
        return torch.func.functional_call(model, p, (inputs,))

    outputs, directional = torch.func.jvp(forward, (params,), (tangents,))
    weights = torch.randn(outputs.shape, generator=generator, dtype=outputs.dtype)
    if not torch.isfinite(directional).all():
        _fail(f"architecture {record.name!r}: torch.func.jvp returned non-finite tangents.")
    leaf = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    grads = torch.autograd.grad((weights * forward(leaf)).sum(), list(leaf.values()), allow_unused=True)
    reverse = sum((g * tangents[n]).sum() for n, g in zip(leaf, grads) if g is not None)
    forward_mode = (weights * directional).sum()
    if not torch.allclose(forward_mode, torch.as_tensor(reverse, dtype=forward_mode.dtype), rtol=_RTOL, atol=_ATOL):
        _fail(
            f"architecture {record.name!r}: forward-mode jvp ({forward_mode.item():.12g}) disagrees with reverse "
            f"mode ({float(reverse):.12g}) in float64."
        )


def _check_parameter_count(record: Any) -> None:
    if record.parameter_count is None:
        _fail(
            f"architecture {record.name!r} declares no parameter_count; add parameter_count=<config -> number of "
            f"parameter and buffer elements> to its record (e.g. build the module under torch.device('meta') and "
            f"sum numel()), so build_model can refuse an oversized config before allocating it."
        )
    declared = record.parameter_count(record.config())
    model = _build(record)
    built = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    if declared != built:
        _fail(f"architecture {record.name!r}: parameter_count(config) returned {declared!r}, the built model has "
              f"{built} parameter and buffer elements.")


def architecture_checks(record: Any, inspected: InspectedPlugin) -> Iterator[tuple[str, Callable[[], None]]]:
    """Checks of one :class:`~explaind.records.ArchitectureRecord` (see the module docstring)."""
    yield "deterministic", lambda: _check_deterministic(record)
    yield "example_input", lambda: _check_example_input(record)
    yield "forward", lambda: _check_forward(record)
    yield "functional_call", lambda: _check_functional_call(record)
    yield "per_sample_gradients", lambda: _check_per_sample_gradients(record, _loss(record, inspected))
    yield "jvp", lambda: _check_jvp(record)
    yield "parameter_count", lambda: _check_parameter_count(record)
