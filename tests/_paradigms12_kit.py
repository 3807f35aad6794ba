"""Cases of the twelfth round (tests/test_paradigms_round12.py, tests/paradigms_round12_table.py): whole training
paradigms as people write them from papers, each a tiny float64 plain loop recorded with ``explaind.Recorder``.

A case returns a :class:`Run` (the trained model, its trajectory, test inputs and the slow float64 loop reference
that fits it: ``reference.Reference``, or ``replay_reference.ReplayReference`` / ``BufferReference`` where training
forwards draw random numbers or count a buffer up), or raises where the library refuses the loop. The models are in
tests/_paradigms12_models.py; the cases whose loops draw every step (diffusion, GAN, reinforcement learning,
skip-gram) and the shared recording loop and figures in tests/_paradigms12_draws.py. Figures:
tests/_stranger_loops_kit.py's ``measure`` (replica against the trained model in evaluation mode, residual share,
``keep=("train",)`` scores against the reference and its own residual); the untuned-rate cases (:data:`DEFAULT_RULE`)
with the default estimators.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from _paradigms12_draws import (  # noqa: F401 - figures and default_figures re-exported for the test and the table
    Case,
    Run,
    actor_critic,
    ddpm_in_forward,
    ddpm_in_loop,
    ddpm_rows,
    default_figures,
    denoising_autoencoder,
    dqn_closure,
    dqn_target_buffers,
    figures,
    gan_in_loop,
    gan_rows,
    gen,
    ppo,
    record,
    reinforce_in_forward,
    reinforce_in_loop,
    sgd,
    skipgram,
)
from _paradigms12_models import (
    DT,
    MAML,
    MaskedAE,
    NeRF,
    Seq2Seq,
    Siamese,
    SimSiam,
    TwoTowers,
    UNet1d,
)
from _stranger_loops_kit import BATCH, N, batches, data
from reference import Reference
from replay_reference import BufferReference, ReplayReference
from torch import nn

import explaind

# ---------------------------------------------------------------------------------------------- sequences


def seq_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source sequences (3 x 2 features), target tokens (3 of 4) and teacher-forced inputs ``[src, BOS, t1, t2]``;
    returns ``(inputs (N, 9), targets (N, 3), test inputs (3, 9))``."""
    g = gen(31)
    src = torch.randn(N + 3, 6, generator=g, dtype=DT)
    tgt = torch.randint(0, 4, (N + 3, 3), generator=g)
    tgt_in = torch.cat([torch.zeros(N + 3, 1, dtype=torch.long), tgt[:, :2]], 1)
    inputs = torch.cat([src, tgt_in.to(DT)], 1)
    return inputs[:N], tgt[:N], inputs[N:]


def seq_loss(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, 4), tgt.reshape(-1))


def seq2seq(sampling: bool = False, schedule: str = "attribute", lr: float = 0.1, optim: str = "sgd") -> Run:
    """A GRU encoder-decoder trained by teacher forcing, or with scheduled sampling (:class:`Seq2Seq`); with
    ``schedule="attribute"`` the loop raises ``model.p`` by 0.1 after every step, with ``"buffer"`` the model
    counts its training forwards in a buffer. Sampling draws, so it is recorded with ``capture_random=True``."""
    inputs, tgt, X_test = seq_data()
    model = Seq2Seq(sampling, schedule)
    opt = sgd(model, lr) if optim == "sgd" else torch.optim.Adam(model.parameters(), lr=lr)
    torch.manual_seed(4)
    rec = explaind.TrajectoryRecorder(model, opt, loss=seq_loss, train_data=(inputs, tgt),
                                      **({"capture_random": True} if sampling else {}))
    with rec:
        for idx in batches():
            opt.zero_grad()
            seq_loss(model(inputs[idx]), tgt[idx]).backward()
            rec.log_batch(idx)
            opt.step()
            model.p += 0.1
    reference = (BufferReference if schedule == "buffer" else ReplayReference) if sampling else Reference
    return Run(model, rec.trajectory, X_test, reference)


# ---------------------------------------------------------------------------------------------- self-supervised


def views() -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of every sample, drawn once before recording: ``(N, 8)`` and the test pairs ``(3, 8)``."""
    X, _, X_test = data()
    g = gen(41)
    both = torch.cat([X, X_test])
    pairs = torch.cat([both + 0.2 * torch.randn(both.shape, generator=g, dtype=DT),
                       both + 0.2 * torch.randn(both.shape, generator=g, dtype=DT)], 1)
    return pairs[:N], pairs[N:]


def clip_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric InfoNCE over the batch (temperature 0.5): every pair's logit reads every other sample."""
    logits = out[:, :3] @ out[:, 3:].T / 0.5
    labels = torch.arange(len(out))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def clip_towers(check: bool = True) -> Run:
    """CLIP's two towers trained on paired views by the batch's InfoNCE (``check_gradients=check``)."""
    pairs, test = views()
    model = TwoTowers()
    traj = record(model, sgd(model), pairs, torch.zeros(N, dtype=DT), clip_loss, batches(), check_gradients=check)
    return Run(model, traj, test)


def simsiam_loss(out: torch.Tensor, _: torch.Tensor) -> torch.Tensor:
    """SimSiam's symmetric negative cosine with the stop-gradient on the targets ``z``, a mean of per-sample terms."""
    p1, p2, z1, z2 = out[:, :3], out[:, 3:6], out[:, 6:9], out[:, 9:]
    cos = F.cosine_similarity
    return (-(cos(p1, z2.detach()) + cos(p2, z1.detach())) / 2).mean()


def simsiam(stop_in_forward: bool = False, lr: float = 0.1) -> Run:
    """SimSiam on two views drawn once before recording: the stop-gradient in the loss callable, or (``stop_in_
    forward``) inside the model's forward with the loss the mean of its output."""
    pairs, test = views()
    model = SimSiam(stop_in_forward)
    loss = (lambda out, _: out.mean()) if stop_in_forward else simsiam_loss
    return Run(model, record(model, sgd(model, lr), pairs, torch.zeros(N, dtype=DT), loss, batches()), test)


def mae_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE on the hidden patches only, per sample, the mask read from the model's output."""
    recon, hidden = out[:, :4], out[:, 4:]
    return (((recon - x) ** 2 * hidden).sum(1) / hidden.sum(1)).mean()


def mae_full_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """MSE of the reconstruction columns against the whole clean input."""
    return F.mse_loss(out[:, :4], x)


def mae(in_loop: bool = False) -> Run:
    """A masked autoencoder: the mask drawn in the training forward, the loss on the hidden patches
    (``capture_random=True``); or the mask drawn in the loop, the masked batch given to the model and the whole
    input reconstructed."""
    X, _, X_test = data()
    model = MaskedAE(draw=not in_loop)
    opt = sgd(model)
    torch.manual_seed(4)
    if not in_loop:
        return Run(model, record(model, opt, X, X, mae_loss, batches(), capture_random=True), X_test,
                   ReplayReference)
    rec = explaind.TrajectoryRecorder(model, opt, loss=mae_full_loss, train_data=(X, X))
    with rec:
        for idx in batches():
            hidden = torch.zeros(BATCH, 4, dtype=DT).scatter_(1, torch.rand(BATCH, 4).argsort(1)[:, :2], 1.0)
            opt.zero_grad()
            mae_full_loss(model(X[idx] * (1 - hidden)), X[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    return Run(model, rec.trajectory, X_test)


# ---------------------------------------------------------------------------------------------- architectures, pairs


def nerf(act: type = nn.Tanh, lr: float = 0.01) -> Run:
    """NeRF's positional-encoding MLP fitting the colours of 2-D points (MSE, Adam at ``lr``)."""
    X, _, X_test = data()
    colours = torch.sin(X[:, 1:4] * 2.0)
    model = NeRF(act)
    return Run(model, record(model, torch.optim.Adam(model.parameters(), lr=lr), X, colours, "mse", batches()),
               X_test)


def unet() -> Run:
    """A 1-D U-Net (strided convolution down, transposed convolution up, skip concatenated) denoising signals of 8."""
    g = gen(51)
    clean = torch.sin(torch.linspace(0, 3, 8, dtype=DT)[None] * (1 + torch.rand(N + 3, 1, generator=g, dtype=DT)))
    noisy = clean + 0.1 * torch.randn(clean.shape, generator=g, dtype=DT)
    model = UNet1d()
    return Run(model, record(model, sgd(model), noisy[:N], clean[:N], "mse", batches()), noisy[N:])


def margin_loss(d: torch.Tensor, same: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """The contrastive margin loss of Hadsell et al.: ``same d^2 + (1 - same) max(0, m - d)^2``."""
    d = d[:, 0]
    return (same * d ** 2 + (1 - same) * torch.clamp(margin - d, min=0) ** 2).mean()


def siamese() -> Run:
    """A Siamese network on pairs built before recording (each sample with a partner; same class or not)."""
    X, y, X_test = data()
    partner = torch.randperm(N, generator=gen(61))
    pairs = torch.cat([X, X[partner]], 1)
    same = (y == y[partner]).to(DT)
    model = Siamese()
    return Run(model, record(model, sgd(model), pairs, same, margin_loss, batches()),
               torch.cat([X_test, X_test.flip(0)], 1))


# ---------------------------------------------------------------------------------------------- meta-learning


def tasks() -> tuple[torch.Tensor, torch.Tensor]:
    """Sine-wave regression tasks: ``[support (4 x (x, 1, y)), query (x, 1)]`` per task and the query's target."""
    g = gen(71)
    amp, phase = 1 + torch.rand(N + 3, 1, generator=g, dtype=DT), 3 * torch.rand(N + 3, 1, generator=g, dtype=DT)
    xs = 4 * torch.rand(N + 3, 5, generator=g, dtype=DT) - 2
    ys = amp * torch.sin(xs + phase)
    support = torch.stack([xs[:, :4], torch.ones_like(xs[:, :4]), ys[:, :4]], 2).flatten(1)
    inputs = torch.cat([support, xs[:, 4:], torch.ones(N + 3, 1, dtype=DT)], 1)
    return inputs, ys[:, 4]


def maml_in_forward() -> Run:
    """MAML with the inner step inside the model's forward (:class:`MAML`), one task per sample, MSE on the query."""
    inputs, targets = tasks()
    model = MAML()
    traj = record(model, sgd(model, 0.05), inputs[:N], targets[:N, None], "mse", batches())
    return Run(model, traj, inputs[N:])


def maml_in_loop() -> Run:
    """MAML as usually written: the network recorded is the plain regressor, the inner step taken in the loop by
    ``torch.autograd.grad(create_graph=True)`` over each task's support, the query loss at the fast weights by
    ``functional_call``; ``train_data`` holds the query points and targets, the loss is MSE."""
    inputs, targets = tasks()
    net = MAML().net
    opt = sgd(net, 0.05)
    rec = explaind.TrajectoryRecorder(net, opt, loss="mse", train_data=(inputs[:N, 12:14], targets[:N, None]))
    with rec:
        for idx in batches():
            opt.zero_grad()
            total = torch.zeros((), dtype=DT)
            for k in idx.tolist():
                support = inputs[k, :12].reshape(4, 3)
                params = dict(net.named_parameters())
                inner = ((net(support[:, :2])[:, 0] - support[:, 2]) ** 2).mean()
                grads = torch.autograd.grad(inner, list(params.values()), create_graph=True)
                fast = {n: p - 0.3 * g for (n, p), g in zip(params.items(), grads)}
                out = torch.func.functional_call(net, fast, (inputs[k:k + 1, 12:14],))
                total = total + ((out[0, 0] - targets[k]) ** 2) / len(idx)
            total.backward()
            rec.log_batch(idx)
            opt.step()
    return Run(net, rec.trajectory, inputs[N:, 12:14])


def reptile() -> Run:
    """Reptile: per step, a copy of the model trained 3 inner SGD steps on one task, then the outer update
    ``theta += 0.5 (phi - theta)`` written into the parameters by hand after the recorded optimizer's step."""
    inputs, targets = tasks()
    model = MAML()
    opt = sgd(model, 0.05)
    rec = explaind.TrajectoryRecorder(model, opt, loss="mse", train_data=(inputs[:N], targets[:N, None]))
    with rec:
        for idx in batches():
            opt.zero_grad()
            F.mse_loss(model(inputs[idx]), targets[idx, None]).backward()
            rec.log_batch(idx)
            opt.step()
            fast = copy.deepcopy(model.net)
            inner = torch.optim.SGD(fast.parameters(), lr=0.1)
            support = inputs[int(idx[0]), :12].reshape(4, 3)
            for _ in range(3):
                inner.zero_grad()
                F.mse_loss(fast(support[:, :2])[:, 0], support[:, 2]).backward()
                inner.step()
            with torch.no_grad():
                for p, q in zip(model.net.parameters(), fast.parameters()):
                    p.add_(0.5 * (q - p))
    return Run(model, rec.trajectory, inputs[N:])


CASES: dict[str, Case] = {
    # generative
    "ddpm_noise_and_timestep_drawn_in_loop": ddpm_in_loop,
    "ddpm_each_steps_draws_as_train_data_rows": ddpm_rows,
    "ddpm_draws_in_training_forward_capture_random": ddpm_in_forward,
    "ddpm_draws_in_training_forward_no_capture": lambda: ddpm_in_forward(capture=False),
    "ddpm_rows_adam_lr1_untuned": lambda: ddpm_rows(lr=1.0),
    "denoising_autoencoder_noise_in_forward": denoising_autoencoder,
    "gan_discriminator_fakes_drawn_in_loop": gan_in_loop,
    "gan_discriminator_fakes_as_train_data_rows": gan_rows,
    # reinforcement learning
    "dqn_target_network_read_by_loss_closure": dqn_closure,
    "dqn_target_network_as_buffers_copied_in_forward": dqn_target_buffers,
    "dqn_target_buffers_sgd_lr2_untuned": lambda: dqn_target_buffers(lr=2.0),
    "actor_critic_action_drawn_in_forward": actor_critic,
    "reinforce_batch_mean_baseline_action_in_forward": reinforce_in_forward,
    "reinforce_actions_drawn_in_loop": reinforce_in_loop,
    "actor_critic_adam_lr1_untuned": lambda: actor_critic(lr=1.0),
    "ppo_clipped_surrogate_fixed_rollout": ppo,
    "ppo_clipped_surrogate_adam_lr1_untuned": lambda: ppo(lr=1.0, optim="adam"),
    # sequences
    "seq2seq_gru_teacher_forcing": seq2seq,
    "scheduled_sampling_prob_python_attribute": lambda: seq2seq(sampling=True),
    "scheduled_sampling_prob_from_counter_buffer": lambda: seq2seq(sampling=True, schedule="buffer"),
    "seq2seq_teacher_forcing_adam_lr1_untuned": lambda: seq2seq(lr=1.0, optim="adam"),
    # self-supervised
    "clip_two_towers_batch_infonce": clip_towers,
    "clip_two_towers_batch_infonce_check_off": lambda: clip_towers(check=False),
    "simsiam_stop_gradient_in_loss": simsiam,
    "simsiam_stop_gradient_in_forward": lambda: simsiam(stop_in_forward=True),
    "simsiam_sgd_lr3_untuned": lambda: simsiam(lr=3.0),
    "mae_mask_drawn_in_training_forward": mae,
    "mae_mask_drawn_in_loop": lambda: mae(in_loop=True),
    "skipgram_negatives_drawn_in_training_forward": skipgram,
    "skipgram_negatives_drawn_in_loop": lambda: skipgram(in_loop=True),
    # architectures and pairs
    "nerf_positional_encoding_mlp": nerf,
    "nerf_relu_adam_lr1_untuned": lambda: nerf(nn.ReLU, 1.0),
    "unet1d_transposed_conv_skip": unet,
    "siamese_contrastive_margin_pairs": siamese,
    # meta-learning
    "maml_inner_step_in_loop_create_graph": maml_in_loop,
    "maml_inner_step_in_forward_torch_func": maml_in_forward,
    "reptile_outer_update_by_hand": reptile,
}

#: Untuned learning rates: measured with the default estimators (adaptive rule) instead of the 8-node rule.
DEFAULT_RULE = tuple(name for name in CASES if name.endswith("_untuned"))
