"""``--nproc N`` for the command line: start N processes with torchrun and join them into one group.

``explaind influence RUN --nproc 4 ...`` runs ``python -m torch.distributed.run --standalone
--nproc_per_node 4 -m explaind.cli -- influence RUN --nproc 4 ...``: torchrun starts the processes,
sets their rank and rendezvous variables and ends all of them when one fails (the robust choice
over hand-made ``torch.multiprocessing`` workers). Each process sees those variables,
initialises the default ``torch.distributed`` group (gloo on CPU, NCCL on CUDA, one GPU per local
rank) and runs the command; the estimators split the work over the group (docs/scaling.md) and
only rank 0 prints and writes.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from collections.abc import Sequence

from .exceptions import ConfigError

__all__ = ["add_nproc", "under_torchrun", "launch", "join_group", "leave_group"]

logger = logging.getLogger(__name__)

#: Environment variables torchrun sets in every process it starts.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def add_nproc(parser: argparse.ArgumentParser) -> None:
    """The ``--nproc N`` option of a subcommand."""
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="processes to split the work over, started with torchrun (default: 1); on GPU use one "
                             "process per card")


def under_torchrun() -> bool:
    """Whether this process was started by torchrun (its rendezvous variables are set)."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def launch(argv: Sequence[str], nproc: int) -> int:
    """Run ``explaind ARGV`` in ``nproc`` processes under torchrun; returns its exit code."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be a positive integer (1: one process, no torchrun).")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "explaind.cli", "--", *argv]
    logger.info("starting %d processes: %s", nproc, " ".join(command))
    return subprocess.call(command)


def join_group(device: str) -> int:
    """Initialise the default process group of this torchrun process; returns its rank.

    NCCL when ``device`` names CUDA (each local rank on its own card), gloo otherwise.
    """
    import torch
    import torch.distributed as dist

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]) % max(1, torch.cuda.device_count()))
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank()


def leave_group(code: int) -> None:
    """Wait for every process, then end this one with ``code``.

    The group is not torn down: gloo's destructor can abort a process that is already exiting
    after every result is written, which torchrun would report as a failure.
    """
    import torch.distributed as dist

    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
