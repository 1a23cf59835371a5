"""Quantities computed from learning images, usable without a Trainer (the names the docs import)."""

from .aipc import aipc, filter_types, type_masking
from .anomaly import (
    AnomalyCriteria,
    AnomalyFilters,
    FilterClusters,
    anomaly_features,
    anomaly_scores,
    apply_criteria,
    cluster_filters,
    detect_anomaly_filters,
    project_filters_2d,
    scan_anomaly_filters,
)
from .fq import (
    diversity_masking,
    feature_quantity,
    fq_diversity,
    layer_feature_quantity,
    neuron_feature_quantity,
)
from .tip import TIPAggregate, avou, interpretable_properties, layer_properties, sou, spearman

__all__ = [
    "AnomalyCriteria",
    "AnomalyFilters",
    "FilterClusters",
    "TIPAggregate",
    "aipc",
    "anomaly_features",
    "anomaly_scores",
    "apply_criteria",
    "avou",
    "cluster_filters",
    "detect_anomaly_filters",
    "diversity_masking",
    "feature_quantity",
    "filter_types",
    "fq_diversity",
    "interpretable_properties",
    "layer_feature_quantity",
    "layer_properties",
    "neuron_feature_quantity",
    "project_filters_2d",
    "scan_anomaly_filters",
    "sou",
    "spearman",
    "type_masking",
]
