"""Lightning callbacks: they schedule, gather and log; the mathematics lives in ``lightning_interp``."""

from .anomaly import AnomalyFilterMonitor
from .base import InterpCallback, select_probe
from .fq import FeatureQuantityMonitor
from .learning_images import LearningImageLogger
from .tip import TIPMonitor

__all__ = [
    "AnomalyFilterMonitor",
    "FeatureQuantityMonitor",
    "InterpCallback",
    "LearningImageLogger",
    "TIPMonitor",
    "select_probe",
]
