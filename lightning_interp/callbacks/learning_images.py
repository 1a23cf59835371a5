"""``LearningImageLogger``: what each watched layer and its most active filters took from the probe."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ..batch import Batch
from ..metrics.tip import avou
from ..nns import (
    filter_learning_images,
    iter_filter_learning_images,
    layer_activations,
    layer_knowledge_quantity,
    layer_learning_image,
    reduce_knowledge_quantity,
)
from ..viz import display_inputs, heatmap, image_grid
from .base import InterpCallback, check_finite

__all__ = ["LearningImageLogger"]


class LearningImageLogger(InterpCallback):
    """Log knowledge quantity and learning-image heatmaps of the watched layers (thesis ch. 3).

    Every ``every_n_epochs`` epochs, on the fixed probe, for each layer:

    * scalars ``interp/nns/<layer>/activation_count`` and ``.../activation_intensity``: a
      filter-level knowledge quantity, the mean over probe samples and the scanned filters (the
      ``max_filters`` most active) of each *filter* learning image's active-element count and
      |intensity| relative to the input's (:func:`~lightning_interp.nns.filter_knowledge_quantity`). This is not the thesis' definition (3.3.1), which
      averages over *all neurons'* learning images: that one is
      :func:`~lightning_interp.nns.layer_knowledge_quantity`, one product per neuron (a filter
      learning image, the activation-weighted sum of its neurons' images, has a support at least
      as large as each neuron's, so its count is higher);
    * with ``thesis_neurons`` > 0, also the thesis' definition on that many seeded, sampled
      neurons: ``.../thesis_activation_count`` and ``.../thesis_activation_intensity``;
    * a heatmap grid ``interp/nns/<layer>/learning_images``: one row per probe image (the first
      ``num_images``), columns = input, layer learning image, and the learning images of the
      ``top_filters`` filters with the highest mean activation on the probe (red high, blue low).

    Args:
        layers: module paths of the LightningModule (e.g. ``"model.conv2"``).
        probe_size: probe samples (default 32).
        every_n_epochs: cadence.
        num_images: probe images shown in the grid.
        top_filters: most active filters shown per layer.
        max_filters: scan at most this many (most active) filters for the knowledge quantity;
            all filters when None (one vector-Jacobian product per filter).
        rectify: apply ReLU to the layer output (default True: name the conv, scan the thesis'
            "conv layer" = convolution + activation; a no-op after a ReLU).
        thesis_neurons: neurons sampled per layer for the thesis' knowledge quantity (one
            vector-Jacobian product each); 0 (default) skips it.
        **kwargs: :class:`~lightning_interp.callbacks.base.InterpCallback` options
            (``probe_split``, ``probe``, ``seed``, ``batch_adapter``, ``strict``).

    Examples:
        >>> trainer = pl.Trainer(callbacks=[LearningImageLogger(["model.conv1", "model.conv3"])],
        ...                      logger=WandbLogger(offline=True))
    """

    key_group = "nns"

    #: Learning images need no logits: a model returning a dict is fine here.
    needs_logits = False

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 32,
        every_n_epochs: int = 1,
        num_images: int = 8,
        top_filters: int = 4,
        max_filters: int | None = None,
        rectify: bool = True,
        thesis_neurons: int = 0,
        **kwargs,
    ):
        super().__init__(layers, probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        for name, value in (("num_images", num_images), ("top_filters", top_filters)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"Expected `{name}` to be a non-negative int but got {value!r}.")
        if max_filters is not None and (not isinstance(max_filters, int) or max_filters < 1):
            raise ValueError(f"Expected `max_filters` to be a positive int or None but got {max_filters!r}.")
        if not isinstance(thesis_neurons, int) or thesis_neurons < 0:
            raise ValueError(f"Expected `thesis_neurons` to be a non-negative int but got {thesis_neurons!r}.")
        self.thesis_neurons = thesis_neurons
        self.num_images = num_images
        self.top_filters = top_filters
        self.max_filters = max_filters
        self.rectify = rectify

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        scalars: dict[str, float] = {}
        x = probe.x
        for layer in self.layers:
            f = check_finite(layer_activations(pl_module, layer, x, rectify=self.rectify), f"activations of {layer}")
            mean_activation = avou(f)  # (K,)
            order = mean_activation.argsort(descending=True)
            scanned = order if self.max_filters is None else order[: self.max_filters]
            shown = order[: self.top_filters].tolist()
            draw = self.num_images > 0 and trainer.is_global_zero
            kept: dict[int, torch.Tensor] = {}
            chunks = iter_filter_learning_images(pl_module, layer, x, filters=scanned, rectify=self.rectify)
            if draw:
                chunks = self._keep(chunks, shown, kept)
            kq = reduce_knowledge_quantity(chunks, x, what=f"learning images of {layer}")
            scalars[f"{self.log_prefix}/nns/{layer}/activation_count"] = kq["activation_count"]
            scalars[f"{self.log_prefix}/nns/{layer}/activation_intensity"] = kq["activation_intensity"]
            if self.thesis_neurons:
                kq_thesis = layer_knowledge_quantity(pl_module, layer, x, rectify=self.rectify,
                                                     max_neurons=self.thesis_neurons, seed=self.seed)
                scalars[f"{self.log_prefix}/nns/{layer}/thesis_activation_count"] = kq_thesis["activation_count"]
                scalars[f"{self.log_prefix}/nns/{layer}/thesis_activation_intensity"] = kq_thesis["activation_intensity"]
            if draw:
                shown_x = x[: self.num_images]
                layer_image = layer_learning_image(pl_module, layer, shown_x, rectify=self.rectify)
                columns = [display_inputs(shown_x), heatmap(layer_image)]
                missing = [c for c in shown if c not in kept]  # shown but not scanned (max_filters < top_filters)
                if missing:
                    images = filter_learning_images(pl_module, layer, shown_x, filters=missing, rectify=self.rectify)
                    kept.update({c: images[:, j] for j, c in enumerate(missing)})
                columns += [heatmap(kept[c]) for c in shown]
                caption = f"epoch {trainer.current_epoch}: input | layer | filters {shown} (most active first)"
                self.log_image(trainer, f"{self.log_prefix}/nns/{layer}/learning_images", image_grid(columns), caption)
        return scalars

    def _keep(
        self, chunks: Iterator[tuple[torch.Tensor, torch.Tensor]], filters: list[int], kept: dict[int, torch.Tensor]
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Pass ``chunks`` on unchanged, copying into ``kept`` the learning images of ``filters`` on the
        first ``num_images`` probe samples (``num_images x <x.shape[1:]>`` each)."""
        wanted = set(filters)
        for idx, li in chunks:
            for j, c in enumerate(idx.tolist()):
                if c in wanted:
                    kept[c] = li[: self.num_images, j].clone()  # a copy: the chunk is freed after its reduction
            yield idx, li
