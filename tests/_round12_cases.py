"""Cases of the twelfth round (tests/test_stranger_round12.py, tests/test_stranger_round12_more.py,
tests/stranger_round12_table.py).

Every case trains as tests/_round5_kit.py does (float64, SGD 0.5 unless the case names another optimizer or rate, 3
steps of 4 of 12 samples, 2 held-out inputs) and is measured by tests/_round6_kit.py's :func:`figures`.
:data:`CASES` maps each case's name to a function that trains it and returns its figures, or raises the error a user
sees. The models are in tests/_round12_models.py; ``model_case`` is the seventh round's.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
from _round5_kit import N_TRAIN, XS, XV, YS, YV, KinkReference, fit
from _round7_cases import model_case
from _round7_kit import figures
from _round10_cases import optim
from _round10_models import relu_mlp
from _round12_models import (
    ENV_SCALE,
    AliasedParam,
    BatchOfOne,
    BufferViewOfParam,
    CallCounter,
    ClampAtBound,
    DefaultDtype,
    DeterministicBranch,
    DtypeBranch,
    EnvScale,
    FunctionalInForward,
    HalfCast,
    InplaceOnParams,
    KeyCache,
    LazyMask,
    LogOfSoftmax,
    LruCachedMask,
    LruCachedWeight,
    MemoPositions,
    NoGradFunction,
    NormAtZero,
    OnceDifferentiable,
    OrthoFFT,
    RepeatedGather,
    RequiresGradToggle,
    TransposedParam,
    deep_narrow,
    deep_narrow_leaky,
    wide_shallow,
)


def deterministic_algorithms(run: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """``run`` with ``torch.use_deterministic_algorithms(True)`` for training and explaining, then as it was."""
    def wrapped() -> dict[str, Any]:
        before = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            return run()
        finally:
            torch.use_deterministic_algorithms(before)
    return wrapped


def environment_variable(changed_before_explaining: bool) -> Callable[[], dict[str, Any]]:
    """:class:`EnvScale` trained with the variable at ``"1.5"``; explained with it unchanged or (``changed``) at
    ``"1"``; removed afterwards."""
    def run() -> dict[str, Any]:
        os.environ[ENV_SCALE] = "1.5"
        try:
            model, traj = fit(EnvScale, XV, YV)
            if changed_before_explaining:
                os.environ[ENV_SCALE] = "1"
            return figures(model, traj, XV[N_TRAIN:])
        finally:
            os.environ.pop(ENV_SCALE, None)
    return run


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    # caches kept between forwards
    "positional_table_memoised_by_length": model_case(MemoPositions, XS, YS),
    "lru_cache_constant_mixing_matrix": model_case(LruCachedMask, XV, YV),
    "lru_cache_parameter_derived_weight": model_case(LruCachedWeight, XV, YV),
    "causal_mask_built_at_first_forward": model_case(LazyMask, XS, YS),
    "key_cache_kept_in_an_attribute": model_case(KeyCache, XV, YV),
    # global state
    "module_level_call_counter": model_case(CallCounter, XV, YV),
    "module_level_call_counter_check_off": model_case(CallCounter, XV, YV, check_gradients=False),
    "default_dtype_cast_in_forward": model_case(DefaultDtype, XV, YV),
    "environment_variable_read_in_forward": environment_variable(False),
    "environment_variable_changed_before_explaining": environment_variable(True),
    "deterministic_algorithms_branch": deterministic_algorithms(model_case(DeterministicBranch, XV, YV)),
    # branches on the input
    "branch_on_batch_of_one": model_case(BatchOfOne, XV, YV),
    "branch_on_input_dtype": model_case(DtypeBranch, XV, YV),
    # in-place edits, singular points
    "inplace_mul_index_put_masked_fill_on_params": model_case(InplaceOnParams, XV, YV),
    "index_put_masked_fill_out_of_place_fix": model_case(lambda: InplaceOnParams(True), XV, YV),
    "relu_units_over_their_norm_at_zero": model_case(NormAtZero, XV, YV),
    "relu_units_normalize_eps_fix": model_case(lambda: NormAtZero(True), XV, YV),
    "log_of_softmax_underflow": model_case(LogOfSoftmax, XV, YV, loss="nll"),
    "log_softmax_stable_fix": model_case(lambda: LogOfSoftmax(True), XV, YV, loss="nll", panels=96),
    "clamp_of_a_parameter_at_its_bound": model_case(ClampAtBound, XV, YV, reference=KinkReference),
    # custom functions and parameters held unusually
    "autograd_function_once_differentiable": model_case(OnceDifferentiable, XV, YV),
    "no_grad_inside_custom_function_forward": model_case(NoGradFunction, XV, YV),
    "functional_call_with_dict_built_in_forward": model_case(FunctionalInForward, XV, YV),
    "requires_grad_toggled_in_forward": model_case(RequiresGradToggle, XV, YV),
    "buffer_that_is_a_view_of_a_parameter": model_case(BufferViewOfParam, XV, YV),
    "non_contiguous_transposed_parameters": model_case(TransposedParam, XV, YV),
    "parameter_registered_under_two_names": model_case(AliasedParam, XV, YV),
    # transforms, gathers, casts
    "rfft_irfft_ortho_real_inputs": model_case(OrthoFFT, XS, YS),
    "gather_index_add_repeated_indices": model_case(RepeatedGather, XV, YV),
    "float16_cast_inside_float64_model": model_case(HalfCast, XV, YV),
    # depth, width and untuned rates
    "deep_narrow_tanh_50x4": model_case(deep_narrow, XV, YV),
    "deep_narrow_leaky_relu_50x4": model_case(deep_narrow_leaky, XV, YV),
    "wide_shallow_relu_1024_adam_0_1": model_case(wide_shallow, XV, YV, opt=optim("Adam", 0.1)),
    "relu_mlp5_sgd_5": model_case(relu_mlp, XV, YV, opt=optim("SGD", 5.0)),
    "relu_mlp5_adam_0_3": model_case(relu_mlp, XV, YV, opt=optim("Adam", 0.3)),
}
