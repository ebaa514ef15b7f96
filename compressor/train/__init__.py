"""Training: the dense baseline and RobustDLRT share one loop (dlrt.Trainer)."""

from .common import CompressionStats, clean_accuracy, compression_stats, resolve_device
from .distributed import DistContext, init_from_env
from .dlrt import Trainer, TrainerConfig, TrainingHistory

__all__ = ["CompressionStats", "DistContext", "Trainer", "TrainerConfig", "TrainingHistory", "clean_accuracy",
           "compression_stats", "init_from_env", "resolve_device"]
