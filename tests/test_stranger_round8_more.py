"""Eighth round of models, layers and losses nobody tuned for (tests/_round8_cases.py): every loud case.

Loud, each naming cause and fix, with what landed in this round (each test failed before it):

* ``nn.LazyLinear`` with the optimizer and the recorder built before the first forward: an
  ``UnsupportedModelError`` at the recorder naming the uninitialised parameters and the dry-run fix (before: torch's
  raw ``ValueError: Attempted to use an uninitialized parameter`` from inside the recorder);
* ``nn.CrossMapLRN2d``: refused at the recorder naming the module, its legacy ``autograd.Function`` without ``jvp``
  and ``nn.LocalResponseNorm`` (before: recorded, then torch's raw ``NotImplementedError: You must implement the jvp
  function`` when explaining); a custom Function without ``jvp`` gets a refusal naming it when explaining;
* jumps computed in ``forward`` that the quadrature warnings blamed on "a ReLU-dense path" and a smaller tol:
  ``torch.remainder`` (a sawtooth), ``F.hardshrink`` as a function, an integer cast ``h.long()`` used to index an
  embedding, and a route chosen by the indices of ``torch.max(probs, dim)``; they are now named with their module;
* a RealNVP flow at SGD 0.5 whose mixing matrix turns singular along every step (``torch.slogdet`` is -inf there):
  the quadrature warnings name ``torch.slogdet`` and the fix instead of float32 casts;
* pruning again between steps: the failed gradient check no longer names prune's own ``weight`` attribute as a
  VAE-style loss term, and the moved-buffer message names the prune mask and the fix (prune before recording);
* ``nll_loss(ignore_index=255)`` over 4-D segmentation logits with a different count of ignored pixels per image: the
  loss check now names the counted positions and the exact fix, ``weights = n / n.sum()`` (before: class weights and
  ``reduction='sum'`` only).

Refused as before, naming the cause: a deep-equilibrium layer iterated until converged (``bool(tensor)`` in an
``if``), ``nn.Embedding(sparse=True)`` with plain SGD, a loss module owning a learned temperature, a Dice loss over
the whole batch and ``CrossEntropyLoss(weight=..., label_smoothing=0.1)``; with the gradient check off the residual
share warns.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from _round5_kit import N_TRAIN, QUAD, XV, YV, fit, head
from _round8_cases import CASES
from _round8_kit import assert_exact, figures, jump_sites
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(("case", "error", "match"), [
    ("lazy_linear_before_the_first_forward", UnsupportedModelError,
     r"TrajectoryRecorder: the model holds uninitialised parameters or buffers \['a\.weight \(LazyLinear\)'.*"
     r"Fix: run one forward on a batch before building the optimizer and the recorder"),
    ("cross_map_lrn2d", UnsupportedModelError,
     r"nn\.CrossMapLRN2d modules \['lrn \(size=3.*no forward-mode derivative.*Fix: nn\.LocalResponseNorm"),
    ("prune_again_between_steps", TrajectoryError,
     r"\['a\.weight_mask'\] look like torch\.nn\.utils\.prune masks.*prune before recording"),
    ("segmentation_nll_ignore_index_counts_differ", TrajectoryError,
     r"counted positions of several per sample \(pixels or tokens with ignore_index\).*weights = n / n\.sum\(\)"),
    # refused as before
    ("deq_fixed_point_until_converged", UnsupportedModelError, r"bool\(tensor\) in an if"),
    ("sparse_embedding_sgd", UnsupportedModelError, r"\['emb'\] have sparse=True.*Fix: build them with sparse=False"),
    ("loss_module_with_a_learned_temperature", TrajectoryError, r"not parameters of the model"),
    ("dice_over_the_batch", TrajectoryError, r"terms coupling samples"),
    ("label_smoothing_class_weights", TrajectoryError, r"class-weighted cross entropy.*w\[y\] / w\[y\]\.sum\(\)"),
])
def test_refused_naming_the_cause_and_the_fix(case, error, match):
    with pytest.raises(error, match=match):
        CASES[case]()


def test_prune_weight_is_not_named_as_a_loss_term_kept_on_the_model():
    with pytest.raises(TrajectoryError) as caught:
        CASES["prune_again_between_steps"]()
    assert "keeps tensors its forward computes" not in str(caught.value)


@pytest.mark.parametrize(("case", "site"), [
    ("remainder_sawtooth", r"<root> \(Sawtooth\): torch\.remainder"),
    ("functional_hardshrink", r"<root> \(FunctionalHardshrink\): torch\.hardshrink"),
    ("integer_cast_bucket_embedding", r"<root> \(BucketEmbedding\): Tensor\.long"),
    ("max_indices_router", r"<root> \(MaxIndexRouter\): torch\.max"),
    ("max_indices_router_switching", r"<root> \(MaxIndexRouter\): torch\.max"),
])
def test_jumps_computed_in_forward_are_named(case, site):
    """The replica misses the trained model (the jump is no integral of the gradient; the split is exact), and the
    quadrature warnings name the call instead of a ReLU-dense path."""
    got = CASES[case]()
    assert got["replica"] > 1e-3 and got["share"] <= 1e-9, got
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature and all(re.search(r"pairs above tol=1e-11, with relative error up to [0-9.e+-]+: the model's "
                                        r"forward applies calls whose output can jump .*" + site, w)
                              for w in quadrature), got["warnings"]
    assert not any("Use a smaller tol" in w for w in got["warnings"]), got["warnings"]
    assert not any("ReLU-dense" in w for w in got["warnings"]), got["warnings"]


def test_a_flow_whose_matrix_turns_singular_names_slogdet_not_float32():
    got = CASES["realnvp_flow_slogdet_nll"]()
    quadrature = [w for w in got["warnings"] if "adaptive quadrature left" in w]
    assert quadrature, got
    assert all("<root> (RealNVP): torch.slogdet" in w and "turns singular" in w and "invertible" in w
               for w in quadrature), quadrature
    assert not any("float32" in w for w in quadrature), quadrature


class _Indexed(nn.Module):
    def __init__(self, use_indices: bool):
        super().__init__()
        self.a, self.use_indices = nn.Linear(4, 3), use_indices

    def forward(self, x):
        values, indices = torch.max(self.a(x), dim=-1)
        return self.a(x).gather(-1, indices[:, None]) if self.use_indices else values[:, None]


def test_max_values_alone_are_no_jump_their_indices_are():
    torch.manual_seed(0)
    x = torch.randn(1, 4)
    assert jump_sites(_Indexed(False), x) == ()
    assert jump_sites(_Indexed(True), x) == ("<root> (_Indexed): torch.max",)


class _Casts(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return (h.to(torch.float64) + h.to(torch.int64) + F.threshold(h, 0.1, 0.1) + F.hardshrink(h, 0.0) + h % 1.0
                + F.threshold(h, 0.2, -1.0))


def test_float_casts_and_continuous_threshold_or_hardshrink_are_no_jump_a_jumping_threshold_is():
    torch.manual_seed(0)
    sites = jump_sites(_Casts(), torch.randn(1, 4))
    assert sites in [("<root> (_Casts): Tensor.to", f"<root> (_Casts): Tensor.{mod}",
                      "<root> (_Casts): torch.nn.functional._threshold") for mod in ("__mod__", "remainder")], sites


class _Cube(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 3 * x ** 2 * g


class _CubeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(_Cube.apply(torch.tanh(self.a(x))))


def test_a_custom_function_without_jvp_is_refused_naming_it():
    model, traj = fit(_CubeModel, XV, YV)
    with pytest.raises(UnsupportedModelError, match=r"custom torch\.autograd\.Function without a jvp staticmethod.*"
                                                    r"Fix: give the Function a jvp"):
        explaind.KernelReplica(**QUAD).fit(traj).predict(XV[N_TRAIN:])


@pytest.mark.parametrize(("case", "share"), [
    ("prune_again_between_steps_check_off", 0.03), ("segmentation_nll_ignore_index_counts_differ_check_off", 0.04),
    ("dice_over_the_batch_check_off", 0.01), ("label_smoothing_class_weights_check_off", 0.4),
])
def test_with_the_check_off_the_residual_share_warns(case, share):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExplaindWarning)
        got = CASES[case]()
    assert got["share"] > share and any("residual share" in w for w in got["warnings"]), got




class _Tempered(nn.Module):
    """The fix the refusal names: the model and the learned temperature in one module, logits ``h(x) / exp(log_t)``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.log_t = inner, nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return self.inner(x) / self.log_t.exp()


def test_a_learned_temperature_in_the_loss_is_refused_naming_the_loss_module_and_the_wrapper_fix():
    with pytest.raises(TrajectoryError) as caught:
        CASES["loss_module_with_a_learned_temperature"]()
    assert re.search(r"The loss module TemperatureCE owns \['log_t'\].*Fix: move it into the model \(a wrapper "
                     r"module holding the model and 'log_t'.*F\.cross_entropy", str(caught.value)), caught.value


def test_the_learned_temperature_moved_into_the_model_is_exact():
    """The refusal's fix: the temperature is recorded and explained; replica, share and train scores exact."""
    model, traj = fit(lambda: _Tempered(head()), XV, YV, opt=lambda m: torch.optim.SGD(m.parameters(), lr=0.5))
    assert "log_t" in traj.param_names
    assert_exact(figures(model, traj, XV[N_TRAIN:]))
