r"""The validation runs beyond SGD on an MLP: AdamW with a schedule, dropout, batch norm, a contrastive loss.

Each setting is a :class:`~explaind.validation.problem.ValidationProblem` (same digits split and
batch schedule) whose :meth:`train` is a plain torch loop over the recorded batches with sample
weights :math:`w_k` (float64, independent of explaind's engine):

.. math::

    L_s = \frac{1}{|B_s|} \sum_{k \in B_s} w_k \, \ell_k(F(X_{B_s}; \theta_s, \xi_s)),

where :math:`F` is the *batched* training forward and :math:`\xi_s` the random state of step
``s``. With every :math:`w_k = 1` it is the recorded run; :class:`~explaind.CounterfactualEstimator`
differentiates it in :math:`w_k = 1 + \epsilon_k`. What "retraining on a subset" (the samples
outside it weighted 0) means depends on the setting (docs/scores_meaning.md, "Beyond SGD on an MLP"):

* ``"adamw"``: the MLP trained by AdamW (decoupled weight decay) under a cosine learning-rate
  schedule (``CosineAnnealingLR`` over the run); a weight-0 sample is absent from the run.
* ``"dropout"``: the MLP with dropout after the hidden layer, recorded with ``capture_random=True``.
  Every retraining replays the *same* dropout masks (the global generator is seeded before the
  loop, and the masks' draws do not depend on the weights); a weight-0 sample is absent.
* ``"batchnorm"``: a small CNN (conv 3x3, 8 channels, train-mode ``BatchNorm2d``, average pool,
  linear). A weight-0 sample still enters its batches' statistics (and the running statistics), so
  it still shapes the other samples' gradients: "removing" it drops its loss term only.
* ``"relu_untuned"``: the ReLU MLP of the SGD benchmark at a learning rate nobody tuned (SGD lr 0.3 with
  momentum 0.9, six times the tuned 0.05): it converges, but its loss jumps from batch to batch late in
  training. Its loop is :class:`~explaind.validation.problem.ValidationProblem`'s; a weight-0 sample is absent.
* ``"contrastive"``: an encoder of two fixed augmented views of each digit trained with InfoNCE
  (:func:`explaind.batch_coupled_loss`); the explained output is the cosine similarity of a test
  digit's two views. A weight-0 sample still serves as a negative in the other samples' terms:
  "removing" it drops its own term only.

Leaving the samples out of their batches instead (statistics and negatives without them) is the other
intervention, :mod:`explaind.validation.leave_out` (``--leave-out``).

The explained quantity of the classification settings is the true-class logit in evaluation mode
(no dropout; batch norm with the trained running statistics).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .problem import ValidationConfig, ValidationProblem

__all__ = ["SETTING_LR", "MLP_SETTINGS", "SETTING_METHODS", "CLASSIFICATION_METHODS", "SETTING_SIZE", "TOKEN_METHODS",
           "TOKEN_SIZE", "make_problem",
           "setting_config", "setting_methods", "describe", "info_nce_terms", "PairEncoder"]

#: Methods compared on every setting beyond the SGD MLP, the contrastive one included.
SETTING_METHODS: tuple[str, ...] = ("counterfactual", "explaind", "tracin", "grad_dot", "random")
#: Methods compared on the classification settings (``"adamw"``, ``"dropout"``, ``"batchnorm"`` and the SGD MLP
#: at their size): those above, the explicit damped influence function and, when installed, Captum's and TRAK.
#: They need a per-sample cross-entropy loss (the Hessian of the mean training loss, TRAK's margin), so they are
#: not run on InfoNCE, whose terms couple the samples of a batch.
CLASSIFICATION_METHODS: tuple[str, ...] = ("counterfactual", "explaind", "tracin", "influence", "grad_dot", "random",
                                           "captum_influence", "trak")

#: The measured size of every setting beyond the SGD MLP (fewer samples, subsets and seeds than the SGD MLP's
#: benchmark, so that one setting runs in minutes on a 2-core machine), and each setting's optimizer settings.
SETTING_SIZE: dict[str, Any] = dict(n_train=300, n_test=30, hidden=32, epochs=8, batch_size=25, n_subsets=100,
                                    top_k=15, seeds=3, n_bootstrap=1000)
#: Methods compared on the token model ``"tiny_lm"``: every method whose output and loss are the harness's own
#: (Captum's influence function and TRAK are written for classifiers: their output functions read one class per
#: input, not one token per position).
TOKEN_METHODS: tuple[str, ...] = ("counterfactual", "explaind", "tracin", "influence", "grad_dot", "random")
#: The measured size of ``"tiny_lm"`` (it replaces :data:`SETTING_SIZE`'s image counts and widths).
TOKEN_SIZE: dict[str, Any] = dict(n_train=200, n_test=30, hidden=16, epochs=8, batch_size=20, weight_decay=0.01)
#: Embedding size of the contrastive encoder.
EMBEDDING = 8
#: The learning rate of the settings that do not keep ``ValidationConfig.lr`` (``--lr`` overrides it).
SETTING_LR: dict[str, float] = {"adamw": 0.01, "contrastive": 0.1, "relu_untuned": 0.3, "tiny_lm": 0.01}
#: The settings whose loop is the SGD MLP's own (:class:`~explaind.validation.problem.ValidationProblem`).
MLP_SETTINGS: tuple[str, ...] = ("sgd_mlp", "relu_untuned")


def info_nce_terms(outputs: Tensor, targets: Tensor, temperature: float = 0.5) -> Tensor:
    r"""Symmetric InfoNCE terms of a micro-batch of view pairs, shape ``(n,)``.

    ``outputs`` is ``(n, 2 e + 1)``: the embeddings ``a`` and ``b`` of the two views and the similarity
    column (not used here). With :math:`s_{kj} = \hat a_k \cdot \hat b_j / T` (unit vectors),
    :math:`\ell_k = \frac12 [-\log \mathrm{softmax}_j(s_{kj})_k - \log \mathrm{softmax}_j(s_{jk})_k]`:
    the other pairs of the batch are ``k``'s negatives. ``targets`` is unused.
    """
    e = (outputs.shape[1] - 1) // 2
    a = nn.functional.normalize(outputs[:, :e], dim=1)
    b = nn.functional.normalize(outputs[:, e:2 * e], dim=1)
    logits = a @ b.T / temperature
    labels = torch.arange(outputs.shape[0])
    return 0.5 * (nn.functional.cross_entropy(logits, labels, reduction="none")
                  + nn.functional.cross_entropy(logits.T, labels, reduction="none"))


class PairEncoder(nn.Module):
    """An MLP encoder of both views of a pair, ``(n, 2, 64) -> (n, 2 e + 1)``: both embeddings and their cosine."""

    def __init__(self, hidden: int, embedding: int = 8):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(64, hidden), nn.Tanh(), nn.Linear(hidden, embedding))

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.encoder(x[:, 0]), self.encoder(x[:, 1])
        return torch.cat([a, b, nn.functional.cosine_similarity(a, b, dim=1)[:, None]], 1)


def _views(X: Tensor, generator: torch.Generator) -> Tensor:
    """Two augmented views of each flattened 8x8 image, ``(n, 2, 64)``: a random shift of at most one pixel
    (zero fill) plus Gaussian pixel noise of std 0.1, drawn once (fixed data for the whole run)."""
    n = X.shape[0]
    padded = nn.functional.pad(X.reshape(n, 8, 8), (1, 1, 1, 1))
    views = []
    for _ in range(2):
        dy, dx = torch.randint(0, 3, (2, n), generator=generator)
        shifted = torch.stack([padded[i, dy[i]:dy[i] + 8, dx[i]:dx[i] + 8] for i in range(n)])
        noise = 0.1 * torch.randn(n, 8, 8, generator=generator, dtype=X.dtype)
        views.append((shifted + noise).reshape(n, 64))
    return torch.stack(views, 1)


class SettingProblem(ValidationProblem):
    """One of the settings beyond the SGD MLP: a plain torch loop with sample weights (module docstring)."""

    def __init__(self, config: ValidationConfig):
        super().__init__(config)
        if config.setting == "batchnorm":
            self.X_train, self.X_test = self.X_train.reshape(-1, 1, 8, 8), self.X_test.reshape(-1, 1, 8, 8)
        elif config.setting == "contrastive":
            gen = torch.Generator().manual_seed(config.seed + 3)
            self.X_train, self.X_test = _views(self.X_train, gen), _views(self.X_test, gen)
        #: Seed of the global generator right before the loop: the dropout masks of every retraining.
        self.mask_seed = config.seed + 11

    def build_model(self) -> nn.Module:
        """The setting's model at its initialisation (the same tensors on every call)."""
        c = self.config
        torch.manual_seed(c.seed)
        act: nn.Module = nn.Tanh() if c.activation == "tanh" else nn.ReLU()
        if c.setting == "batchnorm":
            model: nn.Module = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), act, nn.AvgPool2d(2),
                                             nn.Flatten(), nn.Linear(128, 10))
        elif c.setting == "contrastive":
            model = PairEncoder(c.hidden, EMBEDDING)
        else:
            layers = [nn.Linear(64, c.hidden), act] + ([nn.Dropout(c.dropout)] if c.setting == "dropout" else [])
            model = nn.Sequential(*layers, nn.Linear(c.hidden, 10))
        return model.double()

    def terms(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """The loss terms :math:`\\ell_k` of a batch, ``(n,)`` (cross-entropy, or InfoNCE's terms)."""
        if self.config.setting == "contrastive":
            return info_nce_terms(outputs, targets, self.config.temperature)
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW with its cosine schedule (setting ``"adamw"``), else SGD with momentum and no schedule."""
        c = self.config
        lr = c.lr
        if c.setting == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=c.weight_decay)
            return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=c.n_steps)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=c.momentum), None

    def _recorder(self, model: nn.Module, opt: torch.optim.Optimizer) -> Any:
        from ..losses import batch_coupled_loss
        from ..trajectory import TrajectoryRecorder

        loss: Any = "cross_entropy"
        if self.config.setting == "contrastive":
            loss = batch_coupled_loss(self.terms, batch_loss=lambda out, y: self.terms(out, y).mean(), name="info_nce")
        random = {"capture_random": True} if self.config.setting == "dropout" else {}
        return TrajectoryRecorder(model, opt, loss=loss, train_data=(self.X_train, self.y_train), **random)

    def train(self, weights: Tensor | None = None, *, record: bool = False) -> tuple[nn.Module, Any]:
        r"""Run the setting's loop with sample weights (see :meth:`ValidationProblem.train`).

        The global generator is seeded right before the loop, so every call draws the same dropout
        masks, whatever the weights.
        """
        w = self.checked_weights(weights, record)
        model = self.build_model()
        opt, schedule = self.optimizer(model)
        recorder = self._recorder(model, opt) if record else None
        # the dropout masks: one stream from mask_seed, the same for every weights
        return self.run_loop(model, opt, w, recorder, self.terms, schedule, seed=self.mask_seed)

    def targets(self) -> list[int]:
        """The explained output: the true class, or the similarity column of the contrastive encoder."""
        if self.config.setting == "contrastive":
            return [2 * EMBEDDING] * self.config.n_test
        return super().targets()

    def true_logits(self, model: nn.Module, rows: Any = None) -> Tensor:
        """The explained output of each test point (or of ``rows``), shape ``(T,)``."""
        rows = list(range(self.config.n_test)) if rows is None else list(rows)
        with torch.no_grad():
            return model(self.X_test[rows]).gather(1, torch.as_tensor(self.targets())[rows, None])[:, 0]

    def final_grads(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Flattened gradients at :math:`\\theta_N` of the explained outputs ``(n_test, D)`` and of the training
        losses ``(n_train, D)``: sample ``k``'s cross-entropy in evaluation mode, or (contrastive) ``k``'s
        InfoNCE term in its batch of the last epoch (one autograd call each: a loop, at these sizes)."""
        params = [p for p in model.parameters()]
        model.eval()

        def flat(value: Tensor) -> Tensor:
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params, retain_graph=True)])

        out = model(self.X_test)
        targets = self.targets()
        g_test = torch.stack([flat(out[t, targets[t]]) for t in range(self.config.n_test)])
        g_train = torch.zeros(self.config.n_train, g_test.shape[1], dtype=g_test.dtype)
        if self.config.setting == "contrastive":
            per_epoch = len(self.batches) // self.config.epochs
            for idx in self.batches[-per_epoch:]:
                terms = self.terms(model(self.X_train[idx]), self.y_train[idx])
                for i, k in enumerate(idx.tolist()):
                    g_train[k] = flat(terms[i])
        else:
            for k in range(self.config.n_train):
                g_train[k] = flat(self.terms(model(self.X_train[k:k + 1]), self.y_train[k:k + 1])[0])
        return g_test.detach(), g_train


def setting_methods(setting: str) -> tuple[str, ...]:
    """The methods compared on ``setting``: :data:`SETTING_METHODS` for InfoNCE, else :data:`CLASSIFICATION_METHODS`;
    with ``leave_out_grad`` (:mod:`explaind.validation.leave_out`) where the batches couple their samples."""
    if setting == "tiny_lm":
        return TOKEN_METHODS
    methods = SETTING_METHODS if setting == "contrastive" else CLASSIFICATION_METHODS
    return methods + ("leave_out_grad",) if setting in ("batchnorm", "contrastive") else methods


def setting_config(setting: str, quick: bool = False, settings_size: bool = False, **changes: Any) -> ValidationConfig:
    """The configuration of ``setting`` at its measured size (:data:`SETTING_SIZE`), or the tiny quick size.

    ``"sgd_mlp"`` keeps its own larger size unless ``settings_size`` is true (then it is the baseline of the other
    settings, at their size). ``"relu_untuned"`` is a ReLU MLP: its activation defaults to ``"relu"``.
    """
    if setting == "sgd_mlp" and not settings_size:
        return ValidationConfig.quick(**changes) if quick else ValidationConfig(**changes)
    changes = {"lr": SETTING_LR[setting], **changes} if setting in SETTING_LR else changes
    if setting == "relu_untuned":
        changes = {"activation": "relu", **changes}
    if quick:
        token = {"batch_size": 10, "weight_decay": 0.01} if setting == "tiny_lm" else {}
        return ValidationConfig.quick(setting=setting, **{**token, **changes})
    size = {**SETTING_SIZE, **TOKEN_SIZE} if setting == "tiny_lm" else SETTING_SIZE
    return ValidationConfig(**{**size, "setting": setting, **changes})


def make_problem(config: ValidationConfig) -> ValidationProblem:
    """The problem of ``config.setting``: the SGD MLP itself (also ``"relu_untuned"``), the token model (``"tiny_lm"``,
    :class:`~explaind.validation.token_lm.TokenLMProblem`), or a :class:`SettingProblem`."""
    if config.setting == "tiny_lm":
        from .token_lm import TokenLMProblem

        return TokenLMProblem(config)
    return ValidationProblem(config) if config.setting in MLP_SETTINGS else SettingProblem(config)


def describe(config: dict[str, Any]) -> str:
    """One line naming a setting's run (the header of its tables)."""
    c = config
    data = "sequences" if c["setting"] == "tiny_lm" else "digits"
    size = f"{data} {c['n_train']} train / {c['n_test']} test"
    loop = f"{c['n_steps']} steps of {c['batch_size']}, float64"
    model = {"sgd_mlp": f"MLP 64-{c['hidden']}-10 ({c['activation']})",
             "adamw": f"MLP 64-{c['hidden']}-10 ({c['activation']})",
             "relu_untuned": f"MLP 64-{c['hidden']}-10 ({c['activation']}, learning rate not tuned)",
             "dropout": f"MLP 64-{c['hidden']}-10 ({c['activation']}, dropout {c['dropout']} after the hidden layer, "
                        f"masks replayed)",
             "batchnorm": f"CNN conv3x3(8)-BatchNorm2d (train mode)-{c['activation']}-avgpool-linear",
             "contrastive": f"pair encoder 64-{c['hidden']}-8 ({c['activation']}), symmetric InfoNCE "
                            f"(temperature {c['temperature']}) on two fixed augmented views; explained: the cosine "
                            f"similarity of a test digit's two views",
             "tiny_lm": f"causal transformer (1 attention + 1 tanh MLP block, width 8, MLP {c['hidden']}) on "
                        f"generated Markov-chain sequences of 8 tokens over 8 symbols, next-token loss; explained: "
                        f"the logit of a test sequence's last token"}[c["setting"]]
    lr = c["lr"]
    optimizer = (f"AdamW lr {lr} weight decay {c['weight_decay']}, cosine schedule" if c["setting"] == "adamw"
                 else f"AdamW lr {lr} weight decay {c['weight_decay']}, constant" if c["setting"] == "tiny_lm"
                 else f"SGD lr {lr} momentum {c['momentum']}")
    return f"{size}, {model}, {optimizer}, {loop}"
