"""Tiny Hugging Face models built from configs (no downloads), their data, and a loop reference for mapping inputs.

``MappingReference`` reuses the slow float64 reference of ``reference.py`` (unrolled recurrence,
per-sample gradients one ``autograd.grad`` each, Gauss–Legendre path integrals) for models called as
``model(**inputs)`` that return a ``ModelOutput``; the token loss it uses is a plain loop over positions
(``loop_token_loss``), independent of the registered loss under test.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from reference import Reference, rel_err
from torch import Tensor
from torch.func import functional_call
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

import explaind
from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

VOCAB, LENGTH, N_TRAIN = 30, 8, 24


def trainer_args(tmp_path, **settings) -> TrainingArguments:
    """``TrainingArguments`` of a short CPU run that writes nothing: no checkpoints, logs, reports or bars;
    ``settings`` give the run's own values (batch, steps, learning rate, schedule, clipping) and overrides."""
    quiet = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                 seed=0, optim="adamw_torch", disable_tqdm=True, dataloader_num_workers=0)
    return TrainingArguments(**{**quiet, **settings})


def run_args(tmp_path, **overrides) -> TrainingArguments:
    """``trainer_args`` of the recorded Trainer runs: micro-batches of 4, two accumulated per step, 4 steps, AdamW
    at 1e-2 with weight decay 0.01, a linear schedule after one warm-up step, clipping at 0.5; ``overrides``."""
    return trainer_args(tmp_path, **{**dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
                                          learning_rate=1e-2, lr_scheduler_type="linear", warmup_steps=1,
                                          weight_decay=0.01, max_grad_norm=0.5), **overrides})


def record_trainer_gpt2(tmp_path) -> tuple[GPT2LMHeadModel, explaind.Trajectory]:
    """``tiny_gpt2`` trained by the Trainer (``run_args``) on ``lm_data`` with the ``causal_lm`` loss, recorded."""
    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(N_TRAIN)])
    model = tiny_gpt2()
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    trainer = Trainer(model=model, args=run_args(tmp_path), train_dataset=data, callbacks=[callback],
                      compute_loss_func=callback.compute_loss)
    trainer.train()
    return model.eval(), callback.trajectory


def record_trainer_bert(tmp_path) -> tuple[BertForSequenceClassification, explaind.Trajectory]:
    """The BERT classifier trained by the Trainer on the model's own loss, stored and loaded back."""
    ids, mask, y = cls_data()
    data = IndexedDataset([{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i]} for i in range(N_TRAIN)])
    model = tiny_bert()
    callback = ExplaindTrainerCallback(data, loss="cross_entropy", attention_mask="bidirectional",
                                       check_gradients=True, store=tmp_path / "run")
    Trainer(model=model, args=run_args(tmp_path, max_steps=3), train_dataset=data, callbacks=[callback]).train()
    return model.eval(), explaind.Trajectory.load(tmp_path / "run", model=tiny_bert().eval())  # 4-D masks stored


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """One layer, 16-wide, 2 heads, SDPA attention, every dropout 0, float64."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    cfg._attn_implementation = "sdpa"
    return GPT2LMHeadModel(cfg).double()


def tiny_bert(seed: int = 0, n_labels: int = 3, dropout: float = 0.0) -> BertForSequenceClassification:
    """One layer, 16-wide, 2 heads, SDPA attention, every dropout ``dropout`` (default 0), float64."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=LENGTH, hidden_dropout_prob=dropout,
                     attention_probs_dropout_prob=dropout, num_labels=n_labels)
    cfg._attn_implementation = "sdpa"
    return BertForSequenceClassification(cfg).double()


def lm_data(n: int = N_TRAIN, seed: int = 1) -> tuple[Tensor, Tensor]:
    """Right-padded token ids ``(n, LENGTH)`` (pad id 0) and labels with ``-100`` at the padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    pad = torch.arange(LENGTH)[None, :] >= lengths[:, None]
    return ids.masked_fill(pad, 0), ids.masked_fill(pad, -100)


def cls_data(n: int = N_TRAIN, seed: int = 2, n_labels: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids ``(n, LENGTH)`` padded with 0, their 2-D attention mask, and class labels ``(n,)``."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=gen)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=gen) * mask
    return ids, mask, torch.randint(0, n_labels, (n,), generator=gen)


def mask_4d(mask: Tensor) -> Tensor:
    """``(n, 1, L, L)``: query i may attend key j where ``mask[j]`` (written here, independently of explaind)."""
    n, L = mask.shape
    return torch.stack([mask[k].bool().repeat(L, 1) for k in range(n)])[:, None]


def loop_token_loss(logits: Tensor, labels: Tensor, shift: bool) -> Tensor:
    """Per-sample mean token cross-entropy over the labels that are not -100, one position at a time."""
    out = []
    for k in range(logits.shape[0]):
        terms = []
        for j in range(labels.shape[1] - (1 if shift else 0)):
            label = int(labels[k, j + 1] if shift else labels[k, j])
            if label != -100:
                terms.append(-torch.log_softmax(logits[k, j], dim=-1)[label])
        out.append(torch.stack(terms).mean() if terms else logits.sum() * 0)
    return torch.stack(out)


def _row(X: dict, i: int) -> dict:
    """Row ``i`` of every tensor of ``X`` (a batch of one); other entries (flags) as they are."""
    return {k: v[i : i + 1] if isinstance(v, Tensor) else v for k, v in X.items()}


def _logits(out) -> Tensor:
    """``out.logits``, or ``out`` itself for a model that returns a tensor."""
    return out if isinstance(out, Tensor) else out.logits


class MappingReference(Reference):
    """The loop reference of ``reference.py`` for ``model(**inputs).logits`` (or a returned tensor) with mapping
    inputs."""

    def __init__(self, traj, X: dict[str, Tensor], *, loss_fn=None, **kwargs):
        self.inputs = X
        self._loss = loss_fn
        n = next(v for v in X.values() if isinstance(v, Tensor)).shape[0]
        super().__init__(traj, torch.zeros(n), **kwargs)
        if loss_fn is not None:
            self.loss_fn = loss_fn

    def _logits(self, vec: Tensor, x: dict[str, Tensor]) -> Tensor:
        return _logits(functional_call(self.model, {**self.constants, **self._unflat(vec)}, (), x))

    def forward(self, vec: Tensor, xi: int) -> Tensor:
        return self._logits(vec, _row(self.inputs, xi))[0].reshape(-1)

    def explained(self, vec: Tensor, xi: int) -> Tensor:
        out = self._logits(vec, _row(self.inputs, xi))
        if isinstance(self.target, str):
            return self._loss(out, self.y[xi : xi + 1]).reshape(1)
        flat = out.reshape(-1)
        return flat if self.target is None else flat[int(self.target[xi])].reshape(1)

    def _compute_gradients(self) -> None:
        loss_fn = self._loss or self.traj.loss.implementation
        self.G = torch.zeros(self.N, self.K, self.D, dtype=torch.float64)
        for i in range(self.N):
            idx, w = self.traj.batch(i)
            Xb, yb = self.traj.train_samples(idx)
            th = self.theta[i].clone().requires_grad_(True)
            for j in range(len(idx)):
                out = self._logits(th, _row(Xb.data, j))
                (g,) = torch.autograd.grad(loss_fn(out, yb[j : j + 1]).sum(), th)
                self.G[i, int(idx[j])] += self.coef[i]["scale"] * float(w[j]) * g


class MappingReplayReference(MappingReference):
    """``MappingReference`` with per-sample gradients through each micro-batch's replayed training forward.

    For every step and micro-batch (a plain loop): set the recorded CPU generator state with
    ``torch.set_rng_state``, run a training-mode copy of the model once on the micro-batch's mapping, and take
    each sample's own loss gradient with ``torch.autograd.grad`` one sample at a time (the dropout masks the loop
    drew; docs/maths.md, "Dropout and batch norm"). A micro-batch recorded without a random state runs in
    evaluation mode. The explained outputs are those of ``traj.model`` as it is (evaluation mode in the tests).
    """

    def _compute_gradients(self) -> None:
        loss_fn = self._loss or self.traj.loss.implementation
        train_model = self.train_copy()
        self.G = torch.zeros(self.N, self.K, self.D, dtype=torch.float64)
        for i in range(self.N):
            th = self.theta[i].clone().requires_grad_(True)
            params = {**self.constants, **self._unflat(th)}
            for micro in self.traj.micro_batches(i):
                Xb, yb = self.traj.train_samples(micro.indices)
                before = torch.get_rng_state()
                if micro.state is not None:
                    torch.set_rng_state(micro.state.cpu)
                module = train_model if micro.state is not None else self.model
                out = _logits(functional_call(module, params, (), dict(Xb.data)))
                torch.set_rng_state(before)
                losses = loss_fn(out, yb).reshape(-1)
                for j in range(len(micro.indices)):
                    (g,) = torch.autograd.grad(losses[j], th, retain_graph=True)
                    self.G[i, int(micro.indices[j])] += self.coef[i]["scale"] * float(micro.weights[j]) * g

    def train_copy(self) -> torch.nn.Module:
        """The training-mode copy of the model that replays the micro-batches."""
        return copy.deepcopy(self.model).train()


def lm_figures(model, traj, n_test: int = 3, reference=MappingReplayReference) -> dict[str, float]:
    """A recorded causal LM on ``n_test`` held-out sequences of ``lm_data``: replica, residual share, train scores.

    ``replica``: relative error of the replica's logits against ``model`` in evaluation mode; ``residual_share``
    and ``train`` (``keep=("train",)`` relative to ``MappingReplayReference``, which replays the recorded dropout
    masks, or ``reference``) of the next-token loss (``target="loss"``, the per-sequence mean of ``loop_token_loss``).
    """
    ids, labels = lm_data(n_test, seed=9)
    X = {"input_ids": ids}
    with torch.no_grad():
        truth = model.eval()(**X).logits.reshape(n_test, -1)
    replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X)
    att = explaind.InfluenceEstimator(keep=("train",), target="loss", tol=1e-11, device="cpu").fit(traj).transform(
        X, labels)
    ref = reference(traj, X, target="loss", y=labels,
                    loss_fn=lambda out, y: loop_token_loss(out, y, shift=True))
    return {"replica": rel_err(replica, truth), "residual_share": att.meta["residual_share"],
            "train": rel_err(att.values, ref.kept(("train",)))}


def classifier_figures(model, traj, loss_fn=None, reference=MappingReplayReference) -> dict[str, float]:
    """A recorded BERT classifier on 3 held-out inputs (4-D mask): replica, residual share, train scores.

    ``replica``: relative error against ``model`` in evaluation mode with its 2-D mask; ``residual_share``;
    ``train``: ``keep=("train",)`` relative to the slow loop reference, whose per-sample loss is ``loss_fn``
    (default: cross entropy), through each micro-batch's replayed training forward (``reference``).
    """
    ids, mask, _ = cls_data(3, seed=7)
    X = {"input_ids": ids, "attention_mask": mask_4d(mask)}
    with torch.no_grad():
        truth = model.eval()(input_ids=ids, attention_mask=mask).logits
    replica = explaind.KernelReplica(device="cpu").fit(traj).predict(X)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X)
    ref = reference(traj, X,
                    loss_fn=loss_fn or (lambda out, t: F.cross_entropy(out, t, reduction="none")))
    return {"replica": rel_err(replica, truth), "residual_share": att.meta["residual_share"],
            "train": rel_err(att.values, ref.kept(("train",)))}


def assert_classifier_exact(model, traj, loss_fn=None, max_share: float = 1e-9) -> None:
    """``classifier_figures`` within the bounds: replica <= 1e-6, residual share <= ``max_share``, train <= 1e-9."""
    got = classifier_figures(model, traj, loss_fn)
    assert got["replica"] <= 1e-6 and got["residual_share"] <= max_share and got["train"] <= 1e-9
