"""Wall time and peak memory of the documented ``explaind`` commands, run literally.

The commands are read from the docs, not retyped: every ``explaind ...`` line of the shell
blocks of ``docs/quickstart.md`` (continuation lines joined, comments dropped), in order, then
the ``docs/cli.md`` commands listed in :data:`CLI_COMMANDS` (its code blocks are mostly
synopses; the list holds the example commands and each command at its defaults). Each command
runs as ``python -m explaind.cli ...`` of this checkout in a scratch folder, with
``OMP_NUM_THREADS`` removed from the environment as in a user's shell, and is timed as one child
process (``os.wait4``: wall time and that child's peak resident memory). What each command printed is
kept in ``WORKDIR/logs/NN.out`` (the command, then its stdout) and ``NN.err`` (its stderr), so the
numbers the docs quote from it can be read back.

Prints one table: command, wall seconds, CPU seconds (user + system of the child: the work itself,
steadier than wall time on a shared machine), max RSS (MB), exit code, whether stderr showed a
progress bar with the remaining time (tqdm's ``[elapsed<remaining``), whether it said its cost (a count of
path-gradient evaluations, steps or retrainings) before its first progress bar, how many warning lines it
printed (``explaind COMMAND: warning: ...``) and whether it finished within 120 s. ``--threads`` adds the
quickstart's replica over 100 steps with ``--threads 1`` and ``--threads 2`` (the ratio behind the CLI's
default of one CPU thread).

Run: ``python benchmarks/bench_quickstart.py [--workdir DIR] [--only quickstart|cli] [--skip NAME ...]
[--threads]``. State the machine's load (``uptime``, printed before and after) next to the figures.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 120.0
#: tqdm's time field with an estimate of the time left, e.g. ``[00:21<00:01``.
_ETA = re.compile(r"\[\d+:\d\d<\d+:\d\d")
#: A warning line of the command line (``explaind influence: warning: ...``).
_WARNING = re.compile(r"^explaind[\w -]*: warning: ", re.MULTILINE)
#: A cost said before the first progress bar: evaluations, steps or retrainings counted.
_COST = re.compile(r"\d[\d,]* (path-gradient evaluations|steps|retrainings)")

#: The docs/cli.md commands, in the page's order: its examples, and each command at its defaults
#: (``validate`` at its default size is the 27-minute measurement of docs/scores_meaning.md, run
#: here as ``--quick``; ``replicate runs/grok`` reuses the quickstart's run).
CLI_COMMANDS = [
    "explaind demo",
    "explaind train --out runs/a --dataset digit",
    "explaind train --out runs/cli -a modular_transformer -d modular --data p=23 --data n_train=0.5 "
    "--data n_val=null --model d_model=32 --model d_mlp=128 --optimizer adamw --lr 3e-3 "
    "--weight-decay 4 --betas 0.9 0.98 --steps 1000 --stop-at 1.0 --dtype float64",
    "explaind replicate runs/grok",
    "explaind replicate runs/grok --steps 0:100",
    "explaind replicate runs/grok --steps 570:670",
    "explaind replicate --table",
    "explaind influence runs/cli --out runs/cli/scores",
    "explaind prune",
    "explaind validate --quick",
    "explaind report runs/cli",
    "explaind plugins",
    "explaind study grokking",
]

#: The quickstart's replica over 100 steps with one and with two CPU threads (``--threads``).
THREAD_COMMANDS = [
    f"explaind --threads {n} replicate runs/grok --quadrature gauss-legendre --nodes 4 --n-test 32 --steps 0:100"
    for n in (1, 2)
]


def quickstart_commands(page: Path = ROOT / "docs" / "quickstart.md") -> list[str]:
    """The ``explaind`` lines of the page's fenced blocks, continuations joined, comments dropped."""
    commands: list[str] = []
    inside, pending = False, ""
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        text = pending + line.split(" #")[0].strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        if text.startswith("explaind "):
            commands.append(" ".join(text.split()))
    return commands


def run_command(command: str, workdir: Path) -> dict:
    """Run one documented command as a child process; wall time, peak RSS, exit code, progress seen."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "plugins"), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    argv = shlex.split(command)
    if argv[0] != "explaind":
        raise SystemExit(f"not an explaind command: {command!r}")
    logs = workdir / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.glob("*.out")))
    out_path, err_path = logs / f"{n:02d}.out", logs / f"{n:02d}.err"
    start = time.perf_counter()
    with open(out_path, "w") as out, open(err_path, "w") as err:
        out.write(f"$ {command}\n")
        out.flush()
        child = subprocess.Popen([sys.executable, "-m", "explaind.cli", *argv[1:]], cwd=workdir, env=env,
                                 stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = err_path.read_text(errors="replace")
    return {"command": command, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
            "rss_mb": usage.ru_maxrss / 1024, "rc": child.returncode,
            "eta": bool(_ETA.search(stderr)), "cost": bool(_COST.search(stderr.split("%|")[0])),
            "warnings": len(_WARNING.findall(stderr.replace("\r", "\n"))), "ok": wall <= LIMIT_S}


def _table(rows: list[dict]) -> str:
    head = f"| command | wall s | CPU s | max RSS MB | exit | bar + ETA | cost first | warnings | <= {LIMIT_S:.0f} s |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['command']}` | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['rss_mb']:.0f} | {r['rc']} | "
                     f"{'yes' if r['eta'] else 'no'} | {'yes' if r['cost'] else 'no'} | {r['warnings']} | "
                     f"{'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def _uptime() -> str:
    load = os.getloadavg()
    return f"load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} on {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    p.add_argument("--only", choices=("quickstart", "cli"), default=None)
    p.add_argument("--skip", nargs="*", default=[], help="skip commands containing any of these strings")
    p.add_argument("--threads", action="store_true", help="also compare --threads 1 and 2 on one replica")
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_quickstart_"))
    workdir.mkdir(parents=True, exist_ok=True)
    # the quickstart's run is needed by the cli.md commands that reuse runs/grok
    commands = [] if args.only == "cli" else quickstart_commands()
    commands += [] if args.only == "quickstart" else CLI_COMMANDS
    if args.threads:
        commands += THREAD_COMMANDS
    commands = [c for c in commands if not any(s in c for s in args.skip)]
    print(f"# {len(commands)} commands in {workdir}; before: {_uptime()}", flush=True)
    rows = []
    for command in commands:
        rows.append(run_command(command, workdir))
        r = rows[-1]
        print(f"#   {r['wall_s']:7.1f} s wall {r['cpu_s']:7.1f} s CPU {r['rss_mb']:6.0f} MB  rc {r['rc']}  "
              f"ETA {'yes' if r['eta'] else 'no'}  warnings {r['warnings']}  {command}", flush=True)
    print(f"# after: {_uptime()}")
    print(_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
