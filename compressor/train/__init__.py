"""Training: the dense baseline and RobustDLRT share one loop (dlrt.Trainer), configured by the
recipe's ``baseline`` or ``train`` section."""

from .common import clean_accuracy
from .dlrt import Trainer, TrainingHistory, TrainingSection

__all__ = ["Trainer", "TrainingHistory", "TrainingSection", "clean_accuracy"]
