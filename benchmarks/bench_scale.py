"""Issue 11's real-loop cases at real widths: what recording and explaining cost, and how exact they stay.

Each case runs in a fresh child process (so its peak resident set is its own), one torch thread:

* ``resnet``: tests/resnet_model.py's ResNet-18 (BasicBlocks [2, 2, 2, 2], base width ``--resnet-width``, 64 is the
  full 11M-parameter network), float64, 32x32 inputs, train-mode BatchNorm, SGD momentum 0.9 (lr 5e-5, as
  tests/test_resnet18_batchnorm.py), batch 16;
* ``gpt2``: ``transformers.GPT2LMHeadModel`` (``--gpt2-layers``, ``--gpt2-width``, heads of 64, vocabulary
  ``--vocab``), float64, dropout 0.1 and SDPA attention, AdamW, next-token loss, sequences of 64, batch 4;
* ``bert``: ``BertForSequenceClassification`` (``--bert-layers``, ``--bert-width``, SDPA, 3 labels, sequences of 64
  with a 4-D mask), float64, AdamW, batch 4;
* ``fp16`` / ``bf16``: a dropout MLP ``in - h - h - 10`` (tanh, dropout 0.2, ``--mlp-width`` h) with float32 weights
  under ``torch.autocast("cpu", dtype)`` (float16 with a ``GradScaler``), SGD momentum, batch 16.

Every case first runs ``--steps`` steps unrecorded (``peak plain MB``: that loop's peak), then rebuilds the same
seeded run and records it with the store on (``store MB``: the run folder's bytes, ``store x``: over the parameter
bytes; ``rec x``: recorded over plain seconds per step, the first step included). Then ``KernelReplica.predict`` on
4 test inputs (``replica``: relative error against the trained model in evaluation mode) and
``InfluenceEstimator(keep=("train",))`` on 2 test inputs,
one output each (the ResNet's logit 3, the LM's token logit at position 5, the classifiers' logit 0): its residual
share, completeness error, and with ``--reference`` its relative error against the tests' slow float64 loop reference
(tests/replay_reference.py, whose per-sample gradients are ``steps x n_train x D`` float64: it is skipped, and says
so, when that would pass ``--reference-gb``). ``peak`` is the child's ``ru_maxrss`` above its start after each
phase (record, replica, train); times are wall seconds.

Run: ``python benchmarks/bench_scale.py [--cases resnet gpt2 bert fp16 bf16] [--quick] [--reference]``
(``--quick``: toy sizes, about a minute; the defaults are the real widths of docs/scaling.md's "Real widths").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

CASES = ("resnet", "gpt2", "bert", "fp16", "bf16")
#: The table's columns: header, figure, format.
COLUMNS = (("case", "case", ""), ("params", "params", ""), ("plain s/step", "plain_s", ".2f"),
           ("rec x", "rec_ratio", ".2f"), ("store MB", "store_mb", ".0f"), ("store x", "store_x", ".1f"),
           ("peak plain MB", "peak_plain", ".0f"), ("peak rec MB", "peak_record", ".0f"),
           ("replica", "replica", ".1e"), ("replica s", "replica_s", ".0f"), ("peak replica MB", "peak_replica", ".0f"),
           ("share", "share", ".1e"), ("complete", "completeness", ".1e"), ("train vs ref", "reference", ""),
           ("train s", "train_s", ".0f"), ("peak train MB", "peak_train", ".0f"), ("check", "check", ".1e"))
SEQ = 64


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _mark(phase: str, base: float, out: dict[str, object]) -> None:
    """Progress on stderr: the phase done and the figures so far (a case that dies keeps them in its row)."""
    print(f"{phase}: peak {_peak_mb() - base:.0f} MB, {time.strftime('%H:%M:%S')}", file=sys.stderr, flush=True)
    print("partial " + json.dumps(out), file=sys.stderr, flush=True)


class PeakWhere:
    """A thread sampling the resident set every 50 ms and keeping the main thread's stack at its highest reading
    (``--where``: which call the peak memory is in)."""

    def __init__(self) -> None:
        import threading

        self.best, self.stack, self.main = 0.0, "", threading.get_ident()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import traceback

        while not self.done.wait(0.05):
            with open("/proc/self/statm") as fh:
                mb = int(fh.read().split()[1]) * 4096 / 2**20
            if mb > self.best:
                frame = sys._current_frames().get(self.main)
                frames = traceback.extract_stack(frame) if frame is not None else []
                ours = [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames
                        if "explaind" in f.filename or "torch/func" in f.filename or "_functorch" in f.filename]
                self.best, self.stack = mb, " < ".join(reversed(ours[-6:]))

    def report(self) -> str:
        self.done.set()
        self.thread.join()
        return f"resident peak {self.best:.0f} MB in {self.stack}"


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def next_token_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """Mean next-token cross entropy over every position of every sequence (equal lengths)."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def build(case: str, a: argparse.Namespace):
    """``(model, optimizer, X, y, X_test, forward, loss, target, scaler, autocast dtype)`` of a case, seeded."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    n = a.n_train + 4
    if case == "resnet":
        from resnet_model import ResNet18

        w = a.resnet_width
        model = ResNet18(widths=(w, 2 * w, 4 * w, 8 * w)).double()
        X = torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 10, (n,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=5e-5, momentum=0.9)
        return model, opt, X, y, lambda m, x: m(x), "cross_entropy", [3, 3], None, None
    if case == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(vocab_size=a.vocab, n_positions=SEQ, n_embd=a.gpt2_width, n_layer=a.gpt2_layers,
                         n_head=max(1, a.gpt2_width // 64), bos_token_id=0, eos_token_id=0)
        cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(cfg).double()
        X = torch.randint(0, a.vocab, (n, SEQ), generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        target = [5 * a.vocab + 3, 5 * a.vocab + 7]
        return model, opt, X, X, lambda m, x: m(input_ids=x).logits, next_token_loss, target, None, None
    if case == "bert":
        from _hf_testkit import mask_4d
        from transformers import BertConfig, BertForSequenceClassification

        w = a.bert_width
        cfg = BertConfig(vocab_size=a.vocab, hidden_size=w, num_hidden_layers=a.bert_layers,
                         num_attention_heads=max(1, w // 64), intermediate_size=4 * w, max_position_embeddings=SEQ,
                         num_labels=3)
        cfg._attn_implementation = "sdpa"
        model = BertForSequenceClassification(cfg).double()
        lengths = torch.randint(SEQ // 2, SEQ + 1, (n,), generator=gen)
        mask = (torch.arange(SEQ)[None, :] < lengths[:, None]).long()
        X = {"input_ids": torch.randint(1, a.vocab, (n, SEQ), generator=gen) * mask, "attention_mask": mask_4d(mask)}
        y = torch.randint(0, 3, (n,), generator=gen)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
        fwd = lambda m, x: m(**x).logits  # noqa: E731
        return model, opt, X, y, fwd, "cross_entropy", [0, 0], None, None
    h, d_in = a.mlp_width, a.mlp_width // 4
    model = nn.Sequential(nn.Linear(d_in, h), nn.Tanh(), nn.Dropout(0.2), nn.Linear(h, h), nn.Tanh(),
                          nn.Dropout(0.2), nn.Linear(h, 10))
    X = torch.randn(n, d_in, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if case == "fp16" else None
    dtype = torch.float16 if case == "fp16" else torch.bfloat16
    return model, opt, X, y, lambda m, x: m(x), "cross_entropy", [0, 0], scaler, dtype


def _rows(X, idx):
    return {k: v[idx] for k, v in X.items()} if isinstance(X, dict) else X[idx]


def train(model, opt, X, y, forward, loss, scaler, dtype, batches, rec) -> float:
    """The loop over ``batches`` (logged to ``rec`` unless ``None``); wall seconds per step."""
    model.train()
    start = time.perf_counter()
    for idx in batches:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = forward(model, _rows(X, idx))
            value = F.cross_entropy(out, y[idx]) if loss == "cross_entropy" else loss(out, y[idx])
        if scaler is None:
            value.backward()
            if rec is not None:
                rec.log_batch(idx)
            opt.step()
        else:
            scaler.scale(value).backward()
            scaler.unscale_(opt)
            if rec is not None:
                rec.log_batch(idx)
            scaler.step(opt)
            scaler.update()
    return (time.perf_counter() - start) / len(batches)


def _reference_error(traj, X2, att, target, limit_gb: float) -> str:
    D = sum(p.numel() for p in traj.params(0).values())
    need = 2 * traj.n_steps * traj.n_train * D * 8 / 1e9
    if need > limit_gb:
        return f"skipped ({need:.0f} GB)"
    from engine_compare import as_numpy, reference_terms
    from reference import rel_err
    from replay_reference import BufferReference, ReplayReference

    if isinstance(X2, dict):
        from _hf_testkit import MappingReplayReference

        ref = MappingReplayReference(traj, X2, target=target,
                                     loss_fn=lambda out, t: F.cross_entropy(out, t, reduction="none"))
        return f"{rel_err(as_numpy(att.values), ref.kept(('train',))):.1e}"
    cls = BufferReference if traj.buffer_names else ReplayReference
    ref = cls(traj, X2, target=target, panels=1 if traj.buffer_names else 4)
    return f"{rel_err(as_numpy(att.values), reference_terms(ref, att)['values']):.1e}"


def child(case: str, a: argparse.Namespace) -> dict[str, object]:
    """One case in this (fresh) process."""
    import explaind

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    base = _peak_mb()
    where = PeakWhere() if a.where else None
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randperm(a.n_train, generator=gen)[:a.batch] for _ in range(a.steps)]
    model, opt, X, y, forward, loss, target, scaler, dtype = build(case, a)
    t_plain = train(model, opt, X, y, forward, loss, scaler, dtype, batches, None)
    out: dict[str, object] = {"case": case, "params": sum(p.numel() for p in model.parameters()),
                              "peak_plain": _peak_mb() - base}
    del model, opt
    _mark("plain loop", base, out)
    model, opt, X, y, forward, loss, target, scaler, dtype = build(case, a)  # the same seeded run, recorded
    train_data = (_rows(X, torch.arange(a.n_train)), y[:a.n_train])
    with tempfile.TemporaryDirectory() as tmp:
        rec = explaind.TrajectoryRecorder(model, opt, loss=loss, train_data=train_data, store=Path(tmp) / "run",
                                          grad_scaler=scaler)
        with rec:
            t_rec = train(model, opt, X, y, forward, loss, scaler, dtype, batches, rec)
        param_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        out.update(plain_s=t_plain, rec_ratio=t_rec / t_plain, store_mb=_dir_mb(Path(tmp) / "run"),
                   store_x=_dir_mb(Path(tmp) / "run") / param_mb,
                   peak_record=_peak_mb() - base)
        _mark("recorded", base, out)
        traj = rec.trajectory
        checked = np.asarray(traj.gradient_check(), dtype=float)
        out["check"] = float(np.nanmax(checked)) if np.isfinite(checked).any() else float("nan")
        _mark("gradient check read", base, out)
        X_test = _rows(X, torch.arange(a.n_train, a.n_train + 4))
        model.eval()
        with torch.no_grad():
            trained = forward(model, X_test).reshape(4, -1).double()
        quad = ({"quadrature": "gauss-legendre", "nodes": 8} if dtype is not None  # tanh: smooth
                else {"quadrature": "adaptive", "tol": a.tol})
        start, cpu = time.perf_counter(), time.process_time()
        replica = explaind.KernelReplica(device="cpu", chunk_size=a.chunk_size, **quad).fit(traj)
        per = a.replica_inputs
        rep = np.concatenate([replica.predict(_rows(X_test, torch.arange(i, min(i + per, 4))))
                              for i in range(0, 4, per)])
        out["replica_s"] = time.perf_counter() - start
        out["replica_cpu_s"] = time.process_time() - cpu  # one thread: less sensitive to a loaded machine
        out["replica"] = float(np.linalg.norm(np.asarray(rep, dtype=np.float64) - trained.numpy())
                               / np.linalg.norm(trained.numpy()))
        out["peak_replica"] = _peak_mb() - base
        _mark("replica", base, out)
        print(f"replica: {out['replica_cpu_s']:.1f} CPU s", file=sys.stderr, flush=True)
        X2 = _rows(X_test, torch.arange(2))
        if a.train_axis:
            start = time.perf_counter()
            est = explaind.InfluenceEstimator(keep=("train",), target=target, device="cpu", residual_tol=1.0,
                                              chunk_size=a.chunk_size, **quad)
            att = est.fit(traj).transform(X2)
            out["train_s"] = time.perf_counter() - start
            out["share"] = float(att.meta["residual_share"])
            out["completeness"] = float(att.completeness_error())
            out["peak_train"] = _peak_mb() - base
            _mark("train axis", base, out)
            if a.reference:
                out["reference"] = _reference_error(traj, X2, att, target, a.reference_gb)
                out["peak_reference"] = _peak_mb() - base
    if where is not None:
        print(where.report(), file=sys.stderr, flush=True)
    return out


def _spawn(case: str, argv: list[str]) -> dict[str, object]:
    done = subprocess.run([sys.executable, __file__, "--child", case, *argv], capture_output=True, text=True,
                          check=False)
    if "--where" in argv:
        print("\n".join(x for x in done.stderr.splitlines() if ": peak " in x or x.startswith("resident peak")
                        or x.endswith(" CPU s")),
              file=sys.stderr, flush=True)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        marks = [x for x in lines if ": peak " in x]
        partial = [json.loads(x[len("partial "):]) for x in lines if x.startswith("partial ")]
        return {**(partial[-1] if partial else {}), "case": case,
                "error": f"{lines[-1] if lines else ''} (exit {done.returncode}; last phase done: "
                         f"{marks[-1] if marks else 'none'})"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else (format(v, spec) if isinstance(v, float | int) else str(v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    p.add_argument("--quick", action="store_true", help="toy sizes (about a minute)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch", type=int)
    p.add_argument("--n-train", type=int)
    p.add_argument("--resnet-width", type=int, default=64)
    p.add_argument("--gpt2-layers", type=int, default=4)
    p.add_argument("--gpt2-width", type=int, default=256)
    p.add_argument("--bert-layers", type=int, default=4)
    p.add_argument("--bert-width", type=int, default=256)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--mlp-width", type=int, default=2048)
    p.add_argument("--tol", type=float, default=1e-10, help="the adaptive quadrature's tolerance")
    p.add_argument("--chunk-size", type=int, default=256, help="the estimators' chunk_size")
    p.add_argument("--replica-inputs", type=int, default=4, help="test inputs per KernelReplica.predict call")
    p.add_argument("--no-train-axis", dest="train_axis", action="store_false")
    p.add_argument("--reference", action="store_true", help="the slow float64 loop reference of the train scores")
    p.add_argument("--reference-gb", type=float, default=4.0)
    p.add_argument("--where", action="store_true", help="print each case's resident peak and the calls it was in")
    p.add_argument("--child")
    a = p.parse_args()
    if a.quick:
        a.resnet_width, a.gpt2_layers, a.gpt2_width, a.bert_layers, a.bert_width = 4, 1, 64, 1, 64
        a.vocab, a.mlp_width = 64, 64
    if a.child:
        case = a.child
        a.batch = a.batch or (16 if case in ("resnet", "fp16", "bf16") else 4)
        a.n_train = a.n_train or 2 * a.batch
        print(json.dumps(child(case, a)))
        return
    argv = [x for x in sys.argv[1:] if x not in a.cases and x != "--cases"]
    print(f"torch {torch.__version__}, 1 thread, load average {os.getloadavg()[0]:.1f}"
          f"{' (--quick sizes)' if a.quick else ''}, {a.steps} steps")
    print("| " + " | ".join(h for h, _, _ in COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for case in a.cases:
        r = _spawn(case, argv)
        if "error" in r:
            print(f"{case}: error: {r['error']}", file=sys.stderr, flush=True)
        if "params" not in r:
            continue
        cells = [f"{r['params']:,}" if key == "params" else _fmt(r.get(key), spec) for _, key, spec in COLUMNS]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
