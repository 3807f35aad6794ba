"""Prints the figures of tests/test_grad_mode_forward.py per gradient switch, as docs/guide_own_model.md quotes them.

``OMP_NUM_THREADS=1 PYTHONPATH=$PWD:$PWD/plugins:$PWD/tests python tests/grad_mode_table.py``: per model (the
cosine head with its norms taken under each switch; the centred head under ``inference_mode`` and its fix), the
replica's relative error against the trained model, the ``keep=("step",)`` scores against the reference of the same
function without the switch, the quadrature share of ``keep=("train",)`` and the start of the fix its warning
names (float64, the adaptive rule at tol 1e-9).
"""

from __future__ import annotations

import torch
from _round5_kit import N_TRAIN, XV
from reference import rel_err
from test_grad_mode_forward import SWITCHES, CentredHead, NormHead, _values, explain, trained, twin_reference

ROWS = [(NormHead, mode) for mode in (*SWITCHES, "nested_enable_grad", "plain")]
ROWS += [(CentredHead, "inference_mode"), (CentredHead, "no_grad")]


def main() -> None:
    torch.set_num_threads(1)
    print("| model | replica | step scores vs reference | train: quadrature share | first warning's fix |")
    print("|---|---|---|---|---|")
    for cls, mode in ROWS:
        model, traj = trained(cls, mode)
        rep, att, _, caught = explain(model, traj, keep=("step",))
        expected = twin_reference(traj, XV[N_TRAIN:], cls("plain")).kept(("step",))
        steps = rel_err(_values(att, expected), expected)
        _, train, _, more = explain(model, traj, replica=False, keep=("train",))
        said = [w for w in [*caught, *more] if "Use " in w or "Fix: " in w]
        text = said[0] if said else ""
        fix = text.split("Fix: ", 1)[1] if "Fix: " in text else text.split("Use ", 1)[-1]
        print(f"| {cls.__name__}({mode}) | {rep:.2g} | {steps:.2g} | {train.meta['quadrature_share']:.3g} | "
              f"{fix[:60]} |")


if __name__ == "__main__":
    main()
