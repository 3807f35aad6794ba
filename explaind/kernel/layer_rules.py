r"""Layer rules of the factored evaluator, keyed by layer type (a registry).

A layer whose output is affine in its parameters can be evaluated at any point of a segment
without copying parameters: at :math:`\theta(t) = \theta_s + t\,\Delta\theta_s` its output is
:math:`z(\theta_s) + t\, z(\Delta\theta_s)` (for a linear layer :math:`W_s a + b_s + t(\Delta W a + \Delta b)`), and the
Jacobian of an explained output :math:`g_o` with respect to its parameters factorises into the
layer input :math:`a_r` and the output gradient :math:`\delta_{o,r} = \partial g_o / \partial z_r` at each
position :math:`r`,

.. math::

    \frac{\partial g_o}{\partial W} = \sum_r \delta_{o,r}\, a_r^\top, \qquad
    \frac{\partial g_o}{\partial b} = \sum_r \delta_{o,r}, \qquad
    \frac{\partial g_o}{\partial E[v]} = \sum_{r: k_r = v} \delta_{o,r}\ \text{(embedding)}.

and for a layer normalisation :math:`z = \hat a \odot w + b` the same holds with the normalised input
:math:`\hat a`. A :class:`LayerRule` says which parameters of a module it covers (their *roles*), the moved
output :math:`z(\Delta\theta)` at one step, the output at rows of stacked steps, and how a role's
quadrature-weighted Jacobian is reduced from the factors. :data:`LAYER_RULES` maps
``nn.Linear``, ``nn.Embedding`` and ``nn.LayerNorm`` to theirs; :data:`NAMED_LAYER_RULES` holds rules
keyed by a class's qualified name, matched when such a module is first seen, so that explaind
imports without the class's package (GPT-2's ``transformers.pytorch_utils.Conv1D``, :math:`z = a W + b`
with ``W`` stored ``(in, out)``: :class:`TransposedLinearRule`). :func:`register_layer_rule` adds a
rule either way (its results are still checked against ``torch.func`` at start-up before use);
:func:`layer_rule` finds a module's rule through its class's MRO, for subclasses that redefine no
method of the registered class. A *composite* rule (a block of affine maps around a parameter-free
core, :mod:`~explaind.kernel.attention_rules`) defines ``forward`` instead of ``moved``/``at_steps``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..exceptions import ConfigError
from .layer_norm_jvp import layer_norm_dual

__all__ = ["LayerRule", "LAYER_RULES", "NAMED_LAYER_RULES", "register_layer_rule", "layer_rule", "rule_names",
           "covered_parameters", "parameter_uses", "Factors"]

#: Per call of a layer: ``(delta (O, E, R, out), layer input)``; weighted output gradients and inputs.
Factors = list[tuple[Tensor, Tensor]]


class StackedSteps(Protocol):
    """What a rule needs of the row hooks: stacked parameters and buffers, each row's step, the per-step product."""

    sidx: Tensor

    def stacked(self, prefix: str, role: str, current: Tensor | None) -> tuple[Tensor | None, Tensor | None]: ...

    def linear(self, a: Tensor, t: Tensor, W: Tensor, dW: Tensor | None, b: Tensor | None,
               db: Tensor | None) -> Tensor: ...

    def buffers(self, prefix: str, attr: str, current: Tensor) -> Tensor: ...

    def constant(self, x: Tensor) -> Tensor: ...


class LayerRule(Protocol):
    """How one layer type is evaluated from factors (see the module docstring).

    A rule may also define ``kept(module, a) -> Tensor``: what the hooks keep of the layer input for
    :meth:`reduce` (default: ``a``), computed during the forward pass, while the step's buffers are
    in the module (e.g. the input normalised with running statistics). A composite rule defines
    ``forward(module, args, kwargs, site)`` instead of :meth:`moved` and :meth:`at_steps`: it returns
    the module's output with each affine map computed by ``site(name, a, W, b, roles, part)``, and its
    :meth:`reduce` receives ``calls`` grouped by site name (``{site: Factors}``).
    """

    def roles(self, module: nn.Module) -> dict[str, str]:
        """``attribute -> role`` of the module's parameters this rule covers (empty: none)."""
        ...

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        r""":math:`z(\Delta\theta)` at input ``a`` for the moved roles in ``delta`` (``None``: nothing moves)."""
        ...

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        r"""The output at each row's step and point :math:`\theta_{s_e} + t_e\Delta\theta_{s_e}`."""
        ...

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        """Sum a role's factors over each input's entries into ``out (T_c, O, numel)``."""
        ...


def linear_moved(a: Tensor, dW: Tensor | None, db: Tensor | None, output: Tensor) -> Tensor | None:
    r"""The change :math:`\Delta W a + \Delta b` of an affine map (``dW`` as ``(out, in)``; ``None``: nothing moves)."""
    if dW is not None:
        return F.linear(a, dW, db)
    return None if db is None else db.expand_as(output)


def linear_at_steps(a: Tensor, t: Tensor, rows: StackedSteps, W: Tensor, dW: Tensor | None, b: Tensor | None,
                    db: Tensor | None) -> Tensor:
    r""":math:`(W + t_e \Delta W)_{s_e} a_e + (b + t_e \Delta b)_{s_e}` per row ``e`` of ``a (E, ..., in)``.

    ``W``, ``dW`` are stacks ``(S, out, in)`` (``S = 1``: frozen), ``b``, ``db`` stacks ``(S, out)``.
    """
    n = t.shape[0]
    z = rows.linear(a.reshape(n, -1, a.shape[-1]), t.reshape(n), W, dW, b, db)
    return z.reshape(*a.shape[:-1], z.shape[-1])


def reduce_linear(bias: bool, calls: Factors, owner: Tensor, buckets: list[tuple[Tensor, Tensor]], O: int,
                  out: Tensor, n_out: int, n_in: int, transposed: bool = False) -> None:
    r"""An affine map's Jacobian ``out (T_c, O, numel)``: :math:`\sum_r \delta_r a_r^\top`, or :math:`\sum_r \delta_r`.

    ``calls`` hold ``(delta (O, E, R, out), input (E, R, in))``; ``transposed`` lays the weight's
    Jacobian out as ``(in, out)``. Every input of ``out`` is written (zero where it has no entry).
    """
    Tc = out.shape[0]
    if bias or not calls:
        total = torch.zeros(Tc, O, n_out if bias else n_out * n_in, dtype=out.dtype, device=out.device)
        for d, _ in calls:
            total.index_add_(0, owner, d.sum(2).transpose(0, 1))
        out.copy_(total)
        return
    # per entry: G_e^T (R, O*out) and A_e (R, in); Phi_W[x] = sum_e G_e A_e as one bmm per bucket
    g_rows = [d.permute(1, 2, 0, 3).reshape(d.shape[1], -1, O * n_out) for d, _ in calls]  # (E, R, O*out)
    a_rows = [a.reshape(a.shape[0], -1, n_in) for _, a in calls]  # (E, R, in)
    whole = len(buckets) == 1 and buckets[0][0].numel() == Tc
    for inputs, entries in buckets:  # inputs with the same number of entries: no padding
        k = entries.shape[0]
        if whole:  # entries are 0..E-1 in order
            G = torch.cat([g.reshape(k, -1, O * n_out) for g in g_rows], dim=1)
            A = torch.cat([a.reshape(k, -1, n_in) for a in a_rows], dim=1)
        else:
            G = torch.cat([g[entries].reshape(k, -1, O * n_out) for g in g_rows], dim=1)
            A = torch.cat([a[entries].reshape(k, -1, n_in) for a in a_rows], dim=1)
        part = torch.bmm(G.transpose(1, 2), A).reshape(k, O, n_out, n_in)
        part = (part.transpose(2, 3) if transposed else part).reshape(k, O, n_out * n_in)
        if whole:
            out.copy_(part)
        else:  # buckets partition the inputs
            out.index_copy_(0, inputs, part)


class LinearRule:
    """``nn.Linear``: roles ``weight`` and ``bias`` (``weight`` stored ``(out, in)``).

    Subclasses set :attr:`transposed` for a weight stored ``(in, out)`` (``y = a W + b``) and
    override :meth:`dims`; everything else is shared.
    """

    #: whether the weight is stored ``(in, out)`` rather than ``(out, in)``
    transposed = False

    def dims(self, module: nn.Module) -> tuple[int, int]:
        """``(out, in)`` features of the layer."""
        return module.out_features, module.in_features

    def matrix(self, W: Tensor) -> Tensor:
        """The weight (or a stack ``(S, ...)`` of them) as ``(..., out, in)`` (a view)."""
        return W.transpose(-1, -2) if self.transposed else W

    def roles(self, module: nn.Module) -> dict[str, str]:
        out = {"weight": "weight"}
        if module.bias is not None:
            out["bias"] = "bias"
        return out

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        dw = delta.get("weight")
        return linear_moved(a, None if dw is None else self.matrix(dw), delta.get("bias"), output)

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        W, dW = rows.stacked(prefix, "weight", module.weight)
        b, db = rows.stacked(prefix, "bias", module.bias)
        return linear_at_steps(a, t, rows, self.matrix(W), None if dW is None else self.matrix(dW), b, db)

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        reduce_linear(role == "bias", calls, owner, buckets, O, out, *self.dims(module), self.transposed)


class TransposedLinearRule(LinearRule):
    """GPT-style ``Conv1D`` (``transformers.pytorch_utils.Conv1D``): :math:`z = a W + b`, ``W`` stored ``(in, out)``.

    The roles and factors are those of ``nn.Linear`` with :math:`W^\top`; the reduced Jacobian is laid
    out like the stored weight, ``(in, out)``.
    """

    transposed = True

    def dims(self, module: nn.Module) -> tuple[int, int]:
        return module.nf, module.nx


class EmbeddingRule:
    """``nn.Embedding`` without ``max_norm`` (which rewrites the table) or ``scale_grad_by_freq``: role ``table``.

    Like torch's backward, the padding row receives nothing from tokens equal to the module's
    ``padding_idx`` at the time of the forward (:meth:`kept` marks them ``-1``); the explained
    function lifts the index (:meth:`~explaind.kernel.explained.FunctionalModel.outputs`), training
    losses keep it.
    """

    @staticmethod
    def kept(module: nn.Module, a: Tensor) -> Tensor:
        """The looked-up tokens, those equal to the current ``padding_idx`` replaced by ``-1``."""
        return a if module.padding_idx is None else torch.where(a == module.padding_idx, -1, a)

    def roles(self, module: nn.Module) -> dict[str, str]:
        if module.max_norm is not None or module.scale_grad_by_freq:
            return {}
        return {"weight": "table"}

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        dw = delta.get("table")
        return None if dw is None else F.embedding(a, dw)

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        n = t.shape[0]
        table, moved = rows.stacked(prefix, "table", module.weight)
        sel = rows.sidx.reshape(n, *([1] * (a.dim() - 1)))
        sel_base = sel if table.shape[0] > 1 else torch.zeros_like(sel)
        z = rows.constant(table[sel_base, a])
        return z if moved is None else z + t * rows.constant(moved[sel, a])

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        Tc = out.shape[0]
        V, dim = module.num_embeddings, module.embedding_dim
        acc = torch.zeros(Tc * V, O, dim, dtype=out.dtype, device=out.device)
        for d, tokens in calls:
            tok = tokens.reshape(tokens.shape[0], -1).long()
            rows = (owner[:, None] * V + tok).reshape(-1)
            vals = d.permute(1, 2, 0, 3).reshape(-1, O, dim)
            keep = tok.reshape(-1) >= 0  # padding tokens (see kept)
            if not bool(keep.all()):
                rows, vals = rows[keep], vals[keep]
            acc.index_add_(0, rows, vals)
        out.copy_(acc.reshape(Tc, V, O, dim).permute(0, 2, 1, 3).reshape(Tc, O, V * dim))


class LayerNormRule:
    r"""``nn.LayerNorm`` over the last :math:`k \ge 1` axes: roles ``scale`` (weight) and ``shift`` (bias).

    Given its input, the output :math:`z = \hat a \odot w + b` is affine in the parameters, with
    :math:`\hat a` the input normalised over the trailing axes ``normalized_shape`` (recomputed from the
    kept input) and :math:`w, b` of that shape: with :math:`r` running over the leading positions,
    :math:`\partial g_o/\partial w = \sum_r \delta_{o,r} \odot \hat a_r` and
    :math:`\partial g_o/\partial b = \sum_r \delta_{o,r}`.
    """

    def roles(self, module: nn.Module) -> dict[str, str]:
        if not module.elementwise_affine:
            return {}
        out = {"weight": "scale"}
        if module.bias is not None:
            out["bias"] = "shift"
        return out

    @staticmethod
    def normalised(module: nn.Module, a: Tensor) -> Tensor:
        r""":math:`\hat a`; on a dual ``a`` (the rows' forward mode in :math:`t`) its tangent in closed form
        (:func:`~explaind.kernel.layer_norm_jvp.layer_norm_dual`)."""
        dual = layer_norm_dual(a, module.normalized_shape, None, None, module.eps)
        return F.layer_norm(a, module.normalized_shape, None, None, module.eps) if dual is None else dual

    def moved(self, module: nn.Module, a: Tensor, output: Tensor, delta: Mapping[str, Tensor]) -> Tensor | None:
        dw, db = delta.get("scale"), delta.get("shift")
        if dw is None:
            return None if db is None else db.expand_as(output)
        moved = self.normalised(module, a) * dw
        return moved if db is None else moved + db

    def at_steps(self, module: nn.Module, prefix: str, a: Tensor, t: Tensor, rows: StackedSteps) -> Tensor:
        n, trailing = t.shape[0], tuple(module.normalized_shape)
        shape = (n, *([1] * (a.dim() - 1 - len(trailing))), *trailing)

        def per_row(stack: Tensor | None) -> Tensor | None:
            if stack is None:
                return None
            return rows.constant(stack[0] if stack.shape[0] == 1 else stack.index_select(0, rows.sidx).reshape(shape))

        hat = self.normalised(module, a)
        tt = t.reshape(n, *([1] * (a.dim() - 1)))
        W, dW = rows.stacked(prefix, "scale", module.weight)
        b, db = rows.stacked(prefix, "shift", module.bias)
        z = hat * per_row(W)
        if b is not None:
            z = z + per_row(b)
        if dW is not None:
            z = z + tt * hat * per_row(dW)
        if db is not None:
            z = z + tt * per_row(db)
        return z

    def reduce(self, module: nn.Module, role: str, calls: Factors, owner: Tensor,
               buckets: list[tuple[Tensor, Tensor]], O: int, out: Tensor) -> None:
        C = out.shape[-1]  # elements of normalized_shape
        total = torch.zeros(out.shape[0], O, C, dtype=out.dtype, device=out.device)
        for d, a in calls:  # d (O, E, R, last axis)
            d = d.reshape(O, d.shape[1], -1, C)
            if role == "scale":
                hat = self.normalised(module, a).reshape(d.shape[1], -1, C)
                total.index_add_(0, owner, (d * hat).sum(2).transpose(0, 1))
            else:
                total.index_add_(0, owner, d.sum(2).transpose(0, 1))
        out.copy_(total)


#: Rules by module type; subclasses that override no method of the type use its rule too (:func:`layer_rule`).
LAYER_RULES: dict[type[nn.Module], Any] = {nn.Linear: LinearRule(), nn.Embedding: EmbeddingRule(),
                                           nn.LayerNorm: LayerNormRule()}
#: Rules by the qualified name ``"module.QualName"`` of a type explaind does not import (matched on first use).
NAMED_LAYER_RULES: dict[str, Any] = {"transformers.pytorch_utils.Conv1D": TransposedLinearRule()}
#: Methods a subclass may define and still use its base's rule: construction and initialisation only.
INHERITABLE = frozenset({"__init__", "reset_parameters", "extra_repr", "__repr__", "__setstate__"})


def type_name(layer_type: type) -> str:
    """The qualified name ``"package.module.Class"`` of a type, the key of :data:`NAMED_LAYER_RULES`."""
    return f"{layer_type.__module__}.{layer_type.__qualname__}"


def register_layer_rule(layer_type: type[nn.Module] | str, rule: Any) -> None:
    """Use ``rule`` (a :class:`LayerRule`) for modules of ``layer_type`` and its subclasses that override nothing.

    ``layer_type`` is the class, or its qualified name (``"transformers.pytorch_utils.Conv1D"``) for
    a class whose package need not be installed: the name is matched when such a module is first seen.
    A subclass that defines no method of ``layer_type`` other than those of :data:`INHERITABLE`
    (``__init__``, ``reset_parameters``, ...) uses the rule too (see :func:`layer_rule`); ``rule=None``
    takes a class off the rules (its modules and their subclasses then run on the generic path).
    A rule is either affine (``moved`` and ``at_steps``) or composite (``forward``, see
    :mod:`~explaind.kernel.attention_rules`); either way its results are checked against ``torch.func``
    before use.

    Raises
    ------
    ConfigError
        When ``layer_type`` is neither an ``nn.Module`` subclass nor a dotted name, or ``rule`` lacks a
        method of the protocol.
    """
    named = isinstance(layer_type, str)
    if named and not (layer_type.count(".") >= 1 and all(part.isidentifier() for part in layer_type.split("."))):
        raise ConfigError(f"register_layer_rule: layer_type {layer_type!r} is not a qualified class name; give the "
                          f"class or its name as 'package.module.Class'.")
    if not named and not (isinstance(layer_type, type) and issubclass(layer_type, nn.Module)):
        raise ConfigError(f"register_layer_rule: layer_type must be an nn.Module subclass or a qualified class name, "
                          f"got {layer_type!r}.")
    if rule is not None:
        shape = ("roles", "forward", "reduce") if callable(getattr(rule, "forward", None)) else \
            ("roles", "moved", "at_steps", "reduce")
        missing = [m for m in shape if not callable(getattr(rule, m, None))]
        if missing:
            label = layer_type if named else layer_type.__name__
            raise ConfigError(f"register_layer_rule: the rule for {label} lacks {', '.join(missing)}; a layer rule "
                              f"implements roles, moved, at_steps and reduce, or roles, forward and reduce (see "
                              f"LayerRule), or is None to take the class off the rules.")
    if named:
        NAMED_LAYER_RULES[layer_type] = rule
    else:
        LAYER_RULES[layer_type] = rule


def overridden(cls: type, base: type) -> list[str]:
    """Methods of ``base`` that ``cls`` (a subclass) or a class between them redefines, outside :data:`INHERITABLE`."""
    out = []
    for klass in cls.__mro__:
        if klass is base:
            break
        out += [name for name, value in vars(klass).items() if name not in INHERITABLE and hasattr(base, name)
                and (callable(value) or isinstance(value, (staticmethod, classmethod, property)))]
    return out


def layer_rule(module: nn.Module) -> Any:
    """The rule of the first class in ``type(module)``'s MRO with one (by class, else by qualified name), or ``None``.

    A subclass of a registered layer that redefines one of its methods (``forward``, ``_conv_forward``,
    ...; :func:`overridden`) gets no rule, whatever its base's: it may compute something else. A
    subclass that only adds a constructor (``nn.MultiheadAttention``'s ``out_proj``,
    ``NonDynamicallyQuantizableLinear``) computes what its base does and uses the base's rule.
    """
    cls = type(module)
    for klass in cls.__mro__:
        if klass in LAYER_RULES:
            rule = LAYER_RULES[klass]
        elif NAMED_LAYER_RULES and type_name(klass) in NAMED_LAYER_RULES:
            rule = NAMED_LAYER_RULES[type_name(klass)]
        else:
            continue
        return rule if rule is not None and not overridden(cls, klass) else None
    return None


def rule_names() -> list[str]:
    """The layer types with a rule, for messages: class names, then qualified names."""
    return sorted(t.__name__ for t, r in LAYER_RULES.items() if r is not None) + sorted(
        n for n, r in NAMED_LAYER_RULES.items() if r is not None)


def parameter_uses(module: nn.Module, names: Sequence[str]) -> dict[str, list[tuple[str, str]]]:
    """Trainable parameters that registered rules handle: ``name -> [(module prefix, role), ...]``.

    A parameter shared by several layers (a read-out tied to the token embeddings) has one use per
    layer; parameters are matched by identity, under the name ``named_parameters`` gives them.
    ``role`` is ``"weight"`` or ``"bias"`` of an ``nn.Linear`` or GPT-2 ``Conv1D``, ``"table"`` of an
    ``nn.Embedding``, ``"kernel"``/``"bias"`` of an ``nn.Conv2d``, ``"scale"``/``"shift"`` of a
    normalisation (``nn.LayerNorm`` over the last axis, ``nn.GroupNorm``, eval-mode ``nn.BatchNorm*``),
    or ``"in_weight"``, ``"in_bias"``, ``"out_weight"``, ``"out_bias"`` of an ``nn.MultiheadAttention``.
    A role's attribute may name a submodule's parameter (``"out_proj.weight"``): that submodule is the
    rule's, and gets no rule of its own.
    """
    wanted = set(names)
    by_id = {id(p): n for n, p in module.named_parameters()}
    out: dict[str, list[tuple[str, str]]] = {}
    owned: set[str] = set()  # submodules whose parameters a composite rule of an enclosing module handles
    for prefix, sub in module.named_modules():
        if prefix in owned or any(prefix.startswith(o + ".") for o in owned):
            continue
        rule = layer_rule(sub)
        if rule is None:
            continue
        for attr, role in rule.roles(sub).items():
            if "." in attr:
                owned.add(f"{prefix}.{attr.rsplit('.', 1)[0]}" if prefix else attr.rsplit(".", 1)[0])
            name = by_id.get(id(_attribute(sub, attr)))
            if name in wanted:
                out.setdefault(name, []).append((prefix, role))
    return out


def _attribute(module: nn.Module, path: str) -> Any:
    """``module.a.b`` for ``path = "a.b"`` (``None`` when absent)."""
    for part in path.split("."):
        module = getattr(module, part, None)
    return module


def covered_parameters(module: nn.Module, names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """The first use of each parameter of :func:`parameter_uses`: ``name -> (module prefix, role)``."""
    return {name: uses[0] for name, uses in parameter_uses(module, names).items()}
