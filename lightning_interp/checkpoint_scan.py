"""Run monitors once on a trained model, without training: what ``lightning-interp scan`` does.

The monitors are ordinary callbacks; a one-off scan drives them through ``Trainer.validate``:
after the validation epoch (so ``val/acc`` and ``val/loss`` are known and ``self.log`` is
allowed) each monitor draws its probe and scans exactly as at a training epoch's end, then runs
its fit-end analyses (the anomaly report, AIPC, ...). The weights are never updated and the model
stays in eval mode throughout (``validate`` puts it there).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from .callbacks.base import InterpCallback
from .callbacks.interp_report import report_sections
from .html_report import write_html_report
from .progress import progress

__all__ = ["scan_once"]


class _ScanOnce(Callback):
    """Placed after the monitors: drives each of them through one scan and its fit-end step."""

    def __init__(self, monitors: Sequence[InterpCallback], show_progress: bool):
        self.monitors = list(monitors)
        self.show_progress = show_progress

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for cb in progress(self.monitors, desc="scan", enabled=self.show_progress and trainer.is_global_zero):
            if cb.probe is None and cb.probe_source is None and cb.probe_split == "train":
                cb.probe_source = trainer.datamodule.train_dataloader()  # validate() sets no train loader
            cb.on_train_start(trainer, pl_module)  # draws the probe
            cb.on_train_epoch_end(trainer, pl_module)  # one scan, logged like a training epoch's

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for cb in self.monitors:
            cb.on_fit_end(trainer, pl_module)  # fit-end analyses: reports, AIPC, diversity masking


def scan_once(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    monitors: Sequence[InterpCallback],
    out_dir: str,
    *,
    logger: Any = None,
    accelerator: str = "auto",
    show_progress: bool = True,
    title: str = "lightning_interp scan",
) -> dict[str, Any]:
    """Validate ``module`` on ``datamodule``, scan it once with ``monitors``, write the HTML report.

    Args:
        monitors: configured :class:`InterpCallback` instances (``every_n_epochs`` must be 1).
        out_dir: the run directory: the report (``interp_report/index.html``), the anomaly
            report (``anomaly_report.json`` unless a monitor names another path) and, without a
            logger that takes images, the PNGs.
        logger: a Lightning logger (or None: CSV under ``out_dir``).

    Returns:
        ``{"validation": metrics, "report": path of the HTML page, "monitors": {class: history}}``.
    """
    for cb in monitors:
        if not isinstance(cb, InterpCallback):
            raise TypeError(f"Expected lightning_interp monitors (InterpCallback) but got {type(cb).__name__}.")
        if cb.every_n_epochs != 1:
            raise ValueError(f"Expected every_n_epochs=1 for a one-off scan but {type(cb).__name__} has {cb.every_n_epochs}.")
    os.makedirs(out_dir, exist_ok=True)
    if logger is None:
        from lightning.pytorch.loggers import CSVLogger

        logger = CSVLogger(out_dir, name="", version="")
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, default_root_dir=out_dir, logger=logger,
        callbacks=[*monitors, _ScanOnce(monitors, show_progress)], enable_progress_bar=show_progress,
        enable_model_summary=False,
        inference_mode=False,  # the probe must not be made of inference tensors: scans differentiate
    )
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
    sections, new = report_sections(monitors)
    path = write_html_report(os.path.join(out_dir, "interp_report"), sections, title=title,
                             meta={"run dir": out_dir})
    rank_zero_info(f"lightning-interp scan: report {path}")
    return {
        "validation": metrics[0] if metrics else {},
        "report": path,
        "figures": sorted(new) + sorted(k for cb in monitors for k in cb.figures),
        "monitors": {type(cb).__name__: cb.history for cb in monitors},
    }
