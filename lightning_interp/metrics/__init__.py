"""Quantities computed from learning images, usable without a Trainer."""

from .anomaly import AnomalyFilters, detect_anomaly_filters, project_filters_2d

__all__ = ["AnomalyFilters", "detect_anomaly_filters", "project_filters_2d"]
