"""Every ```python block of the user guides runs, in page order, as a new user would paste it.

Each page's blocks run one after the other in one namespace (a later block sees what an earlier one
defined, e.g. a recorded trajectory) inside a temporary working directory. A block may be preceded
by one HTML comment that the reader does not see:

* ``<!-- run with: NAME -->``: the block is a fragment that uses names it does not define (``model``,
  ``X``, ``traj`` ...). The test first puts those names into the namespace from the setup ``NAME`` of
  :data:`SETUPS` (tiny float64 models and data, listed in each setup's docstring), then runs the block
  as written. The Lightning setup's ``pl.Trainer`` is the tiny variant (one epoch, no logger, no
  checkpoints): the page's own call would train for Lightning's default 1,000 epochs.
* ``<!-- not run: REASON -->``: the block is not run; the reason must name what runs it instead.

An unmarked block that raises fails the test, as does an unknown setup name or a marker without a
reason. An ``ExplaindWarning`` fails it too: a guide's code should run as shown, without a warning the page
does not explain (other libraries' warnings are ignored). Blocks written as an interactive session
(``>>>`` lines) are run statement by statement and each printed line is compared with the page (``...``
matches anything, as in doctest).
"""

from __future__ import annotations

import doctest
import re
import sys
import textwrap
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import explaind

ROOT = Path(__file__).resolve().parents[1]
#: the pages a new user reads (quickstart.md, cli.md, optimizers.md, engine.md and recording.md have their
#: own tests or are measurement logs)
PAGES = ["README.md", "docs/index.md", "docs/guide_own_model.md", "docs/guide_influence.md",
         "docs/guide_replica.md", "docs/guide_reports.md", "docs/guide_datasets.md", "docs/scores_meaning.md",
         "docs/pruning.md", "docs/viz.md", "docs/plugins.md", "docs/hooks.md", "docs/scaling.md",
         "docs/contributing.md"]
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
MARKER = re.compile(r"<!--\s*(run with|not run):\s*(.*?)\s*-->", re.S)


# ------------------------------------------------------------------------------------------------ setups
def _classifier(ns: dict[str, Any], tmp: Path) -> None:
    """``model`` (MLP 4-8-3, float64; output layer ``net.2``), ``optimizer`` and ``opt`` (the same SGD with
    momentum), ``loss_fn`` (``F.cross_entropy``), ``X`` ``(16, 4)``, ``y``, ``batches`` (4 index tensors of
    4), ``X_test`` ``(3, 4)``, ``y_test``, ``torch``, ``explaind``."""
    gen = torch.Generator().manual_seed(0)
    model = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [8], "out_features": 3}, seed=0,
                                 dtype="float64")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    X, X_test = torch.randn(16, 4, generator=gen, dtype=torch.float64), torch.randn(3, 4, generator=gen,
                                                                                   dtype=torch.float64)
    ns.update(model=model, optimizer=optimizer, opt=optimizer, loss_fn=F.cross_entropy, X=X,
              y=torch.randint(0, 3, (16,), generator=gen), batches=list(torch.randperm(16, generator=gen).split(4)),
              X_test=X_test, y_test=torch.randint(0, 3, (3,), generator=gen), torch=torch, explaind=explaind)


def _trajectory(ns: dict[str, Any], tmp: Path) -> None:
    """:func:`_classifier`, trained for 4 steps under the recorder, plus ``traj`` and ``trajectory`` (the
    run), ``X_eval``, ``X_score``/``y_score`` (the training inputs), ``x`` and ``label`` (one test input and
    its label), ``labels`` (``y`` as a list, the labels of ``X``), ``fresh_model`` (an untrained MLP of the
    same shape)."""
    _classifier(ns, tmp)
    model, opt, X, y = ns["model"], ns["opt"], ns["X"], ns["y"]
    rec = explaind.TrajectoryRecorder(model, opt, loss="cross_entropy", train_data=(X, y))
    with rec:
        for idx in ns["batches"]:
            opt.zero_grad()
            F.cross_entropy(model(X[idx]), y[idx]).backward()
            rec.log_batch(idx)
            opt.step()
    X_test, y_test = ns["X_test"], ns["y_test"]
    ns.update(traj=rec.trajectory, trajectory=rec.trajectory, X_eval=X_test, X_score=X, y_score=y, x=X_test[0],
              label=int(y_test[0]), labels=y.tolist(),
              fresh_model=explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [8], "out_features": 3},
                                               seed=1, dtype="float64"))


def _token_data(ns: dict[str, Any], tmp: Path) -> None:
    """``torch``, ``ids``/``labels`` (8 right-padded sequences of 8 tokens, vocabulary 30, labels -100 at the
    padding), ``batches`` (2 index tensors of 4), ``test_ids``/``test_labels`` (2 sequences)."""
    from _hf_testkit import lm_data

    ids, labels = lm_data(8, seed=1)
    test_ids, test_labels = lm_data(2, seed=2)
    ns.update(torch=torch, ids=ids, labels=labels, batches=list(torch.arange(8).split(4)), test_ids=test_ids,
              test_labels=test_labels)


def _hf_trainer(ns: dict[str, Any], tmp: Path) -> None:
    """``Trainer`` (transformers'), ``model`` (1-layer GPT-2, float64), ``items`` (8 mappings with
    ``input_ids`` and ``labels``), ``args`` (2 steps of 4 sequences, writing nothing)."""
    from _hf_testkit import lm_data, tiny_gpt2, trainer_args
    from transformers import Trainer

    ids, labels = lm_data(8, seed=1)
    ns.update(Trainer=Trainer, model=tiny_gpt2(), items=[{"input_ids": ids[i], "labels": labels[i]} for i in range(8)],
              args=trainer_args(tmp, per_device_train_batch_size=4, max_steps=2, learning_rate=1e-2))


def _lightning(ns: dict[str, Any], tmp: Path) -> None:
    """``torch``, ``pl`` (lightning.pytorch with a tiny ``Trainer``: one epoch, no logger, checkpoints,
    bars or summary, root in the temporary directory), ``DataLoader``, ``items`` (8 mappings with a float64
    ``x`` ``(4,)`` and ``labels``) and ``lit_module`` (a LightningModule whose attribute ``model`` is an MLP
    4-8-3 taking ``x``, SGD)."""
    import functools
    import types

    import lightning.pytorch as real_pl
    from torch.utils.data import DataLoader

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = explaind.build_model("mlp", {"in_features": 4, "hidden_sizes": [8], "out_features": 3},
                                            seed=0, dtype="float64")

        def forward(self, x):
            return self.mlp(x)

    class Lit(real_pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = Net()

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.model(x=batch["x"]), batch["labels"])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    gen = torch.Generator().manual_seed(3)
    X, y = torch.randn(8, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (8,), generator=gen)
    tiny = functools.partial(real_pl.Trainer, max_epochs=1, accelerator="cpu", devices=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=str(tmp))
    ns.update(torch=torch, DataLoader=DataLoader, pl=types.SimpleNamespace(Trainer=tiny), lit_module=Lit(),
              items=[{"x": X[i], "labels": y[i]} for i in range(8)])


HUBER = '''
import torch
import torch.nn.functional as F


def huber(outputs, targets):
    """Per-sample Huber loss of ``(n, O)`` outputs."""
    return F.huber_loss(outputs, targets, reduction="none").mean(dim=1)


def regression_example(n, generator):
    return torch.randn(n, 3, generator=generator, dtype=torch.float64), torch.randn(
        n, 3, generator=generator, dtype=torch.float64)


def huber_reference(outputs, targets):
    return F.huber_loss(outputs, targets)
'''


def _huber(ns: dict[str, Any], tmp: Path) -> None:
    """``huber``, ``regression_example`` and ``huber_reference``: a per-sample Huber loss, an example batch
    ``(n, 3)`` and the batch loss it must average to (the names plugins.md's loss record uses)."""
    exec(compile(HUBER, "<huber setup>", "exec"), ns)


def _installed_plugin(ns: dict[str, Any], tmp: Path) -> None:
    """``explaind``, after "pip install" of ``my_package`` 1.0.0: a package on ``sys.path`` whose module is
    :data:`HUBER` plus the page's first block (the ``explaind_losses`` hook), announced as the entry point
    ``my_plugin`` of the group ``explaind`` by a ``dist-info`` folder. Undone when the page's test ends."""
    site = tmp / "site"
    (site / "my_package").mkdir(parents=True)
    (site / "my_package" / "__init__.py").write_text(HUBER + "\n" + ns["__blocks__"][0], encoding="utf-8")
    info = site / "my_package-1.0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my_package\nVersion: 1.0.0\n", encoding="utf-8")
    (info / "entry_points.txt").write_text("[explaind]\nmy_plugin = my_package\n", encoding="utf-8")
    sys.path.insert(0, str(site))
    ns["__cleanup__"].append(lambda: (sys.path.remove(str(site)), sys.modules.pop("my_package", None)))
    explaind.reset_plugins()
    ns["explaind"] = explaind


SETUPS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "classifier": _classifier, "trajectory": _trajectory, "token_data": _token_data, "hf_trainer": _hf_trainer,
    "lightning": _lightning, "huber": _huber, "installed_plugin": _installed_plugin,
}


# ------------------------------------------------------------------------------------------------ reading
def page_blocks(text: str) -> list[tuple[int, str, str | None, str | None]]:
    """``(line, source, kind, argument)`` per ```python block; ``kind`` is "run with", "not run" or None."""
    blocks = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip()
        marker = MARKER.fullmatch(before[before.rfind("<!--"):]) if before.endswith("-->") else None
        kind, arg = (marker.group(1), marker.group(2)) if marker else (None, None)
        blocks.append((text.count("\n", 0, match.start()) + 1, match.group(1), kind, arg))
    return blocks


def run_session(source: str, ns: dict[str, Any], where: str) -> None:
    """Run a ``>>>`` transcript: each statement's repr (or ``ExcName: message``) must match the page."""
    checker, flags = doctest.OutputChecker(), doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    lines, i = source.splitlines(), 0
    while i < len(lines):
        assert lines[i].startswith(">>> "), f"{where}: session line {lines[i]!r} has no '>>> '"
        statement, i = lines[i][4:], i + 1
        expected = []
        while i < len(lines) and not lines[i].startswith(">>> "):
            expected.append(lines[i])
            i += 1
        try:
            got = repr(eval(compile(statement, where, "eval"), ns))
        except Exception as exc:  # the page shows the error a user sees
            got = f"{type(exc).__name__}: {exc}"
        want = "\n".join(expected) + "\n"
        assert checker.check_output(want, got + "\n", flags), f"{where}: {statement}\n  page: {want}  got:  {got}"


# ------------------------------------------------------------------------------------------------ the tests
def _run_page(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    blocks = page_blocks((ROOT / page).read_text(encoding="utf-8"))
    ns: dict[str, Any] = {"__name__": "__docs__", "__blocks__": [b[1] for b in blocks], "__cleanup__": []}
    ran = 0
    try:
        for line, source, kind, arg in blocks:
            where = f"{page}:{line}"
            if kind == "not run":
                assert len(arg) > 20, f"{where}: '<!-- not run: -->' must say why and what runs it instead"
                continue
            if kind == "run with":
                for name in arg.split(","):
                    assert name.strip() in SETUPS, f"{where}: unknown setup {name.strip()!r}; known: {sorted(SETUPS)}"
                    SETUPS[name.strip()](ns, tmp_path)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                warnings.simplefilter("error", explaind.exceptions.ExplaindWarning)
                if source.startswith(">>> "):
                    run_session(source, ns, where)
                else:
                    try:
                        exec(compile(textwrap.dedent(source), where, "exec"), ns)
                    except Exception as exc:
                        raise AssertionError(f"{where}: the block raised {type(exc).__name__}: {exc}. Fix the "
                                             f"block, or mark it '<!-- run with: SETUP -->' / '<!-- not run: "
                                             f"REASON -->'") from exc
            ran += 1
    finally:
        for undo in ns["__cleanup__"]:
            undo()
        explaind.reset_plugins()
    ns["__ran__"] = ran
    return ns


@pytest.mark.parametrize("page", PAGES)
def test_every_python_block_of_the_page_runs(page, tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "tests"))  # the setups use the tests' tiny Hugging Face models
    try:
        ns = _run_page(page, tmp_path, monkeypatch)
    finally:
        sys.path.remove(str(ROOT / "tests"))
    n_blocks = len(ns["__blocks__"])
    assert ns["__ran__"] == n_blocks - sum(1 for b in page_blocks((ROOT / page).read_text()) if b[2] == "not run")
    check = PAGE_CHECKS.get(page)
    if check is not None:
        check(ns, tmp_path)


def _readme(ns: dict[str, Any], tmp: Path) -> None:
    model, X_test = ns["model"], ns["X_test"]
    with torch.no_grad():
        trained = model(X_test).numpy()
    assert abs(ns["rep"].predict(X_test) - trained).max() <= 1e-6 * abs(trained).max()
    assert ns["att"].completeness_error() <= 1e-10 and ns["att"].axes == ("test", "train", "output")


def _viz(ns: dict[str, Any], tmp: Path) -> None:
    assert (tmp / "out" / "heat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "a caption" in (tmp / "out" / "index.html").read_text(encoding="utf-8")


def _pruning(ns: dict[str, Any], tmp: Path) -> None:
    masks, pruned = ns["masks"], ns["pruned"]
    assert masks["net.2.weight"].all(), "the excluded output layer was pruned"
    n = masks["net.0.weight"].numel()  # the one prunable tensor: biases are not, net.2 is excluded
    assert int(masks["net.0.weight"].sum()) == n - int(0.95 * n + 0.5)  # k = floor(rho n + 1/2) removed
    assert not dict(pruned.named_parameters())["net.0.weight"][~masks["net.0.weight"]].any()
    assert (tmp / "model.safetensors").is_file() and (tmp / "results.csv").is_file()


PAGE_CHECKS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "README.md": _readme, "docs/viz.md": _viz, "docs/pruning.md": _pruning,
}


def test_markers_are_read_and_an_unmarked_fragment_fails(tmp_path, monkeypatch):
    text = ("a\n\n<!-- not run: it needs a GPU; tests/x.py runs it -->\n```python\nboom()\n```\n"
            "<!-- run with: huber -->\n\n```python\nvalue = huber\n```\n```python\nundefined_name\n```\n")
    blocks = page_blocks(text)
    assert [(b[2], b[3]) for b in blocks] == [("not run", "it needs a GPU; tests/x.py runs it"),
                                             ("run with", "huber"), (None, None)]
    page = tmp_path / "page.md"
    page.write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    with pytest.raises(AssertionError, match=r"page.md:12: the block raised NameError"):
        _run_page("page.md", tmp_path, monkeypatch)


def test_a_session_block_compares_what_it_prints():
    ns = {"explaind": explaind}
    run_session(">>> 1 + 1\n2\n>>> explaind.get_entry('loss', 'hubr')\nUnknownEntryError: Unknown loss 'hubr'...",
                ns, "p")
    with pytest.raises(AssertionError, match="page: 3"):
        run_session(">>> 1 + 1\n3", ns, "p")
