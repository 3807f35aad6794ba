"""Training a registered architecture on a built-in dataset, recorded to a run folder.

A *run folder* holds everything the command line needs to pick a run up again::

    RUN/
      run.json        TrainConfig, dataset spec, model config, training curves, timings
      trajectory/     the recorded trajectory (explaind.Trajectory.load)

:func:`train_run` trains and records; :func:`load_run` reopens a folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, NonNegativeFloat, PositiveFloat, PositiveInt
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..config import StrictModel, resolve_device, resolve_dtype, validate_config
from ..datasets import Dataset, load_dataset
from ..exceptions import ConfigError
from .phases import History
from .run_file import RUN_FILE, TRAJECTORY_DIR, check_new_run_folder, read_run_file, write_run_file

__all__ = ["TrainConfig", "Run", "train_run", "load_run", "model_config_for", "evaluate", "RUN_FILE"]

logger = logging.getLogger(__name__)



class TrainConfig(StrictModel):
    """What to train, on what, and how (validated; stored in ``run.json``).

    Attributes
    ----------
    architecture : str
        Registered architecture (``explaind plugins`` lists them): ``mlp``, ``cnn``,
        ``modular_transformer``, ...
    model : dict
        Overrides of the architecture's config; sizes tied to the data (input features,
        channels, classes, vocabulary) are filled in from the dataset unless given.
    dataset : str
        Built-in dataset (``modular``, ``digits``, ``cifar10``).
    data : dict
        Keyword arguments of the dataset loader.
    optimizer : {"sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam", "radam", "adamax", "adafactor"}
    lr, weight_decay, momentum, betas, eps
        Optimizer hyperparameters (torch semantics and defaults otherwise; ``momentum`` for SGD and
        RMSprop, ``betas`` for the Adam family, ``eps`` for all but SGD and Adafactor; RMSprop keeps torch's
        ``alpha=0.99``, Adafactor torch's ``eps=(None, 1e-3)``, ``beta2_decay=-0.8`` and ``d=1``).
    steps : int
        Maximum number of optimizer steps.
    batch_size : int or None
        Mini-batch size; ``None`` trains full batch.
    seed : int
        Seeds the model initialisation and the batch order.
    eval_every : int
        Evaluate the training curves every so many steps.
    stop_at : float or None
        Stop early once train *and* validation accuracy reach this value.
    dtype : {"float32", "float64"}
    device : str
        ``"cpu"``, ``"cuda"`` or ``"auto"``.
    """

    architecture: str = "mlp"
    model: dict[str, Any] = Field(default_factory=dict)
    dataset: str = "digits"
    data: dict[str, Any] = Field(default_factory=dict)
    optimizer: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad", "nadam", "radam", "adamax", "adafactor"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    steps: PositiveInt = 100
    batch_size: PositiveInt | None = None
    seed: int = 0
    eval_every: PositiveInt = 10
    stop_at: float | None = Field(None, gt=0.0, le=1.0)
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"


@dataclass
class Run:
    """A trained and recorded run.

    Attributes
    ----------
    path : Path or None
        The run folder (``None`` for an in-memory run).
    config : TrainConfig
    dataset : Dataset
    model_config : dict
        The full, validated architecture config.
    trajectory : explaind.Trajectory
    history : History
        Training curves.
    info : dict
        Timings and final metrics.
    """

    path: Path | None
    config: TrainConfig
    dataset: Dataset
    model_config: dict[str, Any]
    trajectory: Any
    history: History
    info: dict[str, Any]

    def final_model(self) -> nn.Module:
        """The recorded model with the last parameters ``theta_N`` loaded (eval mode)."""
        return model_at(self.trajectory, self.trajectory.n_steps)


def model_at(trajectory: Any, s: int) -> nn.Module:
    """A copy of the trajectory's model template holding ``theta_s`` and the constants."""
    import copy

    model = copy.deepcopy(trajectory.model)
    state = dict(trajectory.constants())
    state.update(trajectory.params(s))
    model.load_state_dict(state, strict=False)
    return model.eval()


def _dataset_defaults(architecture: str, dataset: str, data: dict[str, Any]) -> dict[str, Any]:
    data = dict(data)
    if architecture == "mlp" and dataset in ("digits", "cifar10"):
        data.setdefault("flatten", True)
    return data


def model_config_for(architecture: str, dataset: Dataset, overrides: dict[str, Any] | None = None) -> Any:
    """The architecture's validated config, with the sizes tied to the data filled in.

    Fields the config model declares among ``in_features``, ``in_channels``, ``image_size``,
    ``out_features``, ``n_classes``, ``vocab_size``, ``p``, ``modulus``, ``seq_len`` and ``n_ctx``
    are set from the dataset unless ``overrides`` gives them.
    """
    import explaind

    record = explaind.get_entry("architecture", architecture)
    shape = tuple(dataset.X_train.shape[1:])
    derived: dict[str, Any] = {"out_features": dataset.n_classes, "n_classes": dataset.n_classes}
    if dataset.X_train.is_floating_point():
        derived["in_features"] = math.prod(shape)
        if len(shape) == 3:
            derived.update(in_channels=shape[0], image_size=shape[1])
    for key in ("vocab_size", "p", "seq_len"):
        if key in dataset.meta:
            derived[key] = dataset.meta[key]
    if "p" in dataset.meta:
        derived["modulus"] = dataset.meta["p"]
    if "seq_len" in dataset.meta:
        derived["n_ctx"] = dataset.meta["seq_len"]
    fields = record.config.model_fields
    values = {k: v for k, v in derived.items() if k in fields}
    values.update(overrides or {})
    return validate_config(record.config, values, f"architecture {architecture!r}",
                           fix="Fix the option (--model KEY=VALUE on the command line) and train again.")


#: The end of an error about a run.json whose settings do not validate.
_DAMAGED = "The run folder's run.json was edited or written by another version of explaind: train the run again."


def _optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=config.lr, momentum=config.momentum, eps=config.eps,
                                   weight_decay=config.weight_decay)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, eps=config.eps, weight_decay=config.weight_decay)
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=config.lr, weight_decay=config.weight_decay)
    cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "nadam": torch.optim.NAdam,
           "radam": torch.optim.RAdam, "adamax": torch.optim.Adamax}[config.optimizer]
    return cls(params, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, X: Tensor, y: Tensor, batch: int = 4096) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    for i in range(0, len(X), batch):
        out = model(X[i : i + batch])
        total_loss += float(torch.nn.functional.cross_entropy(out, y[i : i + batch], reduction="sum"))
        correct += int((out.argmax(-1) == y[i : i + batch]).sum())
    model.train(was_training)
    return total_loss / len(X), correct / len(X)


def _batches(n: int, batch: int, seed: int) -> Iterator[Tensor]:
    """The index batch of every step: full batch, or shuffled batches reshuffled each epoch (depends on the seed)."""
    generator = torch.Generator().manual_seed(seed)
    order, cursor = torch.randperm(n, generator=generator), 0
    while True:
        if batch == n:
            yield torch.arange(n)
            continue
        if cursor + batch > n:
            order, cursor = torch.randperm(n, generator=generator), 0
        yield order[cursor : cursor + batch]
        cursor += batch


def _resume_state(path: Path) -> tuple[TrainConfig, History]:
    """The settings and the curves so far of the interrupted run in ``path``."""
    record = read_run_file(path)
    if record["status"] != "recording":
        raise ConfigError(f"The run in {str(path)!r} is complete; there is nothing to resume. Train a new run with "
                          f"another --out folder.")
    config = validate_config(TrainConfig, record["config"], f"{path / RUN_FILE}", fix=_DAMAGED)
    return config, History.from_dict(record["history"]) if "history" in record else History()


def train_run(
    config: TrainConfig | dict[str, Any] | None,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
) -> Run:
    """Train a registered architecture on a built-in dataset and record its trajectory.

    The run folder's ``run.json`` is written before recording starts and updated at every
    evaluation (:mod:`explaind.studies.run_file`); the recorder stores the optimizer state, so an
    interrupted run continues with ``resume=True`` to the trajectory an uninterrupted run records.

    Parameters
    ----------
    config : TrainConfig or dict or None
        What to train (a dict is validated into a :class:`TrainConfig`); ``None`` with ``resume=True``
        (the settings are read from ``run.json``).
    out_dir : str or Path, optional
        Run folder (created; must not already hold a run unless resuming). ``None`` records in memory.
    progress : bool
        Show a progress bar.
    log : callable, optional
        Receives a line describing the run once the settings are validated.
    resume : bool
        Continue the interrupted run in ``out_dir`` (its ``run.json`` has ``"status": "recording"``).

    Returns
    -------
    Run
    """
    import explaind

    path = None if out_dir is None else Path(out_dir)
    history = History()
    if resume:
        if path is None:
            raise ConfigError("resume=True needs the run folder of the interrupted run (out_dir / --out).")
        config, history = _resume_state(path)
    elif path is not None:
        check_new_run_folder(path)
    if not isinstance(config, TrainConfig):
        config = validate_config(TrainConfig, dict(config or {}), "train", fix="Fix the option and train again.")
    store = None if path is None else path / TRAJECTORY_DIR
    data_params = _dataset_defaults(config.architecture, config.dataset, config.data)
    dataset = load_dataset(config.dataset, **data_params)
    dtype = resolve_dtype(config.dtype)
    device = resolve_device(config.device)
    if dataset.X_train.is_floating_point():
        dataset = _cast(dataset, dtype)
    model_cfg = model_config_for(config.architecture, dataset, config.model)
    model = explaind.build_model(config.architecture, model_cfg, seed=config.seed, dtype=dtype).to(device)
    optimizer = _optimizer(config, model)
    if log is not None:
        log(f"{'resuming' if resume else 'training'} {config.architecture} on {config.dataset} ({dataset.n_train} "
            f"samples, {sum(p.numel() for p in model.parameters())} parameters) with {config.optimizer} for up to "
            f"{config.steps} steps -> {out_dir if out_dir is not None else 'memory'}")
    model_dict = model_cfg.model_dump(mode="json")
    record = {
        "explaind_version": explaind.__version__,
        "status": "recording",
        "config": config.model_dump(mode="json"),
        "dataset": {"name": dataset.name, "params": data_params, "meta": _json_meta(dataset.meta)},
        "model_config": model_dict,
    }

    X_tr, y_tr = dataset.X_train.to(device), dataset.y_train.to(device)
    X_va, y_va = dataset.X_val.to(device), dataset.y_val.to(device)
    if not resume:
        history.append(0, *evaluate(model, X_tr, y_tr), *evaluate(model, X_va, y_va))
    if path is not None:  # the description first: an interrupted recording can always be resumed
        path.mkdir(parents=True, exist_ok=True)
        if not resume:
            write_run_file(path, {**record, "history": history.to_dict()})
    recorder = explaind.TrajectoryRecorder(model, optimizer, loss="cross_entropy", train_data=dataset.train,
                                           store=store, fsync=False, save_optimizer_state=store is not None,
                                           resume=resume, extras={"dataset": dataset.spec()})
    first = recorder.restore() if resume else 0
    history = history.until(first)
    n = dataset.n_train
    batches = _batches(n, n if config.batch_size is None else min(config.batch_size, n), config.seed)
    for _ in range(first):  # the batches of the steps already recorded
        next(batches)
    start = time.perf_counter()
    bar = tqdm(total=config.steps, initial=first, desc="train", unit="step", disable=not progress, leave=False)
    with recorder:
        for step in range(first + 1, config.steps + 1):
            idx = next(batches)
            model.train()
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(X_tr[idx.to(device)]), y_tr[idx.to(device)])
            loss.backward()
            recorder.log_batch(idx)
            optimizer.step()
            bar.update(1)
            if step % config.eval_every == 0 or step == config.steps:
                row = (*evaluate(model, X_tr, y_tr), *evaluate(model, X_va, y_va))
                history.append(step, *row)
                bar.set_postfix(train_acc=f"{row[1]:.2f}", val_acc=f"{row[3]:.2f}")
                if path is not None:
                    write_run_file(path, {**record, "history": history.to_dict()})
                if config.stop_at is not None and row[1] >= config.stop_at and row[3] >= config.stop_at:
                    break
    bar.close()
    train_seconds = time.perf_counter() - start
    trajectory = recorder.trajectory
    info = {
        "n_steps": int(trajectory.n_steps),
        "train_seconds": round(train_seconds, 3),
        "resumed_at": first if resume else None,
        "final_train_acc": history.train_acc[-1],
        "final_val_acc": history.val_acc[-1],
        "final_train_loss": history.train_loss[-1],
        "final_val_loss": history.val_loss[-1],
        "n_train": dataset.n_train,
        "n_val": dataset.n_val,
        "n_params": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
    }
    if path is not None:
        write_run_file(path, {**record, "status": "complete", "history": history.to_dict(), "info": info})
    return Run(path, config, dataset, model_dict, trajectory, history, info)


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(meta, default=str))


def _cast(dataset: Dataset, dtype: torch.dtype) -> Dataset:
    return Dataset(dataset.name, dataset.X_train.to(dtype), dataset.y_train, dataset.X_val.to(dtype), dataset.y_val,
                   dataset.n_classes, dataset.meta)


def load_run(path: str | Path) -> Run:
    """Reopen a run folder written by :func:`train_run`.

    An interrupted run (``"status": "recording"``) opens with the steps recorded so far and a
    logged note on how to resume it.

    Raises
    ------
    TrajectoryError
        When the folder, its ``run.json`` (or a field of it) or its trajectory is missing or unreadable.
    """
    import explaind

    path = Path(path)
    record = read_run_file(path)
    config = validate_config(TrainConfig, record["config"], f"{path / RUN_FILE}", fix=_DAMAGED)
    dataset = load_dataset(record["dataset"]["name"], **record["dataset"]["params"])
    if dataset.X_train.is_floating_point():
        dataset = _cast(dataset, resolve_dtype(config.dtype))
    trajectory = explaind.Trajectory.load(path / TRAJECTORY_DIR, train_data=dataset.train)
    history = History.from_dict(record["history"]) if "history" in record else History()
    if record["status"] == "recording":
        logger.warning("The run in %s was interrupted after %d recorded steps; it is used as it is. Continue it with "
                       "'explaind train --out %s --resume'.", path, trajectory.n_steps, path)
        history = history.until(int(trajectory.n_steps))
    return Run(path, config, dataset, record["model_config"], trajectory, history, record.get("info", {}))
