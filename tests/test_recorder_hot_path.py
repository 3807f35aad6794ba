"""The recorder's hot-path shortcuts keep every recorded value: warm theta buffers, Adam's P in one buffer,
the store writer's overlapped write, the byte comparison of gradients (docs/recording.md, "Recording overhead")."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from explaind_optimizers.adam import as_used, preconditioner
from torch import nn

import explaind
from explaind.trajectory import _background, _filewrite
from explaind.trajectory._background import WarmBuffers


def _ready(warm: WarmBuffers, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while warm._ready.empty():
        assert time.monotonic() < end, "the warm-buffer thread made no set"
        time.sleep(0.01)


def test_warm_copies_are_exact_independent_and_keep_strides():
    src = {"w": torch.randn(6, 5).t(), "b": torch.randn(7), "c": torch.randn(2, 3, 4, 4).to(
        memory_format=torch.channels_last)}
    warm = WarmBuffers(src, depth=2)
    thread = warm._thread
    assert thread is not None and thread.is_alive()
    try:
        _ready(warm)
        first = warm.copies(src)
        for name, t in src.items():
            assert torch.equal(first[name], t) and first[name].stride() == t.stride()
            assert first[name].data_ptr() != t.data_ptr()
        _ready(warm)
        src["b"].add_(1.0)
        second = warm.copies(src)
        assert torch.equal(second["b"], src["b"]) and not torch.equal(first["b"], src["b"])
        assert all(second[n].data_ptr() != first[n].data_ptr() for n in src)
    finally:
        warm.close()
    assert not thread.is_alive()


def test_warm_buffers_fall_back_to_clones_when_none_is_ready():
    src = {"w": torch.randn(3, 3)}
    warm = WarmBuffers(src, depth=1)
    warm.close()  # no set left: every copy is a clone
    out = warm.copies(src)
    assert torch.equal(out["w"], src["w"]) and out["w"].data_ptr() != src["w"].data_ptr()
    assert warm.misses == 1
    meta = WarmBuffers({"m": torch.empty(4, device="meta")})  # not on the CPU: no thread, clones
    assert meta._thread is None and meta.copies({"m": torch.empty(4, device="meta")})["m"].is_meta
    meta.close()


def test_warm_buffers_close_does_not_wait_for_the_thread_s_poll(monkeypatch):
    # a thread waiting to hand a set over to a full queue looks at its stop flag every WARM_POLL_S
    # seconds; close() makes room for it instead of waiting that out (here 60 s: the test would hang)
    monkeypatch.setattr(_background, "WARM_POLL_S", 60.0)
    warm = WarmBuffers({"w": torch.randn(8, 8)}, depth=1)
    _ready(warm)
    time.sleep(0.05)  # the thread has made its next set and waits in put()
    closer = threading.Thread(target=warm.close, daemon=True)
    closer.start()
    closer.join(timeout=10.0)
    assert not closer.is_alive(), "close() waited for the warm-buffer thread's poll"
    assert warm._thread is None and warm._ready.empty()


def _mlp_and_data() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A float64 MLP and 40 samples of 6 features, 3 classes (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    return model, torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 3, (40,))


def _recorded_steps(rec, model, opt, X, y, steps: int, stride: int):
    """Train ``steps`` recorded steps on batches of 8 starting ``stride`` samples apart; yields each step after it."""
    for s in range(steps):
        idx = torch.arange(s * stride, s * stride + 8) % 40
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), y[idx]).backward()
        rec.log_batch(idx)
        opt.step()
        yield s


@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_in_memory_theta_equals_the_parameters_after_every_step(opt_name):
    model, X, y = _mlp_and_data()
    opt = (torch.optim.Adam(model.parameters(), lr=1e-2) if opt_name == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    seen = [{n: p.detach().clone() for n, p in model.named_parameters()}]
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False)
    with rec:
        for _ in _recorded_steps(rec, model, opt, X, y, steps=12, stride=3):
            seen.append({n: p.detach().clone() for n, p in model.named_parameters()})
            time.sleep(0.005)  # let the warm-buffer thread make sets, so most copies use them
        warm = rec._warm
        assert warm is not None and warm._thread is not None and warm.misses < 11
        thread = warm._thread
    assert rec._warm is None and not thread.is_alive()  # closed with the recorder
    traj = rec.trajectory
    for s, ref in enumerate(seen):
        got = traj.params(s)
        assert all(torch.equal(got[n], ref[n]) for n in ref), f"theta_{s}"


def test_adams_uncopied_P_of_every_step_stays_as_the_optimizer_state_gave_it():
    model, X, y = _mlp_and_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), maximize=False)
    expected = []
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y), check_gradients=False)
    with rec:
        for s in _recorded_steps(rec, model, opt, X, y, steps=6, stride=5):
            t = s + 1.0  # P from the state torch left, written out here: lr / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + eps)
            expected.append({n: 1e-2 / (1 - 0.8**t) / (opt.state[p]["exp_avg_sq"] / (1 - 0.95**t)).sqrt().add(1e-8)
                             for n, p in model.named_parameters()})
    for s, ref in enumerate(expected):
        got = rec.trajectory.updates(s)
        for n, P in ref.items():
            torch.testing.assert_close(got[n].P, P, rtol=1e-14, atol=0.0)
    firsts = [rec.trajectory.updates(s)["0.weight"].P.data_ptr() for s in range(6)]
    assert len(set(firsts)) == 6  # a tensor per step, none overwritten by a later one


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_preconditioner_has_the_bits_of_one_tensor_per_operation(dtype, amsgrad):
    gen = torch.Generator().manual_seed(1)
    v = (torch.rand(500, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-14, 3, (500,), generator=gen))
    v = v.to(dtype)
    v[:4] = 0.0
    state = {"step": torch.tensor(7.0), "exp_avg_sq": v, "max_exp_avg_sq": v.flip(0)}
    lr, beta1, beta2, eps = 3e-3, 0.9, 0.98, 1e-8
    # the operations of the adapter before, each into a new tensor
    second = state["max_exp_avg_sq"] if amsgrad else v
    denom = (second.sqrt() / (1 - beta2**7.0) ** 0.5).add_(eps)
    ref = torch.full_like(denom, as_used(lr / (1 - beta1**7.0), dtype)).div_(denom)
    got = preconditioner(state, lr, beta1, beta2, eps, amsgrad, dtype)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
    assert got.dtype == dtype and torch.equal(got.view(bits), ref.view(bits))
    assert torch.equal(state["exp_avg_sq"], v)  # the optimizer's state is not written into


def test_a_failed_write_on_the_io_thread_surfaces_and_leaves_no_file(tmp_path, monkeypatch):
    writer = _filewrite.TensorFileWriter()
    tensors = {"a": torch.randn(3000), "b": torch.arange(10)}
    record = writer.write(tmp_path, "one.safetensors", tensors, fsync=False)
    assert (tmp_path / "one.safetensors").stat().st_size == record.nbytes

    def broken(fd, data):
        assert threading.current_thread().name.startswith("explaind-file-io")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(_filewrite, "_write_all", broken)
    with pytest.raises(OSError, match="No space left"):
        writer.write(tmp_path, "two.safetensors", tensors, fsync=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.safetensors"]
    pool = writer._pool
    writer.close()
    assert writer._pool is None and pool is not None and all(not t.is_alive() for t in pool._threads)


def test_an_interrupted_wait_for_the_io_thread_returns_only_after_the_write(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    from concurrent.futures import wait as real_wait

    calls = []

    def interrupted_once(futures):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_wait(futures)

    monkeypatch.setattr(_filewrite, "wait", interrupted_once)
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(gate.wait, 10)
        threading.Timer(0.2, gate.set).start()
        with pytest.raises(KeyboardInterrupt):
            _filewrite._finished(future)
        assert future.done() and len(calls) == 2  # waited again after the interrupt, then re-raised it
