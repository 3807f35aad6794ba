"""The report of a salvage (:func:`~explaind.trajectory._salvage.salvage_store`): what was kept, how each step was
proven, what was dropped and why (docs/recording.md, "Salvaging a damaged store")."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SalvageReport", "steps_text"]


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
    """

    source: Path
    out: Path
    kept: list[tuple[int, str]] = field(default_factory=list)
    dropped: list[tuple[int, str]] = field(default_factory=list)
    unreadable_lines: list[tuple[int, str]] = field(default_factory=list)
    states: list[tuple[int, str]] = field(default_factory=list)
    resume_at: int = 0
    sparse: bool = False

    def __str__(self) -> str:
        by = {how: [s for s, h in self.kept if h == how] for how in ("checksum", "bound")}
        lines = [f"Salvaged {len(self.kept)} step(s) of {str(self.source)!r} into {str(self.out)!r} (the damaged "
                 f"store is unchanged).",
                 f"kept, proven by their checksums: {steps_text(by['checksum'])}",
                 f"kept, proven by their own record and binding only (no checksum): {steps_text(by['bound'])}"]
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
