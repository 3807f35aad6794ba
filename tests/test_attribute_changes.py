"""Python attributes, submodules, modes and hooks changed between steps: refused at record time when the forward
reads them (explaind/trajectory/_attributes.py, _attribute_check.py).

docs/recording.md, "Python attributes changed between steps", describes it.

Before the fix every "refused" case below recorded without a word: the engine replays every step with the final
model's attributes, so the run was silently inexact (at best the residual share warned, after the fact). The
"harmless" cases (changes the forward does not read, torch's and the frameworks' own bookkeeping) must record
without an error or a warning, and stay exact.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
N, STEPS = 24, 4


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(N, 4, generator=gen, dtype=DT), torch.randint(0, 3, (N,), generator=gen)


class Model(nn.Module):
    """``Linear(4, 8)``, an activation, ``Linear(8, 8)``, dropout, ``Linear(8, 3)``; the forward reads plain
    attributes: a temperature, a top-k, a flag, a mode, scales in a list and a tuple, a function."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        torch.manual_seed(0)
        self.l1, self.act, self.hidden, self.drop, self.l2 = (nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8),
                                                              nn.Dropout(p), nn.Linear(8, 3))
        self.tau, self.k, self.use_mask, self.mode = 1.0, 8, False, "tanh"
        self.scales, self.shift, self.squash = [1.0, 1.0], (0.0,), torch.tanh
        self.epoch, self.phase = 0, "warm-up"  # read by nothing: bookkeeping

    def forward(self, x):
        h = self.act(self.l1(x)) * self.scales[0]
        keep = h.topk(self.k, dim=1).values[:, -1:]
        h = h * (h >= keep)
        if self.use_mask:
            h = h.clamp(min=0)
        h = self.squash(self.hidden(h)) if self.mode == "tanh" else torch.sigmoid(self.hidden(h))
        return (self.l2(self.drop(h)) * self.scales[1] + self.shift[0]) / self.tau


def record(model: nn.Module, after=None, *, between=None, **recorder) -> explaind.TrajectoryRecorder:
    """``STEPS`` SGD steps of 6 samples; ``after(model, s)`` runs after step ``s`` inside ``with rec:``,
    ``between(model, s)`` after its ``optimizer.step()`` too (both may change the model)."""
    X, y = data()
    model = model.to(DT).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder.setdefault("train_data", (X, y))
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", **recorder)
    with rec:
        for s in range(STEPS):
            idx = torch.arange(6 * s, 6 * s + 6) % N
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if after is not None and s < STEPS - 1:
                after(model, s)
            if between is not None:
                between(model, s)
    return rec


def set_to(name: str, value) -> callable:
    return lambda m, s: setattr(m, name, value)


REFUSED = {
    "float temperature": (set_to("tau", 1.5), r"tau \(Model\): 1\.0 -> 1\.5"),
    "numpy float temperature": (set_to("tau", np.float64(1.5)), r"tau \(Model\): 1\.0 -> (np\.float64\()?1\.5"),
    "int k of a top-k": (set_to("k", 4), r"k \(Model\): 8 -> 4"),
    "bool flag": (set_to("use_mask", True), r"use_mask \(Model\): False -> True"),
    "string mode": (set_to("mode", "sigmoid"), r"mode \(Model\): 'tanh' -> 'sigmoid'"),
    "scale in a list, edited in place": (lambda m, s: m.scales.__setitem__(1, 2.0),
                                         r"scales \(Model\): \[1\.0, 1\.0\] -> \[1\.0, 2\.0\]"),
    "scale in a tuple": (set_to("shift", (0.5,)), r"shift \(Model\): \(0\.0,\) -> \(0\.5,\)"),
    "function swapped": (set_to("squash", torch.sin), r"squash \(Model\): <built-in method tanh"),
    "module swapped for another": (lambda m, s: setattr(m, "act", nn.ReLU()),
                                   r"_modules \(Model\): children \{l1: Linear, act: Tanh.* -> \{l1: Linear, act: "
                                   r"ReLU"),
    "Identity in place of a layer": (lambda m, s: setattr(m, "act", nn.Identity()),  # a Linear's: its parameters
                                     r"_modules \(Model\): .*act: Tanh.* -> .*act: Identity"),  # leave the model
    "forward hook added": (lambda m, s: m.l2.register_forward_hook(lambda mod, i, o: 2 * o) if s == 0 else None,
                           r"l2\._forward_hooks \(Linear\): 0 -> 1 hook\(s\)"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_change_the_forward_reads_is_refused_at_the_next_step_naming_it_its_values_and_the_fix(case):
    change, named = REFUSED[case]
    with pytest.raises(TrajectoryError, match=named) as caught:
        record(Model(), change)
    text = str(caught.value)
    assert text.startswith("Step 1:") and "between steps 0 and 1" in text, text
    assert "register_buffer" in text and "ignore_attributes" in text, text


class Halved(nn.Module):
    """Halves its input in training mode only: a mode no random-state capture watches."""

    def forward(self, x):
        return 0.5 * x if self.training else x


def test_a_submodule_put_in_evaluation_mode_is_refused_when_its_forward_reads_the_mode():
    """``model.act.eval()`` on a module whose forward reads ``self.training`` (recorded with capture_random=True, which
    replays training forwards in training mode; dropout and batch norm in another mode than the model are refused by
    the random-state capture already)."""
    model = Model()
    model.act = nn.Sequential(nn.Tanh(), Halved())
    with pytest.raises(TrajectoryError, match=r"act\.1\.training \(Halved\): same mode as the model -> other mode"):
        record(model, lambda m, s: m.act.eval(), capture_random=True)
    model = Model()
    model.act = nn.Sequential(nn.Tanh(), Halved())
    model.act[0].eval()  # Tanh reads no mode: accepted
    assert record_quietly(model, lambda m, s: m.act[0].train(), capture_random=True).n_steps == STEPS


def test_a_dropout_rate_set_by_a_schedule_is_refused():
    with pytest.raises(TrajectoryError, match=r"drop\.p \(Dropout\): 0\.3 -> 0\.2"):
        record(Model(p=0.3), set_to_p(0.2))


def set_to_p(p: float) -> callable:
    return lambda m, s: setattr(m.drop, "p", p)


def replica_error(model: nn.Module, rec: explaind.TrajectoryRecorder) -> float:
    X, _ = data()
    with torch.no_grad():
        truth = model.eval()(X)
    got = torch.as_tensor(explaind.KernelReplica(device="cpu", tol=1e-10).fit(rec.trajectory).predict(X))
    return float((got - truth).abs().max() / truth.abs().max())


def record_quietly(model: nn.Module, after=None, **kw) -> explaind.TrajectoryRecorder:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        return record(model, after, **kw)


def test_bookkeeping_the_forward_does_not_read_records_silently_and_exactly():
    """An epoch counter and a phase string changed at every step, a whole-model validation pass between steps and
    a forward hook that only reads the outputs: no error, no warning, and the replica is exact."""
    seen = []

    def after(m, s):
        m.epoch, m.phase = s + 1, "main"
        m.eval()
        with torch.no_grad():
            m(data()[0][:3])
        m.train()
        if s == 0:
            m.l2.register_forward_hook(lambda mod, i, o: seen.append(o.shape))

    model = Model()
    rec = record_quietly(model, after)
    assert rec.n_steps == STEPS and seen
    assert replica_error(model, rec) <= 1e-8


def test_a_parametrized_layer_with_cached_parametrizations_and_a_lazy_layer_raise_nothing():
    """torch's own state: a parametrization (its cache used in one step's forward) and a LazyLinear materialised
    before recording."""
    class Symmetric(nn.Module):
        def forward(self, w):
            return w.triu() + w.triu(1).T

    model = Model()
    torch.nn.utils.parametrize.register_parametrization(model.hidden, "weight", Symmetric())
    model.l1 = nn.LazyLinear(8)
    model.to(DT)(data()[0][:2])

    def after(m, s):
        with torch.nn.utils.parametrize.cached(), torch.no_grad():
            m(data()[0][:2])

    rec = record_quietly(model, after)
    assert rec.n_steps == STEPS


def test_ignore_attributes_lets_a_deliberate_change_through_and_a_bare_string_is_refused():
    assert record_quietly(Model(), set_to("tau", 1.5), ignore_attributes=["ta?"]).n_steps == STEPS
    assert record_quietly(Model(), set_to("k", 4), ignore_attributes=["*"]).n_steps == STEPS
    with pytest.raises(ConfigError, match=r"ignore_attributes='tau'.*wrap a single name in a list"):
        record(Model(), ignore_attributes="tau")


def test_without_train_data_a_change_is_warned_about_once_naming_it():
    def after(m, s):
        m.tau = 1.0 + s

    with pytest.warns(ExplaindWarning, match=r"tau \(Model\): 0\.0|tau \(Model\): 1\.0 -> 2\.0") as caught:
        record(Model(), after, train_data=None, check_gradients=False)
    named = [w for w in caught if "tau (Model)" in str(w.message)]
    assert len(named) == 1 and "cannot test" in str(named[0].message), [str(w.message) for w in caught]


def test_a_change_after_the_last_step_inside_the_recorder_is_warned_about_when_the_forward_reads_it():
    def last(m, s):
        if s == STEPS - 1:
            m.tau = 3.0

    with pytest.warns(ExplaindWarning, match=r"After the last recorded step \(3\) the model's tau \(Model\): "
                                             r"1\.0 -> 3\.0"):
        record(Model(), between=last)
    assert record_quietly(Model(), between=lambda m, s: setattr(m, "epoch", s)).n_steps == STEPS


# ----------------------------------------------------------------- Hugging Face models, Lightning, the Trainer
def hf_record(model: nn.Module, X: dict, y: torch.Tensor, loss: str, batch_loss,
              after=None) -> explaind.TrajectoryRecorder:
    """``STEPS`` AdamW steps of 4 samples of a Hugging Face model in a plain loop; ``after(model, s)`` between."""
    model = model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y))
    with rec:
        for s in range(STEPS):
            idx = torch.arange(4 * s, 4 * s + 4)
            opt.zero_grad()
            batch_loss(model(**{k: v[idx] for k, v in X.items()}).logits, y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if after is not None and s < STEPS - 1:
                after(model, s)
    return rec


def gpt2_run(after=None) -> explaind.TrajectoryRecorder:
    from _hf_testkit import lm_data, tiny_gpt2

    ids, labels = lm_data()
    return hf_record(tiny_gpt2(), {"input_ids": ids}, labels, "causal_lm",
                     lambda out, t: F.cross_entropy(out[:, :-1].reshape(-1, out.shape[-1]), t[:, 1:].reshape(-1),
                                                    ignore_index=-100), after)


def bert_run(after=None) -> explaind.TrajectoryRecorder:
    from _hf_testkit import cls_data, mask_4d, tiny_bert

    ids, mask, y = cls_data()
    return hf_record(tiny_bert(), {"input_ids": ids, "attention_mask": mask_4d(mask)}, y, "cross_entropy",
                     F.cross_entropy, after)


def test_gpt2_and_bert_from_config_record_without_a_false_alarm():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        assert gpt2_run().n_steps == STEPS and bert_run().n_steps == STEPS


def test_gpt2_and_bert_attribute_changes_the_forward_reads_are_refused():
    with pytest.raises(TrajectoryError, match=r"transformer\.h\.0\.attn\.resid_dropout\.p \(Dropout\): 0\.0 -> 0\.5"):
        gpt2_run(lambda m, s: setattr(m.transformer.h[0].attn.resid_dropout, "p", 0.5))
    with pytest.raises(TrajectoryError, match=r"bert\.encoder\.layer\.0\.output\._forward_hooks"):
        bert_run(lambda m, s: m.bert.encoder.layer[0].output.register_forward_hook(lambda mod, i, o: o * 0.9))


def lightning_fit(tmp_path, change: bool) -> tuple[object, callable]:
    """A LightningModule recorded whole (its forward takes ``x``) by ExplaindLightningCallback, with ``self.log``, a
    validation loop every 2 steps and hyperparameters saved; ``change``: its temperature raised after every
    batch. Returns the callback and the call that trains."""
    import lightning.pytorch as pl

    from explaind.integrations import ExplaindLightningCallback, IndexedDataset

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.save_hyperparameters()
            self.net, self.tau = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)), 1.0

        def forward(self, x):
            return self.net(x) / self.tau

        def training_step(self, batch, i):
            loss = F.cross_entropy(self(batch["x"]), batch["labels"])
            self.log("loss", loss)
            return loss

        def on_train_batch_end(self, *args):
            if change:
                self.tau += 0.5

        def validation_step(self, batch, i):
            self.log("val", F.cross_entropy(self(batch["x"]), batch["labels"]))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    X, y = data()
    items = [{"x": X[i], "labels": y[i]} for i in range(N)]
    indexed = IndexedDataset(items)
    callback = ExplaindLightningCallback(indexed, loss="cross_entropy", check_gradients=True)
    torch.manual_seed(0)
    trainer = pl.Trainer(max_steps=STEPS, precision="64-true", accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[callback], val_check_interval=2, check_val_every_n_epoch=None,
                         default_root_dir=str(tmp_path))
    loader = torch.utils.data.DataLoader(indexed, batch_size=4, shuffle=True)
    return callback, lambda: trainer.fit(Net().double(), loader, torch.utils.data.DataLoader(items[:8], batch_size=4))


def trainer_fit(tmp_path, change: bool) -> tuple[object, callable]:
    """GPT-2 under the Hugging Face Trainer with evaluation every 2 steps, on the callback's float64 loss (GPT-2's
    own loss calls ``logits.float()``, which the recorder warns about); ``change``: a TrainerCallback raises the
    embedding dropout's rate after every step."""
    from _hf_testkit import lm_data, tiny_gpt2, trainer_args
    from transformers import Trainer, TrainerCallback

    from explaind.integrations import ExplaindTrainerCallback, IndexedDataset

    class Schedule(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if change:
                model.transformer.drop.p = 0.1 * state.global_step

    ids, labels = lm_data()
    data = IndexedDataset([{"input_ids": ids[i], "labels": labels[i]} for i in range(len(ids))])
    callback = ExplaindTrainerCallback(data, loss="causal_lm", check_gradients=True)
    args = trainer_args(tmp_path, max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
                        eval_strategy="steps", eval_steps=2)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=data, eval_dataset=data,
                      callbacks=[callback, Schedule()], compute_loss_func=callback.compute_loss)
    return callback, trainer.train


FRAMEWORKS = {"lightning": (lightning_fit, "tau (Net): 1.0 -> 1.5"),
              "trainer": (trainer_fit, "transformer.drop.p (Dropout): 0.0 -> 0.1")}


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_a_framework_run_records_without_a_false_alarm_from_its_plumbing(tmp_path, framework):
    callback, fit = FRAMEWORKS[framework][0](tmp_path, change=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        fit()
    assert callback.trajectory.n_steps == STEPS


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_a_change_made_by_a_framework_hook_is_refused_through_the_framework(tmp_path, framework):
    build, named = FRAMEWORKS[framework]
    with pytest.raises(TrajectoryError) as caught:
        build(tmp_path, change=True)[1]()
    assert named in str(caught.value), caught.value


def test_a_change_after_a_skipped_step_is_refused_at_the_next_step():
    """A step with a forward but no logged batch and no gradient is skipped (a ``training_step`` returning None);
    the next step's values are those of its own first forward, so a change made after the skipped one is refused at
    that step (step 1), not one step late."""
    X, y = data()
    model = Model().to(DT).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with pytest.raises(TrajectoryError, match=r"^Step 1: .* tau \(Model\): 1\.0 -> 1\.5"), rec:
        for s in range(STEPS):
            idx = torch.arange(6 * s, 6 * s + 6) % N
            opt.zero_grad(set_to_none=True)
            if s == 1:  # skipped: a forward, then step() without backward or log_batch
                model(X[idx])
                opt.step()
                model.tau = 1.5
                continue
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
