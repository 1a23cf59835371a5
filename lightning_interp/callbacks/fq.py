"""``FeatureQuantityMonitor``: how much of the foreground each layer's units take (DESIGN §2, thesis ch. 4)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from ..batch import Batch
from ..metrics.fq import (
    all_neuron_feature_quantity,
    diversity_masking,
    fq_diversity,
    fq_layer_stats,
    layer_feature_quantity,
)
from ..scores import FilterScores
from .base import InterpCallback, rank_zero_decides

__all__ = ["FeatureQuantityMonitor"]


class FeatureQuantityMonitor(InterpCallback):
    """Feature quantity across depth, its relation to activation, and filter diversity.

    Every ``every_n_epochs`` epochs on the probe (which needs foreground masks), for each layer:
    the FQ of every filter (max over samples of F of its filter learning images) and of its
    ``top_neurons`` most activated neurons; scalars ``interp/fq/<layer>/fq_mean``,
    ``.../fq_variance`` and ``.../r_activation_fq`` (Pearson r between neurons' mean activation
    and FQ), and ``.../diversity_mean``; a per-filter table; the FQ mean/variance-vs-depth curve.

    Diversity (thesis 4.3.3) is the number of DBSCAN clusters (``dbscan_eps`` 0.3,
    ``dbscan_min_samples`` 6) of the FQ of **all** neurons (every spatial position) of each
    filter, from :func:`~lightning_interp.metrics.fq.all_neuron_feature_quantity`. It is computed
    for the last watched layer only (the thesis analyses the last conv layer), or for
    ``diversity_layers``. Cost: K · N vector-Jacobian products per scan, N = h·w positions capped
    at ``diversity_neurons`` (default 64) by a seeded subsample shared by all filters.
    ``dbscan_scale`` multiplies FQ before clustering (eps is in units of F; ``1e4`` restores the
    thesis' K, see :func:`~lightning_interp.metrics.fq.fq_diversity`).

    At fit end, on the validation data, for the ``num_diverse`` most and least diverse filters
    of each diversity layer masked: the **% change in loss** (thesis table 4-3,
    ``interp/fq/<layer>/mask_most_diverse_loss_pct``, ``.../mask_least_diverse_loss_pct``) and the
    accuracy change (``.../mask_most_diverse``, ``.../mask_least_diverse``).

    Without foreground masks the monitor warns once and does nothing.
    """

    key_group = "fq"
    skipped_without_masks = "feature quantity"

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 32,
        every_n_epochs: int = 1,
        rectify: bool = True,
        top_neurons: int = 16,
        num_diverse: int = 20,
        dbscan_eps: float = 0.3,
        dbscan_min_samples: int = 6,
        dbscan_scale: float = 1.0,
        diversity_neurons: int | None = 64,
        diversity_layers: str | Sequence[str] | None = None,
        eval_max_batches: int | None = None,
        **kwargs,
    ):
        super().__init__(layers, probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        if not isinstance(top_neurons, int) or top_neurons < 1:
            raise ValueError(f"Expected `top_neurons` to be a positive int but got {top_neurons!r}.")
        if diversity_neurons is not None and (not isinstance(diversity_neurons, int) or diversity_neurons < 1):
            raise ValueError(f"Expected `diversity_neurons` to be a positive int or None but got {diversity_neurons!r}.")
        chosen = [diversity_layers] if isinstance(diversity_layers, str) else list(diversity_layers or self.layers[-1:])
        unknown = [name for name in chosen if name not in self.layers]
        if unknown:
            raise ValueError(f"Expected `diversity_layers` among the watched layers {list(self.layers)} but got {unknown}.")
        self.diversity_layers = chosen
        self.dbscan_scale = dbscan_scale
        self.diversity_neurons = diversity_neurons
        self.rectify = rectify
        self.top_neurons = top_neurons
        self.num_diverse = num_diverse
        self.dbscan_eps = dbscan_eps
        self.dbscan_min_samples = dbscan_min_samples
        self.eval_max_batches = eval_max_batches
        self.diversity: dict[str, torch.Tensor] = {}
        self.filter_fq: dict[str, torch.Tensor] = {}

    def layer_fq(self, pl_module: pl.LightningModule, layer: str, probe: Batch) -> dict[str, torch.Tensor]:
        """Filter FQ (``K``), neuron FQ (``K x n``) and the neurons' mean activation (``K x n``) on the
        probe: :func:`~lightning_interp.metrics.fq.layer_feature_quantity` with this monitor's settings."""
        return layer_feature_quantity(pl_module, layer, probe.x, probe.mask, top_neurons=self.top_neurons,
                                      rectify=self.rectify)

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        if probe.mask is None:
            self.warn_no_mask()
            return {}
        scalars: dict[str, float] = {}
        depth = {"fq_mean": [], "fq_variance": []}
        for layer in self.layers:
            r = self.layer_fq(pl_module, layer, probe)
            stats = fq_layer_stats(r["neuron_fq"], r["neuron_activation"])
            prefix = f"{self.log_prefix}/fq/{layer}"
            for name, value in stats.items():
                scalars[f"{prefix}/{name}"] = value
            diversity = torch.full((r["filter_fq"].numel(),), -1, dtype=torch.long)  # -1: not computed
            if layer in self.diversity_layers:
                all_fq = all_neuron_feature_quantity(pl_module, layer, probe.x, probe.mask,
                                                     max_neurons=self.diversity_neurons, seed=self.seed,
                                                     rectify=self.rectify)
                diversity = fq_diversity(all_fq, eps=self.dbscan_eps, min_samples=self.dbscan_min_samples,
                                         scale=self.dbscan_scale)
                self.diversity[layer] = diversity
                scalars[f"{prefix}/diversity_mean"] = diversity.double().mean().item()
            self.filter_fq[layer] = r["filter_fq"].detach().cpu()
            scalars[f"{prefix}/filter_fq_mean"] = r["filter_fq"].mean().item()
            depth["fq_mean"].append(stats["fq_mean"])
            depth["fq_variance"].append(stats["fq_variance"])
            rows = [[k, float(r["filter_fq"][k]), int(diversity[k]), float(r["neuron_fq"][k].mean())]
                    for k in range(len(diversity))]
            self.log_table(trainer, f"{prefix}/filters", ["filter", "filter_fq", "diversity", "neuron_fq_mean"], rows)
        self.log_curve(trainer, f"{self.log_prefix}/fq/depth", list(range(1, len(self.layers) + 1)), depth,
                       "FQ across depth (" + ", ".join(self.layers) + ")", "layer (depth)", "FQ")
        return scalars

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rank zero's answer everywhere: `fit_end_analysis` is a collective every rank must enter.
        if not rank_zero_decides(trainer, lambda: bool(self.diversity)):
            return
        self.fit_end_analysis(trainer, "its fit-end analysis", lambda: self._mask_diverse(trainer, pl_module))

    def _mask_diverse(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        loader = self.eval_dataloader(trainer)
        if loader is None:
            rank_zero_warn("FeatureQuantityMonitor: no validation data; diversity masking is skipped.")
            return
        results = diversity_masking(pl_module, self.diversity, loader, num_diverse=self.num_diverse,
                                    batch_adapter=self.batch_adapter, max_batches=self.eval_max_batches)
        metrics, rows = {}, []
        for layer, sides in results.items():
            for tag, r in sides.items():
                metrics[f"{self.log_prefix}/fq/{layer}/mask_{tag}_diverse"] = r["accuracy_change"]
                metrics[f"{self.log_prefix}/fq/{layer}/mask_{tag}_diverse_loss_pct"] = r["loss_pct"]
                rows.append([layer, tag, r["filters"], r["accuracy_change"], r["loss_pct"]])
        self.log_table(trainer, f"{self.log_prefix}/fq/diversity_masking",
                       ["layer", "which", "filters", "accuracy_change", "loss_change_pct"], rows)
        return metrics

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(),
                "diversity": {k: v.tolist() for k, v in self.diversity.items()},
                "filter_fq": {k: v.tolist() for k, v in self.filter_fq.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.diversity = {k: torch.tensor(v) for k, v in state_dict.get("diversity", {}).items()}
        self.filter_fq = {k: torch.tensor(v) for k, v in state_dict.get("filter_fq", {}).items()}

    # ---- filter scores -------------------------------------------------------------------------
    #: ``"diversity"``: DBSCAN clusters of the FQ of each filter's neurons (the diversity layers only);
    #: ``"fq"``: each filter's FQ (max over probe samples of F of its learning images, every watched layer).
    score_names = ("diversity", "fq")

    def filter_scores(self, score: str | None = None) -> FilterScores:
        """The last scan's :class:`~lightning_interp.scores.FilterScores` of ``"diversity"`` (default;
        thesis 4.3.3, the ranking of table 4-3) or ``"fq"``: a score per filter, no flags — flag filters
        with a :class:`~lightning_interp.scores.Selection` (no layers before the first scan)."""
        score = score or "diversity"
        if score not in self.score_names:
            raise ValueError(f"Expected `score` to be one of {list(self.score_names)} but got {score!r}.")
        values = self.diversity if score == "diversity" else self.filter_fq
        epoch = self.history[-1]["epoch"] if self.history else None
        return FilterScores(
            scores={layer: v.float() for layer, v in values.items()}, flagged={}, scorer=f"fq/{score}",
            higher_is="more diverse (clusters)" if score == "diversity" else "more foreground feature quantity",
            epoch=epoch, settings={"probe_size": self.probe_size, "rectify": self.rectify,
                                   "dbscan_eps": self.dbscan_eps, "dbscan_min_samples": self.dbscan_min_samples,
                                   "dbscan_scale": self.dbscan_scale, "diversity_neurons": self.diversity_neurons},
        )
