"""Recording and reading training trajectories."""

from .base import Trajectory

__all__ = ["Trajectory"]
