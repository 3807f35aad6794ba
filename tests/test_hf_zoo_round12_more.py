"""Hugging Face architectures, round 12, part 2: SigLIP trained contrastively in a plain loop on its pairwise sigmoid
loss declared with ``explaind.batch_coupled_loss``, vision and text encoders (FocalNet, PVTv2, DINOv2 with registers,
RoFormer), M2M100, and the ``Trainer`` with a batch-coupled loss (CLIP's symmetric InfoNCE) recorded through
``ExplaindTrainerCallback`` with ``explaind.batch_coupled_loss(terms)``, with and without gradient accumulation.

The plain-loop cases are tests/_zoo12_cases.py's, trained and checked by tests/_zoo9_kit.py (replica <= 1e-6,
residual share <= 1e-9, train scores <= 1e-9 against its slow float64 loop reference). SigLIP's image and text
towers return their embeddings with ``logit_scale`` and ``logit_bias`` as two more columns, and the reference takes
each image's term, a loop over the batch's texts, by its own ``autograd.grad``. RoFormer as built (with a
``pad_token_id``) is refused for Hugging Face's padding check; the refusal's fix, ``pad_token_id=None``, is exact.

The model is tests/_batch_coupled_kit.py's two towers with dropout (captured), float64, trained by the Trainer
(Adam 0.05, constant rate, no clipping) on 12 (image, text) pairs; the loss reaches the Trainer in the three ways a
user writes it: ``compute_loss_func=callback.compute_loss``, a ``compute_loss_func`` of the user's own (the
InfoNCE mean of the micro-batch, or its terms summed over ``num_items_in_batch``), or a ``compute_loss`` override.
Each run is held to: replica <= 1e-6 against the trained model in evaluation mode, residual share <= 1e-9 and
``keep=("train",)`` scores <= 1e-9 against the mapping loop reference of tests/_hf_testkit.py given the terms as
written in the kit (one batched training forward per micro-batch under the recorded random state, one
``autograd.grad`` per term).

What this round found: every route is exact with micro-batches of equal size; a ``compute_loss_func`` of the user's
own that returns the micro-batch's mean (the Trainer then adds the micro-batches' means up) is exact with the
factor measured as the loss scale. One that divides the terms by ``num_items_in_batch`` over micro-batches of
unequal size (an epoch's last batch) is refused at step 0 by the gradient check, which named only the batch
coupling and the loop's ``log_batch`` calls; the callback cannot see ``num_items_in_batch`` there and the message
now names that cause and the fix (``compute_loss_func=callback.compute_loss``), which the test shows exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from _batch_coupled_kit import DT, QUAD, N, TwoTowers, clip_batch_loss, clip_terms, gen
from reference import rel_err

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError, UnsupportedModelError

transformers = pytest.importorskip("transformers")  # in the dev extra
from _hf_testkit import MappingReplayReference, trainer_args  # noqa: E402
from _zoo9_kit import assert_exact as assert_zoo_exact  # noqa: E402
from _zoo9_kit import run  # noqa: E402
from _zoo12_cases import CASES  # noqa: E402

from explaind.integrations import ExplaindTrainerCallback, IndexedDataset  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]


class Towers(TwoTowers):
    """The two towers called as the Trainer calls a model, ``model(x=..., labels=...)`` (labels unused)."""

    def forward(self, x, labels=None):
        return super().forward(x)


def _user_mean(out, labels, num_items_in_batch=None):
    return clip_batch_loss(out, labels)


def _user_by_items(out, labels, num_items_in_batch=None):
    return clip_terms(out, labels).sum() / num_items_in_batch


class OverrideTrainer(transformers.Trainer):
    """A ``compute_loss`` override returning the micro-batch's InfoNCE mean (the Trainer divides it by the
    accumulation)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs)
        loss = clip_batch_loss(out, labels)
        return (loss, out) if return_outputs else loss


def train(tmp_path, route: str, accumulation: int, batch: int = 3):
    """The Trainer run of ``route`` (``"callback"``, ``"user_mean"``, ``"user_by_items"``, ``"override"``);
    returns the model (evaluation mode), the trajectory and the held-out pairs."""
    X = torch.randn(N + 3, 10, generator=gen(11), dtype=DT)
    data = IndexedDataset([{"x": X[i], "labels": torch.zeros((), dtype=DT)} for i in range(N)])
    model = Towers("dropout")
    callback = ExplaindTrainerCallback(data, loss=explaind.batch_coupled_loss(clip_terms), check_gradients=True,
                                       capture_random=True)
    args = trainer_args(tmp_path, per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                        max_steps=3 if batch == 3 else 2, learning_rate=0.05, lr_scheduler_type="constant",
                        weight_decay=0.0, max_grad_norm=0.0)
    loss_func = {"callback": callback.compute_loss, "user_mean": _user_mean, "user_by_items": _user_by_items}
    trainer_cls = OverrideTrainer if route == "override" else transformers.Trainer
    kw = {"compute_loss_func": loss_func[route]} if route in loss_func else {}
    trainer_cls(model=model, args=args, train_dataset=data, callbacks=[callback], **kw).train()
    return model.eval(), callback.trajectory, X[N:]


def figures(model, traj, X_test) -> dict:
    with torch.no_grad():
        truth = model(X_test).numpy()
    test = {"x": X_test}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(np.asarray(explaind.KernelReplica(**QUAD).fit(traj).predict(test)), truth)
        att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(test)
    expected = MappingReplayReference(traj, test, loss_fn=clip_terms).kept(("train",))
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "train": rel_err(np.asarray(att.values).reshape(expected.shape), expected),
            "scales": [traj.grad_scale(s) for s in range(traj.n_steps)],
            "micro_batches": [len(traj.micro_batches(s)) for s in range(traj.n_steps)],
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


def assert_exact(got: dict) -> None:
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and got["train"] <= 1e-9, got
    assert not got["warnings"], got


@pytest.mark.parametrize("route", ["callback", "user_by_items", "override"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_with_clip_infonce_is_exact_by_every_route(tmp_path, route, accumulation):
    got = figures(*train(tmp_path, route, accumulation))
    assert got["micro_batches"] == [accumulation] * 3 and got["scales"] == pytest.approx([1.0] * 3, rel=1e-12), got
    assert_exact(got)


def test_a_users_loss_func_returning_each_micro_batchs_mean_is_exact_with_the_factor_measured(tmp_path):
    """With ``compute_loss_func`` the Trainer does not divide by the accumulation: the step trains on the sum of
    the two micro-batches' means, which the gradient check measures as the loss scale 2."""
    got = figures(*train(tmp_path, "user_mean", 2))
    assert got["scales"] == pytest.approx([2.0] * 3, rel=1e-12), got
    assert_exact(got)


def test_unequal_micro_batches_normalised_by_num_items_are_refused_naming_the_callbacks_loss_func(tmp_path):
    """Batches of 5 over 12 pairs with accumulation 3: one step of micro-batches [5, 5, 2] per epoch. A user's
    ``compute_loss_func`` dividing by ``num_items_in_batch`` weights every pair 1/12, the callback (which does not
    see that count) 1/15 and 1/6: refused at step 0. Before, the message named only the batch coupling and the
    loop's ``log_batch`` calls."""
    with pytest.raises(TrajectoryError, match=r"Step 0: .*compute_loss_func= of your own that divides by "
                                              r"num_items_in_batch.*Fix: compute_loss_func=callback.compute_loss"):
        train(tmp_path, "user_by_items", 3, batch=5)


@pytest.mark.parametrize("route", ["callback", "user_mean", "override"])
def test_unequal_micro_batches_are_exact_by_the_routes_the_callback_sees(tmp_path, route):
    """The fix the refusal names (``compute_loss_func=callback.compute_loss``, weights ``1/num_items_in_batch``),
    a user's mean per micro-batch (factor 3 measured) and the override (divided by the accumulation)."""
    got = figures(*train(tmp_path, route, 3, batch=5))
    assert got["micro_batches"] == [3, 3], got
    assert got["scales"] == pytest.approx([3.0 if route == "user_mean" else 1.0] * 2, rel=1e-12), got
    assert_exact(got)


# ---------------------------------------------------------------- plain loops
@pytest.mark.parametrize("name", ["siglip_sigmoid_pairs", "focalnet", "pvt_v2", "dinov2_registers",
                                  "roformer_pad_token_none", "m2m100"])
def test_plain_loop_cases_are_exact(name):
    assert_zoo_exact(run(CASES[name]))


def test_roformer_with_a_pad_token_is_refused_naming_the_fix_that_holds():
    with pytest.raises(UnsupportedModelError, match=r"warn_if_padding_and_no_attention_mask.*pad_token_id=None"):
        run(CASES["roformer"], reference=False)
