"""Hugging Face gradient checkpointing switched on as users do, with dropout: exact without any user action.

``model.gradient_checkpointing_enable()`` and ``TrainingArguments(gradient_checkpointing=True)`` make every layer
call ``torch.utils.checkpoint`` in training mode and register ``enable_input_require_grads``'s forward hook on the
input embeddings (``output.requires_grad_(True)``). Before, the replica raised ``UnsupportedModelError`` telling the
user to call ``disable_input_require_grads()``; now, inside explaind's model calls only, the checkpoint runs as a
plain call and the hook's ``requires_grad_`` is inert under the ``torch.func`` transforms
(:mod:`explaind._checkpointing`); the user's model keeps its checkpointing and its hook.

Float64, every dropout 0.2 (GPT-2) or 0.1 (BERT), so each micro-batch's masks must replay through the recompute.
"Exact": replica <= 1e-6 relative to the trained model in evaluation mode, residual share <= 1e-9, ``keep=("train",)``
<= 1e-9 relative to the slow float64 loop reference that replays the recorded masks (``MappingReplayReference``)
on a copy without checkpointing, the same function: the reentrant checkpoint refuses ``torch.autograd.grad``, and
the non-reentrant one recomputes in the backward pass, after ``functional_call`` has put the module's own (final)
parameters back, so a reference through it differentiates another function (0.58 relative error measured on the
plain-loop GPT-2 run). That the training gradients, recompute included, are the replayed ones is the recorder's
gradient check (<= 1e-12 in the plain loop).
Still refused, naming the fix: a hook calling ``requires_grad_(False)`` (torch's method, refused by ``torch.func``).
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import note
from _hf_testkit import MappingReplayReference, classifier_figures, lm_data, lm_figures, tiny_gpt2, trainer_args
from test_integrations_lightning import Classifier, _fit, _items

import explaind
from explaind._checkpointing import inert_requires_grad
from explaind.exceptions import UnsupportedModelError
from explaind.integrations import ExplaindLightningCallback, ExplaindTrainerCallback, IndexedDataset

transformers = pytest.importorskip("transformers")  # in the dev extra

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:transformers"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]  # gradient_checkpointing_enable's deprecation


class PlainReplayReference(MappingReplayReference):
    """The replay reference on a training copy with checkpointing switched off (the same function)."""

    def train_copy(self) -> torch.nn.Module:
        model = copy.deepcopy(self.model).train()
        model.gradient_checkpointing_disable()
        return model


def _dropout_gpt2(p: float = 0.2):
    model = tiny_gpt2()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = p
    return model


def _embedding_output_requires_grad(model) -> bool:
    """Whether the model's input-embedding hook still marks the embeddings' output (a plain forward, no grad)."""
    emb = model.get_input_embeddings()
    with torch.no_grad():
        return emb(torch.tensor([1])).requires_grad


def _assert_figures(got: dict) -> None:
    note(replica=got["replica"], share=got["residual_share"], train=got["train"])
    assert got["replica"] <= 1e-6 and got["residual_share"] <= 1e-9 and got["train"] <= 1e-9


def _plain_loop_gpt2(reentrant: bool):
    ids, labels = lm_data(12)
    model = _dropout_gpt2()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss="causal_lm", train_data=({"input_ids": ids}, labels),
                                      check_gradients=True)
    model.train()
    gen = torch.Generator().manual_seed(0)
    with rec:
        for _ in range(3):
            idx = torch.randperm(12, generator=gen)[:4]
            opt.zero_grad()
            logits = model(input_ids=ids[idx]).logits
            F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[idx, 1:].reshape(-1)).backward()
            rec.log_batch(idx)
            opt.step()
    return model, rec.trajectory


@pytest.mark.parametrize("reentrant", [True, False])
def test_plain_loop_gpt2_with_gradient_checkpointing_and_dropout_is_exact(reentrant):
    model, traj = _plain_loop_gpt2(reentrant)
    assert traj.manifest.random_capture and max(traj.gradient_check()) <= 1e-12
    _assert_figures(lm_figures(model, traj, reference=PlainReplayReference))
    # the user's model is untouched: checkpointing on, the hook still marks the embeddings' output
    assert model.is_activation_checkpointing and len(model._require_grads_hooks) == 1
    assert _embedding_output_requires_grad(model)
    assert "requires_grad_" not in vars(torch.Tensor)


def test_trainer_gpt2_with_gradient_checkpointing_and_dropout_is_exact(tmp_path):
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))])
    model = _dropout_gpt2()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    args = trainer_args(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=2,
                        learning_rate=1e-2, weight_decay=0.01, max_grad_norm=0.5, gradient_checkpointing=True)
    transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                         compute_loss_func=callback.compute_loss).train()
    assert model.is_activation_checkpointing and model._require_grads_hooks  # the Trainer switched both on
    traj = callback.trajectory
    assert all(m.state is not None for s in range(2) for m in traj.micro_batches(s))
    assert max(traj.gradient_check()) <= 1e-7
    _assert_figures(lm_figures(model.eval(), traj, reference=PlainReplayReference))


def test_lightning_bert_with_gradient_checkpointing_and_dropout_is_exact(tmp_path):
    data = IndexedDataset(_items())
    module = Classifier(dropout=0.1)
    module.model.gradient_checkpointing_enable()
    callback = ExplaindLightningCallback(data, loss="cross_entropy", module="model", attention_mask="bidirectional",
                                         check_gradients=True)
    _fit(tmp_path, module, callback, data)
    model, traj = module.model.eval(), callback.trajectory
    assert model.is_activation_checkpointing and model._require_grads_hooks
    assert all(m.state is not None for s in range(traj.n_steps) for m in traj.micro_batches(s))
    assert max(traj.gradient_check()) <= 1e-7
    _assert_figures(classifier_figures(model, traj, reference=PlainReplayReference))


def test_a_hook_calling_requires_grad_false_is_still_refused_naming_the_fix():
    """``requires_grad_(False)`` stays torch's (refused under ``torch.func``): explaind's error names the fix."""
    model, traj = _plain_loop_gpt2(reentrant=False)

    def unmark(_module, _inputs, out):
        out.detach().requires_grad_(False)  # a no-op in training

    model.lm_head.register_forward_hook(unmark)
    with pytest.raises(UnsupportedModelError, match=r"requires_grad_\(False\).*Fix: remove that call"):
        explaind.KernelReplica(device="cpu").fit(traj).predict({"input_ids": lm_data(2, seed=9)[0]})


def test_inert_requires_grad_acts_on_its_own_thread_under_a_transform_only():
    def marks(t):
        t.requires_grad_(True)
        return t * 2

    x = torch.ones(3)
    refused = []

    def other_thread():
        try:
            torch.func.vmap(marks)(torch.ones(2, 3))
        except RuntimeError as exc:
            refused.append("inside of a function being transformed" in str(exc))

    with inert_requires_grad():
        assert torch.equal(torch.func.vmap(marks)(torch.ones(2, 3)), torch.full((2, 3), 2.0))
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        # torch.func.grad marks its own inputs with requires_grad_: that still works
        assert torch.equal(torch.func.grad(lambda v: (v * v).sum())(x), 2 * x)
        plain = torch.ones(2)  # outside a transform torch's method runs
        assert plain.requires_grad_(True).requires_grad
        with pytest.raises(RuntimeError, match="inside of a function being transformed"):
            torch.func.vmap(lambda t: t.requires_grad_(False) * 1)(torch.ones(2, 3))
    assert refused == [True]
    assert "requires_grad_" not in vars(torch.Tensor)
    with pytest.raises(RuntimeError, match="inside of a function being transformed"):
        torch.func.vmap(marks)(torch.ones(2, 3))
