"""What a failed write of the store left on disk, said exactly (docs/recording.md, "Strangers' files, round 8").

A step is stored once its journal line is (``explaind/trajectory/store.py``: the step's files are flushed and
moved into place first). When a write fails, the store's writer knows which steps' journal lines were written
and flushed (the steps it committed, with those of the store before a resume) and whether the error came while
journal lines were being appended: then those lines may be on disk whole (a reader and a resume keep the
steps), torn (a reader ignores the torn line with a warning) or not at all, so the message cannot promise
either and says so. Before, the message said "steps before it are stored", also where the failing step's own
journal line was on disk.
"""

from __future__ import annotations

from pathlib import Path

from ._interrupts import JournalGoneError

__all__ = ["write_failure"]


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first} to {last}"


def write_failure(root: Path, step: int | None, err: BaseException, stored: int,
                  appending: tuple[int, int] | None) -> str:
    """The message of a failed write of step ``step`` to the store at ``root``.

    Parameters
    ----------
    root : Path
        The store.
    step : int or None
        The step being written when ``err`` came.
    err : BaseException
        The error.
    stored : int
        Steps ``0 .. stored - 1`` are stored: their journal lines were written and flushed.
    appending : (int, int) or None
        The first and last step whose journal lines were being appended when ``err`` came (``None``: the
        error came before the journal, while the step's files were written).
    """
    if isinstance(err, JournalGoneError):  # the directory deleted or replaced: what it held cannot be said
        return f"Writing step {step} of the trajectory store {str(root)!r} failed: {err}"
    held = "no step is stored" if stored == 0 else f"{_steps(0, stored - 1)} are stored (their journal lines " \
                                                    f"written and flushed)"
    if appending is None:
        after = (f"step {step} is not: its files were not all written and its journal line was not begun (its "
                 f"temporary files are removed when the store is next opened)")
    else:
        after = (f"the journal lines of {_steps(*appending)} were being appended when the error came and may be on "
                 f"disk whole (a reader and a resume then keep those steps), torn (ignored, with a warning) or "
                 f"not at all; their files are in place")
    return (f"Writing step {step} of the trajectory store {str(root)!r} failed: {type(err).__name__}: {err}. On "
            f"disk: {held}; {after}. Later steps were not written. Nothing stored is lost: fix the cause and "
            f"resume (TrajectoryRecorder(..., resume=True), then rec.restore()), which continues from the last "
            f"stored step.")
