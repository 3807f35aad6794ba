r"""Conformance checks for pruning strategies (records of kind ``"pruning_strategy"``).

Each check fits the strategy on a tiny float64 ReLU MLP (5-7-6-3) with a scoring batch and, for
strategies that need one, a trajectory of 6 SGD-with-momentum steps recorded with
:class:`explaind.TrajectoryRecorder`:

``not_fitted``
    ``masks()`` before ``fit`` raises :class:`~explaind.exceptions.NotFittedError`.
``scores``
    ``fit`` returns the estimator; ``scores_`` has one float64 tensor per trainable parameter,
    shaped like it, without NaN.
``mask_shapes_and_dtype``
    ``masks(s)`` has one boolean tensor per trainable parameter, shaped like it.
``sparsity_met``
    For global and per-layer thresholds at sparsities 0, 0.5, 0.9 and 0.97, the fraction of
    prunable coordinates removed is the requested one up to rounding (half a coordinate), per
    tensor for ``scope="layer"``; non-prunable tensors (biases by default) are untouched. With
    ``granularity="neuron"`` whole rows are removed and the sparsity is met up to half a row.
``deterministic``
    Two fits with the same ``random_state`` give identical scores and masks; a strategy that
    declares ``extras={"uses_random_state": True}`` gives different scores for another seed.
``inputs_not_mutated``
    ``fit`` leaves the model's parameters and buffers and the data unchanged; ``masks`` and
    ``transform`` leave ``scores_`` unchanged.
``excluded_untouched``
    With ``exclude`` naming the output layer its masks are all ``True`` and ``transform`` leaves
    its tensors bit for bit; an ``exclude`` entry matching no parameter is a ``ConfigError``.
``nested_masks``
    For strategies whose masks threshold one score (not ``extras={"sparsity_dependent": True}``),
    the coordinates kept at 90% are a subset of those kept at 50%.
``clone``
    ``sklearn.base.clone`` reproduces the parameters, which are exactly the config's fields, with
    the config's defaults as ``__init__`` defaults (see
    :func:`explaind.testing.configs.config_default_mismatches`); an invalid sparsity is a
    ``ConfigError`` naming it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError, ExplaindError, NotFittedError
from .configs import config_default_mismatches
from .plugins import PluginCheckError

__all__ = ["pruning_strategy_checks", "check_pruning_strategy", "tiny_pruning_problem"]

_SPARSITIES = (0.0, 0.5, 0.9, 0.97)


def _fail(message: str) -> None:
    raise PluginCheckError(message)


def tiny_pruning_problem(with_trajectory: bool = True, seed: int = 0) -> tuple[nn.Module, tuple[Tensor, Tensor], Any]:
    """A trained tiny MLP, a scoring batch ``(X, y)`` and (optionally) its recorded trajectory.

    Returns
    -------
    model : nn.Sequential
        float64 ReLU MLP 5-7-6-3 after 6 steps of SGD (lr 0.1, momentum 0.9).
    data : (Tensor, Tensor)
        ``X`` of shape ``(24, 5)`` and class indices ``y`` of shape ``(24,)``.
    trajectory : explaind.Trajectory or None
    """
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.5)
    X = torch.randn(24, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=gen)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    recorder = None
    if with_trajectory:
        from ..trajectory import TrajectoryRecorder

        recorder = TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=(X, y))
        recorder.__enter__()
    try:
        for s in range(6):
            idx = torch.arange(4 * s, 4 * s + 4)
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
            if recorder is not None:
                recorder.log_batch(idx)
            optimizer.step()
    finally:
        if recorder is not None:
            recorder.__exit__(None, None, None)
    model.zero_grad(set_to_none=True)
    return model, (X, y), (recorder.trajectory if recorder is not None else None)


class _Problem:
    """Lazily built fixture shared by the checks of one record."""

    def __init__(self, record: Any, model: nn.Module | None, data: Any, trajectory: Any,
                 options: dict[str, Any] | None = None):
        self.record = record
        self.options = dict(options or {})
        self._given = (model, data, trajectory)
        self._built: tuple | None = None

    def get(self) -> tuple[nn.Module, Any, Any]:
        model, data, trajectory = self._given
        if model is not None:
            return model, data, trajectory
        if self._built is None:
            self._built = tiny_pruning_problem(with_trajectory=bool(self.record.needs_trajectory))
        return self._built

    def make(self, **options: Any) -> Any:
        return self.record.implementation(**{**self.options, **options})

    def fit(self, **options: Any) -> Any:
        model, data, trajectory = self.get()
        return self.make(**options).fit(model, data, trajectory)


def _names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _output_prefix(model: nn.Module) -> str:
    return list(_names(model))[-1].rpartition(".")[0]


def _check_not_fitted(pb: _Problem) -> None:
    try:
        pb.make().masks(0.5)
    except NotFittedError:
        return
    _fail(f"{pb.record.name}: masks() before fit must raise NotFittedError.")


def _check_scores(pb: _Problem) -> None:
    model, data, trajectory = pb.get()
    est = pb.make(random_state=0)
    returned = est.fit(model, data, trajectory)
    if returned is not est:
        _fail(f"{pb.record.name}: fit must return the estimator itself.")
    shapes = _names(model)
    if list(est.scores_) != list(shapes):
        _fail(f"{pb.record.name}: scores_ keys {list(est.scores_)} differ from the parameters {list(shapes)}.")
    for name, s in est.scores_.items():
        if s.dtype != torch.float64 or tuple(s.shape) != shapes[name]:
            _fail(f"{pb.record.name}: scores_[{name!r}] is {s.dtype} {tuple(s.shape)}; expected float64 "
                  f"{shapes[name]}.")
        if torch.isnan(s).any():
            _fail(f"{pb.record.name}: scores_[{name!r}] contains NaN.")


def _check_mask_shapes(pb: _Problem) -> None:
    model = pb.get()[0]
    est = pb.fit(random_state=0)
    shapes = _names(model)
    for sparsity in (None, 0.5, 0.9):
        masks = est.masks(sparsity)
        if list(masks) != list(shapes):
            _fail(f"{pb.record.name}: masks({sparsity}) keys {list(masks)} differ from the parameters.")
        for name, m in masks.items():
            if m.dtype != torch.bool or tuple(m.shape) != shapes[name]:
                _fail(f"{pb.record.name}: masks({sparsity})[{name!r}] is {m.dtype} {tuple(m.shape)}; expected "
                      f"torch.bool {shapes[name]}.")


def _removed(masks: dict[str, Tensor], names: Any) -> tuple[int, int]:
    total = sum(masks[n].numel() for n in names)
    return sum(int((~masks[n]).sum()) for n in names), total


def _check_sparsity(pb: _Problem) -> None:
    model = pb.get()[0]
    shapes = _names(model)
    for scope in ("global", "layer"):
        est = pb.fit(scope=scope, random_state=0)
        for sparsity in _SPARSITIES:
            masks = est.masks(sparsity)
            groups = [list(est.prunable_)] if scope == "global" else [[n] for n in est.prunable_]
            for group in groups:
                removed, total = _removed(masks, group)
                if abs(removed - sparsity * total) > 0.5 + 1e-9:
                    _fail(f"{pb.record.name}: scope={scope!r}, sparsity={sparsity}: removed {removed} of {total} "
                          f"coordinates of {group}; expected {sparsity * total:.1f} (up to rounding).")
            for name in shapes:
                if name not in est.prunable_ and not bool(masks[name].all()):
                    _fail(f"{pb.record.name}: non-prunable {name!r} was pruned (scope={scope!r}).")
    est = pb.fit(granularity="neuron", random_state=0)
    masks = est.masks(0.5)
    removed, total = _removed(masks, est.prunable_)
    row = max(math.prod(shapes[n][1:]) for n in est.prunable_)
    if abs(removed - 0.5 * total) > row / 2 + 1e-9:
        _fail(f"{pb.record.name}: granularity='neuron': removed {removed} of {total}; expected {0.5 * total} "
              f"up to half a row ({row} coordinates).")
    for name in est.prunable_:
        rows = masks[name].reshape(shapes[name][0], -1)
        if not bool((rows.all(dim=1) | (~rows).all(dim=1)).all()):
            _fail(f"{pb.record.name}: granularity='neuron' removed part of a row of {name!r}.")


def _check_deterministic(pb: _Problem) -> None:
    a, b = pb.fit(random_state=3), pb.fit(random_state=3)
    for name in a.scores_:
        if not torch.equal(a.scores_[name], b.scores_[name]):
            _fail(f"{pb.record.name}: two fits with random_state=3 give different scores for {name!r}.")
    for sparsity in (0.5, 0.9):
        ma, mb = a.masks(sparsity), b.masks(sparsity)
        if any(not torch.equal(ma[n], mb[n]) for n in ma):
            _fail(f"{pb.record.name}: two fits with random_state=3 give different masks at sparsity {sparsity}.")
    if pb.record.extras.get("uses_random_state"):
        c = pb.fit(random_state=4)
        if all(torch.equal(a.scores_[n], c.scores_[n]) for n in a.scores_):
            _fail(f"{pb.record.name}: random_state=3 and random_state=4 give identical scores.")


def _snapshot(model: nn.Module, data: Any) -> list[Tensor]:
    tensors = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    items = data if isinstance(data, (tuple, list)) else [data]
    return tensors + [t.detach().clone() for t in items if isinstance(t, Tensor)]


def _check_not_mutated(pb: _Problem) -> None:
    model, data, trajectory = pb.get()
    before = _snapshot(model, data)
    est = pb.make(random_state=0).fit(model, data, trajectory)
    after = _snapshot(model, data)
    if any(not torch.equal(x, y) for x, y in zip(before, after)):
        _fail(f"{pb.record.name}: fit modified the model or the data it was given.")
    scores = {k: v.clone() for k, v in est.scores_.items()}
    for sparsity in (0.3, 0.9, None):
        est.masks(sparsity)
        est.transform(model, sparsity)
    if any(not torch.equal(scores[k], est.scores_[k]) for k in scores):
        _fail(f"{pb.record.name}: masks()/transform() changed scores_.")
    if any(not torch.equal(x, y) for x, y in zip(before, _snapshot(model, data))):
        _fail(f"{pb.record.name}: transform modified the model instead of a copy.")


def _check_excluded(pb: _Problem) -> None:
    model = pb.get()[0]
    prefix = _output_prefix(model)
    est = pb.fit(exclude=(prefix,), prune_biases=True, random_state=0)
    excluded = [n for n in _names(model) if n.startswith(prefix + ".")]
    for sparsity in (0.5, 0.97):
        masks = est.masks(sparsity)
        for name in excluded:
            if not bool(masks[name].all()):
                _fail(f"{pb.record.name}: excluded {name!r} was pruned at sparsity {sparsity}.")
        pruned = est.transform(model, sparsity)
        params = dict(pruned.named_parameters())
        for name in excluded:
            if not torch.equal(params[name], model.get_parameter(name)):
                _fail(f"{pb.record.name}: transform changed excluded {name!r}.")
    try:
        pb.fit(exclude=("no_such_layer",))
    except ConfigError as exc:
        if "no_such_layer" not in str(exc):
            _fail(f"{pb.record.name}: the error for a bad exclude entry does not name it: {exc}")
        return
    _fail(f"{pb.record.name}: exclude=('no_such_layer',) must raise ConfigError.")


def _check_nested(pb: _Problem) -> None:
    est = pb.fit(random_state=0)
    low, high = est.masks(0.5), est.masks(0.9)
    for name in low:
        if bool((high[name] & ~low[name]).any()):
            _fail(f"{pb.record.name}: {name!r} keeps at sparsity 0.9 coordinates removed at 0.5.")


def _check_clone(pb: _Problem) -> None:
    from sklearn.base import clone

    est = pb.record.implementation(sparsity=0.8, random_state=5)
    params = est.get_params(deep=False)
    fields = set(pb.record.config.model_fields)
    if set(params) != fields:
        _fail(f"{pb.record.name}: __init__ parameters {sorted(params)} differ from the config fields {sorted(fields)}.")
    problems = config_default_mismatches(pb.record.implementation, pb.record.config)
    if problems:
        _fail(f"{pb.record.name}: " + " ".join(problems))
    if clone(est).get_params(deep=False) != params:
        _fail(f"{pb.record.name}: sklearn.base.clone does not reproduce the parameters.")
    try:
        pb.fit(sparsity=1.5)
    except ConfigError as exc:
        if "sparsity" not in str(exc):
            _fail(f"{pb.record.name}: the error for sparsity=1.5 does not name the field: {exc}")
        return
    _fail(f"{pb.record.name}: sparsity=1.5 must raise ConfigError at fit.")


def pruning_strategy_checks(record: Any, inspected: Any = None, *, model: nn.Module | None = None, data: Any = None,
                            trajectory: Any = None,
                            options: dict[str, Any] | None = None) -> Iterator[tuple[str, Callable[[], None]]]:
    """Checks of one :class:`~explaind.records.PruningStrategyRecord` (see the module docstring).

    Parameters
    ----------
    record : PruningStrategyRecord
    inspected : object, optional
        Unused (the plugin suite's calling convention).
    model, data, trajectory : optional
        A problem of your own (a float64 model whose last parameter is the output layer, a scoring
        batch ``(X, y)`` and the trajectory when the strategy needs one); default: the tiny MLP.
    options : dict, optional
        Extra constructor options used in every check (e.g. a faster setting).
    """
    pb = _Problem(record, model, data, trajectory, options)
    yield "not_fitted", lambda: _check_not_fitted(pb)
    yield "scores", lambda: _check_scores(pb)
    yield "mask_shapes_and_dtype", lambda: _check_mask_shapes(pb)
    yield "sparsity_met", lambda: _check_sparsity(pb)
    yield "deterministic", lambda: _check_deterministic(pb)
    yield "inputs_not_mutated", lambda: _check_not_mutated(pb)
    yield "excluded_untouched", lambda: _check_excluded(pb)
    if not record.extras.get("sparsity_dependent"):
        yield "nested_masks", lambda: _check_nested(pb)
    yield "clone", lambda: _check_clone(pb)


def check_pruning_strategy(strategy: Any, *, model: nn.Module | None = None, data: Any = None,
                           trajectory: Any = None, options: dict[str, Any] | None = None) -> list[str]:
    """Run every pruning-strategy check; raise :class:`PluginCheckError` listing all failures.

    Parameters
    ----------
    strategy : str or PruningStrategyRecord
        A registered strategy name or a record.
    model, data, trajectory, options
        See :func:`pruning_strategy_checks`.

    Returns
    -------
    list of str
        Names of the checks that ran (all passed).
    """
    if isinstance(strategy, str):
        from ..plugins import get_entry

        strategy = get_entry("pruning_strategy", strategy)
    ran, failures = [], []
    for name, check in pruning_strategy_checks(strategy, model=model, data=data, trajectory=trajectory,
                                               options=options):
        ran.append(name)
        try:
            check()
        except (PluginCheckError, ExplaindError, AssertionError) as exc:
            failures.append((name, str(exc)))
        except Exception as exc:
            failures.append((name, f"raised {type(exc).__name__}: {exc}"))
    if failures:
        lines = "\n".join(f"- {n}: {m}" for n, m in failures)
        raise PluginCheckError(f"pruning strategy {strategy.name!r} failed {len(failures)} of {len(ran)} checks:\n"
                               f"{lines}", failures)
    return ran
