"""``TIPMonitor``: the interpretable properties of every filter during training (DESIGN §3, thesis ch. 5)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..batch import Batch
from ..metrics.aipc import DEFAULT_FRACTIONS, accuracy, aipc, filter_types, type_masking
from ..metrics.thesis import saliency_property_spearman
from ..metrics.tip import PROPERTIES, check_tip_mode, layer_properties
from ..nns import ScanSpec, filter_learning_images
from ..progress import progress, trainer_shows_progress
from ..scores import FilterScores
from ..viz import heatmap, image_grid
from .base import InterpCallback, rank_zero_decides

__all__ = ["TIPMonitor"]


class TIPMonitor(InterpCallback):
    """Per-filter TIP properties, saliencies and filter types every few epochs; AIPC at fit end.

    Every ``every_n_epochs`` epochs on the probe, for each layer: T_m, T_v, T_c, T_cor of every
    filter (eq. 5-7) over all elements and, when batches carry a foreground mask, over the
    foreground and background; AVoU (eq. 5-8) and SoU (eqs. 5-9, 5-10); the Spearman rank
    correlation of each saliency with each property; the proportions of the filter types
    (H-H, H-noH, noH-H, L-L, L-noL, noL-L from foreground/background rankings of
    ``type_property``, top/bottom ``per``). Logs

    * scalars ``interp/tip/<layer>/<property>`` (layer mean of T), ``.../spearman/<saliency>_<property>``
      and ``.../types/<type>``;
    * a per-filter table ``interp/tip/<layer>/filters`` (W&B table, CSV otherwise);
    * the learning images of the top filters by each property (thesis fig. 5-3).

    At fit end, on the validation data: the AIPC curve of each property (accuracy as the top-ranked
    fraction of filters is masked) with its areas (``interp/tip/<layer>/aipc_area/<property>``,
    ``.../aipc_area_top10/<property>``, both accuracy × fraction and negative when masking hurts;
    ``.../aipc_area_top10_thesis/<property>``, the same area in the units of the thesis' table 5-1:
    accuracy drop in percentage points × percent of filters, positive when masking hurts, see
    :class:`~lightning_interp.metrics.aipc.AIPC`), and the accuracy change when each filter type is
    masked.

    Without masks in the batches the foreground variants and filter types are skipped with one
    warning. Without labels SoU is skipped.

    Args:
        layers: module paths of the LightningModule.
        probe_size: probe samples (default 64; 128 before the sketch default).
        rectify: scan ReLU(layer output) (default True).
        per: fraction for the filter types (thesis: 0.3); type_property: the property ranked.
        top_filters: filters shown per property; aipc_fractions: masked fractions;
        aipc_max_batches: validation batches used per AIPC point (all when None).
        mode: ``"sketch"`` (default: T_m and T_c exact from forward-mode products, T_v and T_cor from
            a Hutchinson estimate with ``num_projections`` directions per sample, default 4, so the
            default scan is 6 forward-mode products of the probe for all filters at once) or
            ``"exact"`` (one backward pass per filter: the reference). No ``"pooled"`` mode:
            :func:`~lightning_interp.metrics.tip.check_tip_mode`. Measured cost of the defaults:
            docs/measurements/overhead.md.
        **kwargs: :class:`~lightning_interp.callbacks.base.InterpCallback` options.
    """

    key_group = "tip"
    skipped_without_masks = "foreground/background properties and filter types"

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 64,
        every_n_epochs: int = 1,
        rectify: bool = True,
        per: float = 0.3,
        type_property: str = "mean",
        top_filters: int = 4,
        aipc_fractions: Sequence[float] = DEFAULT_FRACTIONS,
        aipc_max_batches: int | None = None,
        mode: str = "sketch",
        num_projections: int = 4,
        **kwargs,
    ):
        super().__init__(layers, probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        check_tip_mode(mode)
        # How the layers are scanned, validated once and passed down whole.
        self.spec = ScanSpec(mode=mode, num_projections=num_projections, rectify=rectify)
        self.mode, self.num_projections = self.spec.mode, self.spec.num_projections
        if not 0 < per <= 0.5:
            raise ValueError(f"Expected `per` in (0, 0.5] but got {per}.")
        if type_property not in PROPERTIES:
            raise ValueError(f"Expected `type_property` to be one of {list(PROPERTIES)} but got {type_property!r}.")
        self.rectify = rectify
        self.per = per
        self.type_property = type_property
        self.top_filters = top_filters
        self.aipc_fractions = tuple(aipc_fractions)
        self.aipc_max_batches = aipc_max_batches
        self.last: dict[str, dict[str, torch.Tensor]] = {}

    def properties(self, pl_module: pl.LightningModule, layer: str, probe: Batch) -> dict[str, torch.Tensor]:
        """T^k of every property (and AVoU/SoU) of one layer on the probe: dict of ``K`` tensors
        (:func:`~lightning_interp.metrics.tip.layer_properties` with this monitor's settings)."""
        return layer_properties(pl_module, layer, probe.x, probe.mask, probe.y, spec=self.spec, seed=self.seed)

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        if probe.mask is None:
            self.warn_no_mask()
        scalars: dict[str, float] = {}
        for layer in progress(self.layers, desc="TIP scan", enabled=len(self.layers) > 1 and trainer_shows_progress(trainer)):
            t = self.properties(pl_module, layer, probe)
            self.last[layer] = t
            prefix = f"{self.log_prefix}/tip/{layer}"
            props = [n for n in t if n not in ("avou", "sou")]
            for name in props:
                scalars[f"{prefix}/{name}"] = t[name].mean().item()
            rho = saliency_property_spearman(t, [sal for sal in ("avou", "sou") if sal in t], props)
            for sal, by_property in rho.items():
                for name, value in by_property.items():
                    scalars[f"{prefix}/spearman/{sal}_{name}"] = value
            if probe.mask is not None:
                types = filter_types(t[f"fg_{self.type_property}"], t[f"bg_{self.type_property}"], self.per)
                for name, members in types.items():
                    scalars[f"{prefix}/types/{name}"] = members.double().mean().item()
            if trainer.is_global_zero:
                self._log_layer(trainer, pl_module, layer, t, probe)
        return scalars

    def _log_layer(self, trainer, pl_module, layer: str, t: dict[str, torch.Tensor], probe: Batch) -> None:
        names = list(t)
        rows = [[k, *(float(t[n][k]) for n in names)] for k in range(len(t["mean"]))]
        self.log_table(trainer, f"{self.log_prefix}/tip/{layer}/filters", ["filter", *names], rows)
        if self.top_filters <= 0:
            return
        tops = [t[name].argsort(descending=True)[: self.top_filters].cpu() for name in PROPERTIES]
        # One scan of the filters at the top of any property; each property's row picks its own.
        filters = torch.cat(tops).unique()  # sorted, so a filter's position is found by bisection
        li = filter_learning_images(pl_module, layer, probe.x[:1], filters=filters, rectify=self.rectify)[0]
        columns = [heatmap(li[torch.searchsorted(filters, top).to(li.device)]) for top in tops]  # (top, 3, H, W)
        grid = image_grid(list(torch.stack(columns, 0).unbind(1)), min_side=64)  # rows: properties
        self.log_image(
            trainer, f"{self.log_prefix}/tip/{layer}/top_filters", grid,
            f"epoch {trainer.current_epoch}: rows {list(PROPERTIES)}, columns the top {self.top_filters} filters",
        )

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Rank zero's answer everywhere: `fit_end_analysis` is a collective every rank must enter.
        if not rank_zero_decides(trainer, lambda: bool(self.last)):
            return
        self.fit_end_analysis(trainer, "its fit-end analyses", lambda: self._post_fit(trainer, pl_module))

    def _post_fit(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        loader = self.eval_dataloader(trainer)
        if loader is None:
            rank_zero_warn("TIPMonitor: no validation data; AIPC and type masking are skipped.")
            return None
        metrics: dict[str, float] = {}
        # The unmasked model's accuracy, measured once: every AIPC curve starts from it and every
        # type-masking change is taken against it (masks are removed after each evaluation).
        base = accuracy(pl_module, loader, batch_adapter=self.batch_adapter, max_batches=self.aipc_max_batches)
        for layer, t in self.last.items():
            curves = {}
            names = [n for n in t if n not in ("avou", "sou")]
            rank_zero_info(f"TIPMonitor: AIPC of {layer} for {len(names)} properties")
            for name in progress(names, desc=f"AIPC {layer}", enabled=trainer_shows_progress(trainer)):
                curve = aipc(pl_module, layer, t[name], loader, self.aipc_fractions,
                             batch_adapter=self.batch_adapter, max_batches=self.aipc_max_batches,
                             base_accuracy=base)
                curves[name] = curve.change
                metrics[f"{self.log_prefix}/tip/{layer}/aipc_area/{name}"] = curve.area
                metrics[f"{self.log_prefix}/tip/{layer}/aipc_area_top10/{name}"] = curve.area_top10
                metrics[f"{self.log_prefix}/tip/{layer}/aipc_area_top10_thesis/{name}"] = curve.area_top10_thesis
            self.log_curve(trainer, f"{self.log_prefix}/tip/{layer}/aipc", curve.fractions, curves,
                           f"AIPC {layer}", "masked fraction", "accuracy change")
            if f"fg_{self.type_property}" in t:
                types = filter_types(t[f"fg_{self.type_property}"], t[f"bg_{self.type_property}"], self.per)
                changes = type_masking(pl_module, layer, types, loader, batch_adapter=self.batch_adapter,
                                       max_batches=self.aipc_max_batches, base=base)
                rows = [[name, int(types[name].sum()), changes[name]] for name in types]
                self.log_table(trainer, f"{self.log_prefix}/tip/{layer}/type_masking",
                               ["type", "filters", "accuracy_change"], rows)
                for name, change in changes.items():
                    metrics[f"{self.log_prefix}/tip/{layer}/type_masking/{name}"] = change
        return metrics

    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "mode": self.mode}

    @override
    def state_dict(self) -> dict[str, Any]:
        # `last` (the latest T^k per layer) feeds the fit-end AIPC: a run resumed after its final
        # scan must still have it.
        last = {layer: {name: v.detach().cpu() for name, v in t.items()} for layer, t in self.last.items()}
        return {**super().state_dict(), "last": last}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.last = {layer: dict(t) for layer, t in state_dict.get("last", {}).items()}

    # ---- filter scores -------------------------------------------------------------------------
    #: Every score :meth:`filter_scores` can give (``fg_``/``bg_`` need masks in the batches, ``sou`` labels).
    score_names = (*PROPERTIES, *(f"{side}_{p}" for side in ("fg", "bg") for p in PROPERTIES), "avou", "sou")

    def filter_scores(self, score: str | None = None) -> FilterScores:
        """The last scan's :class:`~lightning_interp.scores.FilterScores` of one property or saliency
        (default ``"mean"``, T_m): every filter's T^k per layer, no flags — flag filters with a
        :class:`~lightning_interp.scores.Selection` or :meth:`FilterScores.select
        <lightning_interp.scores.FilterScores.select>` (no layers before the first scan)."""
        score = score or "mean"
        if score not in self.score_names:
            raise ValueError(f"Expected `score` to be one of {list(self.score_names)} but got {score!r}.")
        missing = [layer for layer, t in self.last.items() if score not in t]
        if missing:
            raise ValueError(f"TIPMonitor has no {score!r} scores for {missing} (fg_/bg_ need foreground masks, "
                             f"sou labels); it has {sorted(next(iter(self.last.values())))}.")
        epoch = self.history[-1]["epoch"] if self.history else None
        higher = "more salient" if score in ("avou", "sou") else f"higher {score}"
        return FilterScores(scores={layer: t[score] for layer, t in self.last.items()}, flagged={},
                            scorer=f"tip/{score}", higher_is=higher, epoch=epoch,
                            settings={"probe_size": self.probe_size, "mode": self.mode, "rectify": self.rectify})
