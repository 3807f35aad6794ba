r"""The random state of every training forward, captured so the engine can replay it (docs/recording.md).

A model with dropout draws its masks from the global generators; a model with batch norm in
training mode couples the samples of a batch through the batch statistics. Either way the
gradient the optimizer saw is :math:`c_s\nabla_\theta\sum_k w_k\ell_k(F(X_B;\theta_s,\xi_s))`, a
function of the *batched* forward :math:`F` and of the random state :math:`\xi_s` (docs/maths.md,
"Dropout and batch norm"). :class:`RandomCapture` is a forward pre-hook on the root module: before
every forward that runs in training mode with gradients enabled it saves the state of the CPU
generator (and of every CUDA device's generator once CUDA is initialised, and NumPy's global one:
:mod:`~explaind.trajectory._numpy_random`); ``log_batch`` then ties
the state of that forward to its micro-batch (:class:`MicroBatch`). :func:`replayed` runs code
under a saved state without touching the caller's generators.

Private generators. A layer that draws from its own :class:`torch.Generator` (``torch.rand(...,
generator=self.gen)``) is not seen by the global state. :func:`find_generators` lists the generators
held as attributes of the model's modules, directly or inside lists, tuples and dicts held as
attributes (at most :data:`CONTAINER_DEPTH` levels deep and :data:`CONTAINER_SIZE` entries each; dict
keys that are ``int`` or ``str``), named ``"<module>.<attribute>"`` or ``"<module>.<attribute>[0]['key']"``
(a container named ``generators`` on the root module is named ``".generators[i]"``); generators held
elsewhere (by a helper object the module holds, in a closure, at module level) are passed to the recorder
(``generators=[...]``, named ``"generators[i]"``); an unfound one fails the gradient check, whose message
names ``generators=``. A generator held by a loss callable (its attributes or closure,
:func:`loss_generators`) is refused: the loss is applied one sample at a time, so its draws cannot be
split over samples. Their states
are saved with the global ones before every training forward (:attr:`RandomState.private`) and set
for the replay (:func:`replayed`): attributes are found again by name in the module being replayed,
passed generators are the objects given again (``Trajectory.load(path, generators=[...])``).

The rule (``capture_random="auto"``): capture when the model holds a dropout layer with
``p > 0`` (also ``nn.MultiheadAttention(dropout > 0)`` and dropout between recurrent layers), a batch-norm
layer or a private generator; ``True`` always, ``False`` never. A forward
that draws random numbers no module shows (``F.dropout`` or ``torch.rand`` in ``forward``) needs
``True``: every training forward is then replayed, named ``"<Model>.forward"`` in ``coupled``; under ``"auto"``
with nothing captured, the first training forward that draws so warns naming that fix
(:mod:`~explaind.trajectory._host_random`). The CPU state is 5,056 bytes, each CUDA device's 16 bytes.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from .._compiled import CompiledDrawGuard
from ..exceptions import ConfigError, TrajectoryError
from ..models import refuse_compiled_draws, refuse_mixed_modes
from ..records import LossRecord
from ._common import ModelHook
from ._host_random import HostDrawGuard, TorchDrawProbe
from ._numpy_random import kept_numpy_state, numpy_state, set_numpy_state

__all__ = ["RandomState", "MicroBatch", "RandomCapture", "coupled_modules", "draws_masks", "is_spectral_norm",
           "find_generators", "resolve_generators",
           "loss_generators", "replayed", "replay_parts"]

#: Levels of nested lists, tuples and dicts searched for generators below a module's attribute.
CONTAINER_DEPTH = 3
#: Largest container searched (a bigger one, such as a list of data tensors, is skipped).
CONTAINER_SIZE = 1000
#: Attributes every ``nn.Module`` has (parameters, buffers, submodules, hooks): not searched.
_MODULE_INTERNALS = frozenset(vars(nn.Module()))
#: One subscript of a generator's name: an ``int`` or the ``repr`` of a ``str`` key.
_KEY = re.compile(r"""\[(-?\d+|'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\]""")


def coupled_modules(model: nn.Module) -> list[str]:
    """Names of the modules whose training forward must be replayed, whatever their mode.

    Dropout (``p > 0``, also between the layers of a recurrent module) draws masks, batch norm
    couples the samples, and spectral norm (``torch.nn.utils.parametrizations.spectral_norm`` or
    the older hook) runs its power iteration on buffers the same forward reads.
    """
    return [name or type(module).__name__ for name, module in model.named_modules() if _is_coupled(module)]


def _is_coupled(module: nn.Module) -> bool:
    """A module that draws masks, batch norm or spectral norm (see :func:`coupled_modules`)."""
    return draws_masks(module) or isinstance(module, nn.modules.batchnorm._NormBase) or is_spectral_norm(module)


def draws_masks(module: nn.Module) -> bool:
    """Whether ``module``'s training forward draws dropout masks: a dropout layer, a recurrent module's dropout or
    ``nn.MultiheadAttention``'s dropout on the attention weights (drawn inside its functional forward)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return isinstance(module, nn.RNNBase) and module.dropout > 0 and module.num_layers > 1


def is_spectral_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a spectral-norm parametrization or carries the older spectral-norm hook."""
    return type(module).__name__ == "_SpectralNorm" or any(
        type(h).__name__ == "SpectralNorm" for h in module._forward_pre_hooks.values())


def _held(value: Any, name: str, depth: int) -> Iterator[tuple[str, torch.Generator]]:
    """``(name, generator)`` for ``value`` itself or each generator in its nested lists, tuples and dicts."""
    if isinstance(value, torch.Generator):
        yield name, value
    elif depth <= 0 or isinstance(value, nn.Module):
        return
    elif isinstance(value, (list, tuple)) and len(value) <= CONTAINER_SIZE:
        for i, item in enumerate(value):
            yield from _held(item, f"{name}[{i}]", depth - 1)
    elif isinstance(value, dict) and len(value) <= CONTAINER_SIZE:
        for key, item in value.items():
            if isinstance(key, (int, str)) and not isinstance(key, bool):
                yield from _held(item, f"{name}[{key!r}]", depth - 1)


def find_generators(model: nn.Module) -> dict[str, torch.Generator]:
    """``name -> generator`` for every :class:`torch.Generator` a module of ``model`` holds (see the module docstring).

    Names are ``"<module>.<attribute>"`` followed by the subscripts into the containers
    (``"noise.gens[1]"``, ``"noise.table['a']"``); each generator is listed once, under its first name.
    """
    found: dict[str, torch.Generator] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr in _MODULE_INTERNALS:
                continue
            label = f"{name}.{attr}" if name else attr
            for full, gen in _held(value, label, CONTAINER_DEPTH):
                if id(gen) not in seen:
                    seen.add(id(gen))
                    found["." + full if full.startswith("generators[") else full] = gen
    return found


def _locate(module: nn.Module, name: str) -> Any:
    """The object a name of :func:`find_generators` points to in ``module`` (``None`` when absent)."""
    head, bracket, rest = name.partition("[")
    path, _, attr = head.rpartition(".")
    try:
        value = getattr(module.get_submodule(path) if path else module, attr, None)
    except AttributeError:
        return None
    keys, end = (bracket + rest), 0
    for match in _KEY.finditer(keys):
        if match.start() != end:
            return None
        end = match.end()
        try:
            value = value[ast.literal_eval(match.group(1))]
        except (LookupError, TypeError):
            return None
    return value if end == len(keys) else None


def _callable_parts(loss: Any) -> Iterator[tuple[str, Any]]:
    """``(label, value)`` of what a loss callable holds: attributes, closure cells, partial arguments, ``__self__``."""
    if isinstance(loss, functools.partial):
        yield from _callable_parts(loss.func)
        yield from ((f"args[{i}]", v) for i, v in enumerate(loss.args))
        yield from ((f"keywords[{k!r}]", v) for k, v in loss.keywords.items())
        return
    owner = getattr(loss, "__self__", None)
    if owner is not None and not isinstance(owner, type):
        yield from ((k, v) for k, v in vars(owner).items() if k not in _MODULE_INTERNALS)
    code, cells = getattr(loss, "__code__", None), getattr(loss, "__closure__", None) or ()
    for var, cell in zip(code.co_freevars if code is not None else (), cells):
        try:
            yield var, cell.cell_contents
        except ValueError:  # an empty cell
            continue
    yield from ((k, v) for k, v in getattr(loss, "__dict__", {}).items() if k not in _MODULE_INTERNALS)


def loss_generators(loss: Any) -> list[str]:
    """Names ``"loss.<what>"`` of the generators a loss callable holds (:func:`_callable_parts`, containers too).

    A registered loss (a name or a record) holds none; an ``nn.Module`` loss is searched like a model.
    """
    if isinstance(loss, (str, LossRecord)) or not callable(loss):
        return []
    if isinstance(loss, nn.Module):
        return [f"loss.{name}" for name in find_generators(loss)]
    return [name for label, value in _callable_parts(loss) for name, _ in _held(value, f"loss.{label}",
                                                                                CONTAINER_DEPTH)]


def resolve_generators(names: Sequence[str], module: nn.Module, extra: Sequence[torch.Generator],
                       where: str) -> list[torch.Generator]:
    """The generators ``names`` (from :func:`find_generators`, or ``"generators[i]"``) as ``module`` holds them.

    Raises
    ------
    TrajectoryError
        When a name is not a generator of ``module``, or a passed generator is not given again.
    """
    out = []
    for name in names:
        if name.startswith("generators["):
            i = int(name[len("generators["):-1])
            if i >= len(extra):
                raise TrajectoryError(
                    f"{where}: the run drew random numbers from {name}, a torch.Generator passed to the recorder as "
                    f"generators=[...], but only {len(extra)} such generator(s) are known here, so its draws cannot "
                    f"be replayed. Fix: pass the same generators again, Trajectory.load(path, generators=[...]).")
            out.append(extra[i])
            continue
        gen = _locate(module, name)
        if not isinstance(gen, torch.Generator):
            raise TrajectoryError(
                f"{where}: the run drew random numbers from the torch.Generator {name!r} of the model, but the model "
                f"replayed here has no generator there, so its draws cannot be replayed. Fix: analyse the run with "
                f"the model it was recorded with (Trajectory.load(path, model=...)).")
        out.append(gen)
    return out


@dataclass(frozen=True)
class RandomState:
    """The generators' states before one training forward.

    Attributes
    ----------
    cpu : Tensor
        ``torch.get_rng_state()`` (uint8, 5,056 bytes).
    cuda : tuple of Tensor
        ``torch.cuda.get_rng_state_all()`` when CUDA was initialised, else empty.
    device : str
        Device type of the model's parameters during the forward (``"cpu"``, ``"cuda"``): the
        generator its random layers drew from.
    private : tuple of Tensor
        ``get_state()`` of each private generator, in the recorder's order (empty without them).
    private_devices : tuple of str
        Their device types.
    numpy : Tensor or None
        NumPy's global generator, packed by :func:`~explaind.trajectory._numpy_random.numpy_state` (``None``
        in runs recorded before it was captured, and when the forward drew nothing from it).
    """

    cpu: Tensor
    cuda: tuple[Tensor, ...]
    device: str
    private: tuple[Tensor, ...] = ()
    private_devices: tuple[str, ...] = ()
    numpy: Tensor | None = None

    @classmethod
    def now(cls, device: str, generators: Sequence[torch.Generator] = ()) -> RandomState:
        """The current states (of ``generators`` too)."""
        cuda = tuple(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else ()
        return cls(torch.get_rng_state(), cuda, device, tuple(g.get_state() for g in generators),
                   tuple(g.device.type for g in generators), numpy_state())


@dataclass(frozen=True)
class MicroBatch:
    """One ``log_batch`` call as the engine replays it.

    Attributes
    ----------
    indices : Tensor
        Dataset positions in the order given, int64 ``(n,)``.
    weights : Tensor
        :math:`w_{s,k}`, ``(n,)``.
    forwards : int
        Training forwards (with gradients) seen since the previous ``log_batch``; replayable iff 1.
        ``-1``: not captured (``capture_random=False`` or a run recorded before capturing).
    state : RandomState or None
        The generators before that forward (when ``forwards == 1``).
    eval_forwards : int
        Forwards in evaluation mode (with gradients) seen since the previous ``log_batch``: a
        micro-batch with only these needs no replay (the evaluation-mode recomputation is exact).
    """

    indices: Tensor
    weights: Tensor
    forwards: int = -1
    state: RandomState | None = None
    eval_forwards: int = 0


class RandomCapture:
    """Forward pre-hook on the root module that saves the generators before each training forward.

    Parameters
    ----------
    model : nn.Module
    capture : {"auto", True, False}
        See the module docstring.
    generators : sequence of torch.Generator, optional
        Private generators the model draws from that are not attributes of its modules.

    Attributes
    ----------
    generator_names : list of str
        Names of the private generators (attributes found, then ``"generators[i]"``).
    generators : list of torch.Generator
        The generators themselves, in that order; ``extra`` the passed ones.
    """

    def __init__(self, model: nn.Module, capture: Any, generators: Any = None, loss: Any = None):
        if not (capture is True or capture is False or capture == "auto"):
            raise ConfigError(f"capture_random={capture!r} is not allowed. Choose one of: 'auto' (when the model has "
                              f"dropout, batch norm or a private generator), True, False.")
        extra = list(generators or ())
        bad = [type(g).__name__ for g in extra if not isinstance(g, torch.Generator)]
        if bad:
            raise ConfigError(f"generators must be a list of torch.Generator objects the model draws from; got "
                              f"{bad}. Fix: pass e.g. generators=[my_layer_generator].")
        found = find_generators(model)
        known = {id(g) for g in found.values()}
        self.extra = [g for g in extra if id(g) not in known]  # a generator the model holds is found by name
        self.generator_names = [*found, *(f"generators[{i}]" for i in range(len(self.extra)))]
        self.generators = [*found.values(), *self.extra]
        self.model = model
        self.coupled = coupled_modules(model) + self.generator_names
        #: coupled submodules, whose mode must follow the root's in every training forward (:meth:`_hook`)
        self._moded = [(name, m) for name, m in model.named_modules() if m is not model and _is_coupled(m)]
        if capture is True and not self.coupled:  # random draws the modules do not show (F.dropout, torch.rand)
            self.coupled = [f"{type(model).__name__}.forward"]
        self.enabled = bool(self.coupled) if capture == "auto" else bool(capture)
        draws = capture is True or bool(self.generators) or any(draws_masks(m) for m in model.modules())
        if self.enabled and draws:
            refuse_compiled_draws(model, loss)
        #: compiled code met later (a compiled function calling the model, a submodule compiled after the start)
        self.compiled = CompiledDrawGuard(model) if self.enabled and draws else None
        self.paused = False
        self._handle: Any = None
        self._forwards = self._eval_forwards = 0
        self._state: RandomState | None = None
        #: numpy and Python draws in a training forward are refused unless capture_random=False (nothing replayed)
        self.host = HostDrawGuard(model, lambda: not self.paused and torch.is_grad_enabled(), self.enabled)
        self._guarded = capture is not False
        #: under "auto" with nothing captured: warns at a training forward that draws from torch (F.dropout)
        self.probe = TorchDrawProbe(model, lambda: not self.paused) if capture == "auto" and not self.enabled \
            else None

    def attach(self) -> None:
        """Register the hook (when capturing) and the guard against numpy and Python draws."""
        if self._guarded:
            self.host.attach()
        if self.probe is not None:
            self.probe.attach()
        if self.enabled and self._handle is None:
            self._handle = self.model.register_forward_pre_hook(ModelHook(self._hook))

    def detach(self) -> None:
        """Remove the hooks."""
        self.host.detach()
        if self.probe is not None:
            self.probe.detach()
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module: nn.Module, args: Any) -> None:
        if self.paused or not torch.is_grad_enabled():
            return
        refuse_mixed_modes(self._moded, module)
        if not module.training:
            self._eval_forwards += 1
            return
        if self.compiled is not None:
            self.compiled.forward()
        self._forwards += 1
        if self._forwards == 1:
            param = next(module.parameters(), None)
            self._state = RandomState.now(param.device.type if param is not None else "cpu", self.generators)

    def take(self) -> tuple[int, RandomState | None, int]:
        """``(forwards, state, eval_forwards)`` since the previous call (``(-1, None, 0)`` when not capturing)."""
        if not self.enabled:
            return -1, None, 0
        state = self._state if self._forwards == 1 else None
        if state is not None and state.numpy is not None and torch.equal(state.numpy, numpy_state()):
            # NumPy's generator did not move since the forward began: the forward drew nothing from it
            state = replace(state, numpy=None)
        got = (self._forwards, state, self._eval_forwards)
        self._forwards, self._state, self._eval_forwards = 0, None, 0
        return got

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Run the recorder's own forwards (checks): not counted, and the caller's generators left as they were."""
        self.paused = True
        try:
            with (torch.random.fork_rng(devices=_cuda_devices(), device_type="cuda"), _kept(self.generators),
                  kept_numpy_state()):
                yield
        finally:
            self.paused = False


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


@contextlib.contextmanager
def _kept(generators: Sequence[torch.Generator]) -> Iterator[None]:
    """Restore the states of ``generators`` after the body."""
    saved = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for g, st in zip(generators, saved):
            g.set_state(st)


@contextlib.contextmanager
def replayed(state: RandomState, device: torch.device, where: str,
             generators: Sequence[torch.Generator] = ()) -> Iterator[None]:
    """Run the body with the generators set to ``state``; the caller's generators are restored afterwards.

    ``generators`` are the private generators of the module that runs the body, in the order of
    ``state.private`` (:func:`resolve_generators`).

    Raises
    ------
    TrajectoryError
        When the forward drew from a generator this device does not have (recorded on CUDA, replayed
        on CPU or the reverse), or a private generator is missing or on another device type: its
        masks cannot be reproduced here.
    """
    if len(generators) != len(state.private):
        raise TrajectoryError(
            f"{where}: the training forward drew from {len(state.private)} private torch.Generator(s) but "
            f"{len(generators)} are given for the replay, so its random draws cannot be reproduced. Fix: analyse "
            f"the run with the model (and generators=[...]) it was recorded with.")
    for i, (gen, kind) in enumerate(zip(generators, state.private_devices)):
        if gen.device.type != kind:
            raise TrajectoryError(
                f"{where}: private generator {i} drew on {kind!r} during training, but the generator given for the "
                f"replay is on {gen.device.type!r}, whose states are not interchangeable. Fix: analyse the run on a "
                f"machine with a {kind!r} device and keep the layer's generator on {kind!r}.")
    if state.device != device.type or (state.device == "cuda" and not state.cuda):
        raise TrajectoryError(
            f"{where}: the training forward ran on {state.device!r} and drew its dropout masks from that device's "
            f"random generator, but the engine computes on {device.type!r}, whose generator gives other masks. Fix: "
            f"compute on the device the run was recorded on (device={state.device!r})."
        )
    devices = list(range(len(state.cuda))) if state.device == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"), _kept(generators), kept_numpy_state():
        torch.set_rng_state(state.cpu)
        if state.numpy is not None:
            set_numpy_state(state.numpy, where)
        for d, s in enumerate(state.cuda if devices else ()):
            torch.cuda.set_rng_state(s, d)
        for gen, s in zip(generators, state.private):
            gen.set_state(s)
        yield


def replay_parts(micro: Sequence[MicroBatch], coupled: Sequence[str],
                 where: str) -> tuple[tuple[int, int, RandomState], ...] | None:
    """Positions ``[lo, hi)`` in the merged batch and states of the micro-batches to replay.

    ``None`` when every micro-batch ran its forward in evaluation mode (the evaluation-mode
    recomputation is then exact).

    Raises
    ------
    TrajectoryError
        When a micro-batch saw no or several training forwards between two ``log_batch`` calls, or
        the step mixes training- and evaluation-mode micro-batches: its masks and batch statistics
        are not known.
    """
    if all(m.forwards == 0 and m.eval_forwards > 0 for m in micro):
        return None
    parts, lo = [], 0
    for i, m in enumerate(micro):
        n = int(m.indices.shape[0])
        if m.forwards != 1 or m.state is None:
            raise TrajectoryError(
                f"{where}: micro-batch {i} saw {m.forwards} training forward(s) between two rec.log_batch calls, so "
                f"the dropout masks and batch statistics of the modules {list(coupled)} cannot be replayed and the "
                f"split over samples would be inexact. Fix: record with one training forward of exactly the logged "
                f"samples per rec.log_batch(indices) call (R-drop's or a consistency loss's two dropout passes of "
                f"the batch: take both inside one forward that returns them side by side as output columns, which "
                f"the loss callable compares)."
            )
        parts.append((lo, lo + n, m.state))
        lo += n
    return tuple(parts)
