"""Recording and reading training trajectories."""

from .base import Trajectory
from .disk import DiskTrajectory
from .memory import InMemoryTrajectory
from .recorder import TrajectoryRecorder

__all__ = ["Trajectory", "InMemoryTrajectory", "DiskTrajectory", "TrajectoryRecorder"]
