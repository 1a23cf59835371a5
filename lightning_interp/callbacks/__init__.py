"""Lightning callbacks: they schedule, gather and log; the mathematics lives in ``lightning_interp``."""

from .base import InterpCallback, select_probe
from .learning_images import LearningImageLogger

__all__ = ["InterpCallback", "LearningImageLogger", "select_probe"]
