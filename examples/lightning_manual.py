"""Record a Lightning run with manual optimization and explain an MLP's predictions by training sample.

The LightningModule sets ``automatic_optimization = False`` and steps its one optimizer by hand, as Lightning's
docs write it: ``self.manual_backward(loss / k)`` on every batch, and every ``k`` batches
``self.clip_gradients(...)``, ``opt.step()``, ``opt.zero_grad()`` and ``self.lr_schedulers().step()``. The training
script adds only the :class:`~explaind.integrations.IndexedDataset` and the callback: the callback logs each batch
after ``manual_backward``, the recorder hooks the optimizer's step, and the gradient check measures the ``1 / k``
and the clipping as each step's factor.

Run ``python examples/lightning_manual.py`` (a few seconds) or with ``--tiny`` (used by the tests).
"""

from __future__ import annotations

import argparse
import tempfile

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

import explaind
from explaind.integrations import ExplaindLightningCallback, IndexedDataset

K = 2  # batches accumulated per optimizer step


class Manual(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False
        self.model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = F.cross_entropy(self.model(batch["x"]), batch["labels"])
        self.manual_backward(loss / K)
        if (batch_idx + 1) % K == 0:
            self.clip_gradients(opt, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad()
            self.lr_schedulers().step()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.8)]


def main(tiny: bool = False) -> dict:
    n_train, epochs = (16, 1) if tiny else (64, 5)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n_train, 2, generator=gen, dtype=torch.float64)
    y = (X[:, 0] * X[:, 1] > 0).long()  # the sign of the product: not linearly separable
    train = IndexedDataset([{"x": X[i], "labels": y[i]} for i in range(n_train)])
    torch.manual_seed(0)
    module = Manual()
    callback = ExplaindLightningCallback((X, y), loss="cross_entropy", module="model")
    loader = torch.utils.data.DataLoader(train, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(1))
    pl.Trainer(max_epochs=epochs, precision="64-true", accelerator="cpu", devices=1, logger=False,
               enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
               callbacks=[callback], default_root_dir=tempfile.mkdtemp(prefix="explaind-manual-")).fit(module, loader)
    traj = callback.trajectory

    X_test = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.5, -2.0], [-1.5, -0.5]], dtype=torch.float64)
    y_test = (X_test[:, 0] * X_test[:, 1] > 0).long()
    replica = explaind.KernelReplica().fit(traj)
    fidelity = replica.fidelity_report(X_test, model=module.model)
    att = explaind.InfluenceEstimator(keep=("train",), target=y_test.tolist()).fit(traj).transform(X_test)
    scores = att.values[..., 0]  # (test, train): contribution to the logit of the true class
    top = scores.topk(3, dim=1).indices  # (test, 3): the most supporting training samples
    print(f"{traj.n_steps} steps recorded (manual optimization, {K} batches a step, clipping, StepLR); step 0's "
          f"measured factor {traj.grad_scale(0):.3f}; replica max rel. error {fidelity['model_max_rel_error']:.1e}, "
          f"residual share {att.meta['residual_share']:.1e}, completeness gap {att.completeness_error():.1e}")
    for point, label, best in zip(X_test.tolist(), y_test.tolist(), top):
        print(f"test {point} (label {label}): most supporting training samples {best.tolist()} with labels "
              f"{y[best].tolist()}")
    return {"fidelity": fidelity, "completeness_gap": att.completeness_error(),
            "residual_share": att.meta["residual_share"], "scores": scores, "steps": traj.n_steps}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true")
    main(tiny=parser.parse_args().tiny)
