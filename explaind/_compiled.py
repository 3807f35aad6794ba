"""Compiled code that draws random numbers explaind cannot replay: found by module, attribute, loss or frame.

explaind replays every training forward (and the recorder's loss) in eager PyTorch, from the random state it
captured before the loop's forward. ``torch.compile`` with a backend that generates its own kernels (inductor, the
default) draws dropout masks and ``torch.rand`` values from its own random-number generator unless
``torch._inductor.config.fallback_random`` is set, so no replay draws them again. The eager backends
(:data:`EAGER_RANDOM_BACKENDS`) and inductor with ``fallback_random = True`` draw as torch does.

:func:`compiled_callables` finds what the recorder can see before the first step: a compiled module
(``torch.compile(model)``, ``model.compile()``, a compiled submodule), a compiled function held by a module
(``model.forward = torch.compile(model.forward)``) and a compiled loss callable. :func:`compiled_frames` names the
user functions dynamo compiled in this process (``torch.compile`` of a training step that calls the model, a
submodule compiled after recording began), for the gradient check's message when a checked step fails.
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path
from typing import Any

from torch import nn

from .exceptions import TrajectoryError

__all__ = ["CompiledDrawGuard", "EAGER_RANDOM_BACKENDS", "FALLBACK_FIX", "compile_backend", "compiled_callables",
           "compiled_caller", "compiled_count", "compiled_frames",
           "function_backend", "refuse_compiled_at_step", "replays_draws"]


#: ``torch.compile`` backends that run dropout with eager PyTorch's random number generator.
EAGER_RANDOM_BACKENDS = ("eager", "aot_eager")


def compile_backend(model: nn.Module) -> str | None:
    """The ``torch.compile`` backend's name of a compiled module (``"?"`` when unknown), ``None`` if not compiled."""
    if hasattr(model, "_orig_mod") and hasattr(model, "dynamo_ctx"):  # torch.compile(model)
        context = model.dynamo_ctx
    elif getattr(model, "_compiled_call_impl", None) is not None:  # model.compile(): the context is in a closure
        cells = getattr(model._compiled_call_impl, "__closure__", None) or ()
        context = next((c.cell_contents for c in cells if hasattr(c.cell_contents, "callback")), None)
    else:
        return None
    try:  # torch keeps the backend two wrappers deep; a backend without a __name__ is reported as unknown
        return str(context.callback._torchdynamo_orig_backend._torchdynamo_orig_backend.__name__)
    except AttributeError:
        return "?"


#: The fix every message names.
FALLBACK_FIX = ("torch._inductor.config.fallback_random = True before compiling (inductor then draws as torch "
                "does), or torch.compile(..., backend='aot_eager') or 'eager', whose draws are eager PyTorch's")

_TORCH = str(Path(nn.__file__).resolve().parents[1])
_EXPLAIND = str(Path(__file__).resolve().parent)
#: Python's own library (dynamo also compiles the frames of ``copy`` or ``random`` a compiled forward calls)
_STDLIB = tuple(str(Path(sysconfig.get_paths()[k]).resolve()) for k in ("stdlib", "platstdlib"))


def function_backend(fn: Any) -> str | None:
    """The backend's name of a function compiled by ``torch.compile(fn)`` (``"?"`` when unknown), else ``None``."""
    try:  # any object a module holds: one whose __getattr__ raises more than AttributeError is no compiled function
        if not callable(fn) or getattr(fn, "_torchdynamo_orig_callable", None) is None:
            return None
    except Exception:  # noqa: BLE001
        return None
    cells = getattr(fn, "__closure__", None) or ()
    context = next((c.cell_contents for c in cells if hasattr(c.cell_contents, "callback")), None)
    try:  # torch keeps the backend two wrappers deep, as for a compiled module
        return str(context.callback._torchdynamo_orig_backend._torchdynamo_orig_backend.__name__)
    except AttributeError:
        return "?"


def replays_draws(backend: str) -> bool:
    """Whether code compiled with ``backend`` draws random numbers as eager PyTorch does."""
    if backend in EAGER_RANDOM_BACKENDS:
        return True
    config = sys.modules.get("torch._inductor.config")
    return backend == "inductor" and bool(getattr(config, "fallback_random", False))


def compiled_callables(model: nn.Module, loss: Any = None) -> list[str]:
    """The compiled modules, module-held functions and loss whose draws no eager replay repeats, described as
    ``"the submodule 'enc' (torch.compile(backend='inductor'))"``; empty when none."""
    found = []
    for name, m in model.named_modules():
        backend = compile_backend(m)
        if backend is not None:  # its own compiled forward is the module's: named once
            if not replays_draws(backend):
                what = "the model" if not name else f"the submodule {name!r}"
                found.append(f"{what} (torch.compile(backend={backend!r}))")
            continue
        for attr, value in vars(m).items():
            backend = function_backend(value)
            if backend is not None and not replays_draws(backend):
                owner = "model" if not name else f"model.{name}"
                found.append(f"{owner}.{attr} = torch.compile(...) (backend={backend!r})")
    backend = function_backend(loss)
    if backend is not None and not replays_draws(backend):
        found.append(f"the loss {getattr(loss, '__qualname__', type(loss).__name__)} = torch.compile(...) "
                     f"(backend={backend!r})")
    return found


def compiled_frames(limit: int = 4) -> list[str]:
    """The user functions dynamo compiled in this process (not torch's or explaind's own), as
    ``"train_step (loop.py:12)"``; empty when ``torch.compile`` has not run."""
    convert = sys.modules.get("torch._dynamo.convert_frame")
    seen = getattr(getattr(convert, "input_codes", None), "seen", None) or []
    names: list[str] = []
    for ref in seen:
        code = ref() if callable(ref) else None
        if code is None or code.co_filename.startswith((_TORCH, _EXPLAIND, "<")):
            continue
        if str(Path(code.co_filename).resolve()).startswith(_STDLIB) and "site-packages" not in code.co_filename:
            continue
        name = f"{code.co_qualname} ({Path(code.co_filename).name}:{code.co_firstlineno})"
        if name not in names:
            names.append(name)
    return names[:limit]


def refuse_compiled_at_step(model: nn.Module, step: int) -> None:
    """Raise :class:`~explaind.exceptions.TrajectoryError` at checked step ``step`` when compiled code the recorder
    refuses up front (:func:`compiled_callables`) is found in ``model`` now: compiled after the recorder started."""
    found = compiled_callables(model)
    if found:
        raise TrajectoryError(
            f"Step {step}: compiled code draws random numbers with the compiler's own generator: "
            f"{'; '.join(found[:4])}, compiled after the recorder started. The gradient check runs the compiled "
            f"code with the loop's draws and cannot see it, but explaind replays every training forward in eager "
            f"PyTorch, which draws other dropout masks, so the split over samples would be inexact. The steps "
            f"recorded before are kept. Fix: {FALLBACK_FIX}; or compile before the recorder starts, which refuses "
            f"or accepts it up front."
        )


#: Where dynamo's ``torch.compile`` wrapper runs the compiled function (its frame is on the stack meanwhile).
_WRAPPER = ("compile_wrapper", str(Path("torch") / "_dynamo" / "eval_frame.py"))


def compiled_caller() -> str | None:
    """The ``torch.compile``'d function the current call runs inside, when its backend draws random numbers with its
    own generator (:func:`replays_draws` false), as ``"logits_of at loop.py:12 (torch.compile(backend='inductor'))"``;
    else ``None``. Found by dynamo's wrapper frame on the stack; the search is excluded from dynamo's tracing
    (``torch._dynamo.disable``), so a compiled caller runs it eagerly at a graph break."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is None:  # torch.compile never ran in this process
        return None
    global _EAGER_SEARCH
    if _EAGER_SEARCH is None:
        _EAGER_SEARCH = dynamo.disable(_caller_on_stack)
    return _EAGER_SEARCH()


_EAGER_SEARCH: Any = None


def _caller_on_stack() -> str | None:
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == _WRAPPER[0] and code.co_filename.endswith(_WRAPPER[1]):
            context, fn = frame.f_locals.get("self"), frame.f_locals.get("fn")
            try:  # torch keeps the backend two wrappers deep, as for a compiled module
                backend = str(context.callback._torchdynamo_orig_backend._torchdynamo_orig_backend.__name__)
            except AttributeError:
                backend = "?"
            if not replays_draws(backend):
                return f"{_compiled_name(fn, frame)} (torch.compile(backend={backend!r}))"
        frame = frame.f_back
    return None


def _compiled_name(fn: Any, frame: Any) -> str:
    """``"logits_of at loop.py:12"`` for a user function; ``"torch.compile(Net)"`` for a compiled module (whose
    wrapper torch makes), found on the frames just outside dynamo's wrapper."""
    code = getattr(fn, "__code__", None)
    if code is not None and not str(Path(code.co_filename).resolve()).startswith(_TORCH):
        return f"{getattr(fn, '__name__', type(fn).__name__)} at {Path(code.co_filename).name}:{code.co_firstlineno}"
    outer = frame.f_back
    for _ in range(6):
        if outer is None:
            break
        owner = outer.f_locals.get("self")
        if isinstance(owner, nn.Module) and isinstance(getattr(owner, "_orig_mod", None), nn.Module):
            return f"torch.compile({type(owner._orig_mod).__name__})"
        outer = outer.f_back
    return "a compiled function"


def compiled_count() -> int:
    """How many code objects dynamo has compiled in this process (0 before ``torch.compile`` first ran)."""
    convert = sys.modules.get("torch._dynamo.convert_frame")
    return len(getattr(getattr(convert, "input_codes", None), "seen", None) or ())


class CompiledDrawGuard:
    """Compiled code that draws random numbers no eager replay repeats, refused at record time whether or not the
    gradient check runs (docs/guide_own_model.md, "Manual optimization", the `torch_compile=True` paragraph).

    Used only for a model whose training forward draws random numbers (dropout, ``capture_random=True``): a model
    that draws nothing is exact under any backend and never looked at.

    * :meth:`forward`, at every training forward: the model called from inside a compiled function (``torch.compile``
      of a training step or of ``lambda x: model(x)``) whose backend is not one of :data:`EAGER_RANDOM_BACKENDS` (or
      inductor with ``fallback_random``) is refused, naming the function and its backend;
    * :meth:`step`, at every step's pre-step hook: when dynamo compiled something since the last look (a counter,
      :func:`compiled_count`), the modules are searched again (:func:`refuse_compiled_at_step`): a submodule compiled
      after the recorder started.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._count = compiled_count()

    def forward(self) -> None:
        """Raise :class:`~explaind.exceptions.TrajectoryError` when this training forward runs inside compiled code
        whose draws no eager replay repeats."""
        caller = compiled_caller()
        if caller is not None:
            raise TrajectoryError(
                f"The recorded model's training forward runs inside code compiled by torch.compile: {caller}, whose "
                f"dropout masks and other random numbers come from the compiler's own generator. explaind replays "
                f"every training forward in eager PyTorch, which draws other masks, so the split over samples would "
                f"be inexact (with the gradient check off nothing else would say so but the residual). The steps "
                f"recorded before are kept. Fix: {FALLBACK_FIX}; or call the model outside the compiled function."
            )

    def step(self, s: int) -> None:
        """At step ``s``: refuse a module compiled since the last look (:func:`refuse_compiled_at_step`)."""
        count = compiled_count()
        if count != self._count:
            self._count = count
            refuse_compiled_at_step(self.model, s)
