"""Shapes with the TIP and feature-quantity monitors, W&B offline.

SimpleCNN learns four shapes on textured backgrounds; the batches carry foreground masks, so
both monitors report foreground/background properties, filter types and feature quantity.
At fit end they run AIPC, type masking and diversity masking on the validation set.

    .venv/bin/python recipes/shapes_tip_fq.py --epochs 6 --out runs/shapes_tip_fq
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_interp.callbacks import FeatureQuantityMonitor, LearningImageLogger, TIPMonitor
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--out", default="runs/shapes_tip_fq")
    args = parser.parse_args(argv)

    os.environ.setdefault("WANDB_MODE", "offline")
    pl.seed_everything(0, workers=True)
    data = ShapesDataModule(num_train=args.num_train, num_val=max(64, args.num_train // 4), image_size=args.image_size)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=data.num_classes), lr=2e-3)
    layers = ["model.relu1", "model.relu2", "model.relu3"]
    callbacks = [
        TIPMonitor(layers[1:], probe_size=args.probe_size),
        FeatureQuantityMonitor(layers, probe_size=min(32, args.probe_size), top_neurons=8),
        LearningImageLogger(layers, probe_size=min(32, args.probe_size), num_images=4),
    ]
    os.makedirs(args.out, exist_ok=True)
    wandb_logger = WandbLogger(project="lightning_interp-shapes", save_dir=args.out, offline=True)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, callbacks=callbacks,
        logger=[wandb_logger, CSVLogger(args.out, name="csv")], log_every_n_steps=10, enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    run_dir = os.path.dirname(wandb_logger.experiment.dir)
    wandb_logger.experiment.finish()
    print(f"\nW&B offline run: {run_dir}")
    return {"run_dir": run_dir, "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()}}


if __name__ == "__main__":
    main()
