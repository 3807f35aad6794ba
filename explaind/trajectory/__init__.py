"""Recording and reading training trajectories."""

from .base import Trajectory
from .checkpoints import CheckpointTrajectory
from .disk import DiskTrajectory
from .memory import InMemoryTrajectory
from .recorder import TrajectoryRecorder

__all__ = ["Trajectory", "CheckpointTrajectory", "InMemoryTrajectory", "DiskTrajectory", "TrajectoryRecorder"]
