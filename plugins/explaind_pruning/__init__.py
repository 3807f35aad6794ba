"""First-party explaind plugin: pruning strategies (uses only the public API of explaind).

Registers ``random``, ``magnitude``, ``snip``, ``grasp``, ``synflow`` and ``explaind`` under the
``"pruning_strategy"`` kind::

    import explaind
    record = explaind.get_entry("pruning_strategy", "snip")
    strategy = record.implementation(sparsity=0.95, exclude=("fc3",)).fit(model, (X, y))
    masks = strategy.masks()
"""

from __future__ import annotations

import explaind
from explaind.records import PruningStrategyRecord

from .basic import MagnitudeConfig, MagnitudePruning, RandomConfig, RandomPruning
from .explaind_scores import ExplaindPruning, ExplaindScoreConfig
from .grasp import GraspConfig, GraspPruning
from .snip import SnipConfig, SnipPruning
from .synflow import SynflowConfig, SynflowPruning

__all__ = [
    "RandomPruning",
    "MagnitudePruning",
    "SnipPruning",
    "GraspPruning",
    "SynflowPruning",
    "ExplaindPruning",
    "explaind_pruning_strategies",
]


@explaind.hookimpl
def explaind_pruning_strategies() -> list[PruningStrategyRecord]:
    """The six first-party pruning strategies."""
    return [
        PruningStrategyRecord(
            name="random", implementation=RandomPruning, config=RandomConfig, needs_data=False,
            description="Uniformly random scores from a seeded generator (chance baseline).",
            extras={"uses_random_state": True},
        ),
        PruningStrategyRecord(
            name="magnitude", implementation=MagnitudePruning, config=MagnitudeConfig, needs_data=False,
            description="Absolute parameter value |theta|.",
        ),
        PruningStrategyRecord(
            name="snip", implementation=SnipPruning, config=SnipConfig, needs_data=True,
            description="SNIP connection sensitivity |theta * dL/dtheta| on a scoring batch.",
        ),
        PruningStrategyRecord(
            name="grasp", implementation=GraspPruning, config=GraspConfig, needs_data=True,
            description="GraSP gradient-flow preservation theta * (H g) on a scoring batch (signed).",
        ),
        PruningStrategyRecord(
            name="synflow", implementation=SynflowPruning, config=SynflowConfig, needs_data=False,
            description="Iterative, data-free synaptic flow |theta * dR/dtheta| of the linearised network.",
            extras={"sparsity_dependent": True},
        ),
        PruningStrategyRecord(
            name="explaind", implementation=ExplaindPruning, config=ExplaindScoreConfig, needs_data=True,
            needs_trajectory=True,
            description="ExPLAIND parameter-wise influence sum_x sum_o |sum_s sum_k psi| over an evaluation set.",
        ),
    ]
