"""Plain loops through Lightning Fabric and Hugging Face accelerate: exact, or loud naming the cause and the fix.

Each run trains the float64 tanh MLP of tests/_stranger_loops_kit.py (24 samples, batches of 4 from a shuffled
loader of the positions, SGD momentum 0.9) with the recorder of docs/guide_own_model.md ("Fabric and Accelerate"):
``rec.log_batch(idx)`` after ``fabric.backward`` / ``accelerator.backward``. "Exact" is ``assert_exact`` of that kit:
replica <= 1e-6 relative to the trained model, residual share <= 1e-9 with no warning, ``keep=("train",)``
<= 1e-9 relative to the slow float64 loop reference (tests/reference.py). The figures go to
``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py test_fabric_accelerate.py`` prints them).

Fixed here (each test names what happened before):

* ``Fabric(precision="64-true")`` casts its module's outputs back to torch's default dtype (float32) before the
  loop's loss, so a float64 run trains on float32-rounded gradients: gradient check above 1e-9 (inside its float64
  tolerance) and a residual share of 2.2e-8, without a word. The recorder now warns at the first backward.
* The wrappers ``fabric.setup`` and ``accelerator.prepare`` return (``FabricSGD``, ``AcceleratedOptimizer``,
  ``_FabricModule``) were refused with an ``UnknownEntryError`` whose fix (build ``SGD`` itself) did not apply;
  the recorder now records the objects they wrap.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import note
from _real_loop_testkit import MLP_N_TRAIN, assert_autocast_run_exact, dropout_mlp, mlp_data, mlp_optimizer
from _start_state_kit import carried_part
from _stranger_loops_kit import N, assert_exact, data, measure, mlp
from lightning.fabric.plugins import MixedPrecision
from reference import Reference, rel_err

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory._output_rounding import MAX_CHECKED, float32_rounded, leading_part

fabric_mod = pytest.importorskip("lightning.fabric")
accelerate = pytest.importorskip("accelerate")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:lightning"),
              pytest.mark.filterwarnings("ignore::UserWarning:accelerate")]

BATCH = 4


def _loader(batch: int = BATCH) -> torch.utils.data.DataLoader:
    """Shuffled positions ``0..N-1`` in batches of 4 (an epoch of 6 micro-batches), seeded."""
    return torch.utils.data.DataLoader(torch.arange(N), batch_size=batch, shuffle=True,
                                       generator=torch.Generator().manual_seed(1))


def _reset_accelerate() -> None:
    """Forget accelerate's per-process state, which refuses another precision without a reset."""
    accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
    accelerate.state.GradientState._reset_state()


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts and ends with no accelerator state (the Trainer runs of other test files make their own)."""
    _reset_accelerate()
    yield
    _reset_accelerate()


def _accelerator(**kwargs) -> accelerate.Accelerator:
    return accelerate.Accelerator(cpu=True, **kwargs)


def _record(net, opt, **kwargs) -> explaind.TrajectoryRecorder:
    X, y, _ = data()
    return explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=(X, y), **kwargs)


def _exact(net, traj, outcome: str = "exact") -> None:
    figures = measure(net, traj)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"], outcome=outcome)
    assert_exact(figures)


# ---------------------------------------------------------------- Lightning Fabric
def _fabric_run(precision: str, *, wrapped: bool = False, accumulate: int = 1, clip: dict | None = None,
                epochs: int = 1, **recorder) -> tuple[torch.nn.Module, explaind.Trajectory]:
    """Fabric on the CPU: ``setup``, ``setup_dataloaders``, ``fabric.backward`` on ``loss / accumulate`` inside
    ``no_backward_sync`` between steps, ``clip_gradients(**clip)`` before each step. The recorder is given the
    wrapped model and optimizer (``wrapped``) or the ones ``setup`` was given."""
    X, y, _ = data()
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision=precision)
    model, fopt = fabric.setup(net, opt)
    loader = fabric.setup_dataloaders(_loader())
    rec = _record(model if wrapped else net, fopt if wrapped else opt, **recorder)
    with rec:
        for _ in range(epochs):
            for i, idx in enumerate(loader):
                last = (i + 1) % accumulate == 0
                with fabric.no_backward_sync(model, enabled=not last):
                    fabric.backward(F.cross_entropy(model(X[idx]), y[idx]) / accumulate)
                rec.log_batch(idx)
                if last:
                    if clip:
                        fabric.clip_gradients(model, fopt, **clip)
                    fopt.step()
                    fopt.zero_grad()
    return net, rec.trajectory


def test_fabric_64_true_casts_outputs_to_float32_before_the_loss_and_is_warned():
    """``Fabric(precision="64-true")`` converts the outputs of its module to torch's default dtype (float32), so the
    loss and every gradient carry float32 rounding: gradient check above 1e-9, a residual share of 2.2e-8 that the
    per-sample scores miss (they equal the float64 loop reference's). Before: no word (the check's float64
    tolerance is 1e-7, the estimators warn above 1e-3)."""
    with pytest.warns(ExplaindWarning, match=r"rounded to float32 .*Fabric\(precision='64-true'\).*Fix: compute "
                                             r"the loss in float64"):
        net, traj = _fabric_run("64-true", check_gradients=True)
    assert 1e-9 < max(traj.gradient_check()) < 1e-7  # inside the check's float64 tolerance
    figures = measure(net, traj)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"],
         outcome="loud: ExplaindWarning (outputs cast to float32)")
    assert figures["share"] > 1e-9  # the float32 rounding, in the residual: what the warning is about


def test_fabric_64_true_with_float64_as_default_dtype_is_exact():
    """The first fix the warning names: with torch's default dtype float64 the cast is none."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net, traj = _fabric_run("64-true", check_gradients=True)
    finally:
        torch.set_default_dtype(before)
    assert max(traj.gradient_check()) <= 1e-12
    _exact(net, traj)


def test_fabric_wrapped_model_and_optimizer_with_clipping_and_two_epochs_are_exact():
    """The second fix: ``precision="32-true"`` with the model built in float64 (Fabric leaves it so); the
    recorder is given what ``fabric.setup`` returned, ``clip_gradients(max_norm=...)`` clips every step (measured
    as ``c_s``). Before: ``UnknownEntryError`` for ``FabricSGD`` advising to build ``SGD`` itself."""
    net, traj = _fabric_run("32-true", wrapped=True, clip={"max_norm": 0.3}, epochs=2, check_gradients=True)
    assert traj.n_steps == 12 and all(traj.grad_scale(s) < 1 for s in range(12))
    assert traj.manifest.optimizer_class == "torch.optim.sgd.SGD"
    _exact(net, traj)


def test_fabric_accumulation_with_no_backward_sync_and_a_divided_loss_is_exact():
    """Two micro-batches per step, each loss divided by 2 (as Fabric's docs write it): the gradient check measures
    the factor 1/2."""
    net, traj = _fabric_run("32-true", accumulate=2, check_gradients=True)
    assert traj.n_steps == 3 and [traj.batch(s)[0].numel() for s in range(3)] == [8, 8, 8]
    assert max(traj.gradient_check()) <= 1e-12
    _exact(net, traj)


def test_fabric_clip_gradients_by_value_is_refused():
    """``clip_gradients(clip_val=...)`` changes coordinates one by one: no single factor ``c_s``."""
    with pytest.raises(TrajectoryError, match=r"clip_grad_value_"):
        _fabric_run("32-true", clip={"clip_val": 0.01})
    note(outcome="loud: TrajectoryError (clipping by value)")


# ---------------------------------------------------------------- Hugging Face accelerate
def _accelerate_run(*, k: int = 3, wrapped: bool = True, clip: str = "norm", weights: bool = False,
                    sync_with_dataloader: bool = True, batch: int = BATCH, epochs: int = 2,
                    **recorder) -> tuple[torch.nn.Module, explaind.Trajectory]:
    """``Accelerator(cpu=True, gradient_accumulation_steps=k)``, ``prepare`` of the model, optimizer, a
    ``StepLR`` and the loader; ``with accelerator.accumulate(model)``; ``accelerator.backward`` (which divides the
    loss by ``k``); clipping when the gradients sync. An epoch of 6 micro-batches is 2 steps for ``k = 3``;
    ``weights``: log each micro-batch with the weights ``1 / (n k)`` of that division; ``sync_with_dataloader``:
    accelerate's ``GradientAccumulationPlugin`` setting (``False``: a step may span the end of an epoch); ``batch``
    and ``epochs``: the loader's batch size and the passes over it."""
    X, y, _ = data()
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    schedule = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)
    acc = _accelerator(gradient_accumulation_plugin=accelerate.utils.GradientAccumulationPlugin(
        num_steps=k, sync_with_dataloader=sync_with_dataloader))
    model, aopt, sched, loader = acc.prepare(net, opt, schedule, _loader(batch))
    rec = _record(model, aopt if wrapped else opt, **recorder)
    with rec:
        for _ in range(epochs):
            for idx in loader:
                with acc.accumulate(model):
                    acc.backward(F.cross_entropy(model(X[idx]), y[idx]))
                    rec.log_batch(idx, torch.full((len(idx),), 1 / (len(idx) * k), dtype=torch.float64)
                                  if weights else None)
                    if acc.sync_gradients:
                        if clip == "norm":
                            acc.clip_grad_norm_(model.parameters(), 0.05)
                        else:
                            acc.clip_grad_value_(model.parameters(), 0.01)
                    aopt.step()
                    sched.step()
                    aopt.zero_grad()
    return net, rec.trajectory


def test_accelerate_accumulate_with_clipping_and_a_schedule_is_exact_with_the_gradient_check():
    """The prepared ``AcceleratedOptimizer`` given to the recorder (before: ``UnknownEntryError``); the loss
    divided by ``gradient_accumulation_steps`` is measured by the gradient check, the clipping as ``c_s``, the
    ``StepLR`` (stepped by accelerate only when the optimizer stepped) read from the optimizer."""
    net, traj = _accelerate_run(check_gradients=True)
    assert traj.n_steps == 4 and max(traj.gradient_check()) <= 1e-12
    _exact(net, traj)


def test_accelerate_accumulation_with_the_default_gradient_check_schedule_is_exact():
    """``check_gradients="auto"`` (the default) over 4 epochs of 5 micro-batches (4 of 5 samples, then 4): steps of
    3 and 2 micro-batches, each divided by 3. The factor 1/3 is not 1, so every step whose micro-batches differ
    from those it was measured on is checked anew: here every step, each at float64 rounding."""
    net, traj = _accelerate_run(batch=5, epochs=4)
    assert [len(traj.micro_batches(s)) for s in range(traj.n_steps)] == [3, 2] * 4
    checks = traj.gradient_check()  # NaN where a step was not checked
    assert bool((checks <= 1e-12).all())
    _exact(net, traj)


def test_accelerate_accumulation_across_the_end_of_an_epoch_is_exact():
    """``GradientAccumulationPlugin(num_steps=4, sync_with_dataloader=False)`` over epochs of 6 micro-batches: the
    second step holds the last 2 micro-batches of the first epoch and the first 2 of the second."""
    net, traj = _accelerate_run(k=4, sync_with_dataloader=False, check_gradients=True)
    assert [len(traj.micro_batches(s)) for s in range(traj.n_steps)] == [4, 4, 4]
    assert max(traj.gradient_check()) <= 1e-12
    _exact(net, traj)


def test_accelerate_accumulate_weighted_as_it_divides_is_exact_with_the_check_off():
    """With the check off nothing measures the division by ``k``: the weights ``1 / (n k)`` say it."""
    net, traj = _accelerate_run(weights=True, check_gradients=False)
    _exact(net, traj)


def test_accelerate_accumulate_with_the_check_off_and_default_weights_is_warned():
    """The mean weights without the division by ``k = 3``: the steps are recorded 3 times too large, a residual
    share of about 2 that the estimator warns about."""
    net, traj = _accelerate_run(wrapped=False, check_gradients=False)
    figures = measure(net, traj)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"],
         outcome="loud: ExplaindWarning (residual share, loss divided by k unmeasured)")
    assert figures["share"] > 0.5 and any("residual share" in w for w in figures["warnings"])


def test_accelerate_clip_grad_value_is_refused():
    with pytest.raises(TrajectoryError, match=r"clip_grad_value_"):
        _accelerate_run(clip="value")
    note(outcome="loud: TrajectoryError (clipping by value)")


# ---------------------------------------------------------------- bfloat16 autocast on the CPU
def _amp_run(framework: str, precision: str = "bfloat16",
             hand_over: bool = True) -> tuple[torch.nn.Module, explaind.Trajectory, torch.Tensor]:
    """The float32 dropout MLP of tests/_real_loop_testkit.py, 6 steps of two micro-batches of 4 under autocast:
    ``Fabric(precision="bf16-mixed")`` (autocast in the wrapped module's forward, the loss divided by 2) or
    ``Accelerator(mixed_precision="bf16", gradient_accumulation_steps=2)`` (autocast wrapped around
    ``model.forward``). ``precision="float16"``: Fabric's ``MixedPrecision("16-mixed", "cpu", GradScaler)`` plugin,
    accelerate with the two attributes it sets on a GPU (``native_amp``, ``scaler``; see
    tests/test_integrations_amp.py), clipping by norm at 0.5 before each step; ``hand_over``: the recorder is given
    the framework's scaler. Returns the trained parameters in a fresh module (accelerate leaves its autocast on the
    model), the trajectory and the test inputs."""
    X, y = mlp_data(torch.Generator().manual_seed(2))
    net = dropout_mlp()
    opt = mlp_optimizer(net.parameters())
    loader = torch.utils.data.DataLoader(torch.arange(MLP_N_TRAIN), batch_size=BATCH, shuffle=True,
                                         generator=torch.Generator().manual_seed(1))
    half = precision == "float16"
    if framework == "fabric":
        plugins = [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))] if half else []
        fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, plugins=plugins,
                                   **({} if half else {"precision": "bf16-mixed"}))
        model, wrapped = fabric.setup(net, opt)
        loader = fabric.setup_dataloaders(loader)
        scaler = fabric.strategy.precision.scaler
    else:
        acc = _accelerator(mixed_precision="fp16" if half else "bf16", gradient_accumulation_steps=2)
        if half:  # what accelerate sets on a GPU
            acc.native_amp, acc.scaler = True, torch.amp.GradScaler("cpu", init_scale=1024.0)
        model, wrapped, loader = acc.prepare(net, opt, loader)
        scaler = acc.scaler
    rec = explaind.TrajectoryRecorder(model, wrapped, loss="cross_entropy", train_data=(X[:MLP_N_TRAIN],
                                                                                        y[:MLP_N_TRAIN]),
                                      grad_scaler=scaler if hand_over else None)
    with rec:
        for i, idx in enumerate(list(loader) * 2):
            if rec.n_steps == 6:
                break
            if framework == "fabric":
                fabric.backward(F.cross_entropy(model(X[idx]), y[idx]) / 2)
                rec.log_batch(idx)
                if i % 2 == 1:
                    if half:
                        fabric.clip_gradients(model, wrapped, max_norm=0.5)
                    wrapped.step()
                    wrapped.zero_grad()
            else:
                with acc.accumulate(model):
                    acc.backward(F.cross_entropy(model(X[idx]), y[idx]))
                    rec.log_batch(idx)
                    if half and acc.sync_gradients:
                        acc.clip_grad_norm_(model.parameters(), 0.5)
                    wrapped.step()
                    wrapped.zero_grad()
    net.eval()  # the recorded model, which the reference evaluates along the path
    final = dropout_mlp()
    final.load_state_dict(net.state_dict())
    return final.eval(), rec.trajectory, X[MLP_N_TRAIN:]


@pytest.mark.parametrize("framework", ["fabric", "accelerate"])
def test_bf16_autocast_is_recorded_and_exact_up_to_its_rounding(framework):
    """Each step recorded under bfloat16 autocast, its masks replayed; train scores and residual <= 1e-9 against
    the loop reference replaying both, the residual share the autocast rounding (tests/test_amp_dropout.py)."""
    model, traj, X_test = _amp_run(framework)
    assert traj.n_steps == 6 and [len(traj.micro_batches(s)) for s in range(6)] == [2] * 6
    got = assert_autocast_run_exact(model, traj, X_test, "bfloat16")
    note(replica=got["replica"], share=got["residual_share"], train=got["train"],
         outcome="exact up to bfloat16 autocast (residual share: its rounding)")


def test_the_float32_rounding_test_of_an_output_gradient():
    """A float64 loss's gradient has random low mantissa bits; a cast before the loss leaves float32 numbers; a
    loss of simple values (``out.mean()``: one magnitude; dyadic sample weights: short mantissas) says nothing;
    ``torch.compile`` may hand over ``None``."""
    out = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    target = torch.tensor([0, 2, 1, 0])
    (float64,) = torch.autograd.grad(F.cross_entropy(out, target), out)
    (cast,) = torch.autograd.grad(F.cross_entropy(out.float(), target), out)
    (simple,) = torch.autograd.grad(out.mean(), out)
    weights = torch.tensor([0.5, 0.25, 0.125, 0.75], dtype=torch.float64)[:, None]
    (dyadic,) = torch.autograd.grad((weights * out).sum(), out)  # four magnitudes, each a short float32 number
    assert not float32_rounded(float64) and float32_rounded(cast)
    assert not float32_rounded(simple) and not float32_rounded(dyadic) and not float32_rounded(None)


def test_a_large_output_gradient_is_checked_on_its_leading_rows_only():
    """A language model's logits' gradient (batch x length x vocabulary) is checked on a view of about MAX_CHECKED
    entries at every training backward, not copied whole; a row larger than that is checked whole."""
    grad = torch.randn(64, 32, 500, dtype=torch.float64)
    part = leading_part(grad)
    assert part.data_ptr() == grad.data_ptr() and part.shape[1:] == grad.shape[1:]
    assert MAX_CHECKED // 2 < part.numel() <= MAX_CHECKED
    cast = grad.float().double()
    assert float32_rounded(leading_part(cast)) and not float32_rounded(leading_part(grad))
    wide = torch.randn(2, 3 * MAX_CHECKED, dtype=torch.float64)
    assert leading_part(wide).shape == (1, 3 * MAX_CHECKED)
    small = torch.randn(4, 3, dtype=torch.float64)
    assert leading_part(small) is small


# ---------------------------------------------------------------- resuming from the framework's checkpoint
def _resumed(framework: str, tmp_path) -> tuple[torch.nn.Module, explaind.Trajectory, dict]:
    """3 steps of SGD momentum 0.9, a checkpoint of the model and optimizer (``fabric.save`` /
    ``accelerator.save_state``), then a new model, optimizer and framework object restored from it
    (``fabric.load`` / ``accelerator.load_state``) and 3 recorded steps. Returns the model, the trajectory and the
    optimizer state the recording starts from."""
    X, y, _ = data()
    batches = list(_loader())

    def setup():
        net = mlp()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        if framework == "fabric":
            fabric = fabric_mod.Fabric(accelerator="cpu", devices=1)
            return (net, opt, fabric, *fabric.setup(net, opt))
        _reset_accelerate()
        acc = _accelerator()
        return (net, opt, acc, *acc.prepare(net, opt))

    def backward(runner, model, idx):
        runner.backward(F.cross_entropy(model(X[idx]), y[idx]))

    net, opt, runner, model, wrapped = setup()
    for idx in batches[:3]:
        backward(runner, model, idx)
        wrapped.step()
        wrapped.zero_grad()
    if framework == "fabric":
        runner.save(tmp_path / "state.ckpt", {"model": model, "optimizer": wrapped})
    else:
        runner.save_state(str(tmp_path / "state"))
    net, opt, runner, model, wrapped = setup()
    if framework == "fabric":
        runner.load(tmp_path / "state.ckpt", {"model": model, "optimizer": wrapped})
    else:
        runner.load_state(str(tmp_path / "state"))
    state = copy.deepcopy(opt.state_dict())
    rec = _record(model, wrapped, check_gradients=True)
    with rec:
        for idx in batches[3:]:
            backward(runner, model, idx)
            rec.log_batch(idx)
            wrapped.step()
            wrapped.zero_grad()
    return net, rec.trajectory, state


@pytest.mark.parametrize("framework", ["fabric", "accelerate"])
def test_resuming_from_the_frameworks_checkpoint_with_momentum_is_exact(tmp_path, framework):
    """The restored momentum buffers carry part of every recorded update: the ``initial_state`` term, checked
    against ``carried_part`` (tests/_start_state_kit.py), the rest split over the samples as the loop reference
    splits it."""
    net, traj, state = _resumed(framework, tmp_path)
    assert traj.n_steps == 3 and state["state"]
    _, _, X_test = data()
    with torch.no_grad():
        truth = net.eval()(X_test)
    replica = rel_err(explaind.KernelReplica(device="cpu").fit(traj).predict(X_test), truth)
    att = explaind.InfluenceEstimator(keep=("train",), tol=1e-11, device="cpu").fit(traj).transform(X_test)
    ref = Reference(traj, X_test)
    train = rel_err(att.values, ref.kept(("train",)))
    carried = rel_err(att.initial_state, carried_part("sgd", ref, state, [0.1] * 3))
    note(replica=replica, share=att.meta["residual_share"], train=train)
    assert float(att.initial_state.abs().sum()) >= 1e-2 * float((att.final - att.initial).abs().sum())
    assert replica <= 1e-6 and att.meta["residual_share"] <= 1e-9 and train <= 1e-9 and carried <= 1e-9
    assert att.completeness_error() <= 1e-12


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_fabric_half_precision_parameters_are_refused_naming_bf16_mixed(precision):
    """The recorder given what ``fabric.setup`` returned. Before: an ``UnknownEntryError`` for ``FabricSGD`` (and
    given the torch objects, torch's ``RuntimeError`` "mat1 and mat2 must have the same dtype" from the first
    gradient check: since round 10 a ``ConfigError`` there too, tests/test_fabric_accelerate_round10.py)."""
    X, y, _ = data()
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision=precision)
    net = mlp().float()
    model, fopt = fabric.setup(net, torch.optim.SGD(net.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match=rf"Fabric\(precision='{precision}'\) holds the parameters themselves.*"
                                          r"Fix: Fabric\(precision='bf16-mixed'\)"):
        explaind.TrajectoryRecorder(model, fopt, loss="cross_entropy", train_data=(X.float(), y))
    note(outcome="loud: ConfigError (half-precision parameters)")


@pytest.mark.parametrize("framework", ["fabric", "accelerate"])
def test_float16_with_the_frameworks_grad_scaler_is_recorded_and_exact_up_to_its_rounding(framework):
    """The scaler handed to the recorder (``fabric.strategy.precision.scaler``, ``accelerator.scaler``): each step
    recorded with its loss scale and the clipping of the unscaled gradient as ``c_s``; exact up to the float16
    autocast as in tests/test_amp_dropout.py."""
    model, traj, X_test = _amp_run(framework, "float16")
    assert traj.n_steps == 6 and [r.amp_scale for r in traj.manifest.steps] == [1024.0] * 6
    got = assert_autocast_run_exact(model, traj, X_test, "float16")
    note(replica=got["replica"], share=got["residual_share"], train=got["train"],
         outcome="exact up to float16 autocast (residual share: its rounding)")


@pytest.mark.parametrize("framework", ["fabric", "accelerate"])
def test_float16_without_the_scaler_is_refused_naming_where_the_framework_keeps_it(framework):
    with pytest.raises(TrajectoryError, match=r"does not know the scaler.*grad_scaler=fabric\.strategy\.precision"
                                              r"\.scaler; in an accelerate loop: grad_scaler=accelerator\.scaler"):
        _amp_run(framework, "float16", hand_over=False)
    note(outcome="loud: TrajectoryError (GradScaler not handed to the recorder)")
