"""lightning_interp: neuron- and filter-level interpretability of CNNs while they train.

Algorithms (plain functions on ``nn.Module`` and tensors) live in the submodules
``layers``, ``nns``, ``metrics``, ``overfitting``; filter scores, the one shape every scorer returns and
masking, pruning and the report take, in ``scores``; Lightning callbacks in ``lightning_interp.callbacks``; shipped data and
reference models in ``data`` and ``models``.
"""

from .batch import Batch, default_batch_adapter
from .layers import get_layer, list_layers
from .nns import (
    KnowledgeQuantity,
    filter_learning_images,
    iter_filter_learning_images,
    knowledge_quantity,
    layer_activations,
    layer_learning_image,
    neuron_learning_images,
)
from .scores import FilterScores, Selection, resolve_scores

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "FilterScores",
    "Selection",
    "KnowledgeQuantity",
    "default_batch_adapter",
    "filter_learning_images",
    "get_layer",
    "iter_filter_learning_images",
    "knowledge_quantity",
    "layer_activations",
    "layer_learning_image",
    "list_layers",
    "neuron_learning_images",
    "resolve_scores",
]
