"""Losses whose per-sample terms read the whole batch, declared with ``explaind.batch_coupled_loss``: split exactly by
loss term (tests/_batch_coupled_kit.py). Every case is held against the trained model in evaluation mode (replica
<= 1e-6 relative), the residual share (<= 1e-9) and the slow float64 loop reference of per-term gradients (train
scores <= 1e-9 relative). The checks at recording refuse a declaration that is not the loss the optimizer saw, and
R-drop's two calls of the model between two ``log_batch`` calls is refused at the step it happens.
"""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _batch_coupled_kit import (
    CASES,
    DT,
    QUAD,
    TAU,
    N,
    Run,
    ScaledTowers,
    TwoTowers,
    clip,
    clip_batch_loss,
    clip_terms,
    figures,
    gen,
    optimizer,
    random_batches,
    record,
    reference,
)
from torch import nn

import explaind
from explaind.exceptions import ConfigError, TrajectoryError
from explaind.records import LossRecord


def assert_exact(got: dict) -> None:
    assert got["replica"] <= 1e-6 and got["share"] <= 1e-9 and not got["warnings"], got
    assert got["scores"] <= 1e-9 and got["reference_residual"] <= 1e-10, got


@pytest.mark.parametrize("name", sorted(CASES))
def test_split_by_loss_term_is_exact(name):
    """Replica, residual share and train scores of every case (InfoNCE, NT-Xent, SupCon, batch-hard triplets,
    REINFORCE's batch baseline, ListNet; dropout captured, batch norm, two micro-batches per step; SGD-momentum and
    Adam) at rounding level."""
    assert_exact(figures(CASES[name]()))


def _clip_data():
    X = torch.randn(N + 3, 10, generator=gen(11), dtype=DT)
    return X, torch.zeros(N, dtype=DT)


@pytest.mark.parametrize("checkpoint_every", [1, 2])
def test_a_stored_run_keeps_its_micro_batches_and_refuses_a_per_sample_loss(checkpoint_every):
    """Dense and sparse stores of two micro-batches per step: loaded with the declared loss, exact; with the loop's
    batch loss as a plain callable, refused naming the fix."""
    X, y = _clip_data()
    with tempfile.TemporaryDirectory() as root:
        model = TwoTowers()
        record(model, "sgd", X[:N], y, clip_terms, random_batches(6, 1, 2), store=f"{root}/run",
               checkpoint_every=checkpoint_every)
        traj = explaind.Trajectory.load(f"{root}/run", model=model, train_data=(X[:N], y),
                                        loss=explaind.batch_coupled_loss(clip_terms))
        assert [len(traj.micro_batches(s)) for s in range(traj.n_steps)] == [2, 2, 2]
        assert_exact(figures(Run(model, traj, X[N:], clip_terms)))
        with pytest.raises(TrajectoryError, match=r"recorded with the batch-coupled loss 'custom:coupled:clip_terms'"
                                                  r".*Fix: Trajectory.load\(path, loss=explaind.batch_coupled_loss"):
            explaind.Trajectory.load(f"{root}/run", model=model, train_data=(X[:N], y), loss=clip_batch_loss)


@pytest.mark.parametrize(("opt", "norm", "parts", "h"), [("sgd", None, 1, 1e-5), ("sgd", "dropout", 1, 1e-5),
                                                    ("sgd", "batchnorm", 2, 1e-5), ("adam", "dropout", 2, 1e-6)])
def test_counterfactual_metagradients_match_retraining(opt, norm, parts, h):
    """CounterfactualEstimator on the coupled loss against central differences of retraining with sample k's term
    weighted (1 +- h) in every batch, the same masks drawn (<= 1e-6 relative; Adam's differences converge as h^2
    and need the smaller step)."""
    X, y = _clip_data()

    def retrain(k: int, eps: float) -> np.ndarray:
        model = TwoTowers(norm)
        optim = optimizer(model, opt)
        model.train()
        torch.manual_seed(7)  # as record() before its loop: the same dropout masks
        for micro in random_batches(6, 1, parts):
            optim.zero_grad()
            for idx in micro:
                w = (1 + eps * (idx == k).to(DT)) / sum(len(m) for m in micro)
                (w * clip_terms(model(X[idx]), y[idx])).sum().backward()
            optim.step()
        with torch.no_grad():
            return model.eval()(X[N:]).numpy()

    run = clip(opt, norm, parts=parts)
    tau = np.asarray(explaind.CounterfactualEstimator(device="cpu").fit(run.traj).transform(run.X_test).values)
    fd = np.stack([(retrain(k, h) - retrain(k, -h)) / (2 * h) for k in range(N)], 1)
    assert np.abs(fd).max() > 1e-2
    assert np.abs(tau - fd).max() / np.abs(fd).max() <= 1e-6


def test_terms_of_the_wrong_shape_are_refused():
    """A terms callable that returns the mean: refused at the first logged micro-batch naming the shape and fix."""
    with pytest.raises(ConfigError, match=r"batch-coupled loss 'clip_batch_loss' returned \(\) for a micro-batch of "
                                          r"6 samples.*shape \(6,\).*reduction='none'"):
        _record_clip(explaind.batch_coupled_loss(clip_batch_loss))


def _record_clip(loss, loop_terms=clip_terms, batches=None, **kw):
    X, y = _clip_data()
    return record(TwoTowers(), "sgd", X[:N], y, loop_terms, batches or random_batches(6, 1), loss=loss, **kw)


def test_a_batch_loss_that_is_not_the_weighted_sum_of_the_terms_is_refused_at_step_0():
    """``batch_loss`` given: the terms' weighted sum is compared with it on the first micro-batch (a sum of the
    terms declared against a mean)."""
    summed = explaind.batch_coupled_loss(clip_terms, batch_loss=lambda out, y: clip_terms(out, y).sum())
    with pytest.raises(TrajectoryError, match=r"Step 0: Loss 'custom:coupled:clip_terms': on the first logged "
                                              r"micro-batch its batch_loss \(a LossRecord's reference\) gives .* "
                                              r"times its terms sum to .*Fix"):
        _record_clip(summed)
    _record_clip(explaind.batch_coupled_loss(clip_terms, batch_loss=clip_batch_loss))  # the same loss: recorded


def test_the_gradient_check_refuses_terms_other_than_the_optimised_loss():
    """The loop optimises InfoNCE at temperature 0.2; the declared terms are at 0.5: the gradient check refuses."""
    def hotter(out, y):
        a, b = F.normalize(out[:, :4], dim=1), F.normalize(out[:, 4:], dim=1)
        logits, labels = a @ b.T / 0.2, torch.arange(len(out))
        return (F.cross_entropy(logits, labels, reduction="none")
                + F.cross_entropy(logits.T, labels, reduction="none")) / 2

    assert TAU != 0.2
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*is "
                                              r"batch-coupled: its terms were recomputed on each logged micro-batch "
                                              r"as a whole \(sizes \[6\]\).*the same temperature"):
        _record_clip(explaind.batch_coupled_loss(clip_terms), loop_terms=hotter)


def test_one_infonce_over_two_logged_micro_batches_is_refused():
    """The loop takes InfoNCE over the whole step but logs it as two micro-batches: the terms per logged
    micro-batch are not the optimised loss, and the gradient check says so at step 0."""
    X, y = _clip_data()
    model = TwoTowers()
    opt = optimizer(model, "sgd")
    rec = explaind.TrajectoryRecorder(model, opt, loss=explaind.batch_coupled_loss(clip_terms), train_data=(X[:N], y))
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*\(sizes "
                                              r"\[3, 3\]\).*a loss over the whole step logged as several"), rec:
        for (idx,) in random_batches(6, 1):
            opt.zero_grad()
            clip_terms(model(X[idx]), y[idx]).mean().backward()
            rec.log_batch(idx[:3])
            rec.log_batch(idx[3:])
            opt.step()


def test_a_plain_callable_coupling_the_batch_is_refused_naming_batch_coupled_loss():
    """The refusal of the per-sample check now names the declaration that splits it exactly."""
    X, y = _clip_data()
    with pytest.raises(TrajectoryError, match=r"Step 0: .*loss=explaind.batch_coupled_loss\(terms\).*exactly"):
        _record_clip(clip_batch_loss)


class Dropped(nn.Module):
    """A dropout network ``(n, 5) -> (n, 3)``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(6)
        self.net = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).to(DT)

    def forward(self, x):
        return self.net(x)


def _rdrop(**kw):
    g = gen(15)
    X, y = torch.randn(N, 5, generator=g, dtype=DT), torch.arange(N) % 3
    model = Dropped()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), capture_random=True, **kw)
    with rec:
        for (idx,) in random_batches(6, 5):
            opt.zero_grad()
            a, b = model(X[idx]), model(X[idx])  # R-drop's two passes as two calls of the model
            kl = F.kl_div(a.log_softmax(1), b.log_softmax(1), log_target=True, reduction="batchmean")
            (F.cross_entropy(a, y[idx]) + F.cross_entropy(b, y[idx]) + kl).backward()
            rec.log_batch(idx)
            opt.step()
    return rec


def test_rdrop_as_two_calls_of_the_model_is_refused_at_record_time():
    """Refused at log_batch of step 0 (before: recorded, refused only by the train axis's replay), naming R-drop
    and the fix; with check_gradients=False a warning, and the replica stays exact."""
    with pytest.raises(TrajectoryError, match=r"Step 0: the micro-batch logged now saw 2 training forwards.*R-drop.*"
                                              r"Fix: take both passes inside one forward"):
        _rdrop()
    with pytest.warns(explaind.exceptions.ExplaindWarning, match=r"Step \d: .*R-drop"):
        rec = _rdrop(check_gradients=False)
    assert rec.n_steps == 3
    X = torch.randn(3, 5, generator=gen(16), dtype=DT)
    with torch.no_grad():
        truth = rec.model.eval()(X)
    replica = explaind.KernelReplica(device="cpu").fit(rec.trajectory).predict(X)
    assert np.abs(np.asarray(replica) - truth.numpy()).max() / np.abs(truth.numpy()).max() <= 1e-6



@pytest.mark.parametrize("estimator", ["InfluenceEstimator", "CounterfactualEstimator"])
def test_the_loss_of_a_test_input_alone_is_refused_as_target(estimator):
    """target='loss' with a batch-coupled loss: the term of a batch of one is no term of a batch; refused naming the
    outputs as the fix."""
    run = clip("sgd")
    est = getattr(explaind, estimator)(target="loss", device="cpu").fit(run.traj)
    with pytest.raises(ConfigError, match=r"target='loss' explains the loss of each test input alone, but the "
                                          r"training loss is batch-coupled.*Fix: explain the outputs"):
        est.transform(run.X_test, torch.zeros(3, dtype=DT))


@pytest.mark.parametrize(("keep", "momentum"), [(("train",), "forward"), (("train",), "reverse"),
                                                (("step", "train"), "auto"), (("train", "group"), "auto")])
def test_other_kept_axes_and_momentum_sweeps_split_by_loss_term(keep, momentum):
    """Two micro-batches per step under Adam with dropout captured: the train axis with the forward and the reverse
    momentum sweep, and beside the steps or the parameter groups, equal the loop reference's atoms (<= 1e-9)."""
    run = clip("adam", "dropout", parts=2, capture_random=True)
    run.model.eval()  # the reference's test features are the model's evaluation-mode outputs
    att = explaind.InfluenceEstimator(keep=keep, momentum=momentum, chunk_size=2, **QUAD).fit(run.traj).transform(
        run.X_test)
    expected = reference(run).kept(keep)
    got = np.asarray(att.values.detach()).reshape(expected.shape)
    assert np.abs(got - expected).max() / np.abs(expected).max() <= 1e-9
    assert att.meta["residual_share"] <= 1e-9


def test_a_loss_record_flagged_batch_coupled_is_split_by_term():
    """The flag on the loss registration: a LossRecord(batch_coupled=True) given as loss= records and explains as
    explaind.batch_coupled_loss does, and a store reloads with it under its own name."""
    record_ = LossRecord(name="clip_infonce", implementation=clip_terms, description="CLIP's InfoNCE terms.",
                         reference=clip_batch_loss, batch_coupled=True)
    X, y = _clip_data()
    with tempfile.TemporaryDirectory() as root:
        model = TwoTowers()
        record(model, "adam", X[:N], y, clip_terms, random_batches(6, 1, 2), loss=record_, store=f"{root}/run")
        traj = explaind.Trajectory.load(f"{root}/run", model=model, train_data=(X[:N], y), loss=record_)
        assert traj.manifest.loss == "clip_infonce"
        assert_exact(figures(Run(model, traj, X[N:], clip_terms)))
    summed = LossRecord(name="clip_infonce", implementation=clip_terms, description="CLIP's InfoNCE terms.",
                        reference=lambda out, y: clip_terms(out, y).sum(), batch_coupled=True)
    with pytest.raises(TrajectoryError, match=r"Step 0: Loss 'clip_infonce': on the first logged micro-batch its "
                                              r"batch_loss \(a LossRecord's reference\) gives"):
        _record_clip(summed)


def test_lightning_with_accumulation_and_dropout_records_each_micro_batchs_terms(tmp_path):
    """ExplaindLightningCallback with the declared loss, accumulation 2 (each micro-batch's own InfoNCE), dropout
    captured, Adam: replica <= 1e-6, residual share <= 1e-9 and train scores <= 1e-9 against the mapping loop
    reference of tests/_hf_testkit.py given the terms as written here."""
    import lightning.pytorch as pl
    from _hf_testkit import MappingReplayReference
    from reference import rel_err

    from explaind.integrations import ExplaindLightningCallback, IndexedDataset

    class Clip(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = TwoTowers("dropout")

        def training_step(self, batch, batch_idx):
            return clip_terms(self.model(batch["x"]), batch["labels"]).mean()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.05)

    X, _ = _clip_data()
    data = IndexedDataset([{"x": X[i], "labels": torch.zeros((), dtype=DT)} for i in range(N)])
    module = Clip()
    callback = ExplaindLightningCallback(data, loss=explaind.batch_coupled_loss(clip_terms), module="model",
                                         check_gradients=True)
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True, generator=torch.Generator().manual_seed(2))
    pl.Trainer(max_steps=3, accumulate_grad_batches=2, precision="64-true", accelerator="cpu", devices=1,
               logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback], default_root_dir=str(tmp_path)).fit(module, loader)
    traj, model, X_test = callback.trajectory, module.model.eval(), {"x": X[N:]}
    assert [len(traj.micro_batches(s)) for s in range(traj.n_steps)] == [2, 2, 2]
    with torch.no_grad():
        truth = model(X[N:]).numpy()
    assert rel_err(np.asarray(explaind.KernelReplica(**QUAD).fit(traj).predict(X_test)), truth) <= 1e-6
    att = explaind.InfluenceEstimator(keep=("train",), **QUAD).fit(traj).transform(X_test)
    expected = MappingReplayReference(traj, X_test, loss_fn=clip_terms).kept(("train",))
    assert att.meta["residual_share"] <= 1e-9
    assert rel_err(np.asarray(att.values).reshape(expected.shape), expected) <= 1e-9


def test_a_temperature_read_by_the_terms_outside_the_outputs_is_refused_naming_it():
    """CLIP's logit_scale read by the terms from the model directly (not as an output column): the gradient check
    names the parameter and a learned temperature; as an output column the case is exact (test_split_by_...)."""
    model = ScaledTowers()

    def terms(out, _):
        a, b = F.normalize(out[:, :4], dim=1), F.normalize(out[:, 4:8], dim=1)
        logits, labels = model.logit_scale.exp() * a @ b.T, torch.arange(len(out))
        return (F.cross_entropy(logits, labels, reduction="none")
                + F.cross_entropy(logits.T, labels, reduction="none")) / 2

    X, y = _clip_data()
    with pytest.raises(TrajectoryError, match=r"Step 0: .*The parameter\(s\) \['logit_scale'\] got a gradient from "
                                              r"backward\(\) but none through the recomputed loss.*temperature"):
        record(model, "sgd", X[:N], y, terms, random_batches(6, 1))


def test_a_loop_that_sums_the_terms_is_exact_with_its_factor_measured():
    """The loop backpropagates the sum of the terms (n times their mean) while the default weights are 1/n: the
    gradient check measures the factor 6 as the loss scale and the split stays exact."""
    X, y = _clip_data()
    model = TwoTowers()
    opt = optimizer(model, "sgd")
    rec = explaind.TrajectoryRecorder(model, opt, loss=explaind.batch_coupled_loss(clip_terms), train_data=(X[:N], y))
    with rec:
        for (idx,) in random_batches(6, 1):
            opt.zero_grad()
            clip_terms(model(X[idx]), y[idx]).sum().backward()
            rec.log_batch(idx)
            opt.step()
    assert [rec.trajectory.grad_scale(s) for s in range(3)] == pytest.approx([6.0] * 3, rel=1e-12)
    assert_exact(figures(Run(model, rec.trajectory, X[N:], clip_terms)))


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"terms": 3}, r"batch_coupled_loss\(terms=3\): expected a callable"),
    ({"terms": lambda o, t: o, "batch_loss": 5}, r"batch_coupled_loss\(batch_loss=5\): expected a callable"),
    ({"terms": lambda o, t: o, "name": 3}, r"batch_coupled_loss\(name=3\): expected a non-empty str"),
    ({"terms": lambda o, t: o, "name": " "}, r"batch_coupled_loss\(name=' '\): expected a non-empty str"),
])
def test_batch_coupled_loss_refuses_bad_arguments_naming_the_value(kwargs, match):
    """Each argument of the wrong kind is a ConfigError naming it and what is allowed, before anything is recorded."""
    with pytest.raises(ConfigError, match=match):
        explaind.batch_coupled_loss(**kwargs)
