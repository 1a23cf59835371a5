"""``InterpReport``: an HTML page (and PNGs) of what the monitors found, written at fit end."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..html_report import Figure, Section, Table, write_html_report
from ..memorisation import filter_suspects
from ..nns import filter_learning_images
from ..scores import FilterScores, ScoreSource, Selection, check_source, resolve_scores
from ..viz import anomaly_timeline, display_inputs, heatmap, labelled_image_grid, line_plot
from .anomaly import AnomalyFilterMonitor
from .base import InterpCallback, class_names, guarded, log_root, send_image
from .dynamics import MemorisationScorer, SampleDynamicsMonitor
from .prune import PruneFlaggedFilters

__all__ = ["InterpReport", "report_sections"]

Curves = dict[str, list[tuple[int, float]]]


def _names(key: str, word: str) -> bool:
    """Whether the metric's last path component contains ``word`` (``val/loss`` names "loss")."""
    return word in key.rsplit("/", 1)[-1]


def _is_curve(key: str) -> bool:
    return not key.startswith("interp/") and not key.endswith("_step") and (_names(key, "loss") or _names(key, "acc"))


def _anomaly_section(cb: AnomalyFilterMonitor, curves: Curves) -> tuple[Section, np.ndarray | None]:
    s = cb.summary()
    s = {k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in s.items()}
    section = Section(f"Anomaly filters ({', '.join(cb.layers)})")
    section.paragraphs.append(
        f"Mode {cb.mode}, probe of {cb.probe_size} samples, λ = {cb.min_cluster_size}. "
        f"{cb.summary_text()[0].upper()}{cb.summary_text()[1:]}."
        + (f" The flagged filters below, which masking and pruning take, come from one exact rescan of the "
           f"probe at fit end ({cb.filter_scores().count} flagged)."
           if cb.filter_scores().settings.get("scanned") == "fit end" else "")
    )
    val = [(e["epoch"], e["val_loss"]) for e in cb.val_history if "val_loss" in e]
    best_loss = f" (validation loss lowest at epoch {min(val, key=lambda p: p[1])[0]})" if val else ""
    section.paragraphs.append(
        f"Overfitting alarm (rule {cb.alarm}): fired at epoch {s['alarm_epoch']}{best_loss}."
        if s["alarm_epoch"] is not None else f"Overfitting alarm (rule {cb.alarm}): did not fire{best_loss}."
    )
    timeline = None
    if cb.history:
        epochs = [h["epoch"] for h in cb.history if "fit_end" not in h]
        counts = {
            layer: [h.get(f"{cb.log_prefix}/anomaly/{layer}/count") for h in cb.history if "fit_end" not in h]
            for layer in cb.layers
        }
        losses = {k: v for k, v in curves.items() if _names(k, "loss")}
        if not losses:  # no InterpReport curves (e.g. `lightning-interp scan`): the monitor's own
            losses = {"val/loss": [(e["epoch"], e["val_loss"]) for e in cb.val_history if "val_loss" in e]}
        timeline = anomaly_timeline(epochs, counts, losses, wt_epoch=s["wt_epoch"], alarm_epoch=s["alarm_epoch"])
        section.figures.append(Figure(f"{cb.log_prefix}/anomaly/timeline", timeline,
                                      "anomaly filters per layer per scan, against the loss curves"))
    section.figures.extend(Figure(k, img, cap) for k, (img, cap, _) in cb.figures.items())
    scores = cb.filter_scores()
    scanned = scores.settings.get("scanned")
    table = _flagged_table(scores, f"Flagged filters ({scores.settings.get('mode')} scan at {scanned})" if scanned
                           else "Flagged filters (last scan)")
    if table is not None:
        section.tables.append(table)
    else:
        section.paragraphs.append("No filter is flagged at the last scan.")
    return section, timeline


def _flagged_table(scores: FilterScores, title: str) -> Table | None:
    """The flagged filters of any :class:`~lightning_interp.scores.FilterScores` (one table layout for every scorer)."""
    columns, rows = scores.rows()
    if not rows:
        return None
    score = f"score ({scores.scorer}{': ' + scores.higher_is if scores.higher_is else ''})"
    return Table(title, [score if c == "score" else c for c in columns],
                 [[str(v) if isinstance(v, list) else v for v in row] for row in rows])


def _scores_section(scores: FilterScores) -> Section:
    """A section for a filter-score source given to :class:`InterpReport` (``scores=``)."""
    how = scores.settings.get("selection")
    section = Section(f"Filter scores: {scores.scorer}" + (f" ({how})" if how else ""))
    section.paragraphs.append(
        f"{scores.count} filters flagged over {len(scores.layers)} layers"
        + (f" at epoch {scores.epoch}" if scores.epoch is not None else "") + "."
    )
    table = _flagged_table(scores, "Flagged filters")
    if table is not None:
        section.tables.append(table)
    return section


def _split(key: str) -> str:
    """Which data a logged curve comes from, from its name: ``"training"``, ``"validation"``, ``"test"`` or ``""``."""
    parts = [p for p in re.split(r"[/_.\-]+", key.lower()) if p]
    for split, words in (("validation", ("val", "valid", "validation")), ("training", ("train", "training")),
                         ("test", ("test",))):
        if any(p in words for p in parts):
            return split
    return ""


def _curve_figure(name: str, group: Curves) -> Figure:
    """One panel per quantity (loss, accuracy) with every split it was logged for, each series labelled
    with its split (``"validation: val_acc"``) and the title naming only the splits that are there."""
    epochs = sorted({e for pts in group.values() for e, _ in pts})
    series = {}
    for key in sorted(group, key=lambda k: ("training", "validation", "test", "").index(_split(k))):
        split = _split(key)
        series[f"{split}: {key}" if split else key] = [dict(group[key]).get(e, float("nan")) for e in epochs]
    splits = sorted({_split(k) for k in group} - {""}, key=("training", "validation", "test").index)
    title = f"{name.capitalize()} ({', '.join(splits)})" if splits else name.capitalize()
    ylabel = next(iter(series)) if len(series) == 1 else name  # one series: its label names the key and split
    return Figure(f"training/{name}", line_plot(epochs, series, title, "epoch", ylabel), title)


def _dynamics_section(cb: SampleDynamicsMonitor, trainer: pl.Trainer | None) -> Section | None:
    s = cb.summary()
    if not s:
        return None
    section = Section("Which training samples is the model memorising? (SampleDynamicsMonitor)")
    how = "the training forward passes" if cb.source == "batches" else "an eval-mode pass over a fixed subset"
    section.paragraphs.append(
        f"{s['tracked']} training samples tracked through {how}; {s['flagged']} flagged by {cb.score} "
        f"(rule {cb.flag_rule!r}). The flagged samples' fit rate on their given labels is {s['flagged_fit']:.2f} — "
        "it rises when the model starts memorising them."
        + ("" if cb.alarm is None else
           (f" {'Validation-loss' if cb.alarm_rule is not None else 'Label-free'} overfitting alarm ({cb.alarm}): "
            + (f"fired at epoch {s['alarm_epoch']}." if s["alarm_epoch"] is not None else "did not fire.")))
    )
    truth = cb.truth(trainer) if trainer is not None else None
    latest = cb.latest
    if truth is not None:
        flags = latest.flagged
        precision, recall = latest.precision_recall(truth)
        section.paragraphs.append(
            f"The datamodule knows which labels it flipped: {int((flags & truth).sum())} of the {int(flags.sum())} flagged "
            f"samples truly have a flipped label (precision {precision:.2f}; recall {recall:.2f} of the "
            f"{int(truth.sum())} flipped among the tracked; {truth.double().mean():.2f} by chance)."
        )
    files = [f"`{s[k]}`" for k in ("label_issues", "pred_probs") if k in s]
    if files:
        section.paragraphs.append("For cleanlab and your own pipeline: " + ", ".join(files) + ".")
    section.figures.extend(Figure(k, img, cap) for k, (img, cap, _) in cb.figures.items())
    epochs = [h["epoch"] for h in cb.history if "fit_end" not in h]
    if epochs:
        series = {name: [h.get(f"{cb.key}/{name}", float("nan")) for h in cb.history if "fit_end" not in h]
                  for name in ("flagged_fit", "flips", "flagged_fraction")}
        section.figures.append(Figure(f"{cb.key}/curves", line_plot(epochs, series, "tracked samples per epoch",
                                                                    "epoch", "fraction"),
                                      "flagged samples' fit rate, prediction flips and flagged fraction per epoch"))
    columns = ["index", "given", "predicted", f"suspect score ({cb.score}; higher = more suspect)", "fit since epoch"] + (["truly flipped"] if truth is not None else [])
    rows = []
    for p in latest.top(20).tolist():
        row = [int(latest.indices[p]), int(latest.labels[p]), int(latest.predicted[p]), round(float(latest.scores[p]), 3),
               int(latest.columns["fit_since_epoch"][p])]
        rows.append(row + ([bool(truth[p])] if truth is not None else []))
    section.tables.append(Table("The 20 most suspect samples", columns, rows))
    return section


#: The memorisation section: filters shown per layer and suspects shown per filter.
MEMORISATION_FILTERS, MEMORISATION_SAMPLES = 3, 4
MEMORISATION_TITLE = "Which filters hold what it memorised?"


def _memorisation_scorers(callbacks: Sequence[Callback], scores: Sequence[tuple[ScoreSource, Selection | None]]
                          ) -> list[MemorisationScorer]:
    """The memorisation scorers given to the report (``scores=``) or feeding a callback (``FilterMasking(scorer)``)."""
    found = [source for source, _ in scores] + [getattr(cb, "source", None) for cb in callbacks]
    return list({id(s): s for s in found if isinstance(s, MemorisationScorer)}.values())


def _memorisation_section(scorer: MemorisationScorer, trainer: pl.Trainer | None) -> Section:
    """The top memorisation filters of each layer, each beside the suspects it contributes most to."""
    monitor = scorer.monitor
    section = Section(MEMORISATION_TITLE)
    chosen = monitor.flagged_positions(scorer.max_suspects, scorer.seed, fitted=scorer.fitted_only)
    if chosen is None:
        if monitor.latest is None or not bool(monitor.latest.flagged.any()):
            section.paragraphs.append("No training sample is flagged yet, so there are no suspects to score the "
                                      "filters on.")
        else:
            section.paragraphs.append("No flagged training sample is fitted to its given label, so no filter holds a "
                                      "memorised fit (the model has not memorised the flagged samples).")
        return section
    positions, mask = chosen
    suspects = positions[mask]
    latest = monitor.latest
    scores = scorer.filter_scores()
    device = next((p.device for p in scorer.model.parameters()), torch.device("cpu"))
    x = monitor._inputs(suspects.tolist()).to(device)
    y = latest.labels[suspects]
    per_filter = min(MEMORISATION_SAMPLES, len(suspects))
    held = filter_suspects(scorer.model, scores, x, y, num_filters=MEMORISATION_FILTERS, num_samples=per_filter)
    what = "flagged samples fitted to their given label" if scorer.fitted_only else "flagged samples"
    section.paragraphs.append(
        f"Memorisation scores ({scores.scorer}: the given-label margin a filter carries on the {len(suspects)} {what} "
        f"beyond what it carries on as many fitted clean ones) of the model at the end of training. For the "
        f"{MEMORISATION_FILTERS} highest-scoring filters of each layer, one row each: the {per_filter} flagged samples "
        "whose margin the filter contributes most to, each beside the filter's learning image on it (the input "
        "pixels that drive the filter; red positive, blue negative). Masking or pruning these filters is what "
        "FilterMasking(scorer, select=Selection(...)) does."
    )
    name = class_names(trainer) if trainer is not None else str
    aum = latest.columns.get("aum")
    rows = []
    for layer, entries in held.items():
        images, captions = [], []
        for k, score, picks in entries:
            learning = filter_learning_images(scorer.model, layer, x[picks], filters=[k])[:, 0]
            shown = [int(suspects[p]) for p in picks]
            for j, p in enumerate(shown):
                images += [display_inputs(x[picks[j] : picks[j] + 1])[0], heatmap(learning[j : j + 1])[0]]
                captions += [f"#{int(latest.indices[p])} given: {name(int(latest.labels[p]))} / "
                             f"pred: {name(int(latest.predicted[p]))}"
                             + (f" / AUM {float(aum[p]):.2f}" if aum is not None else ""),
                             f"filter {k} / learning image"]
            rows.append([layer, k, round(score, 4), str([int(latest.indices[p]) for p in shown])])
        grid = labelled_image_grid(torch.stack(images), captions, ncols=2 * per_filter, thumb=64)
        filters = [k for k, _, _ in entries]
        section.figures.append(Figure(f"{monitor.key}/memorisation_filters/{layer}", grid,
                                      f"{layer}: filters {filters} (highest memorisation score first), one per row: "
                                      "flagged sample | the filter's learning image on it"))
    section.tables.append(Table("Top memorisation filters and the flagged samples they hold most",
                                ["layer", "filter", f"score ({scores.scorer})", "samples (dataset indices)"], rows))
    return section


def _prune_section(cb: PruneFlaggedFilters) -> Section | None:
    s = cb.summary
    if not s:
        return None
    section = Section("Pruning (flagged filters removed)")
    removed = sum(len(v) for v in s.get("pruned", {}).values())
    section.paragraphs.append(
        f"{removed} filters removed from `{cb.model_attr}`; its weights and pruning plan are saved at {cb.saved_to} "
        "(load it with lightning_interp.pruning.load_pruned(path, <a fresh copy of the network>))."
    )
    rounded = sum(len(v) for v in s.get("rounded", {}).values())
    if rounded:
        section.paragraphs.append(f"{rounded} of them were not flagged: removed (lowest weight magnitude first) so "
                                  f"that each pruned layer keeps a multiple of {s.get('round_to')} channels.")
    if s.get("latency_ms_before") is not None and s["latency_ms_after"] >= s["latency_ms_before"]:
        section.paragraphs.append("The pruned network was not faster where it was timed; removing few filters saves "
                                  "less time than timing resolves (docs/guide/pruning.md).")
    rows = [["parameters", s["params_before"], s["params_after"]], ["MACs", s["macs_before"], s["macs_after"]]]
    if s.get("latency_ms_before") is not None:
        rows.append([f"latency, ms (median, batch of {s.get('latency_batch')}, {s.get('latency_device')})",
                     s["latency_ms_before"], s["latency_ms_after"]])
    if "val_acc_before" in s:
        rows.append(["validation accuracy", s["val_acc_before"], s["val_acc_after"]])
    section.tables.append(Table("Before and after", ["", "before", "after"], rows))
    section.tables.append(Table("Channels per pruned layer", ["layer", "before", "after", "removed filters"],
                                [[layer, *s["channels"].get(layer, ["?", "?"]), str(idx)]
                                 for layer, idx in s.get("pruned", {}).items()]))
    return section


def _scalars_table(cb: InterpCallback) -> Table | None:
    scans = [h for h in cb.history if "fit_end" not in h]
    rows = []
    for entry in (scans[-1] if scans else None, next((h for h in reversed(cb.history) if "fit_end" in h), None)):
        if entry:
            rows += [[k, v, entry["epoch"]] for k, v in entry.items()
                     if k not in ("epoch", "fit_end") and isinstance(v, (int, float)) and math.isfinite(v)]
    return Table("Latest values", ["metric", "value", "epoch"], rows) if rows else None


def report_sections(
    callbacks: Sequence[Callback],
    curves: Curves | None = None,
    scores: Sequence[tuple[ScoreSource, Selection | None]] = (),
    trainer: pl.Trainer | None = None,
) -> tuple[list[Section], dict[str, np.ndarray]]:
    """The report's sections from the monitors among ``callbacks`` (their figures, flagged
    filters and latest values), the training ``curves`` (``{metric: [(epoch, value)]}``) and
    extra filter-score ``scores`` (sources with their selections, one section each).

    Returns:
        the sections and the figures made here (``{key: image}``) that no logger has seen yet.
    """
    curves = curves or {}
    sections: list[Section] = []
    new: dict[str, np.ndarray] = {}
    # The overfitting view first: memorised samples, anomaly monitors, then the others in the trainer's order.
    order = {SampleDynamicsMonitor: 0, AnomalyFilterMonitor: 1}
    for cb in sorted(callbacks, key=lambda c: order.get(type(c), 2)):
        if isinstance(cb, SampleDynamicsMonitor):
            dynamics = _dynamics_section(cb, trainer)
            if dynamics is not None:
                sections.append(dynamics)
            continue
        if isinstance(cb, AnomalyFilterMonitor):
            section, timeline = _anomaly_section(cb, curves)
            if timeline is not None:
                new[f"{cb.log_prefix}/anomaly/timeline"] = timeline
        elif isinstance(cb, InterpCallback):
            section = Section(f"{type(cb).__name__} ({', '.join(cb.layers)})", paragraphs=cb.report_notes())
            section.figures.extend(Figure(k, img, cap) for k, (img, cap, _) in cb.figures.items())
        elif isinstance(cb, PruneFlaggedFilters):
            pruning = _prune_section(cb)
            if pruning is not None:
                sections.append(pruning)
            continue
        else:
            continue
        table = _scalars_table(cb)
        if table is not None:
            section.tables.append(table)
        sections.append(section)
    for scorer in _memorisation_scorers(callbacks, scores):
        at = next((i + 1 for i, sec in enumerate(sections) if sec.title.startswith("Which training samples")), len(sections))
        try:
            section = _memorisation_section(scorer, trainer)
        except Exception as err:  # the section only; the rest of the report is written
            section = Section(MEMORISATION_TITLE, paragraphs=[f"Not available: {err}"])
        sections.insert(at, section)
        new.update({f.key: f.image for f in section.figures})
    for source, select in scores:
        try:
            sections.append(_scores_section(resolve_scores(source, select)))
        except Exception as err:  # one source that cannot answer (a malformed file, ...) costs its section only
            sections.append(Section("Filter scores", paragraphs=[f"Not available: {err}"]))
    if curves:
        groups = {"loss": {k: v for k, v in curves.items() if _names(k, "loss")},
                  "accuracy": {k: v for k, v in curves.items() if _names(k, "acc")}}
        figures = [_curve_figure(name, group) for name, group in groups.items() if group]
        sections.insert(0, Section("Training curves", figures=figures))
    return sections, new


class InterpReport(Callback):
    """Write an HTML report of the run's monitors at fit end: ``<log dir>/interp_report/index.html``.

    Sections: the training loss/accuracy curves; for each :class:`AnomalyFilterMonitor` the
    anomaly count per layer vs epoch against the loss curves (also sent to W&B/TensorBoard as
    ``interp/anomaly/timeline``), its cluster scatter plots and outlier samples, and the table of
    flagged filters; for every other monitor its latest figures (learning-image grids, TIP top
    filters, AIPC and FQ curves) and latest values. The pictures are the same ones the monitors
    send to the loggers. Written on rank zero after every other callback's ``on_fit_end``
    (in ``teardown``), so fit-end analyses such as AIPC are included. A failure warns and never
    loses the run (``strict=True`` raises).

    Args:
        dirpath: report directory; ``<log dir>/interp_report`` when None.
        title: the page title.
        scores: extra filter-score sources to tabulate, each a source
            (:func:`~lightning_interp.scores.resolve_scores`: a monitor, ``FilterScores``, a saved file,
            ``{layer: [filter, ...]}``) or a ``(source, Selection)`` pair — e.g.
            ``[(tip, Selection("sou", amount=8, lowest=True))]`` lists the 8 least salient filters per layer.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        *,
        title: str = "lightning_interp report",
        strict: bool = False,
        scores: Sequence[ScoreSource | tuple[ScoreSource, Selection | None]] = (),
    ):
        super().__init__()
        self.scores = [item if isinstance(item, tuple) else (item, None) for item in scores]
        for source, select in self.scores:
            check_source(source, select, owner="InterpReport")
        self.dirpath = dirpath
        self.title = title
        self.strict = strict
        self.curves: Curves = {}
        self.path: str | None = None
        self.report_dir: str | None = dirpath
        self.log_root: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts under DDP: resolve it here, on every rank.
        self.log_root = log_root(trainer)
        self.report_dir = self.dirpath or os.path.join(self.log_root, "interp_report")

    def _record(self, trainer: pl.Trainer, epoch: int) -> None:
        for key, value in trainer.callback_metrics.items():
            if _is_curve(key) and value.numel() == 1:
                name = key[: -len("_epoch")] if key.endswith("_epoch") else key
                pts = [p for p in self.curves.get(name, []) if p[0] != epoch]
                self.curves[name] = [*pts, (epoch, float(value))]

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The fit loop has switched callback_metrics to epoch aggregates by now (epoch_end_reached), and
        # this runs before ModelCheckpoint saves, so a resumed run keeps this epoch's point.
        self._record(trainer, trainer.current_epoch)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero or trainer.sanity_checking:
            return
        guarded("InterpReport", self.strict, "could not write the HTML report (training is done; nothing lost)",
                lambda: self.write(trainer))

    def write(self, trainer: pl.Trainer) -> str:
        """Build and write the page now (rank zero); returns its path."""
        sections, new = report_sections(trainer.callbacks, self.curves, self.scores, trainer=trainer)
        captions = {f.key: f.caption for section in sections for f in section.figures}
        for key, image in new.items():
            send_image(trainer, key, image, captions.get(key, ""))
        meta: dict[str, Any] = {"epochs": trainer.current_epoch, "global step": trainer.global_step}
        meta["log dir"] = self.log_root or trainer.default_root_dir
        try:
            self.path = write_html_report(self.report_dir, sections, title=self.title, meta=meta)
        except OSError as err:
            rank_zero_warn(f"InterpReport could not write {self.report_dir}: {err}.")
            return ""
        rank_zero_info(f"InterpReport: {self.path}")
        return self.path

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"curves": {k: list(v) for k, v in self.curves.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.curves = {k: [tuple(p) for p in v] for k, v in state_dict.get("curves", {}).items()}
