r"""The token-model setting ``"tiny_lm"``: a tiny causal transformer trained by AdamW on next-token prediction.

The corpus is generated, not shipped: each seed draws a first-order Markov chain over a vocabulary of
:data:`VOCAB` symbols (every row of its transition matrix the softmax of :data:`SHARPNESS` times standard normal
logits, so that each symbol has a few likely successors) and samples ``n_train`` training and ``n_test`` test
sequences of :data:`LENGTH` tokens from it, the first token uniform. The model (:class:`TinyCausalLM`) embeds
tokens and positions, applies one causal single-head self-attention block and one tanh MLP block, both residual,
and reads out logits at every position; ``float64``, no layer norm, no dropout.

Training is the validation loop of :class:`~explaind.validation.problem.ValidationProblem` with the
per-sample next-token loss :math:`\ell_k` of sample ``k`` (``causal_lm``: the mean over its ``LENGTH - 1``
positions of :math:`-\log p(x_{j+1} \mid x_{\le j})`), recorded with ``loss="causal_lm"``: every sequence has
the same length, so its token share of a batch is :math:`1/|B_s|` and the batch loss is Hugging Face's token
mean. Step ``s`` minimises :math:`\frac{1}{|B_s|}\sum_{k \in B_s} w_k \ell_k` under AdamW (decoupled weight
decay, constant learning rate); a weight-0 sequence is absent from the run (nothing couples the sequences of
a batch, so leave-out retraining is the same run up to rounding).

The explained output of test sequence ``t`` is the logit of its last token at the position that predicts it,
``model(x_t)[LENGTH - 2, x_t[LENGTH - 1]]``: the estimators' ``target`` is the pair ``(LENGTH - 2, token)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..exceptions import ConfigError
from .problem import ValidationConfig, ValidationProblem, batch_schedule

__all__ = ["VOCAB", "LENGTH", "WIDTH", "TinyCausalLM", "TokenLMProblem", "markov_corpus"]

#: Vocabulary size, sequence length and model width of the setting.
VOCAB, LENGTH, WIDTH = 8, 8, 8
#: Scale of the standard normal logits of each row of the corpus's transition matrix (a few likely successors).
SHARPNESS = 2.5


def markov_corpus(n: int, generator: torch.Generator) -> Tensor:
    """``(n, LENGTH)`` int64 token sequences of a Markov chain drawn from ``generator`` (module docstring)."""
    transition = torch.softmax(SHARPNESS * torch.randn(VOCAB, VOCAB, generator=generator, dtype=torch.float64), 1)
    tokens = torch.empty(n, LENGTH, dtype=torch.int64)
    tokens[:, 0] = torch.randint(0, VOCAB, (n,), generator=generator)
    for j in range(1, LENGTH):
        tokens[:, j] = torch.multinomial(transition[tokens[:, j - 1]], 1, generator=generator)[:, 0]
    return tokens


class TinyCausalLM(nn.Module):
    """Token and position embeddings, one causal single-head attention block and one tanh MLP block, token logits.

    ``(n, length)`` int64 ids -> ``(n, length, VOCAB)`` logits; position ``j`` sees tokens ``0..j`` only.
    """

    def __init__(self, width: int = WIDTH, hidden: int = 2 * WIDTH):
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, width)
        self.positions = nn.Parameter(0.1 * torch.randn(LENGTH, width))
        self.query, self.key, self.value = (nn.Linear(width, width) for _ in range(3))
        self.mix = nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, hidden), nn.Linear(hidden, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[-1]
        h = self.tokens(ids) + self.positions[:length]
        scores = self.query(h) @ self.key(h).transpose(-1, -2) / math.sqrt(h.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        h = h + self.mix(torch.softmax(scores, dim=-1) @ self.value(h))
        h = h + self.down(torch.tanh(self.up(h)))
        return self.head(h)


class TokenLMProblem(ValidationProblem):
    """The ``"tiny_lm"`` run: generated Markov-chain sequences, :class:`TinyCausalLM`, AdamW (module docstring)."""

    def __init__(self, config: ValidationConfig):
        if config.setting != "tiny_lm":
            raise ConfigError(f"TokenLMProblem: the setting must be 'tiny_lm'; got {config.setting!r}.")
        self.config = config
        gen = torch.Generator().manual_seed(config.seed + 7)
        corpus = markov_corpus(config.n_train + config.n_test, gen)
        # next-token labels are the ids themselves (the causal_lm loss shifts them)
        self.X_train = self.y_train = corpus[:config.n_train]
        self.X_test = self.y_test = corpus[config.n_train:]
        self.batches: list[Tensor] = batch_schedule(config)

    def build_model(self) -> nn.Module:
        """:class:`TinyCausalLM` at its initialisation (the same tensors on every call)."""
        torch.manual_seed(self.config.seed)
        return TinyCausalLM(WIDTH, self.config.hidden).double()

    def optimizer(self, model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
        """AdamW with decoupled weight decay and a constant learning rate."""
        c = self.config
        return torch.optim.AdamW(model.parameters(), lr=c.lr, weight_decay=c.weight_decay), None

    def terms(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-sequence next-token losses :math:`\\ell_k`, ``(n,)`` (the ``causal_lm`` loss)."""
        from ..plugins import get_entry

        return get_entry("loss", "causal_lm").implementation(outputs, targets)

    def train(self, weights: Tensor | None = None, *, record: bool = False) -> tuple[nn.Module, Any]:
        """Run the loop with sequence weights (see :meth:`ValidationProblem.train`), recorded with ``causal_lm``."""
        w = self.checked_weights(weights, record)
        model = self.build_model()
        opt, schedule = self.optimizer(model)
        recorder = None
        if record:
            from ..trajectory import TrajectoryRecorder

            recorder = TrajectoryRecorder(model, opt, loss="causal_lm", train_data=(self.X_train, self.y_train))
        return self.run_loop(model, opt, w, recorder, self.terms, schedule)

    def targets(self) -> list[list[int]]:
        """The explained output of each test sequence: ``(LENGTH - 2, last token)``."""
        return [[LENGTH - 2, int(x[-1])] for x in self.X_test]

    def true_logits(self, model: nn.Module, rows: Any = None) -> Tensor:
        """The logit of each test sequence's last token where it is predicted, ``(T,)`` (or of ``rows``)."""
        rows = list(range(self.config.n_test)) if rows is None else list(rows)
        x = self.X_test[rows]
        with torch.no_grad():
            return model(x)[torch.arange(len(rows)), LENGTH - 2, x[:, -1]]

    def final_grads(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """Flattened gradients at :math:`\\theta_N` of the explained outputs ``(n_test, D)`` and of the training
        sequences' next-token losses ``(n_train, D)`` (one autograd call each)."""
        params = list(model.parameters())

        def flat(value: Tensor) -> Tensor:
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])

        with torch.enable_grad():
            x = self.X_test
            g_test = torch.stack([flat(model(x[t:t + 1])[0, LENGTH - 2, x[t, -1]]) for t in range(len(x))])
            g_train = torch.stack([flat(self.terms(model(self.X_train[k:k + 1]), self.y_train[k:k + 1])[0])
                                   for k in range(self.config.n_train)])
        return g_test, g_train

    def mean_train_loss(self, outputs: Tensor) -> Tensor:
        """The mean next-token loss of the training set from its model outputs (the influence function's Hessian)."""
        return self.terms(outputs, self.y_train).mean()
