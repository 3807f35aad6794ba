"""Layers that draw from their own torch.Generator: captured with the global state, replayed, exact.

The loops seed the private generator themselves before every forward (``gen.manual_seed(500 + s)``); the slow
reference (tests/replay_reference.py) seeds its own copy of the layer the same way, independently of the states
the recorder captured.
"""

from __future__ import annotations

import contextlib
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from engine_compare import as_numpy, reference_terms
from reference import rel_err
from replay_reference import ReplayReference
from torch import nn

import explaind
from explaind.exceptions import ConfigError, ExplaindWarning, TrajectoryError
from explaind.trajectory._random import MicroBatch, RandomState, replayed
from explaind.trajectory._random_store import pack_micro_batches, unpack_micro_batches

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
OUTSIDE = torch.Generator()  # a generator no module holds: the forward of OutsideNoise reads this global


class OutsideNoise(nn.Module):
    """Multiplicative Gaussian noise in training mode, drawn from the module-level generator ``OUTSIDE``."""

    def source(self) -> torch.Generator:
        return OUTSIDE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return x * (1 + 0.5 * torch.randn(x.shape, generator=self.source(), dtype=x.dtype))


class Noise(OutsideNoise):
    """The same noise drawn from the layer's own generator."""

    def __init__(self):
        super().__init__()
        self.gen = torch.Generator()

    def source(self) -> torch.Generator:
        return self.gen


def _model(layer: type[OutsideNoise] = Noise) -> nn.Sequential:
    torch.manual_seed(6)
    return nn.Sequential(nn.Linear(4, 7), layer(), nn.Tanh(), nn.Linear(7, 3)).to(DT)


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(22, 4, generator=gen, dtype=DT), torch.randint(0, 3, (22,), generator=gen)


def _seed(model: nn.Module, s: int) -> None:
    """What the loop does before the forward of step ``s``: seed the generator the noise layer draws from."""
    model[1].source().manual_seed(500 + s)


def _record(model: nn.Sequential, X, y, *, steps: int = 4, seed: bool = True, record: bool = True, **kw):
    """The loop (SGD with momentum, batches of 6 of the first 18 samples), recorded unless ``record=False``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X[:18], y[:18]), **kw)
    order = torch.Generator().manual_seed(1)
    model.train()
    with rec if record else contextlib.nullcontext():
        for s in range(steps):
            idx = torch.randperm(18, generator=order)[:6]
            opt.zero_grad()
            if seed:
                _seed(model, s)
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            if record:
                rec.log_batch(idx)
            opt.step()
    return rec


class SeededReference(ReplayReference):
    """The replaying reference, seeding its copy's noise generator as the loop did."""

    @staticmethod
    def before_forward(module: nn.Module, step: int, micro: int) -> None:
        _seed(module, step)


def _check_exact(traj, model: nn.Module, X_test: torch.Tensor) -> None:
    quad = {"quadrature": "gauss-legendre", "nodes": 8}
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExplaindWarning)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu", **quad).fit(traj).transform(X_test)
    model.eval()
    want = reference_terms(SeededReference(traj, X_test), att)
    assert rel_err(as_numpy(att.values), want["values"]) <= 1e-9
    assert att.meta["residual_share"] <= 1e-9
    with torch.no_grad():
        assert rel_err(as_numpy(att.total()), as_numpy(model(X_test))) <= 1e-6


def test_a_generator_held_by_a_layer_is_found_captured_and_replayed(tmp_path):
    X, y = _data()
    model = _model()
    rec = _record(model, X, y, store=tmp_path / "run")
    traj = rec.trajectory
    assert traj.manifest.generators == ["1.gen"] and "1.gen" in traj.manifest.coupled
    assert float(max(traj.gradient_check()[:3])) <= 1e-12  # the check replayed the layer's draws
    (m,) = traj.micro_batches(2)
    assert len(m.state.private) == 1 and m.state.private_devices == ("cpu",)
    assert torch.equal(m.state.private[0], torch.Generator().manual_seed(502).get_state())
    traj.verify()  # the states are in the checksummed step files
    _check_exact(traj, model, X[18:])
    disk = explaind.Trajectory.load(tmp_path / "run", model=_model().eval())
    _check_exact(disk, model, X[18:])


def test_a_generator_held_elsewhere_is_replayed_when_passed(tmp_path):
    X, y = _data(1)
    model = _model(OutsideNoise)
    traj = _record(model, X, y, generators=[OUTSIDE], store=tmp_path / "run").trajectory
    assert traj.manifest.generators == ["generators[0]"]
    _check_exact(traj, model, X[18:])
    with pytest.raises(TrajectoryError, match=r"generators\[0\].*only 0 such generator.*Trajectory.load\(path, "
                                              r"generators=\[\.\.\.\]\)"):
        explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(
            explaind.Trajectory.load(tmp_path / "run", model=_model(OutsideNoise))).transform(X[18:])
    disk = explaind.Trajectory.load(tmp_path / "run", model=_model(OutsideNoise).eval(), generators=[OUTSIDE])
    _check_exact(disk, model, X[18:])


def test_a_generator_that_is_not_found_fails_the_gradient_check():
    X, y = _data(2)
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*"
                                              r"TrajectoryRecorder\(generators=\[\.\.\.\]\)"):
        _record(_model(OutsideNoise), X, y)  # check_gradients="auto" checks the first steps


def test_without_the_gradient_check_an_unfound_generator_warns_through_the_residual():
    """Recorded anyway: the noise is not replayed, and the residual share carries the difference, loudly."""
    X, y = _data(3)
    traj = _record(_model(OutsideNoise), X, y, check_gradients=False).trajectory
    assert traj.manifest.generators == [] and not traj.manifest.random_capture
    with pytest.warns(ExplaindWarning, match="residual share"):
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(traj).transform(X[18:])
    assert att.meta["residual_share"] > 1e-2


def test_recording_leaves_the_private_generator_alone():
    """The recorder's own forwards (checks) restore the layer's generator: training is the unrecorded one."""
    X, y = _data(4)
    plain, recorded = _model(), _model()
    plain[1].gen.manual_seed(9)
    recorded[1].gen.manual_seed(9)
    _record(plain, X, y, steps=3, seed=False, record=False)
    _record(recorded, X, y, steps=3, seed=False, check_gradients=True)
    for a, b in zip(plain.parameters(), recorded.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(plain[1].gen.get_state(), recorded[1].gen.get_state())


@pytest.mark.parametrize(("given", "message"), [
    (1, r"Step 2: private generator 0 drew on 'cuda'.*replay is on 'cpu'.*Fix"),
    (0, r"Step 2: the training forward drew from 1 private torch.Generator\(s\) but 0 are given.*Fix"),
])
def test_a_generator_on_another_device_or_missing_is_refused(given, message):
    gen = torch.Generator()
    state = RandomState(torch.get_rng_state(), (), "cpu", (gen.get_state(),), ("cuda",))
    with pytest.raises(TrajectoryError, match=message), replayed(state, torch.device("cpu"), "Step 2", [gen][:given]):
        pass
    assert torch.equal(gen.get_state(), torch.Generator().get_state())  # nothing was set


def test_generators_are_validated():
    model = _model()
    with pytest.raises(ConfigError, match=r"generators must be a list of torch.Generator.*\['int'\].*Fix"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss="cross_entropy",
                                    generators=[3])


def test_a_store_missing_a_generator_state_is_reported():
    gen = torch.Generator().manual_seed(4)
    state = RandomState(torch.get_rng_state(), (), "cpu", (gen.get_state(),), ("cpu",))
    idx, w = torch.arange(3), torch.full((3,), 1 / 3, dtype=DT)
    tensors = pack_micro_batches([MicroBatch(idx, w, 1, state)])
    (back,) = unpack_micro_batches(tensors, idx, w, "step_000001")
    assert torch.equal(back.state.private[0], gen.get_state()) and back.state.private_devices == ("cpu",)
    del tensors["micro.0.gen.0"]
    with pytest.raises(TrajectoryError, match=r"step_000001 lacks the private generator states \['micro.0.gen.0'\]"):
        unpack_micro_batches(tensors, idx, w, "step_000001")


# ---------------------------------------------------------------------------------------------- where generators live
class ListNoise(OutsideNoise):
    """The noise generator held in a list attribute."""

    def __init__(self):
        super().__init__()
        self.gens = [torch.Generator()]

    def source(self) -> torch.Generator:
        return self.gens[0]


class DictNoise(OutsideNoise):
    """The noise generator held in a tuple inside a dict attribute (a key with a quote in it)."""

    def __init__(self):
        super().__init__()
        self.pool = {"it's": (torch.Generator(),)}

    def source(self) -> torch.Generator:
        return self.pool["it's"][0]


class Sampler:
    """A helper object (not a module, not a container) owning a generator."""

    def __init__(self):
        self.gen = torch.Generator()


class HelperNoise(OutsideNoise):
    def __init__(self):
        super().__init__()
        self.sampler = Sampler()

    def source(self) -> torch.Generator:
        return self.sampler.gen


@pytest.mark.parametrize(("layer", "name"), [(ListNoise, "1.gens[0]"), (DictNoise, "1.pool[\"it's\"][0]")])
def test_a_generator_in_a_container_attribute_is_found_and_replayed(tmp_path, layer, name):
    X, y = _data(5)
    model = _model(layer)
    traj = _record(model, X, y, store=tmp_path / "run").trajectory
    assert traj.manifest.generators == [name]
    assert float(max(traj.gradient_check()[:3])) <= 1e-12
    _check_exact(traj, model, X[18:])
    _check_exact(explaind.Trajectory.load(tmp_path / "run", model=_model(layer).eval()), model, X[18:])


def test_a_generator_owned_by_a_helper_object_fails_the_check_unless_passed():
    X, y = _data(6)
    with pytest.raises(TrajectoryError, match=r"Step 0: the gradient from backward\(\) does not match.*"
                                              r"TrajectoryRecorder\(generators=\[\.\.\.\]\)"):
        _record(_model(HelperNoise), X, y)
    model = _model(HelperNoise)
    traj = _record(model, X, y, generators=[model[1].sampler.gen]).trajectory
    assert traj.manifest.generators == ["generators[0]"]
    _check_exact(traj, model, X[18:])  # the engine's copy of the model shares the passed generator


def test_names_of_found_generators_point_back_to_them():
    from explaind.trajectory._random import find_generators, resolve_generators

    root = nn.Module()
    root.generators = [torch.Generator()]  # a root container named like the passed ones: ".generators[0]"
    root.table = {3: {"a]b": torch.Generator()}, -1: [None, torch.Generator()]}
    root.big = [torch.Generator()] * 1001  # larger than CONTAINER_SIZE: not searched
    root.child = nn.Linear(2, 2)
    root.child.gen = root.generators[0]  # the same generator again: listed once
    found = find_generators(root)
    assert list(found) == [".generators[0]", "table[3]['a]b']", "table[-1][1]"]
    assert resolve_generators(list(found), root, (), "here") == list(found.values())
    with pytest.raises(TrajectoryError, match=r"\"table\[4\]\['a\]b'\]\" of the model.*Fix"):
        resolve_generators(["table[4]['a]b']"], root, (), "here")


class NoisyLoss:
    def __init__(self):
        self.gen = torch.Generator()

    def __call__(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out + 0.1 * torch.randn(out.shape, generator=self.gen, dtype=out.dtype), target)


def _closure_loss() -> object:
    gens = {"noise": torch.Generator()}

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out + 0.1 * torch.randn(out.shape, generator=gens["noise"], dtype=out.dtype), target)

    return loss


@pytest.mark.parametrize(("loss", "name"), [(NoisyLoss(), "loss.gen"), (_closure_loss(), "loss.gens['noise']")])
def test_a_loss_callable_holding_a_generator_is_refused(loss, name):
    from explaind.trajectory._random import loss_generators

    assert loss_generators(loss) == [name]
    assert loss_generators(F.cross_entropy) == [] and loss_generators("cross_entropy") == []
    model = _model()
    with pytest.raises(ConfigError, match=re.escape(f"loss: the loss callable holds the torch.Generator(s) {[name]}")
                       + r".*one sample at a time.*Fix"):
        explaind.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), loss=loss)
