"""Lightning Fabric and Hugging Face accelerate, round 10: exact, or loud naming the cause and the fix.

The runs train the float64 tanh MLP of tests/_stranger_loops_kit.py (24 samples, batches of 4 from a shuffled loader
of the positions, SGD momentum 0.9) through ``fabric.setup`` as tests/test_fabric_accelerate.py does. "Exact" is
``assert_exact`` of that kit: replica <= 1e-6 relative to the trained model, residual share <= 1e-9 with no warning,
``keep=("train",)`` <= 1e-9 relative to the slow float64 loop reference (tests/reference.py). The figures go to
``_hf_stranger_kit.MEASURED`` (``python tests/hf_strangers_table.py test_fabric_accelerate_round10.py``).

Fixed here (each test names what happened before):

* The float32 rounding of the output gradient (``Fabric(precision="64-true")`` with torch's default dtype float32)
  was warned about only while recording; a stored run did not remember it, and the estimators' residual-share
  warning on it listed other causes. The recorder now writes it into ``manifest.extras["output_rounding"]`` and the
  residual warning names it first-hand.
* The torch module of ``Fabric(precision="bf16-true")`` given to the recorder (not the ``_FabricModule``) failed
  in the first gradient check with torch's "mat1 and mat2 must have the same dtype"; now a ``ConfigError`` naming
  the parameters' and the data's dtypes, the precision and the fix.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from _hf_stranger_kit import note
from _stranger_loops_kit import assert_exact, data, measure, mlp

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning

fabric_mod = pytest.importorskip("lightning.fabric")

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning:lightning")]


def _fabric_run(precision: str, *, compiled: bool = False, fullgraph: bool = False, store=None, give: str = "torch",
                **recorder) -> tuple[torch.nn.Module, explaind.Trajectory, list[str]]:
    """One epoch of 6 steps through ``fabric.setup`` (of ``torch.compile(net, backend="aot_eager")`` with
    ``compiled``); the recorder is given the torch model (``give="torch"``) or the ``_FabricModule``. Returns the
    model, the trajectory and the messages of the ExplaindWarnings raised while recording."""
    X, y, _ = data()
    net = mlp()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision=precision)
    model, fopt = fabric.setup(torch.compile(net, backend="aot_eager", fullgraph=fullgraph) if compiled else net, opt)
    loader = fabric.setup_dataloaders(torch.utils.data.DataLoader(
        torch.arange(len(X)), batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1)))
    rec = explaind.TrajectoryRecorder(net if give == "torch" else model, fopt, loss="cross_entropy",
                                      train_data=(X, y), store=store, **recorder)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        with rec:
            for idx in loader:
                fabric.backward(F.cross_entropy(model(X[idx]), y[idx]))
                rec.log_batch(idx)
                fopt.step()
                fopt.zero_grad()
    return net, rec.trajectory, [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]


@pytest.mark.parametrize("kept", ["memory", "store"])
def test_output_rounding_is_remembered_by_the_stored_run_and_named_by_the_residual_warning(tmp_path, kept):
    """``Fabric(precision="64-true")`` with float32 as torch's default dtype: warned while recording (as before),
    and the run keeps it; loaded from its store, the estimator's residual warning (``residual_tol`` below the
    rounding's share) names it. Before: the manifest held no word of it and the residual warning did not name it."""
    net, traj, caught = _fabric_run("64-true", store=tmp_path / "run" if kept == "store" else None)
    assert len([m for m in caught if "rounded to float32" in m]) == 1
    if kept == "store":
        traj = explaind.Trajectory.load(tmp_path / "run", model=net)
    assert "rounded to float32" in traj.manifest.extras["output_rounding"]
    _, _, X_test = data()
    cause = (r"residual share .* Likely causes: \(1\) the recorder noted while recording that the training gradient "
             r"reaching the output of the float64 model Sequential was rounded to float32 \(a cast before the "
             r"loss\): .*compute the loss in float64")
    with pytest.warns(ExplaindWarning, match=cause) as record:
        att = explaind.InfluenceEstimator(keep=("train",), residual_tol=1e-10, tol=1e-11, device="cpu").fit(
            traj).transform(X_test)
    assert any("the recorder noted while recording" in str(w.message) for w in record)
    note(share=att.meta["residual_share"], outcome="loud: ExplaindWarning, kept in the run (float32 output cast)")
    assert 1e-10 < att.meta["residual_share"] < 1e-6


def test_a_float64_run_has_no_output_rounding_note():
    """The note is not written where there is nothing to say (torch's default dtype float64: no cast)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        net, traj, caught = _fabric_run("64-true")
    finally:
        torch.set_default_dtype(before)
    assert not caught and "output_rounding" not in traj.manifest.extras
    figures = measure(net, traj)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"])
    assert_exact(figures)


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_the_torch_module_of_a_half_precision_fabric_run_is_refused_naming_the_precision(precision):
    """Before: torch's ``RuntimeError`` "mat1 and mat2 must have the same dtype, but got Float and BFloat16" from
    the recorder's first gradient check."""
    X, y, _ = data()
    net = mlp().float()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fabric = fabric_mod.Fabric(accelerator="cpu", devices=1, precision=precision)
    model, fopt = fabric.setup(net, opt)
    rec = explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=(X.float(), y))
    half = "bfloat16" if precision == "bf16-true" else "float16"
    with pytest.raises(ConfigError, match=rf"Step 0's gradient check: the model's parameters are {half} but the "
                                          r"recorder's train_data holds float32 inputs.*mat1 and mat2.*"
                                          r"Fabric\(precision='bf16-true'\) or '16-true'.*"
                                          r"Fix: Fabric\(precision='bf16-mixed'\)"), rec:
        idx = torch.arange(4)
        fabric.backward(F.cross_entropy(model(X[idx].float()), y[idx]))
        rec.log_batch(idx)
        fopt.step()
    note(outcome="loud: ConfigError (torch module of a half-precision Fabric run)")


@pytest.mark.parametrize("give", ["torch", "fabric_module"])
def test_fabric_setup_of_a_compiled_module_is_exact(give):
    """``fabric.setup(torch.compile(net))``: Fabric unwraps the compiled module and compiles its own wrapper; the
    recorder's hooks on ``net`` run (graph breaks), every step's gradient check passes at 1e-12."""
    net, traj, caught = _fabric_run("32-true", compiled=True, give=give, check_gradients=True)
    assert not caught and traj.n_steps == 6 and max(traj.gradient_check()) <= 1e-12
    figures = measure(net, traj)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"])
    assert_exact(figures)


def test_fabric_64_true_with_a_compiled_module_still_warns_of_the_output_cast():
    """Under ``torch.compile`` the output-gradient probe still sees the gradient (the cast is Fabric's, outside the
    compiled graph): warned and noted, as without compile."""
    _, traj, caught = _fabric_run("64-true", compiled=True, check_gradients=True)
    assert len([m for m in caught if "rounded to float32" in m]) == 1
    assert "output_rounding" in traj.manifest.extras
    note(outcome="loud: ExplaindWarning (outputs cast to float32, compiled module)")


def test_a_full_graph_compile_is_refused_by_torch_with_a_note_naming_the_recorder_and_the_fix():
    """``fabric.setup(torch.compile(net, fullgraph=True))``: the recorder's hooks break the graph, torch refuses
    (``Unsupported``); leaving ``with rec:`` the recorder adds a note naming its hooks and the fix. Before: torch's
    message alone, naming a ctypes array."""
    torch._dynamo.reset()  # no frames compiled by the tests above without fullgraph
    with pytest.raises(torch._dynamo.exc.Unsupported) as caught:
        _fabric_run("32-true", compiled=True, fullgraph=True)
    notes = getattr(caught.value, "__notes__", [])
    assert len(notes) == 1 and "Fix: compile without fullgraph=True" in notes[0]
    note(outcome="loud: torch's Unsupported with a note naming the recorder's hooks and the fix")


def test_accelerate_with_a_dynamo_backend_is_exact():
    """``Accelerator(dynamo_backend="aot_eager")``: ``prepare`` returns the compiled model, given to the recorder."""
    accelerate = pytest.importorskip("accelerate")

    def reset() -> None:  # accelerate's per-process state, as tests/test_fabric_accelerate.py resets it
        accelerate.state.AcceleratorState._reset_state(reset_partial_state=True)
        accelerate.state.GradientState._reset_state()

    reset()
    X, y, _ = data()
    net = mlp()
    accelerator = accelerate.Accelerator(cpu=True, dynamo_backend="aot_eager")
    model, opt = accelerator.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))
    assert type(model).__name__ == "OptimizedModule"
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
    with rec:
        for idx in torch.utils.data.DataLoader(torch.arange(len(X)), batch_size=4, shuffle=True,
                                               generator=torch.Generator().manual_seed(1)):
            accelerator.backward(F.cross_entropy(model(X[idx]), y[idx]))
            rec.log_batch(idx)
            opt.step()
            opt.zero_grad()
    reset()
    assert max(rec.trajectory.gradient_check()) <= 1e-12
    figures = measure(net, rec.trajectory)
    note(replica=figures["replica"], share=figures["share"], train=figures["scores"])
    assert_exact(figures)


def test_an_inductor_compiled_dropout_model_is_refused_naming_fallback_random():
    """A plain loop training ``torch.compile(net)`` (inductor) of a dropout model: inductor draws the masks from its
    own generator. Before: the first gradient check failed, its causes not naming the compiler; then they named
    inductor's generator and ``torch._inductor.config.fallback_random = True``; since round 14 the first training
    forward is refused naming the compiled module, its backend and the same fix (with the check off too)."""
    import torch._inductor.config as inductor_config

    from explaind.exceptions import TrajectoryError

    X, y, _ = data()
    net = torch.nn.Sequential(mlp(), torch.nn.Dropout(0.3))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=False):
        compiled = torch.compile(net)
        rec = explaind.TrajectoryRecorder(net, opt, loss="cross_entropy", train_data=(X, y), check_gradients=True)
        with pytest.raises(TrajectoryError, match=r"training forward runs inside code compiled by torch.compile: "
                                                  r"torch.compile\(Sequential\) \(torch.compile\(backend='inductor'"
                                                  r"\)\).*Fix: torch._inductor.config.fallback_random = True"), rec:
            idx = torch.arange(4)
            F.cross_entropy(compiled(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    note(outcome="loud: TrajectoryError naming inductor's own dropout masks")
