"""Cases of the twelfth round whose loops draw random numbers or extra rows every step: DDPM diffusion, a
denoising autoencoder, a discriminator against a frozen generator, DQN, actor-critic, REINFORCE, PPO and word2vec's
skip-gram with negative sampling (collected in tests/_paradigms12_kit.py's ``CASES``).

A case returns a :class:`Run` or raises where the library refuses the loop. Here too the pieces every case shares:
:class:`Run`, the textbook recording loop (:func:`record`) and the figures (:func:`figures`:
tests/_stranger_loops_kit.py's ``measure``; :func:`default_figures`: the default estimators, for the untuned rates).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from _paradigms12_models import (
    DT,
    T_STEPS,
    ActorCritic,
    Denoiser,
    DenoisingAE,
    DiffusionInForward,
    SkipGram,
    TargetQ,
    noised,
)
from _stranger_loops_kit import BATCH, STEPS, N, batches, data, measure
from reference import Reference, rel_err
from replay_reference import BufferReference, ReplayReference
from torch import nn

import explaind
from explaind.exceptions import ExplaindWarning


class Run(NamedTuple):
    model: nn.Module
    traj: Any
    X_test: torch.Tensor
    reference: type = Reference


Case = Callable[[], Run]
GAMMA = 0.9


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def record(model: nn.Module, opt: Any, inputs: Any, targets: Any, loss: Any, steps: list[torch.Tensor],
           train_data: tuple[Any, Any] | None = None, **rec_kwargs: Any) -> Any:
    """The textbook loop over ``steps`` (each a tensor of row indices): ``loss(model(inputs[idx]), targets[idx])``
    backwarded, the batch logged; recorded with ``train_data`` (default ``(inputs, targets)``)."""
    loss_fn = F.mse_loss if loss == "mse" else (F.cross_entropy if loss == "cross_entropy" else loss)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=train_data or (inputs, targets), **rec_kwargs)
    with rec:
        for idx in steps:
            opt.zero_grad()
            loss_fn(model(inputs[idx]), targets[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return rec.trajectory


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def per_step_rows(s: int, idx: torch.Tensor) -> torch.Tensor:
    """Step ``s``'s own rows ``s * BATCH + k`` (draws stacked per step in ``train_data``)."""
    return s * BATCH + torch.arange(len(idx))


def figures(name: str, run: Run) -> dict[str, Any]:
    """``measure`` of ``run`` on its test inputs against its reference."""
    return measure(run.model, run.traj, run.reference, X_test=run.X_test)


def default_figures(run: Run) -> dict[str, Any]:
    """The default replica's relative error against the trained model and the default estimator's residual share,
    with every ExplaindWarning (the untuned-rate cases)."""
    with torch.no_grad():
        truth = run.model.eval()(run.X_test)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExplaindWarning)
        replica = rel_err(explaind.KernelReplica(device="cpu").fit(run.traj).predict(run.X_test), truth)
        att = explaind.InfluenceEstimator(keep=("train",), device="cpu").fit(run.traj).transform(run.X_test)
    return {"replica": replica, "share": float(att.meta["residual_share"]),
            "warnings": [str(w.message) for w in caught if issubclass(w.category, ExplaindWarning)]}


# ---------------------------------------------------------------------------------------------- diffusion, DAE, GAN


def diffusion_draws() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every step's timesteps and noise, drawn as DDPM's loop draws them: ``(t (S, B), eps (S, B, 4))`` and the
    clean rows they noise ``(S, B, 4)``."""
    X, _, _ = data()
    g = gen(11)
    t = torch.randint(0, T_STEPS, (STEPS, BATCH), generator=g)
    eps = torch.randn(STEPS, BATCH, 4, generator=g, dtype=DT)
    return t, eps, torch.stack([X[idx] for idx in batches()])


def ddpm_in_loop() -> Run:
    """DDPM's loop: per step a timestep and Gaussian noise drawn for each sample, the denoiser trained by MSE on
    the noise; ``train_data`` holds the clean samples (timestep column 0, noise targets 0)."""
    X, _, X_test = data()
    model = Denoiser()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    t, eps, _ = diffusion_draws()
    clean = torch.cat([X, torch.zeros(N, 1, dtype=DT)], 1)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(clean, torch.zeros(N, 4, dtype=DT)))
    with rec:
        for s, idx in enumerate(batches()):
            opt.zero_grad()
            inputs = torch.cat([noised(X[idx], t[s], eps[s]), t[s][:, None].to(DT)], 1)
            F.mse_loss(model(inputs), eps[s]).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, test_points(X_test))


def test_points(X_test: torch.Tensor) -> torch.Tensor:
    """The denoiser's test inputs: the test points at timesteps 2, 5 and 8."""
    return torch.cat([X_test, torch.tensor([[2.0], [5.0], [8.0]], dtype=DT)], 1)


def ddpm_rows(lr: float = 0.01) -> Run:
    """The fix: each step's draws stacked as ``train_data``'s rows (``x_t`` and ``t`` as input, ``eps`` as target),
    step ``s`` logging its own rows; the denoiser trained by Adam at ``lr``."""
    _, _, X_test = data()
    t, eps, x0 = diffusion_draws()
    inputs = torch.cat([noised(x0.flatten(0, 1), t.flatten(), eps.flatten(0, 1)), t.reshape(-1, 1).to(DT)], 1)
    model = Denoiser()
    steps = [per_step_rows(s, idx) for s, idx in enumerate(batches())]
    traj = record(model, torch.optim.Adam(model.parameters(), lr=lr), inputs, eps.flatten(0, 1), "mse", steps)
    return Run(model, traj, test_points(X_test))


def ddpm_in_forward(capture: bool = True) -> Run:
    """DDPM with the timestep and noise drawn inside the model's training forward (:class:`DiffusionInForward`),
    MSE of ``eps_hat - eps`` to 0, ``capture_random=True`` (or left at ``"auto"``)."""
    X, _, X_test = data()
    model = DiffusionInForward()
    torch.manual_seed(4)
    traj = record(model, torch.optim.Adam(model.parameters(), lr=0.01), X, torch.zeros(N, 4, dtype=DT), "mse",
                  batches(), **({"capture_random": True} if capture else {}))
    return Run(model, traj, X_test, ReplayReference)


def denoising_autoencoder() -> Run:
    """A denoising autoencoder, its noise drawn in the training forward, reconstructing the clean input (MSE)."""
    X, _, X_test = data()
    model = DenoisingAE()
    torch.manual_seed(4)
    return Run(model, record(model, sgd(model), X, X, "mse", batches(), capture_random=True), X_test,
               ReplayReference)


def generator() -> nn.Module:
    torch.manual_seed(9)
    return nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 4)).to(DT).requires_grad_(False)


def discriminator() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1)).to(DT)


def bce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(out[:, 0], y)


def gan_in_loop() -> Run:
    """A discriminator trained against a frozen generator: per step the real batch and as many fakes ``G(z)``,
    ``z`` drawn in the loop, labelled 1 and 0; ``train_data`` holds the real samples."""
    X, _, X_test = data()
    G, D = generator(), discriminator()
    opt = sgd(D)
    rec = explaind.TrajectoryRecorder(D, opt, loss=bce, train_data=(X, torch.ones(N, dtype=DT)))
    with rec:
        for idx in batches():
            fakes = G(torch.randn(BATCH, 2, generator=gen(3), dtype=DT))
            opt.zero_grad()
            bce(D(torch.cat([X[idx], fakes])), torch.cat([torch.ones(BATCH), torch.zeros(BATCH)]).to(DT)).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(D, rec.trajectory, X_test)


def gan_rows() -> Run:
    """The fix: the frozen generator's fakes drawn before recording, one per step and slot, stacked after the real
    samples in ``train_data`` (label 0); each step logs its real rows and its own fake rows."""
    X, _, X_test = data()
    G, D = generator(), discriminator()
    fakes = G(torch.randn(STEPS * BATCH, 2, generator=gen(3), dtype=DT))
    inputs, labels = torch.cat([X, fakes]), torch.cat([torch.ones(N), torch.zeros(STEPS * BATCH)]).to(DT)
    steps = [torch.cat([idx, N + per_step_rows(s, idx)]) for s, idx in enumerate(batches())]
    return Run(D, record(D, sgd(D), inputs, labels, bce, steps), X_test)


# ---------------------------------------------------------------------------------------------- reinforcement learning


def transitions() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A replay buffer of ``N`` transitions ``(s (4), a, r, s' (4))``."""
    X, y, _ = data()
    g = gen(21)
    return X, y, torch.randn(N, generator=g, dtype=DT), torch.randn(N, 4, generator=g, dtype=DT)


def q_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)


def td_loss(q: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``(Q(s)[a] - y)^2`` per transition, ``target = [a, y]``."""
    return ((q.gather(1, target[:, :1].long())[:, 0] - target[:, 1]) ** 2).mean()


def replay_batches() -> list[torch.Tensor]:
    """Replay-buffer samples with replacement."""
    g = gen(7)
    return [torch.randint(0, N, (BATCH,), generator=g) for _ in range(STEPS)]


def dqn_closure() -> Run:
    """DQN with the target network read by the loss callable from its closure, ``y = r + gamma max Q'(s')``, the
    target network copied from the online one every 2 steps; ``train_data = (s, [a, r, s'])``."""
    S, A, R, S2 = transitions()
    model = q_net()
    target = {"net": copy.deepcopy(model)}

    def loss(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = t[:, 1] + GAMMA * target["net"](t[:, 2:]).amax(1)
        return td_loss(q, torch.stack([t[:, 0], y], 1))

    opt = sgd(model)
    info = torch.cat([A[:, None].to(DT), R[:, None], S2], 1)
    rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=(S, info))
    with rec:
        for s, idx in enumerate(replay_batches()):
            opt.zero_grad()
            loss(model(S[idx]), info[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            if s % 2 == 1:
                target["net"] = copy.deepcopy(model)
    return Run(model, rec.trajectory, data()[2])


def dqn_target_buffers(lr: float = 0.1) -> Run:
    """The fix: the target network's weights held as buffers of the model (:class:`TargetQ`), copied by the training
    forward every 2 steps and read to compute ``y``; the loss ``(Q(s)[a] - y)^2`` on the output's two columns,
    recorded with ``capture_random=True`` (which replays the buffer updates)."""
    S, A, R, S2 = transitions()
    model = TargetQ()
    inputs = torch.cat([S, A[:, None].to(DT), R[:, None], S2], 1)
    test = torch.cat([data()[2], torch.tensor([[0.0, 0.5], [1.0, -1.0], [2.0, 0.0]], dtype=DT), S2[:3]], 1)
    traj = record(model, sgd(model, lr), inputs, torch.zeros(N, dtype=DT), q_loss, replay_batches(),
                  capture_random=True)
    return Run(model, traj, test, BufferReference)


def q_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    return ((out[:, 0] - out[:, 1].detach()) ** 2).mean()


def actor_critic(lr: float = 0.05) -> Run:
    """An advantage actor-critic on a contextual bandit (reward 1 for the labelled action): the action drawn in
    the training forward (:class:`ActorCritic`, ``capture_random=True``), the loss ``-(r - V).detach() log pi(a) +
    (r - V)^2 / 2`` per sample."""
    X, y, X_test = data()
    model = ActorCritic()
    torch.manual_seed(4)
    traj = record(model, torch.optim.Adam(model.parameters(), lr=lr), X, y, ac_loss, batches(), capture_random=True)
    return Run(model, traj, X_test, ReplayReference)


def ac_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logp, value, action = torch.log_softmax(out[:, :3], 1), out[:, 3], out[:, 4:]
    reward = action[torch.arange(len(y)), y]
    advantage = (reward - value).detach()
    return (-(advantage * (logp * action).sum(1)) + 0.5 * (reward - value) ** 2).mean()


def reinforce_baseline_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the batch's mean reward as baseline (detached): ``-(r - mean r) log pi(a)``."""
    logp, action = torch.log_softmax(out[:, :3], 1), out[:, 4:]
    reward = action[torch.arange(len(y)), y]
    return (-((reward - reward.mean()).detach() * (logp * action).sum(1))).mean()


def reinforce_in_forward() -> Run:
    """REINFORCE with a batch-mean baseline in the loss callable, the action drawn in the training forward."""
    X, y, X_test = data()
    model = ActorCritic()
    torch.manual_seed(4)
    traj = record(model, sgd(model), X, y, reinforce_baseline_loss, batches(), capture_random=True)
    return Run(model, traj, X_test, ReplayReference)


def reinforce_in_loop() -> Run:
    """REINFORCE as usually written: actions drawn from the policy in the loop, ``-(r - mean r) log pi(a)``
    backwarded, the run recorded with ``train_data=(states, labels)`` and ``loss="cross_entropy"``."""
    X, y, X_test = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).to(DT)
    opt = sgd(model)
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in batches():
            opt.zero_grad()
            logp = torch.log_softmax(model(X[idx]), 1)
            action = torch.multinomial(logp.exp().detach(), 1, generator=gen(2))[:, 0]
            reward = (action == y[idx]).to(DT)
            (-((reward - reward.mean()) * logp[torch.arange(BATCH), action])).mean().backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, X_test)


def ppo_rollout() -> tuple[torch.Tensor, torch.Tensor]:
    """One rollout of the initial policy (PPO's data for an update): states, and per state ``[a, advantage, old
    log pi(a)]`` with the action drawn from that policy and a Gaussian advantage."""
    X, _, _ = data()
    g = gen(81)
    with torch.no_grad():
        logp = torch.log_softmax(q_net()(X), 1)
    actions = torch.multinomial(logp.exp(), 1, generator=g)[:, 0]
    advantage = torch.randn(N, generator=g, dtype=DT)
    return X, torch.stack([actions.to(DT), advantage, logp[torch.arange(N), actions]], 1)


def ppo_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """PPO's clipped surrogate ``-min(rho A, clip(rho, 0.8, 1.2) A)``, ``rho = pi(a) / pi_old(a)``."""
    ratio = torch.exp(torch.log_softmax(out, 1).gather(1, t[:, :1].long())[:, 0] - t[:, 2])
    return -torch.minimum(ratio * t[:, 1], torch.clamp(ratio, 0.8, 1.2) * t[:, 1]).mean()


def ppo(lr: float = 0.1, optim: str = "sgd") -> Run:
    """PPO's update: minibatches over one fixed rollout of the old policy, the clipped surrogate per sample."""
    S, info = ppo_rollout()
    model = q_net()
    opt = sgd(model, lr) if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    return Run(model, record(model, opt, S, info, ppo_loss, batches()), data()[2])


def skipgram_data() -> tuple[torch.Tensor, torch.Tensor]:
    """``N`` (center, context) pairs with zero negative columns, and 3 test rows with negatives."""
    g = gen(91)
    pairs = torch.randint(0, 8, (N, 2), generator=g).to(DT)
    test = torch.randint(0, 8, (3, 5), generator=g).to(DT)
    return torch.cat([pairs, torch.zeros(N, 3, dtype=DT)], 1), test


def sgns_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """Negative sampling: ``-log sigma(pos) - sum log sigma(-neg)``."""
    return -(F.logsigmoid(out[:, 0]) + F.logsigmoid(-out[:, 1:]).sum(1)).mean()


def skipgram(in_loop: bool = False) -> Run:
    """Skip-gram with 3 negatives per pair: drawn in the training forward (``capture_random=True``), or drawn in
    the loop and written into the batch's negative columns (``train_data`` the pairs)."""
    rows, test = skipgram_data()
    model = SkipGram(draw=not in_loop)
    opt = sgd(model)
    torch.manual_seed(4)
    if not in_loop:
        return Run(model, record(model, opt, rows, torch.zeros(N, dtype=DT), sgns_loss, batches(),
                                 capture_random=True), test, ReplayReference)
    rec = explaind.TrajectoryRecorder(model, opt, loss=sgns_loss, train_data=(rows, torch.zeros(N, dtype=DT)))
    with rec:
        for idx in batches():
            batch = rows[idx].clone()
            batch[:, 2:] = torch.randint(0, 8, (BATCH, 3)).to(DT)
            opt.zero_grad()
            sgns_loss(model(batch), None).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, test)
