"""Print the measured figures of the stranger framework tests (Hugging Face, Lightning, Fabric, accelerate) as a table.

Run from the repository root::

    PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/hf_strangers_table.py [test files]

Without arguments it runs every file of ``FILES``; given file names (of ``FILES``) it runs those only.

It runs those test files in this process; each exactness check keeps what it measured
(``_hf_stranger_kit.MEASURED``): replica against the trained model in evaluation mode, residual share, and
``keep=("train",)`` scores against the slow loop reference (relative errors), and the outcome a check named
(``exact``, or ``loud: ...`` for a run refused or warned about; ``exact`` where it named none).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _hf_stranger_kit  # noqa: E402  (the test files share this module object)

FILES = ["test_stranger_hf_encoders.py", "test_stranger_hf_decoders.py", "test_stranger_hf_audio_vision.py",
         "test_stranger_hf_gc.py", "test_stranger_hf_round3.py",
         "test_stranger_hf_vision.py", "test_stranger_hf_seq2seq.py", "test_stranger_hf_text.py",
         "test_stranger_hf_trainer.py", "test_stranger_hf_round5.py", "test_stranger_lightning_round5.py",
         "test_stranger_hf_round6.py", "test_stranger_lightning_round6.py", "test_stranger_hf_round7.py",
         "test_stranger_lightning_round7.py", "test_stranger_hf_round8.py", "test_stranger_lightning_round8.py",
         "test_stranger_hf_round9.py", "test_stranger_lightning_round9.py", "test_fabric_accelerate.py",
         "test_stranger_hf_round10.py", "test_stranger_lightning_round10.py", "test_fabric_accelerate_round10.py",
         "test_stranger_hf_round11.py", "test_stranger_lightning_round11.py", "test_fabric_accelerate_round11.py",
         "test_frameworks_round12.py", "test_frameworks_round12_more.py"]


def main() -> int:
    chosen = sys.argv[1:] or FILES
    unknown = sorted(set(chosen) - set(FILES))
    if unknown:
        raise SystemExit(f"unknown test files {unknown}; allowed: {FILES}")
    code = pytest.main(["-q", "-p", "no:cacheprovider", *(str(HERE / f) for f in chosen)])
    merged: dict[str, dict] = {}
    for row in _hf_stranger_kit.MEASURED:
        merged.setdefault(row["test"], {}).update({k: v for k, v in row.items() if k != "test"})
    print("\n| test | replica vs trained model | residual share | train scores vs reference | outcome |\n"
          "|---|---|---|---|---|")
    for test, fig in merged.items():
        cells = [f"{fig[k]:.1e}" if k in fig else "—" for k in ("replica", "share", "train")]
        cells.append(str(fig.get("outcome", "exact")))
        print(f"| `{test.split('::', 1)[1]}` | " + " | ".join(cells) + " |")
    return int(code)


if __name__ == "__main__":
    raise SystemExit(main())
