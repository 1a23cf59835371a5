"""The default demo: SimpleCNN on scikit-learn's digits with 30 % of the training labels flipped, half
the digits held out and small batches, so it overfits within 20 epochs; learning images and the
overfitting monitor (its alarm) logged to W&B (offline). The same job as `recipes/demo.yaml`, which
`make demo` runs. Everything is local: the digits ship
with scikit-learn and W&B runs in offline mode; `wandb sync <run dir>` uploads the run later.
"""

from __future__ import annotations

import argparse
import glob
import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_interp.callbacks import AnomalyFilterMonitor, LearningImageLogger
from lightning_interp.data import DigitsDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default="runs/demo", help="directory for the W&B and CSV logs")
    parser.add_argument("--limit-train-batches", type=float, default=1.0)
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    pl.seed_everything(0, workers=True)
    os.makedirs(args.out, exist_ok=True)
    datamodule = DigitsDataModule(image_size=32, batch_size=16, val_fraction=0.5, label_noise=0.3)
    module = ImageClassifier(SimpleCNN(in_channels=1, num_classes=10), lr=2e-3)
    wandb_logger = WandbLogger(project="lightning_interp-demo", save_dir=args.out, offline=True)
    csv_logger = CSVLogger(args.out, name="csv")
    callback = LearningImageLogger(
        ["model.relu1", "model.relu2", "model.relu3", "model.relu4"], probe_size=32, every_n_epochs=4
    )
    anomaly = AnomalyFilterMonitor("model.relu3", probe_size=128, min_cluster_size=0.1, every_n_epochs=1)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        logger=[wandb_logger, csv_logger],
        callbacks=[callback, anomaly],
        limit_train_batches=args.limit_train_batches,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    trainer.fit(module, datamodule=datamodule)

    run_dir = wandb_logger.experiment.dir
    wandb_logger.experiment.finish()
    images = sorted(glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True),
                    key=os.path.getmtime)
    last = callback.history[-1] if callback.history else {}
    print("\nKnowledge quantity at the last epoch (relative to the input):")
    for key, value in last.items():
        if key != "epoch":
            print(f"  {key:55s} {value:.4f}")
    summary = anomaly.summary()
    print(f"\nAnomaly filters in model.relu3 per epoch: {[int(h['interp/anomaly/count']) for h in anomaly.history]}")
    print(f"  best validation accuracy (WT) at epoch {summary['wt_epoch']}: {summary['wt_count']} anomaly filters; "
          f"last epoch: {summary['final_count']}")
    best = min(anomaly.val_history, key=lambda e: e.get("val_loss", float("inf")))["epoch"] if anomaly.val_history else None
    print(f"  validation loss lowest at epoch {best}; overfitting alarm ({anomaly.alarm}) "
          + (f"fired at epoch {summary['alarm_epoch']}" if summary["alarm_epoch"] is not None else "did not fire"))
    print(f"  report: {anomaly.resolve_report_path(trainer)}")
    print(f"\nW&B offline run: {os.path.dirname(run_dir)}  (upload later with `wandb sync` on it)")
    print(f"Images (learning-image grids, cluster plots): {len(images)} PNGs under {os.path.join(run_dir, 'media', 'images')}")
    if images:
        print(f"  latest: {images[-1]}")
    print(f"Scalars (CSV): {os.path.join(csv_logger.log_dir, 'metrics.csv')}")


if __name__ == "__main__":
    main()
