"""The report of a salvage (:func:`~explaind.trajectory._salvage.salvage_store`): what was kept, how each step was
proven, what was dropped and why (docs/recording.md, "Salvaging a damaged store")."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import TrajectoryError

__all__ = ["SalvageReport", "log_unvouched", "steps_text", "out_failure"]

logger = logging.getLogger("explaind.trajectory._salvage")  # the salvage's own logger


@dataclass
class SalvageReport:
    """What :func:`~explaind.trajectory._salvage.salvage_store` kept and dropped.

    Attributes
    ----------
    source, out : Path
        The damaged store (unchanged) and the new one.
    kept : list of (int, str)
        Each step kept and how it was proven: ``"checksum"`` or ``"bound"`` (module docstring).
    dropped : list of (int, str)
        Each step of the damaged store (in its index or as a step file) that was not kept, and why.
    unreadable_lines : list of (int, str)
        Journal lines that do not parse: line number and the problem (line 0: the journal as a whole could not
        be read, e.g. a directory in its place; every step is then proven by its file alone).
    states : list of (int, str)
        Each step kept with its optimizer state, and how the state was proven.
    resume_at : int
        The step a resume of ``out`` continues from (the newest step kept with a state; 0: from the start).
    sparse : bool
        Whether the store is sparse (``checkpoint_every > 1``): its steps are replayed when read (module docstring).
    replayed : list of (int, float)
        Each step kept as ``"replayed"`` (``salvage(..., replay=True)``, a store written before schema 3) and its
        replayed relative residual r_s (``_salvage_replay``: the update audit of the step, replayed).
    replay_tolerance : float
        The largest residual of a step proven by replay (0 when nothing was replayed).
    """

    source: Path
    out: Path
    kept: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    unreadable_lines: list[tuple[int, str]] = field(default_factory=list)
    states: list[tuple[int, str]] = field(default_factory=list)
    resume_at: int = 0
    sparse: bool = False
    replayed: list[tuple[int, float]] = field(default_factory=list)
    replay_tolerance: float = 0.0

    def __str__(self) -> str:
        by = {how: [s for s, h in self.kept if h == how] for how in ("checksum", "bound", "replayed")}
        lines = [f"Salvaged {len(self.kept)} step(s) of {str(self.source)!r} into {str(self.out)!r} (the damaged "
                 f"store is unchanged).",
                 f"kept, proven by their checksums: {steps_text(by['checksum'])}",
                 f"kept, proven by their own record and binding only (no checksum): {steps_text(by['bound'])}"]
        if by["replayed"]:
            worst = max(r for _, r in self.replayed)
            lines.append(f"kept, proven by replaying their recorded updates (written before schema 3, no checksum; "
                         f"each theta_s+1 follows from theta_s to a relative {worst:.3g}, tolerance "
                         f"{self.replay_tolerance:g}; not bit for bit): {steps_text(by['replayed'])}")
        lines += [f"unreadable journal{f' line {n}' if n else ''}: {problem}" for n, problem in self.unreadable_lines]
        lines += [f"dropped step {s}: {why}" for s, why in self.dropped]
        lines.append(f"a resume continues from step {self.resume_at}" + ("" if self.resume_at == len(self.kept) else
                     f" (the newest step kept with its optimizer state); steps {self.resume_at} to "
                     f"{len(self.kept) - 1} are recorded again"))
        return "\n".join(lines)


def steps_text(steps: list[int]) -> str:
    if not steps:
        return "none"
    return ", ".join(str(s) for s in steps[:20]) + (f", ... ({len(steps)} in all)" if len(steps) > 20 else "")


def log_unvouched(report: SalvageReport) -> None:
    """Warn about the steps kept without a checksum: what their proof (``"replayed"`` or ``"bound"``) does not prove
    and the fix."""
    if report.replayed:
        logger.warning(
            "Trajectory.salvage(%r): steps %s are proven by replaying their recorded updates (their journal lines were "
            "lost and their files, written before schema 3, bind no run): each theta_{s+1} follows from theta_s, the "
            "recorded batch and coefficients to a relative %g, not bit for bit (a change below that is not found), "
            "and their optimizer states are not kept (a resume records them again).",
            str(report.source), steps_text([s for s, _ in report.replayed]), report.replay_tolerance)
    bound = [s for s, how in report.kept if how == "bound"]
    if bound:
        logger.warning(
            "Trajectory.salvage(%r): steps %s are proven by their own files only (their journal lines were lost or "
            "unreadable): each holds its step, its record and this run's identity, start files and description, but "
            "nothing vouches for the bytes of its tensors (its checksum was in the lost line), nor that it continues "
            "the step before it (a file of an abandoned continuation of the same run would pass). If a copy of the "
            "store exists, compare these steps with it; else re-record from step %d if you cannot vouch for them.",
            str(report.source), steps_text(bound), bound[0])
        if report.sparse:
            logger.warning(
                "Trajectory.salvage(%r): this sparse store's steps %s are checked once more when read: each segment "
                "is replayed from the checkpoint state before it and compared with the theta stored at its end, so a "
                "damaged checkpoint state or step file shows as a replay gap (a warning naming the steps) or an "
                "error; read every step once before trusting them.",
                str(report.source), steps_text(bound))


def out_failure(exc: OSError, out: Any, root: Path, target: Path) -> Exception:
    """The error of a salvage that could not write its new store ``target`` (``exc`` itself where the failed
    operation was not on ``target``: a read of the damaged store ``root``)."""
    if not str(exc.filename or "").startswith(str(target)):
        return exc
    return TrajectoryError(f"salvage(out={str(out)!r}) could not write the new store: {exc.strerror} "
                           f"({str(exc.filename)!r}). The store {str(root)!r} was only read: nothing there changed. "
                           f"Fix: pass an out= on a writable file system with free space; salvaging again into the "
                           f"same out= removes what this attempt left there.")
