"""``AnomalyFilterMonitor``: anomaly filters as a live overfitting indicator (DESIGN §4, thesis ch. 6)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from ..batch import Batch
from ..gradients import per_sample_gradient_magnitude
from ..metrics.anomaly import (
    BACKENDS,
    AnomalyFilters,
    resolve_min_cluster_size,
    scan_anomaly_filters,
)
from ..progress import progress, trainer_shows_progress
from ..report import write_anomaly_report
from ..viz import cluster_scatter, display_inputs, image_grid
from .base import InterpCallback, rank_zero_decides

__all__ = ["AnomalyFilterMonitor", "overfit_alarm"]


def overfit_alarm(counts: Sequence[float], val_losses: Sequence[float | None], patience: int = 2) -> bool:
    """True when, over the last ``patience + 1`` scans, the anomaly count never fell and rose
    overall while the validation loss rose overall."""
    if len(counts) < patience + 1:
        return False
    c = list(counts[-(patience + 1) :])
    v = list(val_losses[-(patience + 1) :])
    if any(x is None for x in v):
        return False
    rising = all(b >= a for a, b in zip(c, c[1:], strict=False)) and c[-1] > c[0]
    return rising and v[-1] > v[0]


class AnomalyFilterMonitor(InterpCallback):
    """Count anomaly filters of the watched layers every few epochs and raise an overfitting alarm.

    On a fixed training probe (default 512 samples), for each layer: every filter's learning
    images → per-filter 2-D PCA → GMM sweep K = 2..k_max by Calinski-Harabasz → the three
    criteria (:func:`~lightning_interp.metrics.anomaly.detect_anomaly_filters`). Logs

    * ``interp/anomaly/<layer>/count`` and ``interp/anomaly/count`` (all layers) — monitorable by
      ``EarlyStopping``/``ModelCheckpoint`` (``mode="min"``);
    * ``interp/anomaly/overfit_alarm`` — 1 when the count kept rising over the last
      ``alarm_patience + 1`` scans while the validation loss rose;
    * ``interp/anomaly/outlier_grad`` and ``interp/anomaly/normal_grad`` — mean per-sample
      gradient magnitude of outlier vs normal probe samples (thesis table 6-3);
    * a table of the flagged filters with their criteria, a scatter plot of the clusters of the
      most anomalous filters (thesis figs. 6-1/6-2) and the outlier samples as images;
    * a JSON report of the flagged filters (:mod:`lightning_interp.report`), rewritten at every
      scan and at fit end, which masking and pruning read.

    The epoch with the best validation accuracy (``val_acc_key``) is the WT epoch; at fit end the
    WT and final anomaly counts are logged (``interp/anomaly/count_wt``, ``.../count_final``) and
    written to the report. History, validation curve and flags survive checkpoint/resume.

    Args:
        layers: module paths of the LightningModule (e.g. ``"model.relu3"``).
        probe_size: probe samples (default 512).
        every_n_epochs: cadence.
        min_cluster_size: λ: int (samples) or fraction of the probe (default 0.1 ≈ the thesis' 50
            of 512 for small CNNs; use 10 / 0.02 for ResNet-18-sized models).
        k_max, alpha, beta, theta: see :func:`detect_anomaly_filters` (thesis table 6-1).
        rectify: scan ReLU(layer output) (the thesis' conv layer); default True.
        mode: ``"exact"`` (one backward pass per filter) or ``"sketch"`` (``num_projections``
            random projections of all filters' learning images from forward-mode products).
            Sketch features are 17-34× cheaper on a GPU for a 512-filter layer, but its flags
            matched exact mode's on only 65-84 % of filters (95 % between two exact runs):
            README, "Sketch vs exact"; ``benchmarks/sketch.py``.
        backend: GMM backend, ``"auto"``, ``"batched"`` or ``"sklearn"``.
        val_acc_key, val_loss_key: ``trainer.callback_metrics`` keys of validation accuracy and loss.
        alarm_patience: scans over which the alarm looks for a rising count.
        report_path: JSON report path; ``<log dir>/anomaly_report.json`` when None.
        num_scatter: flagged filters drawn per layer; num_outlier_images: outlier samples shown.
        **kwargs: :class:`~lightning_interp.callbacks.base.InterpCallback` options.
    """

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 512,
        every_n_epochs: int = 1,
        min_cluster_size: int | float = 0.1,
        k_max: int = 10,
        alpha: float = 0.2,
        beta: float = 1.0,
        theta: float = 0.1,
        rectify: bool = True,
        backend: str = "auto",
        val_acc_key: str = "val/acc",
        val_loss_key: str = "val/loss",
        alarm_patience: int = 2,
        report_path: str | None = None,
        num_scatter: int = 4,
        num_outlier_images: int = 16,
        mode: str = "exact",
        num_projections: int = 64,
        **kwargs,
    ):
        super().__init__(layers, probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        if mode not in ("exact", "sketch"):
            raise ValueError(f"Expected `mode` to be one of ['exact', 'sketch'] but got {mode!r}.")
        if not isinstance(num_projections, int) or num_projections < 2:
            raise ValueError(f"Expected `num_projections` to be an int >= 2 but got {num_projections!r}.")
        self.mode = mode
        self.num_projections = num_projections
        if not isinstance(k_max, int) or k_max < 2:
            raise ValueError(f"Expected `k_max` to be an int >= 2 but got {k_max!r}.")
        if probe_size <= k_max + 1:
            raise ValueError(f"Expected `probe_size` > k_max + 1 = {k_max + 1} but got {probe_size}.")
        resolve_min_cluster_size(min_cluster_size, probe_size)  # fail now, not at the first scan
        if backend not in BACKENDS:
            raise ValueError(f"Expected `backend` to be one of {list(BACKENDS)} but got {backend!r}.")
        for name, value in (("alpha", alpha), ("beta", beta), ("theta", theta)):
            if not float(value) >= 0:
                raise ValueError(f"Expected `{name}` >= 0 but got {value}.")
        if not isinstance(alarm_patience, int) or alarm_patience < 1:
            raise ValueError(f"Expected `alarm_patience` to be a positive int but got {alarm_patience!r}.")
        self.min_cluster_size = min_cluster_size
        self.k_max = k_max
        self.alpha, self.beta, self.theta = alpha, beta, theta
        self.rectify = rectify
        self.backend = backend
        self.val_acc_key = val_acc_key
        self.val_loss_key = val_loss_key
        self.alarm_patience = alarm_patience
        self.report_path = report_path
        self.num_scatter = num_scatter
        self.num_outlier_images = num_outlier_images
        # Run progress (state_dict): validation curve, flags of the last scan.
        self.val_history: list[dict[str, float]] = []
        self.flagged: dict[str, list[dict[str, Any]]] = {}
        self.num_filters: dict[str, int] = {}
        self.last_result: dict[str, AnomalyFilters] = {}

    # ---- validation curve --------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        entry = {"epoch": trainer.current_epoch}
        for name, key in (("val_acc", self.val_acc_key), ("val_loss", self.val_loss_key)):
            if key in metrics:
                entry[name] = float(metrics[key])
        self.val_history = [e for e in self.val_history if e["epoch"] != trainer.current_epoch] + [entry]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation metrics logged without `sync_dist` differ between ranks: rank zero's curve
        # decides the WT epoch and the alarm everywhere. Shared here, a hook every rank runs (a rank
        # without validation batches skips the validation hooks), before this epoch's scan.
        self.val_history = rank_zero_decides(trainer, lambda: list(self.val_history))
        super().on_train_epoch_end(trainer, pl_module)

    def _val_at(self, epoch: int, name: str) -> float | None:
        return next((e.get(name) for e in self.val_history if e["epoch"] == epoch), None)

    @property
    def wt_epoch(self) -> int | None:
        """The epoch with the best validation accuracy so far (thesis 6.3.2), None before validation."""
        scored = [e for e in self.val_history if "val_acc" in e]
        return max(scored, key=lambda e: e["val_acc"])["epoch"] if scored else None

    # ---- the scan ----------------------------------------------------------------------------
    def detect(self, pl_module: pl.LightningModule, layer: str, x: torch.Tensor) -> AnomalyFilters:
        """Anomaly filters of one layer on inputs ``x`` with this monitor's settings
        (:func:`~lightning_interp.metrics.anomaly.scan_anomaly_filters`)."""
        return scan_anomaly_filters(
            pl_module, layer, x, mode=self.mode, num_projections=self.num_projections, rectify=self.rectify,
            seed=self.seed, k_max=self.k_max, min_cluster_size=self.min_cluster_size, alpha=self.alpha,
            beta=self.beta, theta=self.theta, backend=self.backend,
        )

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        epoch = trainer.current_epoch
        layers = progress(self.layers, desc="anomaly scan", enabled=len(self.layers) > 1 and trainer_shows_progress(trainer))
        results = {layer: self.detect(pl_module, layer, probe.x) for layer in layers}
        scalars: dict[str, float] = {}
        flagged: dict[str, list[dict[str, Any]]] = {}
        for layer, res in results.items():
            scalars[f"{self.log_prefix}/anomaly/{layer}/count"] = res.count
            self.num_filters[layer] = int(res.anomaly.numel())
            flagged[layer] = [self._describe(res, k, epoch) for k in res.flagged]
        total = float(sum(r.count for r in results.values()))
        scalars[f"{self.log_prefix}/anomaly/count"] = total

        counts = [h[f"{self.log_prefix}/anomaly/count"] for h in self.history] + [total]
        losses = [self._val_at(h["epoch"], "val_loss") for h in self.history] + [self._val_at(epoch, "val_loss")]
        scalars[f"{self.log_prefix}/anomaly/overfit_alarm"] = float(overfit_alarm(counts, losses, self.alarm_patience))

        outliers = torch.stack([r.sample_is_outlier for r in results.values()]).any(0)
        if probe.y is not None and outliers.any() and not outliers.all():
            grads = per_sample_gradient_magnitude(pl_module, probe.x, probe.y)
            scalars[f"{self.log_prefix}/anomaly/outlier_grad"] = grads[outliers].mean().item()
            scalars[f"{self.log_prefix}/anomaly/normal_grad"] = grads[~outliers].mean().item()

        self.flagged = flagged
        self.last_result = results
        self._log_pictures(trainer, results, probe, outliers)
        return scalars

    @override
    def decisions(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "num_filters": self.num_filters}

    @override
    def adopt_decisions(self, decisions: dict[str, Any]) -> None:
        self.flagged = dict(decisions["flagged"])
        self.num_filters = dict(decisions["num_filters"])

    @staticmethod
    def _describe(res: AnomalyFilters, k: int, epoch: int) -> dict[str, Any]:
        sizes = sorted((int(s) for s in res.cluster_sizes[k].tolist() if s > 0), reverse=True)
        return {
            "filter": int(k),
            "epoch": int(epoch),
            "num_clusters": int(res.num_clusters[k]),
            "ch_index": float(res.ch_index[k]),
            "outlier_clusters": int(res.outlier_clusters[k]),
            "cluster_sizes": sizes,
            "outlier_samples": int(res.outlier_samples[k].sum()),
        }

    @rank_zero_only
    def _log_pictures(self, trainer, results: dict[str, AnomalyFilters], probe: Batch, outliers) -> None:
        rows = [
            [layer, d["filter"], d["num_clusters"], d["ch_index"], d["outlier_clusters"], str(d["cluster_sizes"]), d["epoch"]]
            for layer, items in self.flagged.items()
            for d in items
        ]
        columns = ["layer", "filter", "num_clusters", "ch_index", "outlier_clusters", "cluster_sizes", "epoch"]
        if rows:
            self.log_table(trainer, f"{self.log_prefix}/anomaly/flagged", columns, rows)
        for layer, res in results.items():
            top = sorted(res.flagged, key=lambda k: -float(res.ch_index[k]))[: self.num_scatter]
            if not top:
                continue
            lam = res.min_cluster_size
            panels = [(res.embedding[k], res.labels[k], res.cluster_sizes[k][res.labels[k]] <= lam) for k in top]
            image = cluster_scatter(
                [p[0] for p in panels], [p[1] for p in panels], [p[2] for p in panels],
                [f"filter {k}: K={int(res.num_clusters[k])}, CH={float(res.ch_index[k]):.0f}" for k in top],
            )
            self.log_image(trainer, f"{self.log_prefix}/anomaly/{layer}/clusters", image,
                           f"epoch {trainer.current_epoch}: most anomalous filters (x = outlier clusters)")
        if self.num_outlier_images > 0 and outliers.any():
            idx = outliers.nonzero().flatten()[: self.num_outlier_images]
            grid = image_grid([display_inputs(probe.x[idx])], min_side=64)
            self.log_image(trainer, f"{self.log_prefix}/anomaly/outlier_samples", grid,
                           f"epoch {trainer.current_epoch}: {int(outliers.sum())} outlier samples")

    # ---- fit end and the report ----------------------------------------------------------------
    def _count_at(self, epoch: int | None) -> float | None:
        key = f"{self.log_prefix}/anomaly/count"
        return next((h[key] for h in self.history if h["epoch"] == epoch and key in h), None)

    def summary(self) -> dict[str, Any]:
        """WT/final epochs and anomaly counts (thesis table 6-2)."""
        wt = self.wt_epoch
        final = self.history[-1]["epoch"] if self.history else None
        return {
            "wt_epoch": wt,
            "wt_count": self._count_at(wt),
            "final_epoch": final,
            "final_count": self._count_at(final),
            "wt_val_acc": self._val_at(wt, "val_acc") if wt is not None else None,
            "final_val_acc": self._val_at(final, "val_acc") if final is not None else None,
        }

    def resolve_report_path(self, trainer: pl.Trainer) -> str:
        root = getattr(self, "log_root", None) or trainer.default_root_dir
        return self.report_path or os.path.join(root, "anomaly_report.json")

    def _write_report(self, trainer: pl.Trainer) -> None:
        key = f"{self.log_prefix}/anomaly/count"
        history = []
        for h in self.history:
            history.append({
                "epoch": h["epoch"],
                "count": h.get(key),
                "counts": {layer: h.get(f"{self.log_prefix}/anomaly/{layer}/count") for layer in self.layers},
                "overfit_alarm": h.get(f"{self.log_prefix}/anomaly/overfit_alarm"),
                "val_acc": self._val_at(h["epoch"], "val_acc"),
                "val_loss": self._val_at(h["epoch"], "val_loss"),
            })
        report = {
            "epoch": self.history[-1]["epoch"] if self.history else None,
            **self.summary(),
            "settings": {
                "min_cluster_size": self.min_cluster_size, "k_max": self.k_max, "alpha": self.alpha,
                "beta": self.beta, "theta": self.theta, "rectify": self.rectify, "probe_size": self.probe_size,
                "mode": self.mode, "num_projections": self.num_projections if self.mode == "sketch" else None,
            },
            "layers": {
                layer: {"num_filters": self.num_filters.get(layer), "flagged": self.flagged.get(layer, [])}
                for layer in self.layers
            },
            "history": history,
        }
        path = self.resolve_report_path(trainer)
        try:
            write_anomaly_report(path, report)
        except OSError as err:
            rank_zero_warn(f"AnomalyFilterMonitor could not write its report to {path}: {err}. Training goes on.")

    @override
    def log_scalars(self, trainer, pl_module, scalars):
        super().log_scalars(trainer, pl_module, scalars)
        # The report includes this scan's history entry, so it is written after it is recorded.
        if trainer.is_global_zero:
            self._write_report(trainer)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history:
            return
        summary = self.summary()
        if trainer.is_global_zero:
            metrics = {
                f"{self.log_prefix}/anomaly/count_wt": summary["wt_count"],
                f"{self.log_prefix}/anomaly/count_final": summary["final_count"],
            }
            metrics = {k: v for k, v in metrics.items() if v is not None}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
            self._write_report(trainer)
            rank_zero_info(
                f"AnomalyFilterMonitor: WT epoch {summary['wt_epoch']} had {summary['wt_count']} anomaly filters, "
                f"the final epoch {summary['final_epoch']} has {summary['final_count']}; report: "
                f"{self.resolve_report_path(trainer)}"
            )

    # ---- state -------------------------------------------------------------------------------
    @override
    def state_key_fields(self) -> dict[str, Any]:
        return {**super().state_key_fields(), "mode": self.mode}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "val_history": list(self.val_history),
            "flagged": dict(self.flagged),
            "num_filters": dict(self.num_filters),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.val_history = list(state_dict.get("val_history", []))
        self.flagged = dict(state_dict.get("flagged", {}))
        self.num_filters = dict(state_dict.get("num_filters", {}))
