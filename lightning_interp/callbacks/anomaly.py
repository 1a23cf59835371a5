"""``AnomalyFilterMonitor``: anomaly filters as a live overfitting indicator (DESIGN §4, thesis ch. 6)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from ..batch import Batch
from ..metrics.anomaly import AnomalyCriteria, AnomalyFilters, anomaly_scores, scan_anomaly_filters
from ..nns import ScanSpec, pooling_basis, scan_mode
from ..overfitting import (
    ALARMS,
    AlarmRule,
    best_epoch,
    grouped_gradient_magnitude,
    hard_sample_loss,
    overfit_alarm,
    per_sample_loss,
)
from ..progress import progress, trainer_shows_progress
from ..scores import ANOMALY_REPORT_FORMAT, FilterScores, write_json
from ..viz import cluster_scatter, labelled_image_grid
from .base import InterpCallback, class_names, guarded, rank_zero_decides, send_metrics

__all__ = ["ALARMS", "AnomalyFilterMonitor", "overfit_alarm"]  # the last two live in lightning_interp.overfitting


class AnomalyFilterMonitor(InterpCallback):
    """Count anomaly filters of the watched layers every few epochs and raise an overfitting alarm.

    On a fixed training probe (default 128 samples), for each layer: every filter's learning
    images → per-filter 2-D PCA → GMM sweep K = 2..k_max by Calinski-Harabasz → the three
    criteria (:func:`~lightning_interp.metrics.anomaly.detect_anomaly_filters`). By default
    (``mode="pooled"``) the learning images are seen on a 2×2 grid, channels summed
    (:func:`~lightning_interp.nns.pooled_learning_images`: exact, 4 forward-mode products for all
    filters at once); ``mode="exact"`` clusters the full images, as the thesis does (one backward pass
    per filter: the reference). Measured cost of the defaults (``benchmarks/overhead.py``, 2-core CPU,
    SimpleCNN ``relu3``, 5,000 samples/epoch): the three default monitors together 1.3-1.5× the
    epoch (docs/measurements/overhead.md); exact mode with a 256-image probe 6.9×. Whether the pooled
    count carries exact mode's overfitting signal is measured in ``experiments/cheap_scan_signal.py``:
    on the 12 runs of the overfitting benchmark it did **not** pass issue 16's criterion — on
    SimpleCNN its count's Spearman with exact mode's across epochs was 0.66 (probe 128) where exact
    mode with another GMM seed reached 0.91-0.93 (docs/measurements/cheap_scan_signal.md). The flags that masking and pruning take
    come from one exact rescan at fit end (``exact_flags_at_fit_end``). Logs

    * ``interp/anomaly/<layer>/count`` and ``interp/anomaly/count`` (all layers) — monitorable by
      ``EarlyStopping``/``ModelCheckpoint`` (``mode="min"``);
    * ``interp/anomaly/overfit_alarm`` — 0 until the ``alarm`` rule fires, then 1 for the rest of
      the run (``EarlyStopping(monitor=..., mode="max", stopping_threshold=0.5)`` stops on it);
    * ``interp/anomaly/outlier_grad`` and ``interp/anomaly/normal_grad`` — mean per-sample
      gradient magnitude of outlier vs normal probe samples (thesis table 6-3);
    * ``interp/anomaly/hard_loss`` — mean loss of the 20 % of probe samples whose given label has
      the highest loss (:func:`~lightning_interp.overfitting.hard_sample_loss`), and those samples as
      a captioned grid: the answer to "which samples is it memorising?" that the benchmark supports
      (outlier samples found wrongly labelled samples at chance, per-sample loss at 1.3-3.3× chance);
    * a table of the flagged filters with their criteria, a scatter plot of the clusters of the
      most anomalous filters (thesis figs. 6-1/6-2) and the outlier samples as images;
    * a JSON report (``<log dir>/anomaly_report.json``, rewritten at every scan and at fit end):
      the latest :class:`~lightning_interp.scores.FilterScores` (score = CH index, flags = the
      anomaly filters) plus the summary, the settings and the scan history.

    The monitor is a source of filter scores (:meth:`filter_scores`): ``FilterMasking``,
    ``PruneFlaggedFilters`` and the HTML report take it, or its report file, the same way.

    The epoch with the best validation accuracy (``val_acc_key``) is the WT epoch; at fit end the
    WT and final anomaly counts are logged (``interp/anomaly/count_wt``, ``.../count_final``) and
    written to the report. History, validation curve and flags survive checkpoint/resume.

    Args:
        layers: module paths of the LightningModule (e.g. ``"model.relu3"``).
        probe_size: probe samples (default 128; it was 512 before the pooled default).
        every_n_epochs: cadence.
        min_cluster_size: λ: int (samples) or fraction of the probe (default 0.1 ≈ the thesis' 50
            of 512 for small CNNs; use 10 / 0.02 for ResNet-18-sized models).
        k_max: largest number of GMM components tried (thesis table 6-1; see
            :class:`~lightning_interp.metrics.anomaly.AnomalyCriteria`).
        alpha: criterion 1's threshold (thesis table 6-1).
        beta: criterion 2's threshold (thesis table 6-1).
        theta: criterion 3's threshold (thesis table 6-1).
        criteria: all of the detector's settings at once, an
            :class:`~lightning_interp.metrics.anomaly.AnomalyCriteria` (then ``min_cluster_size``,
            ``k_max``, ``alpha``, ``beta``, ``theta``, ``ch_reference`` and ``backend`` are ignored);
            the keywords are shorthands that build one. Either way the monitor holds one validated
            ``criteria`` and passes it down whole.
        ch_reference: criterion 2's layer reference: ``"mean"`` (the thesis) or ``"median"``
            (robust to one filter with a huge CH index; see
            :func:`~lightning_interp.metrics.anomaly.apply_criteria`).
        rectify: scan ReLU(layer output) (the thesis' conv layer); default True.
        mode: one of :data:`~lightning_interp.nns.SCAN_MODES`: ``"pooled"`` (default: learning images
            pooled onto ``grid``, exact in that definition, one forward-mode product per cell for all
            filters), ``"exact"`` (full learning images, one backward pass per filter: the thesis'
            embedding and the reference) or ``"sketch"`` (``num_projections`` random projections of
            all filters' learning images). Sketch features are 17-34× cheaper on a GPU for a
            512-filter layer, but its flags matched exact mode's on only 65-84 % of filters (95 %
            between two exact runs): docs/measurements/sketch_vs_exact.md; ``benchmarks/sketch.py``.
        grid: cells per side of pooled mode's grid (int or ``(rows, columns)``); default 2 (2×2).
        backend: GMM backend, ``"auto"``, ``"batched"`` or ``"sklearn"``.
        val_acc_key: the ``trainer.callback_metrics`` key of the validation accuracy.
        val_loss_key: the ``trainer.callback_metrics`` key of the validation loss.
        alarm: the overfitting alarm's rule, a name or a whole
            :class:`~lightning_interp.overfitting.AlarmRule` (then the ``alarm_*`` keywords are ignored)
            (:func:`~lightning_interp.overfitting.rise_alarm`):
            ``"val_loss"`` — the validation loss (``val_loss_key``) rose more than ``alarm_rel`` over
            its best for ``alarm_patience`` consecutive scans; ``"count"`` — the anomaly count rose
            more than ``max(alarm_rel · its running minimum, alarm_margin)`` for ``alarm_patience``
            scans (training probe only: no validation labels); ``"count_and_val_loss"`` — the count
            never fell and rose over the last ``alarm_patience + 1`` scans while the validation loss
            rose (the rule before the benchmark). The default (validation loss 1 % over its best for
            2 scans) was tuned on the seed-0 runs of ``experiments/overfitting_signals.py``; on the
            held-out seed-1 runs it, and every validation-loss rule, fired within 2 epochs of the
            test loss' minimum on 2 of 6 runs, the best anomaly-count rule on 0 of 6
            (docs/measurements/overfitting_signals.md). Scans without a validation loss are skipped.
        alarm_rel: the rise over the running minimum that counts, relative to it.
        alarm_margin: the rise over the running minimum that counts, absolute.
        alarm_patience: consecutive scans the rise must last.
        alarm_min_epoch: the alarm never fires before this many epochs have been trained.
        report_path: JSON report path; ``<log dir>/anomaly_report.json`` when None.
        num_scatter: flagged filters drawn per layer; num_outlier_images: outlier samples shown, as a
            grid captioned with each sample's given label, predicted class and the filters that flag it.
        exact_flags_at_fit_end: when ``mode`` is not ``"exact"``, scan the probe once more in exact
            mode at fit end, so that the flags the report, ``FilterMasking`` and ``PruneFlaggedFilters``
            take afterwards are exact mode's (issue 16: cheap counts during training, exact per-filter
            flags for the layers being pruned). Costs one exact scan (about one epoch-end scan of the
            old default); logged as ``interp/anomaly/<layer>/count_exact``.
        outlier_gradients: compute the outlier vs normal per-sample gradient magnitudes (table 6-3)
            at every scan; within the scan memory budget, but one backward pass per probe sample
            on a large model — turn off to save the time.
        **kwargs: :class:`~lightning_interp.callbacks.base.InterpCallback` options.
    """

    key_group = "anomaly"
    report_name = "anomaly_report.json"

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 128,
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
        ch_reference: str = "mean",
        alarm: str | AlarmRule = "val_loss",
        alarm_rel: float = 0.01,
        alarm_margin: float = 0.0,
        alarm_patience: int = 2,
        alarm_min_epoch: int = 3,
        report_path: str | None = None,
        num_scatter: int = 4,
        num_outlier_images: int = 16,
        outlier_gradients: bool = True,
        exact_flags_at_fit_end: bool = True,
        mode: str = "pooled",
        num_projections: int = 64,
        grid: int | tuple[int, int] = 2,
        criteria: AnomalyCriteria | None = None,
        **kwargs,
    ):
        super().__init__(layers, probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        # How the layers are scanned, validated once and passed down whole (a grid too fine for the
        # inputs is refused at the first scan, when their size is known).
        self.spec = ScanSpec(mode=mode, num_projections=num_projections, grid=grid, rectify=rectify)
        # The settings, validated once and passed down whole (the report writes them with `asdict`).
        if criteria is not None and not isinstance(criteria, AnomalyCriteria):
            raise TypeError(f"Expected `criteria` to be an AnomalyCriteria but got {type(criteria).__name__}.")
        self.criteria = criteria or AnomalyCriteria(min_cluster_size=min_cluster_size, k_max=k_max, alpha=alpha,
                                                    beta=beta, theta=theta, ch_reference=ch_reference, backend=backend)
        try:
            self.criteria.check_probe(probe_size)  # fail now, not at the first scan
        except ValueError as err:
            raise ValueError(f"AnomalyFilterMonitor(probe_size={probe_size}): {err}") from None
        self.alarm_rule = alarm if isinstance(alarm, AlarmRule) else AlarmRule(
            alarm, rel=alarm_rel, margin=alarm_margin, patience=alarm_patience, min_epoch=alarm_min_epoch)
        self.val_acc_key = val_acc_key
        self.val_loss_key = val_loss_key
        self.report_path = report_path
        self.num_scatter = num_scatter
        self.num_outlier_images = num_outlier_images
        self.outlier_gradients = outlier_gradients
        self.exact_flags_at_fit_end = exact_flags_at_fit_end
        # Run progress (state_dict): validation curve, the scores and flags of the last scan.
        self.val_history: list[dict[str, float]] = []
        self.latest: FilterScores = self._no_scores()
        self._exact_counts: dict[str, float] | None = None  # the fit-end exact rescan's counts, once per fit

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

    @override
    def metric_keys(self) -> dict[str, str]:
        return {"val_acc_key": self.val_acc_key, "val_loss_key": self.val_loss_key}

    def _val_at(self, epoch: int, name: str) -> float | None:
        return next((e.get(name) for e in self.val_history if e["epoch"] == epoch), None)

    @property
    def wt_epoch(self) -> int | None:
        """The epoch with the best validation accuracy so far (thesis 6.3.2), None before validation."""
        return best_epoch(self.val_history, "val_acc")

    # ---- settings, as the report and the HTML page show them ----------------------------------
    @property
    def mode(self) -> str:
        """``spec.mode``: how the layers are scanned."""
        return self.spec.mode

    @property
    def num_projections(self) -> int:
        return self.spec.num_projections

    @property
    def grid(self) -> int | tuple[int, ...]:
        return self.spec.grid

    @property
    def rectify(self) -> bool:
        return self.spec.rectify

    @property
    def alarm_key(self) -> str:
        """The logged key of the overfitting alarm (``FilterMasking(start_on=...)``)."""
        return f"{self.log_prefix}/anomaly/overfit_alarm"

    @property
    def alarm(self) -> str:
        """The alarm rule's name (``alarm_rule.rule``)."""
        return self.alarm_rule.rule

    @property
    def min_cluster_size(self) -> int | float:
        """λ as given (``criteria.min_cluster_size``)."""
        return self.criteria.min_cluster_size

    def settings(self) -> dict[str, Any]:
        """Every setting that shapes the flags and the alarm, JSON-able (written to the report)."""
        return {
            **asdict(self.criteria),
            **{f"alarm_{k}" if k != "rule" else "alarm": v for k, v in asdict(self.alarm_rule).items()},
            "rectify": self.rectify, "probe_size": self.probe_size, "mode": self.mode,
            "num_projections": self.num_projections if self.mode == "sketch" else None,
            "grid": self.grid if self.mode == "pooled" else None,
        }

    # ---- filter scores -------------------------------------------------------------------------
    score_names = ("anomaly",)

    def _no_scores(self) -> FilterScores:
        return FilterScores(scores={}, flagged={}, scorer="anomaly", higher_is="stronger clustering (CH index)")

    def filter_scores(self, score: str | None = None) -> FilterScores:
        """The last scan's :class:`~lightning_interp.scores.FilterScores`: per layer every filter's CH
        index and the anomaly filters flagged (no layers before the first scan)."""
        if score not in (None, *self.score_names):
            raise ValueError(f"Expected `score` to be one of {list(self.score_names)} but got {score!r}.")
        return self.latest

    @property
    def flagged(self) -> dict[str, list[dict[str, Any]]]:
        """``{layer: [{"filter": k, "num_clusters", "ch_index", ...}, ...]}`` of the last scan (read-only view)."""
        return {layer: [{"filter": k, **d} for k, d in zip(idx, self.latest.details.get(layer, ({},) * len(idx)), strict=True)]
                for layer, idx in self.latest.flagged.items()}

    @override
    def check_dry_run(self, pl_module: pl.LightningModule, probe: Batch, outputs: dict[str, torch.Size]) -> None:
        # `__init__` checked the default probe size; a given `probe=` is checked here, before the first step.
        try:
            self.criteria.check_probe(len(probe.x))
            if self.mode == "pooled":
                pooling_basis(tuple(probe.x.shape[1:]), self.grid)  # a grid finer than the inputs
        except ValueError as err:
            raise ValueError(f"AnomalyFilterMonitor's probe does not fit its settings: {err}") from None

    # ---- the scan ----------------------------------------------------------------------------
    def detect(self, pl_module: pl.LightningModule, layer: str, x: torch.Tensor) -> AnomalyFilters:
        """Anomaly filters of one layer on inputs ``x`` with this monitor's settings
        (:func:`~lightning_interp.metrics.anomaly.scan_anomaly_filters`)."""
        return scan_anomaly_filters(
            pl_module, layer, x, spec=self.spec, seed=self.seed, criteria=self.criteria,
        )

    def exact_scores(self, pl_module: pl.LightningModule, probe: Batch) -> FilterScores:
        """Exact-mode :class:`~lightning_interp.scores.FilterScores` of every watched layer on ``probe``
        (this monitor's criteria and seed): what ``exact_flags_at_fit_end`` puts in the report."""
        spec = replace(self.spec, mode="exact")
        results = {layer: scan_anomaly_filters(pl_module, layer, probe.x, spec=spec, seed=self.seed,
                                               criteria=self.criteria) for layer in self.layers}
        epoch = self.history[-1]["epoch"] if self.history else None
        return anomaly_scores(results, epoch=epoch, settings={**asdict(self.criteria), "mode": "exact",
                                                              "scanned": "fit end"})

    @override
    def pilot_size(self) -> int:
        # The GMM sweep clusters the probe's samples into up to k_max components: it needs more than k_max + 1.
        return min(len(self.probe), max(super().pilot_size(), self.criteria.k_max + 2))

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        epoch = trainer.current_epoch
        layers = progress(self.layers, desc="anomaly scan", enabled=len(self.layers) > 1 and trainer_shows_progress(trainer))
        results = {layer: self.detect(pl_module, layer, probe.x) for layer in layers}
        scalars: dict[str, float] = {}
        for layer, res in results.items():
            scalars[f"{self.log_prefix}/anomaly/{layer}/count"] = res.count
        total = float(sum(r.count for r in results.values()))
        scalars[f"{self.log_prefix}/anomaly/count"] = total

        counts = [h[f"{self.log_prefix}/anomaly/count"] for h in self.history] + [total]
        epochs = [h["epoch"] for h in self.history] + [epoch]
        losses = [self._val_at(e, "val_loss") for e in epochs]
        scalars[self.alarm_key] = float(self.alarm_rule.fired(epochs, counts, losses))

        outliers = torch.stack([r.sample_is_outlier for r in results.values()]).any(0)
        if self.outlier_gradients and probe.y is not None:
            grads = grouped_gradient_magnitude(pl_module, probe.x, probe.y, outliers)
            if grads is not None:
                scalars[f"{self.log_prefix}/anomaly/outlier_grad"] = grads[0]
                scalars[f"{self.log_prefix}/anomaly/normal_grad"] = grads[1]

        hardest = self.probe_losses(pl_module, probe)
        if hardest is not None:
            scalars[f"{self.log_prefix}/anomaly/hard_loss"] = hard_sample_loss(hardest[0], 0.2)

        self.latest = anomaly_scores(results, epoch=epoch, settings=self.criteria)
        # A picture must never cost the scan: its counts, alarm and flags are kept whatever happens here.
        guarded(type(self).__name__, self.strict, f"drew no pictures at epoch {epoch}",
                lambda: self._log_pictures(trainer, results, probe, outliers, hardest))
        return scalars

    @staticmethod
    def probe_losses(pl_module: pl.LightningModule, probe: Batch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The probe's :func:`~lightning_interp.overfitting.per_sample_loss` (None without labels)."""
        if probe.y is None:
            return None
        result = per_sample_loss(pl_module, probe.x, probe.y)
        if result is None:
            rank_zero_warn("AnomalyFilterMonitor: no per-sample loss on the probe (the module's output is not "
                           "B x C logits of the labels); no hardest samples.")
        return result

    def alarm_fired(self, epochs: Sequence[int], counts: Sequence[float], val_losses: Sequence[float | None]) -> bool:
        """Whether the ``alarm`` rule has fired by the last of these scans (:meth:`AlarmRule.fired
        <lightning_interp.overfitting.AlarmRule.fired>`)."""
        return self.alarm_rule.fired(epochs, counts, val_losses)

    @override
    def decisions(self) -> dict[str, Any]:
        return self.latest

    @override
    def adopt_decisions(self, decisions: dict[str, Any]) -> None:
        self.latest = decisions

    @rank_zero_only
    def _log_pictures(self, trainer, results: dict[str, AnomalyFilters], probe: Batch, outliers, hardest=None) -> None:
        columns, rows = self.latest.rows()
        if rows:
            self.log_table(trainer, f"{self.log_prefix}/anomaly/flagged", columns,
                           [[str(v) if isinstance(v, list) else v for v in row] for row in rows])
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
            idx, captions = self.outlier_captions(trainer.lightning_module, results, probe,
                                                  pred=None if hardest is None else hardest[1])
            grid = labelled_image_grid(probe.x[idx].float().cpu(), captions, thumb=96)
            flagging = sum(len(r.flagged) for r in results.values())
            self.log_image(trainer, f"{self.log_prefix}/anomaly/outlier_samples", grid,
                           f"epoch {trainer.current_epoch}: {int(outliers.sum())} of {len(outliers)} probe samples lie "
                           f"in a small cluster of at least one of the {flagging} anomaly filters (the thesis' outlier "
                           f"samples: with many anomaly filters, most of the probe); shown: the {len(idx)} that the "
                           "most filters put there (given label / predicted class / f: those filters, k/N of them)")
        if self.num_outlier_images > 0 and hardest is not None:
            loss, pred = hardest
            idx = torch.argsort(-loss, stable=True)[: self.num_outlier_images]
            name = class_names(trainer)
            captions = [f"given: {name(int(probe.y[i]))} / pred: {name(int(pred[i]))} / loss {float(loss[i]):.2f}"
                        for i in idx.tolist()]
            grid = labelled_image_grid(probe.x[idx.to(probe.x.device)].float().cpu(), captions, thumb=96)
            self.log_image(trainer, f"{self.log_prefix}/anomaly/hardest_samples", grid,
                           f"epoch {trainer.current_epoch}: the probe samples whose given label has the highest "
                           "loss at this scan — on the overfitting benchmark these found wrongly labelled samples "
                           "at 1.3-3.3× chance where outlier samples did not. Which samples the model memorises, "
                           "tracked over epochs: SampleDynamicsMonitor")

    def outlier_captions(
        self, pl_module: pl.LightningModule, results: dict[str, AnomalyFilters], probe: Batch,
        pred: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[str]]:
        """The outlier samples to show (those flagged by the most filters first, up to
        ``num_outlier_images``) and a caption each: given label, predicted class, flagging filters.

        ``pred``: the predicted class of every probe sample when the scan has it (``B``); otherwise
        the shown samples are run through the module once."""
        flags = torch.cat([r.outlier_samples for r in results.values()], 0)  # (sum K, B)
        flagging = sum(len(r.flagged) for r in results.values())
        one_layer = len(results) == 1
        names = [str(k) if one_layer else f"{layer.split('.')[-1]}:{k}"
                 for layer, r in results.items() for k in range(r.anomaly.numel())]
        votes = flags.sum(0)
        order = torch.argsort(-votes.cpu(), stable=True)
        idx = order[: min(self.num_outlier_images, int((votes > 0).sum()))]
        if pred is not None:
            pred = pred[idx.cpu()].tolist()
        else:
            try:
                with scan_mode(pl_module), torch.no_grad():
                    out = pl_module(probe.x[idx].to(pl_module.device))
                if isinstance(out, torch.Tensor) and out.dim() == 2:
                    pred = out.argmax(1).tolist()
            except Exception as err:  # a caption must never cost the scan
                rank_zero_warn(f"AnomalyFilterMonitor: no predicted class in the outlier captions ({err}).")
        label = class_names(pl_module._trainer)
        captions = []
        for j, i in enumerate(idx.tolist()):
            who = [name for name, f in zip(names, flags[:, i].tolist()) if f]
            parts = [f"given: {label(int(probe.y[i]))}" if probe.y is not None else "given: ?"]
            parts.append(f"pred: {label(pred[j])}" if pred is not None else "pred: ?")
            parts.append(f"f: {len(who)}/{flagging} "
                         + ",".join(who[:3]) + (f" +{len(who) - 3}" if len(who) > 3 else ""))
            captions.append(" / ".join(parts))
        return idx, captions

    # ---- fit end and the report ----------------------------------------------------------------
    def _count_at(self, epoch: int | None) -> float | None:
        key = f"{self.log_prefix}/anomaly/count"
        return next((h[key] for h in self.history if h["epoch"] == epoch and key in h), None)

    @property
    def alarm_epoch(self) -> int | None:
        """The first scanned epoch (0-based) at which the overfitting alarm was on, None if never."""
        key = self.alarm_key
        return next((h["epoch"] for h in self.history if h.get(key)), None)

    def summary(self) -> dict[str, Any]:
        """WT/final epochs and anomaly counts (thesis table 6-2), the alarm's epoch."""
        wt = self.wt_epoch
        final = self.history[-1]["epoch"] if self.history else None
        return {
            "alarm_epoch": self.alarm_epoch,
            "wt_epoch": wt,
            "wt_count": self._count_at(wt),
            "final_epoch": final,
            "final_count": self._count_at(final),
            "wt_val_acc": self._val_at(wt, "val_acc") if wt is not None else None,
            "final_val_acc": self._val_at(final, "val_acc") if final is not None else None,
        }

    def summary_text(self) -> str:
        """:meth:`summary` in one sentence, without a "None" anywhere: what the fit-end line and the HTML report say."""
        s = self.summary()

        def count(v: float | None) -> str:
            return "no count" if v is None else f"{int(v)} anomaly filter{'s' if v != 1 else ''}"

        if s["wt_epoch"] is None:
            wt = (f"no WT epoch (no validation accuracy was logged under `val_acc_key={self.val_acc_key!r}`)")
        elif s["wt_count"] is None:
            wt = f"the WT epoch {s['wt_epoch']} (best validation accuracy) was not scanned"
        else:
            wt = f"the WT epoch {s['wt_epoch']} (best validation accuracy) had {count(s['wt_count'])}"
        if s["final_epoch"] is None:
            last = "no scan finished"
        else:
            last = f"the last scan (epoch {s['final_epoch']}) found {count(s['final_count'])}"
        skipped = [e for e in self.skipped_scans if s["final_epoch"] is None or e > s["final_epoch"]]
        if skipped:
            last += f"; the scans of epochs {skipped} after it were skipped (see the warnings)"
        return f"{wt}; {last}"

    def _write_report(self, trainer: pl.Trainer) -> None:
        key = f"{self.log_prefix}/anomaly/count"
        history = []
        for h in self.history:
            history.append({
                "epoch": h["epoch"],
                "count": h.get(key),
                "counts": {layer: h.get(f"{self.log_prefix}/anomaly/{layer}/count") for layer in self.layers},
                "overfit_alarm": h.get(self.alarm_key),
                "val_acc": self._val_at(h["epoch"], "val_acc"),
                "val_loss": self._val_at(h["epoch"], "val_loss"),
            })
        # The report is the latest FilterScores (FilterScores.load reads it back) plus the run's story.
        report = {
            **self.latest.to_dict(),
            "format": ANOMALY_REPORT_FORMAT,
            "epoch": self.history[-1]["epoch"] if self.history else None,
            **self.summary(),
            # The scan settings, and which scan the flags come from (the exact fit-end rescan, or the last scan).
            "settings": {**self.settings(), "flags_mode": self.latest.settings.get("mode", self.mode),
                         "flags_scanned": self.latest.settings.get("scanned", "last scan")},
            "history": history,
        }
        path = self.resolve_report_path(trainer)
        try:
            write_json(path, report)
        except OSError as err:
            rank_zero_warn(f"AnomalyFilterMonitor could not write its report to {path}: {err}. Training goes on.")

    @override
    def log_scalars(self, trainer, pl_module, scalars):
        super().log_scalars(trainer, pl_module, scalars)
        # The report includes this scan's history entry, so it is written after it is recorded.
        if trainer.is_global_zero:
            self._write_report(trainer)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._exact_counts = None

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # Before every callback's `on_fit_end`: the consumers there (PruneFlaggedFilters, the report) see
        # the exact flags whatever the order of the callbacks.
        self.rescan_exact(trainer, pl_module)

    def rescan_exact(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The ``exact_flags_at_fit_end`` rescan, once per fit (call on every rank: a collective)."""
        if self._exact_counts is not None or not self.history:
            return
        self._exact_counts = {}
        if self.mode == "exact" or not self.exact_flags_at_fit_end or self.probe is None:
            return
        # With a time budget the rescan runs only if it fits, costed as the last scan (a lower bound: exact mode
        # costs more); otherwise the flags stay the last scan's.
        if self.max_overhead is not None and self._fit_started is not None and not rank_zero_decides(
                trainer, lambda: self.within_budget(trainer)):
            rank_zero_info(f"AnomalyFilterMonitor: no exact rescan at fit end (it does not fit max_overhead="
                           f"{self.max_overhead:g}); the flags are the last scan's ({self.mode} mode).")
            return
        # Training is over: FilterMasking's masks come off now (they would at its own train end), so the
        # flags describe the network that pruning will cut, every filter included.
        from .masking import FilterMasking

        for cb in trainer.callbacks:
            if isinstance(cb, FilterMasking):
                cb.remove_masks()
        # Decided on rank zero (one scan) and broadcast: every rank holds the same flags.
        exact = rank_zero_decides(trainer, lambda: guarded(
            "AnomalyFilterMonitor", self.strict, "kept the last scan's flags (no exact scan at fit end)",
            lambda: self.exact_scores(pl_module, self.probe.to(pl_module.device))))
        if exact is not None:
            self.latest = exact
            self._exact_counts = {f"{self.log_prefix}/anomaly/{layer}/count_exact": float(len(idx))
                                  for layer, idx in exact.flagged.items()}

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.history:
            return
        self.rescan_exact(trainer, pl_module)  # done at train end in a fit; here for a one-off scan
        exact_counts = self._exact_counts or {}
        summary = self.summary()
        if trainer.is_global_zero:
            metrics = {
                f"{self.log_prefix}/anomaly/count_wt": summary["wt_count"],
                f"{self.log_prefix}/anomaly/count_final": summary["final_count"],
                **exact_counts,
            }
            metrics = {k: v for k, v in metrics.items() if v is not None}
            send_metrics(trainer, metrics)
            self._write_report(trainer)
            alarm = (f"the overfitting alarm ({self.alarm}) fired at epoch {summary['alarm_epoch']}"
                     if summary["alarm_epoch"] is not None else f"the overfitting alarm ({self.alarm}) never fired")
            rank_zero_info(f"AnomalyFilterMonitor: {self.summary_text()}; {alarm}; report: "
                           f"{self.resolve_report_path(trainer)}")

    # ---- state -------------------------------------------------------------------------------
    @override
    def state_key_fields(self) -> dict[str, Any]:
        # The grid and the projections name the state only when they differ from the defaults: two monitors that
        # differ in them coexist, and checkpoints written before keep their key.
        fields = {**super().state_key_fields(), "mode": self.mode}
        if self.mode == "pooled" and self.grid != 2:
            fields["grid"] = self.grid
        if self.mode == "sketch" and self.num_projections != 64:
            fields["num_projections"] = self.num_projections
        return fields

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "val_history": list(self.val_history),
            "scores": self.latest.to_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.val_history = list(state_dict.get("val_history", []))
        if "scores" in state_dict:
            self.latest = FilterScores.from_dict(state_dict["scores"], where="the checkpoint")
        elif state_dict.get("flagged"):  # checkpoints written before FilterScores: flags and their details
            flagged = state_dict["flagged"]
            self.latest = FilterScores(
                scores={}, flagged={layer: [d["filter"] for d in items] for layer, items in flagged.items()},
                scorer="anomaly", details={layer: [{k: v for k, v in d.items() if k != "filter"} for d in items]
                                           for layer, items in flagged.items()},
            )
