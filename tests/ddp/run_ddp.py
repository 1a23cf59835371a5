"""Run every monitor under DDP (2 CPU processes, gloo) and dump what rank 0 saw; used by tests/test_ddp.py.

    python tests/ddp/run_ddp.py OUT_DIR [--devices 2]
"""

import json
import os
import sys

import lightning.pytorch as pl

from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FeatureQuantityMonitor,
    FilterMasking,
    LearningImageLogger,
    TIPMonitor,
)
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN


def main(out: str, devices: int) -> None:
    pl.seed_everything(0)
    # 101 training samples: with 2 processes one rank gets one batch fewer at the end.
    data = ShapesDataModule(num_train=101, num_val=40, num_test=8, batch_size=16, image_size=16, num_workers=0)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), lr=3e-3)
    anomaly = AnomalyFilterMonitor("model.relu3", probe_size=48, k_max=4, num_outlier_images=2)
    callbacks = [
        LearningImageLogger("model.relu2", probe_size=8, num_images=2),
        anomaly,
        TIPMonitor("model.relu3", probe_size=8, aipc_fractions=[0.5], top_filters=1),
        FeatureQuantityMonitor("model.relu3", probe_size=8, top_neurons=4, num_diverse=2),
        AttentionGuidance("model.relu3", {"attention_supervision": 1.0}, probe_size=8),
        FilterMasking(monitor=anomaly, start_epoch=1),
    ]
    trainer = pl.Trainer(
        strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_epochs=2,
        default_root_dir=out, logger=pl.loggers.CSVLogger(out, name="csv"), callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=data)
    result = {
        "rank": trainer.global_rank,
        "anomaly_history": anomaly.history,
        "probe": anomaly.probe.x.double().sum().item(),
        "probe_indices": anomaly.probe_indices,
        "tip_history": callbacks[2].history,
        "masking": callbacks[5].history,
        "lil_history": callbacks[0].history,
        "fq_history": callbacks[3].history,
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
