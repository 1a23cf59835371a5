"""Lightning callbacks: they schedule, gather and log; the mathematics lives in ``lightning_interp``."""

from .anomaly import AnomalyFilterMonitor
from .base import InterpCallback, select_probe
from .fq import FeatureQuantityMonitor
from .guidance import AttentionGuidance
from .learning_images import LearningImageLogger
from .masking import FilterMasking
from .prune import PruneFlaggedFilters
from .report import InterpReport
from .tip import TIPMonitor

__all__ = [
    "AnomalyFilterMonitor",
    "AttentionGuidance",
    "FeatureQuantityMonitor",
    "FilterMasking",
    "InterpCallback",
    "InterpReport",
    "LearningImageLogger",
    "PruneFlaggedFilters",
    "TIPMonitor",
    "select_probe",
]
