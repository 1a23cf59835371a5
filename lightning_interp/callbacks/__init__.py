"""Lightning callbacks: they schedule, gather and log; the mathematics lives in ``lightning_interp``."""

from .anomaly import AnomalyFilterMonitor
from .base import InterpCallback, select_probe
from .learning_images import LearningImageLogger

__all__ = ["AnomalyFilterMonitor", "InterpCallback", "LearningImageLogger", "select_probe"]
