"""More plain and Lightning loops a new user writes, each exact or refused naming the fix (float64, a tanh MLP).

Labels marked ``-100`` (``ignore_index``) with ``F.cross_entropy`` and with a label-smoothed loss callable; soft
(probability) targets; mixup inside the loop; a submodule frozen at the start and unfrozen halfway (its
parameters already in the optimizer, or added with ``add_param_group``); Lightning's manual optimization with
``self.clip_gradients``. "Exact" is ``_assert_exact`` of tests/test_stranger_loops.py: replica <= 1e-6 against the
trained model, residual share <= 1e-9, ``keep=("train",)`` scores <= 1e-9 against the slow loop reference.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from _framework_testkit import fit_lightning, indexed
from test_stranger_loops import BATCH, DT, STEPS, N, _assert_exact, _data, _mlp

import explaind
from explaind.exceptions import TrajectoryError
from explaind.integrations import ExplaindLightningCallback


def _train(model, opt, y, loss, batch_loss, *, log=lambda idx, y: idx, before=None, X=None, **rec_kwargs):
    """STEPS steps of BATCH random samples; ``batch_loss(out, y[idx])`` is the loop's loss, ``log`` what is logged."""
    X_train, _, X_test = _data()
    X = X_train if X is None else X
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(X, y), check_gradients=True, **rec_kwargs)
    gen = torch.Generator().manual_seed(2)
    with rec:
        for s in range(STEPS):
            if before is not None:
                before(s)
            idx = torch.randperm(len(y), generator=gen)[:BATCH]
            opt.zero_grad()
            batch_loss(model(X[idx]), y[idx]).backward()
            logged = log(idx, y)  # indices, or (indices, weights)
            rec.log_batch(*logged) if isinstance(logged, tuple) else rec.log_batch(logged)
            opt.step()
    return model.eval(), rec.trajectory, X_test


def _ignored_labels():
    _, y, _ = _data()
    y = y.clone()
    y[::4] = -100
    return y


def _smoothed(out, t):
    return F.cross_entropy(out, t, label_smoothing=0.1)


@pytest.mark.parametrize("loss", ["cross_entropy", _smoothed], ids=["registered", "smoothed-callable"])
def test_samples_labelled_ignore_index_are_refused_naming_the_fix_which_is_exact(loss):
    """Before: a raw ``index -100 is out of bounds`` RuntimeError inside the gradient check (registered loss), or
    a refusal that blamed class weights because the callable's one-sample mean over no label is NaN."""
    smoothing = 0.0 if loss == "cross_entropy" else 0.1

    def batch_loss(out, t):
        return F.cross_entropy(out, t, label_smoothing=smoothing, ignore_index=-100)

    y = _ignored_labels()
    model = _mlp()
    with pytest.raises(TrajectoryError, match=r"logged with label -100 \(ignore_index\).*Fix: log only the counted "
                                              r"samples, keep = y\[idx\] != -100; rec.log_batch\(idx\[keep\]\)"):
        _train(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), y, loss, batch_loss)
    model = _mlp()
    _assert_exact(*_train(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), y, loss, batch_loss,
                          log=lambda idx, y: idx[y[idx] != -100]))


def test_weights_zero_at_the_ignored_samples_are_not_refused():
    """The other route the message names: weights 0 where the label is -100, a callable finite there."""
    y = _ignored_labels()

    def counted_mean(out, t):  # 0 for a sample without a counted label, the mean over the counted ones otherwise
        return F.cross_entropy(out, t, ignore_index=-100, reduction="sum") / (t != -100).sum().clamp_min(1)

    model = _mlp()
    _assert_exact(*_train(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), y, counted_mean,
                          lambda out, t: F.cross_entropy(out, t, ignore_index=-100),
                          log=lambda idx, y: (idx, (y[idx] != -100).to(DT) / (y[idx] != -100).sum())))


def _soft_targets():
    return torch.softmax(3 * torch.randn(N, 3, generator=torch.Generator().manual_seed(5), dtype=DT), -1)


@pytest.mark.parametrize("loss", ["cross_entropy", "callable"])
def test_soft_targets_are_exact(loss):
    def soft_cross_entropy(out, t):
        return -(t * torch.log_softmax(out, -1)).sum(-1).mean()

    model = _mlp()
    _assert_exact(*_train(model, torch.optim.Adam(model.parameters(), lr=0.02), _soft_targets(),
                          soft_cross_entropy if loss == "callable" else loss, soft_cross_entropy))


def _mix(X, y, idx, lam=0.7):
    """Mixup of the batch with itself reversed: ``lam x_i + (1 - lam) x_j`` and the same mix of one-hot targets."""
    hot = F.one_hot(y, 3).to(DT)
    return lam * X[idx] + (1 - lam) * X[idx.flip(0)], lam * hot[idx] + (1 - lam) * hot[idx.flip(0)]


def test_mixup_inside_the_loop_is_refused_naming_it_and_mixup_built_beforehand_is_exact():
    X, y, X_test = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    with pytest.raises(TrajectoryError, match=r"inputs mixed or augmented inside the loop, as mixup or CutMix do.*"
                                              r"build them before recording"), rec:
        idx = torch.arange(BATCH)
        x_mix, t_mix = _mix(X, y, idx)
        opt.zero_grad()
        F.cross_entropy(model(x_mix), t_mix).backward()
        rec.log_batch(idx)
        opt.step()
    batches = torch.randperm(N, generator=torch.Generator().manual_seed(2)).reshape(-1, 5)  # 6 batches of 5
    mixed = [_mix(X, y, idx) for idx in batches]
    X_mix, t_mix = torch.cat([m[0] for m in mixed]), torch.cat([m[1] for m in mixed])
    model = _mlp()
    _assert_exact(*_train(model, torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9), t_mix, "cross_entropy",
                          F.cross_entropy, X=X_mix))


def _unfreeze_at_2(model, opt, add_group: bool):
    def before(s):
        if s == 2:
            model[0].requires_grad_(True)
            if add_group:
                opt.add_param_group({"params": list(model[0].parameters()), "lr": 0.01})
    return before


@pytest.mark.parametrize("add_group", [False, True], ids=["in-optimizer", "add_param_group"])
def test_a_submodule_unfrozen_halfway_is_refused_naming_record_frozen_which_is_exact(add_group):
    for record_frozen in (False, True):
        model = _mlp()
        model[0].requires_grad_(False)
        opt = (torch.optim.Adam(model[2].parameters(), lr=0.02) if add_group
               else torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9))
        args = (model, opt, _data()[1], "cross_entropy", F.cross_entropy)
        if not record_frozen:
            with pytest.raises(TrajectoryError, match=r"Step 2: optimizer.step\(\) would update 0.weight, 0.bias.*"
                                                      r"Fix: create the recorder with record_frozen=True"):
                _train(*args, before=_unfreeze_at_2(model, opt, add_group))
        else:
            model, traj, X_test = _train(*args, before=_unfreeze_at_2(model, opt, add_group), record_frozen=True)
            assert float((traj.params(2)["0.weight"] - traj.params(0)["0.weight"]).abs().max()) == 0
            assert float((traj.params(STEPS)["0.weight"] - traj.params(2)["0.weight"]).abs().max()) > 0
            _assert_exact(model, traj, X_test)


class _ManualClipping(pl.LightningModule):
    """Manual optimization with ``self.clip_gradients``; records itself when given ``train_data``."""

    def __init__(self, net, train_data=None):
        super().__init__()
        self.model = net
        self.automatic_optimization = False
        self.train_data, self.rec = train_data, None

    def on_train_start(self):
        if self.train_data is not None:
            self.rec = explaind.TrajectoryRecorder(self.model, self.optimizers().optimizer, loss="cross_entropy",
                                                   train_data=self.train_data, check_gradients=True)
            self.rec.__enter__()

    def on_train_end(self):
        if self.rec is not None:
            self.rec.__exit__(None, None, None)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(F.cross_entropy(self.model(batch["x"]), batch["labels"]))
        self.clip_gradients(opt, gradient_clip_val=0.3, gradient_clip_algorithm="norm")
        if self.rec is not None:
            self.rec.log_batch(batch["explaind_index"])
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.3, momentum=0.9)


def test_lightning_manual_optimization_with_clip_gradients_is_exact_by_the_callback_and_by_a_hand_recorder(
        tmp_path):
    X, y, X_test = _data()
    train = indexed(X, y)
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")
    by_callback = _ManualClipping(_mlp())
    fit_lightning(tmp_path, by_callback, callback, train, max_steps=STEPS, batch=BATCH, accumulate=1)
    assert all(float(callback.trajectory.grad_scale(s)) < 1 for s in range(STEPS))  # clipped every step
    _assert_exact(by_callback.model, callback.trajectory, X_test)
    module = _ManualClipping(_mlp(), train_data=(X, y))
    loader = torch.utils.data.DataLoader(train, batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, loader)
    traj = module.rec.trajectory
    assert traj.n_steps == STEPS and all(float(traj.grad_scale(s)) < 1 for s in range(STEPS))  # clipped every step
    _assert_exact(module.model, traj, X_test)
