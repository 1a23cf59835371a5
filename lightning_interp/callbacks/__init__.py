"""Lightning callbacks: they schedule, gather and log; the mathematics lives in ``lightning_interp``."""

from .anomaly import AnomalyFilterMonitor
from .base import InterpCallback, rank_zero_decides, select_probe  # noqa: F401 (select_probe: importable, not exported)
from .dynamics import MemorisationScorer, SampleDynamicsMonitor
from .fq import FeatureQuantityMonitor
from .guidance import AttentionGuidance
from .interp_report import InterpReport
from .learning_images import LearningImageLogger
from .masking import FilterMasking
from .prune import PruneFlaggedFilters, load_pruned
from .tip import TIPMonitor

__all__ = [
    "AnomalyFilterMonitor",
    "AttentionGuidance",
    "FeatureQuantityMonitor",
    "FilterMasking",
    "InterpCallback",
    "InterpReport",
    "LearningImageLogger",
    "MemorisationScorer",
    "PruneFlaggedFilters",
    "SampleDynamicsMonitor",
    "TIPMonitor",
    "load_pruned",
    "rank_zero_decides",
]
