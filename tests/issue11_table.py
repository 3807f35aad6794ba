"""Print issue 11's "Done when" figures: each real-loop case, plain loop and framework callbacks, as one table.

Run from the repository root::

    PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/issue11_table.py [--cases gpt2 bert resnet amp]

Each row records the case as its test does (the test named in the row) and prints what the test asserts on:

* ``replica``: relative error of ``KernelReplica.predict`` against the trained model in evaluation mode;
* ``share``: the residual share ``|sum residual| / |g(theta_stop) - g(theta_start)|`` (``att.meta``);
* ``train``: ``keep=("train",)`` relative to the slow float64 loop reference that replays the recorded masks and
  batch statistics (tests/replay_reference.py, tests/_hf_testkit.py);
* ``extra``: the ResNet's buffers term against the reference's, or the autocast runs' residual against the
  reference's and the largest gradient-check mismatch.

The bounds of the issue are replica <= 1e-6, share <= 1e-9, train <= 1e-9 in float64. The autocast runs train in
float32 (autocast leaves float64 alone): their share is the half-precision rounding of the loop's gradients, which
the tests bound by a measured range (tests/_real_loop_testkit.py). About 5 minutes on a 2-core CPU, one thread.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from _hf_testkit import classifier_figures, lm_figures
from _real_loop_testkit import autocast_figures, resnet_figures
from lightning.pytorch.plugins import MixedPrecision
from test_amp_dropout import record as record_plain_amp
from test_hf_models import gpt2_lm_figures, record_gpt2_lm
from test_integrations_amp import record_lightning_amp, record_trainer_amp
from test_integrations_hf import record_trainer_bert, record_trainer_dropout_gpt2
from test_integrations_lightning import record_lightning_bert
from test_integrations_resnet18 import record_framework_resnet
from test_resnet18_batchnorm import record_resnet
from test_token_models import record_bert

Row = tuple[str, str, str, Callable[[Path], dict[str, float]]]


def _lightning_amp(tmp: Path, precision: str) -> dict[str, float]:
    if precision == "float16":
        plugin = MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=1024.0))
        model, callback, X_test = record_lightning_amp(tmp, plugins=[plugin])
    else:
        model, callback, X_test = record_lightning_amp(tmp, precision="bf16-mixed")
    return autocast_figures(model, callback.trajectory, X_test, precision)


def rows() -> dict[str, list[Row]]:
    """Per case: ``(model, path, test, measure(tmp_dir) -> figures)``."""
    gpt2 = "GPT-2 LM, dropout, SDPA, AdamW, next-token loss"
    bert = "BERT classifier, AdamW"
    resnet = "ResNet-18 layout, BatchNorm, SGD momentum, 32x32"
    out: dict[str, list[Row]] = {
        "gpt2": [
            (gpt2 + " (dropout 0.1)", "plain loop",
             "test_hf_models.py::test_gpt2_lm_with_dropout_and_sdpa_attention_is_exact",
             lambda tmp: gpt2_lm_figures(*record_gpt2_lm())),
            (gpt2 + " (dropout 0.2)", "HF Trainer, accumulation 2, clipping",
             "test_integrations_hf.py::test_trainer_dropout_run_is_exact_with_random_state_capture",
             lambda tmp: lm_figures(*record_trainer_dropout_gpt2(tmp))),
        ],
        "bert": [
            (bert, "plain loop", "test_token_models.py::test_bert_classifier_is_explained_exactly_with_a_4d_mask",
             lambda tmp: classifier_figures(*record_bert("4d"))),
            (bert, "Lightning, accumulation 2, clipping",
             "test_integrations_lightning.py::test_lightning_bert_replica_and_train_scores_are_exact",
             lambda tmp: classifier_figures(*record_lightning_bert(tmp))),
            (bert + " (dropout 0.1)", "Lightning, accumulation 2, clipping",
             "test_integrations_lightning.py::test_lightning_bert_with_dropout_is_exact_with_each_micro_batchs_masks_"
             "replayed", lambda tmp: classifier_figures(*record_lightning_bert(tmp, dropout=0.1))),
            (bert, "HF Trainer, accumulation 2, clipping",
             "test_integrations_hf.py::test_trainer_bert_with_the_models_own_loss_is_exact",
             lambda tmp: classifier_figures(*record_trainer_bert(tmp))),
        ],
        "resnet": [
            (resnet, "plain loop", "test_resnet18_batchnorm.py::test_replica_and_train_scores_match_the_trained_"
             "model_and_the_replaying_loop_reference", lambda tmp: resnet_figures(*record_resnet(tmp / "run"))),
        ],
        "amp": [],
    }
    for fw, name in (("lightning", "Lightning"), ("trainer", "HF Trainer")):
        out["resnet"].append((resnet, f"{name}, accumulation 2, clipping",
                              f"test_integrations_resnet18.py::test_replica_and_train_scores_are_exact[{fw}]",
                              lambda tmp, f=fw: resnet_figures(*record_framework_resnet(tmp, f))))
    for precision, plain_id in (("float16", "float16"), ("bfloat16", "bfloat16")):
        mlp = f"dropout MLP, {precision} autocast" + (" + GradScaler" if precision == "float16" else "")
        out["amp"] += [
            (mlp, "plain loop", "test_amp_dropout.py::test_autocast_dropout_run_decomposes_exactly_up_to_its_"
             f"rounding[{plain_id}]", lambda tmp, p=precision: autocast_figures(*record_plain_amp(p), p)),
            (mlp, "Lightning" + (" MixedPrecision plugin" if precision == "float16" else " bf16-mixed"),
             "test_integrations_amp.py::" + ("test_lightning_float16_steps_are_recorded_with_the_plugins_loss_scale"
                                            if precision == "float16" else
                                            "test_lightning_bf16_mixed_is_recorded_and_exact_up_to_its_rounding"),
             lambda tmp, p=precision: _lightning_amp(tmp, p)),
            (mlp, "HF Trainer" + (" fp16 (accelerate's GPU scaler)" if precision == "float16" else " bf16=True"),
             "test_integrations_amp.py::" + ("test_trainer_fp16_steps_are_recorded_with_accelerates_loss_scale"
                                            if precision == "float16" else
                                            "test_trainer_bf16_is_recorded_and_exact_up_to_its_rounding"),
             lambda tmp, p=precision: autocast_figures(*record_trainer_amp(tmp, p), p)),
        ]
    return out


def _extra(got: dict[str, float]) -> str:
    if "buffers" in got:
        return f"buffers term {got['buffers']:.1e}"
    if "check" in got:
        return f"residual vs ref {got['residual']:.1e}, check {got['check']:.1e}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=("gpt2", "bert", "resnet", "amp"),
                        default=["gpt2", "bert", "resnet", "amp"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}")
    print("| model | path | replica | share | train | extra | test |")
    print("|---|---|---|---|---|---|---|")
    table = rows()
    for case in args.cases:
        for model, path, test, measure in table[case]:
            with tempfile.TemporaryDirectory() as tmp:
                got = measure(Path(tmp))
            print(f"| {model} | {path} | {got['replica']:.1e} | {got['residual_share']:.1e} | {got['train']:.1e} | "
                  f"{_extra(got)} | tests/{test} |", flush=True)


if __name__ == "__main__":
    main()
