"""Torch-Pruning's channel importances as filter scores: the peers a user would otherwise rank filters by.

:func:`importance_scores` calls ``torch_pruning.importance`` on the pruning group of each layer's
filters (the conv or linear that makes them, its BatchNorm channel and the next layer's inputs — the
group :func:`~lightning_interp.pruning.prune_filters` cuts) and returns a
:class:`~lightning_interp.scores.FilterScores`, so masking, pruning, the report and the CLI take a
magnitude or Taylor ranking exactly as they take the anomaly flags or the memorisation score.
:class:`ImportanceScorer` is the same as a live source (``Scorer``): computed on the model's current
weights whenever a consumer asks.

Criteria (Torch-Pruning's defaults for each: group mean, mean-normalised):

* ``"l1"`` / ``"l2"``: ``MagnitudeImportance(p=1 / 2)`` — weight magnitude (Li et al. 2017);
* ``"taylor"``: ``TaylorImportance()`` — ``|w · ∂loss/∂w|`` (Molchanov et al. 2019) of the mean
  cross-entropy on the given samples;
* ``"bn_scale"``: ``BNScaleImportance()`` — ``|γ|`` of the BatchNorm after the filter (Liu et al. 2017,
  network slimming); only for layers followed by a BatchNorm;
* ``"lamp"``: ``LAMPImportance()`` — layer-adaptive magnitude (Lee et al. 2021).

High = more important to Torch-Pruning (kept by its pruner): prune with
``Selection("l1", amount=0.3, lowest=True)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .layers import eval_mode, filter_owner, get_layer, layer_channels
from .memorisation import _check_labels, _check_layers, _model_device
from .nns import check_inputs, scan_mode
from .pruning import _pruning_fn
from .scores import FilterScores

__all__ = ["CRITERIA", "importance_scores", "ImportanceScorer", "make_importance"]

CRITERIA = ("l1", "l2", "taylor", "bn_scale", "lamp")


def make_importance(criterion: str):
    """The ``torch_pruning.importance`` object of a criterion (see the module docstring)."""
    import torch_pruning as tp

    if criterion not in CRITERIA:
        raise ValueError(f"Expected `criterion` to be one of {list(CRITERIA)} but got {criterion!r}.")
    return {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "taylor": lambda: tp.importance.TaylorImportance(),
        "bn_scale": lambda: tp.importance.BNScaleImportance(),
        "lamp": lambda: tp.importance.LAMPImportance(),
    }[criterion]()


def _check_taylor(criterion: str, inputs: torch.Tensor | None, labels: torch.Tensor | None) -> None:
    if criterion == "taylor":
        if inputs is None or labels is None:
            raise ValueError("Expected `inputs` and `labels` for criterion 'taylor' (its gradients come from their loss).")
        check_inputs(inputs, "inputs")


def _loss_gradients(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> dict[nn.Parameter, torch.Tensor]:
    """∂(mean cross-entropy)/∂θ over all the samples, through ``torch.autograd.grad`` in eval mode."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    device = _model_device(model)
    with scan_mode(model):
        for s in range(0, inputs.shape[0], batch_size):
            x = inputs[s : s + batch_size].to(device).clone()
            loss = F.cross_entropy(model(x).float(), labels[s : s + batch_size].to(device), reduction="sum")
            for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    t += g
    return {p: t / inputs.shape[0] for p, t in zip(params, total)}


def importance_scores(
    model: nn.Module,
    layers: Sequence[str],
    example_inputs: torch.Tensor,
    criterion: str = "l1",
    *,
    inputs: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    batch_size: int = 256,
) -> FilterScores:
    """Torch-Pruning's importance of every filter of ``layers``, as :class:`~lightning_interp.scores.FilterScores`.

    Args:
        model: the network (or a LightningModule whose ``forward`` runs it; layers then start ``"model."``).
        layers: module paths; a layer after a conv (its ReLU, its BatchNorm) names the conv's filters,
            as masking and pruning do (:func:`~lightning_interp.pruning.prune_target`).
        example_inputs: a batch the model accepts (Torch-Pruning traces its dependency graph with it).
        criterion: one of :data:`CRITERIA`.
        inputs: the samples whose mean cross-entropy gives the gradients of ``"taylor"``
            (required for it, ignored otherwise; with ``labels``, their labels). The gradients come from ``torch.autograd.grad`` in eval
            mode and are handed to Torch-Pruning through the parameters' ``.grad`` for the call only:
            every ``.grad`` is restored afterwards.
        labels: the labels of ``inputs``.

    Returns:
        ``FilterScores`` with ``scorer="torch_pruning/<criterion>"``, ``K`` scores per layer, no flags.

    Raises:
        ValueError: unknown criterion or layer, ``"taylor"`` without samples, ``"bn_scale"`` on a layer
            with no BatchNorm in its group.

    Example:
        >>> l1 = importance_scores(net, ["relu2", "relu3"], x[:2], "l1")
        >>> prune_filters(net, l1.select(0.3, lowest=True).flags(), x[:2])
    """
    import torch_pruning as tp

    importance = make_importance(criterion)
    layers = _check_layers(model, layers)
    check_inputs(example_inputs, "example_inputs")
    grads = None
    if criterion == "taylor":
        _check_taylor(criterion, inputs, labels)
        grads = _loss_gradients(model, inputs, _check_labels(labels, inputs.shape[0]), batch_size)
    example = example_inputs.to(_model_device(model))
    scores = {}
    with eval_mode(model), torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        saved = {p: p.grad for p in grads} if grads is not None else {}
        try:
            for p, g in (grads or {}).items():
                p.grad = g
            for layer in layers:
                target = filter_owner(model, layer, example)
                module = get_layer(model, target)
                k = layer_channels(module)
                group = graph.get_pruning_group(module, _pruning_fn(module), idxs=list(range(k)))
                imp = importance(group)
                if imp is None:
                    raise ValueError(f"Torch-Pruning's {criterion!r} importance has nothing to score for layer {layer!r} "
                                     f"(filters of {target!r}): no {'BatchNorm' if criterion == 'bn_scale' else 'weighted layer'} "
                                     f"in its group. Criteria that score it: {[c for c in CRITERIA if c != criterion]}.")
                scores[layer] = imp.detach().float().cpu()
        finally:
            for p, g in saved.items():
                p.grad = g
    return FilterScores(scores=scores, flagged={}, scorer=f"torch_pruning/{criterion}",
                        higher_is="more important to Torch-Pruning (kept)",
                        settings={"criterion": criterion, "importance": type(importance).__name__})


class ImportanceScorer:
    """Torch-Pruning's importances of a model's filters as a live filter-score source (a ``Scorer``).

    Each :meth:`filter_scores` call scores the model's weights as they are then, so a consumer that
    reads at fit end (``PruneFlaggedFilters``) or every epoch (``FilterMasking``) ranks the trained filters.

    Args:
        model: the module the consumer acts on (for callbacks the LightningModule: layers ``"model.relu3"``).
        layers: module paths to score.
        example_inputs: a batch the model accepts; moved to the model's device when scoring.
        criterion: the default criterion (one of :data:`CRITERIA`); ``Selection(score=...)`` picks another.
        inputs: the samples of ``"taylor"``.
        labels: their labels.

    Example:
        >>> l1 = ImportanceScorer(module, ["model.relu3"], x[:2])
        >>> PruneFlaggedFilters(l1, select=Selection("l1", amount=0.3, lowest=True))
    """

    score_names = CRITERIA

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str],
        example_inputs: torch.Tensor,
        *,
        criterion: str = "l1",
        inputs: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        batch_size: int = 256,
    ):
        make_importance(criterion)  # checks the name
        self.model = model
        self.layers = _check_layers(model, layers)
        check_inputs(example_inputs, "example_inputs")
        _check_taylor(criterion, inputs, labels)
        self.example_inputs = example_inputs.detach()
        self.criterion = criterion
        self.inputs, self.labels, self.batch_size = inputs, labels, batch_size

    def filter_scores(self, score: str | None = None) -> FilterScores:
        """The importances of the model's current weights by ``score`` (default: ``criterion``)."""
        return importance_scores(self.model, self.layers, self.example_inputs, score or self.criterion,
                                 inputs=self.inputs, labels=self.labels, batch_size=self.batch_size)
