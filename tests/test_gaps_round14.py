"""Four gaps of the real-loops issue, closed (round 14).

1. ``CounterfactualEstimator`` on a gradient reversal layer (DANN: a custom ``torch.autograd.Function`` whose backward
   is ``-g``, or ``Tensor.register_hook(lambda g: -g)``): exact against central finite differences of retraining in
   float64 with each sample's weight scaled by ``1 +- h`` (before: relative errors 0.65 with SGD momentum and 1.13
   with Adam, with a warning). A dropout step on such a model keeps a warning naming the cause.
2. The optimizer's carried momentum edited through ``.data`` in fewer entries than the watch's stride, between its
   strided samples: refused at the next step by the sum of the buffer's 64-bit words (before: recorded silently).
3. Compiled code drawing random numbers with the gradient check off (a compiled function calling a dropout model, a
   submodule compiled after the start): refused at record time naming it (before: only the residual warned, share
   0.23); compiled code that draws nothing, or draws as torch does, passes.
4. A daemon thread inside ``with rec:`` when the main thread exits (a subprocess): stopped at its next step
   boundary, every step it recorded kept, the lock given back, the store closed as an interrupted run and resumed
   bit for bit (before: 1 of 2 returned steps kept, the lock file left behind).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _gaps14_kit import BATCHES, OPTIMIZERS, M, X, Y, compile_net, dann_train, record_unchecked, retrained_differences
from _recording_helpers import resumable_reference, resumable_setup
from _round9_functions import GradientReversal, HookReversal, dann_loss
from _stranger_loops_kit import train
from test_compiled_draws_loops import inductor_draws  # noqa: F401 - the fixture: inductor drawing its own masks
from test_store_round11 import STEPS, _resume_to_the_end, _stored
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning, TrajectoryError
from explaind.trajectory._optimizer_state_watch import SAMPLE, sampled_bits, word_sum
from explaind.trajectory.lock import LOCK

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("build", [GradientReversal, HookReversal], ids=["function", "hook"])
def test_counterfactual_on_a_gradient_reversal_layer_matches_retraining(build, optimizer, caplog):
    _, traj = dann_train(build, optimizer, record=True)
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="explaind.estimators.counterfactual"):
        warnings.simplefilter("error", ExplaindWarning)
        est = explaind.CounterfactualEstimator(device="cpu", checkpoint_every=2).fit(traj)
        att = est.transform(X[M:])
    assert any("forward mode (torch.func.jacfwd)" in r.message for r in caplog.records), caplog.text
    reference = retrained_differences(build, optimizer)
    err = float((att.values - reference).abs().max() / reference.abs().max())
    assert err <= 1e-6, err
    assert est.replay_residual_ <= 1e-12


class _DroppedReversal(GradientReversal):
    """DANN with dropout on the features (a training-mode replay)."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        h = self.drop(torch.tanh(self.f(x)))
        return torch.cat([self.c(h), self.d(self.reverse.apply(h))], 1)


def test_a_dropout_step_on_a_reversal_still_warns_naming_the_cause():
    torch.manual_seed(0)
    model = _DroppedReversal().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = explaind.TrajectoryRecorder(model, opt, loss=dann_loss, train_data=(X[:M], Y[:M]))
    with rec:
        for batch in BATCHES[:2]:
            idx = torch.tensor(batch)
            opt.zero_grad()
            dann_loss(model(X[idx]), Y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    with pytest.warns(ExplaindWarning, match=r"backward is not the derivative.*_ReverseGrad.*step 1 is replayed "
                                             r"through its training forward.*Fix: InfluenceEstimator"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory).transform(X[M:])


def test_a_plain_model_keeps_reverse_mode(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:M], Y[:M, 0]))
    with rec:
        for batch in BATCHES[:2]:
            idx = torch.tensor(batch)
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), Y[idx, 0]).backward()
            rec.log_batch(idx)
            opt.step()
    with caplog.at_level(logging.WARNING, logger="explaind.estimators.counterfactual"):
        explaind.CounterfactualEstimator(device="cpu").fit(rec.trajectory).transform(X[M:])
    assert "forward mode" not in caplog.text


def _wide_mlp() -> nn.Module:
    """Buffers of 2400 and 1800 entries: strides 3 and 2, so entry 1 of each is between two sampled entries."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 600), nn.Tanh(), nn.Linear(600, 3)).double()


EDITS = {"one_entry": lambda b: b.view(-1)[1].add_(1e-3), "last_bit_of_one_entry":
         lambda b: b.view(-1).view(torch.int64)[1].add_(1), "run_shorter_than_the_stride":
         lambda b: b.view(-1)[1:3].mul_(0.5)}


@pytest.mark.parametrize("edit", sorted(EDITS))
@pytest.mark.parametrize(("optimizer", "key"), [("sgd", "momentum_buffer"), ("adam", "exp_avg")])
def test_an_edit_between_the_sampled_entries_is_refused_at_the_next_step(optimizer, key, edit):
    model = _wide_mlp()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
           else torch.optim.Adam(model.parameters(), lr=0.01))
    buf = None

    def after(s: int) -> None:
        nonlocal buf
        if s == 2:
            buf = opt.state[model[0].weight][key]
            assert buf.numel() > SAMPLE and 1 % -(-buf.numel() // SAMPLE) != 0  # entry 1 is not sampled
            EDITS[edit](buf.data)

    with pytest.raises(TrajectoryError, match=rf"Step 3: the optimizer's momentum buffers of 0\.weight \({key}: "
                                              rf"changed through \.data\)"):
        train(model, opt, after=after)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_the_word_sum_sees_every_single_entry_edit_the_sample_misses(dtype):
    """Each of the 3001 entries of a buffer changed in its last bit, one at a time: the sum moves every time (an odd
    count leaves trailing bytes out of the 64-bit words), while the sample misses all but the strided ones."""
    buf = torch.linspace(-1, 1, 3001, dtype=dtype)
    ints = {8: torch.int64, 4: torch.int32, 2: torch.int16}[buf.element_size()]
    total, sample = word_sum(buf), sampled_bits(buf).clone()
    missed_by_sample = 0
    for i in range(buf.numel()):
        edited = buf.clone()
        edited.view(ints)[i] += 1
        assert not torch.equal(word_sum(edited), total), (dtype, i)
        missed_by_sample += torch.equal(sampled_bits(edited), sample)
    assert missed_by_sample == 3001 - 1001, missed_by_sample  # stride 3: the entries 0, 3, ..., 3000 are sampled


# 3. compiled code that draws random numbers, with the gradient check off ------------------------------------------

COMPILE_FIX = r"Fix: torch\._inductor\.config\.fallback_random = True before compiling.*backend='aot_eager'"


@pytest.mark.usefixtures("inductor_draws")
def test_a_compiled_function_calling_a_dropout_model_is_refused_at_its_first_forward_without_a_check():
    model = compile_net(0.3)

    def logits_of(x):
        return model(x)

    with pytest.raises(TrajectoryError, match=r"training forward runs inside code compiled by torch\.compile: "
                                              r"logits_of at test_gaps_round14\.py:\d+ \(torch\.compile\(backend="
                                              r"'inductor'\)\).*" + COMPILE_FIX):
        record_unchecked(model, torch.compile(logits_of))


@pytest.mark.usefixtures("inductor_draws")
def test_a_submodule_compiled_after_the_start_is_refused_at_that_step_without_a_check():
    model = nn.Sequential(compile_net(0.3), nn.Tanh()).double()

    def compile_at_1(s: int) -> None:
        if s == 1:
            model[0].compile()

    with pytest.raises(TrajectoryError, match=r"Step 1: compiled code draws random numbers with the compiler's own "
                                              r"generator: the submodule '0' \(torch\.compile\(backend='inductor'\)\), "
                                              r"compiled after the recorder started.*" + COMPILE_FIX):
        record_unchecked(model, model, before_step=compile_at_1)


@pytest.mark.usefixtures("inductor_draws")
def test_compiled_code_that_draws_nothing_or_draws_as_torch_does_is_recorded():
    """No false alarm: inductor around a model without dropout; aot_eager around a dropout model (its masks are eager
    torch's); a module compiled by inductor after the start on a model that draws nothing."""
    plain = compile_net(0.0)
    assert record_unchecked(plain, torch.compile(lambda x: plain(x))).n_steps == 3
    dropped = compile_net(0.3)
    assert record_unchecked(dropped, torch.compile(lambda x: dropped(x), backend="aot_eager")).n_steps == 3
    later = nn.Sequential(compile_net(0.0), nn.Tanh()).double()
    traj = record_unchecked(later, later, before_step=lambda s: later[0].compile() if s == 1 else None)
    assert traj.n_steps == 3


# 4. a daemon thread inside `with rec:` when the main thread exits --------------------------------------------------

_DAEMON_CHILD = """
import atexit, sys, threading, time
sys.path.insert(0, sys.argv[2])
from _gaps14_kit import slow_commits
from _recording_helpers import resumable_setup, resumable_step
import explaind
from explaind.trajectory import _interrupts
slow_commits(0.2)  # a slow disk: steps pile up in the writer's queue
store, pause = sys.argv[1], float(sys.argv[3])
if len(sys.argv) > 4:
    _interrupts.DAEMON_WAIT = float(sys.argv[4])
model, opt, X, y = resumable_setup()
rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(X, y), store=store)
returned = []
def train():
    with rec:
        for s in range(6):
            resumable_step(model, opt, X, y, s, rec)
            returned.append(s)
            time.sleep(pause)
trainer = threading.Thread(target=train, daemon=True, name="recording-daemon")
trainer.start()
while len(returned) < 2 and trainer.is_alive():
    time.sleep(0.005)
atexit.register(lambda: print("returned", len(returned), flush=True))
sys.exit(3)
"""


def _daemon_child(store: Path, *args: str) -> subprocess.CompletedProcess:
    here = Path(__file__).parent
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here.parent / "plugins")]))
    return subprocess.run([sys.executable, "-c", _DAEMON_CHILD, str(store), str(here), *args], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def resumable_run():
    return resumable_reference(STEPS)


@pytest.mark.parametrize(("pause", "wait", "said"), [
    ("0.1", None, "its next training forward or optimizer.step() raises"),
    ("5", "0.5", "was still inside `with rec:` on the daemon thread 'recording-daemon'"),
], ids=["stopped_at_its_next_forward", "exited_from_the_exit_hook_after_the_wait"])
def test_a_daemon_thread_recording_at_exit_keeps_every_returned_step(tmp_path, resumable_run, pause, wait, said):
    store = tmp_path / "run"
    done = _daemon_child(store, pause, *([wait] if wait else []))
    assert done.returncode == 3, done.stderr
    returned = int(done.stdout.split()[-1])
    assert returned >= 2 and _stored(store, resumable_run) == returned
    assert not (store / LOCK).exists()
    assert not explaind.Trajectory.load(store, model=resumable_setup()[0]).manifest.complete
    assert said in done.stderr and "Join the recording thread" in done.stderr, done.stderr
    assert _resume_to_the_end(store, resumable_run) == returned
