"""lightning_interp.callbacks.tip: TIPMonitor in a fit (with FeatureQuantityMonitor beside it, both
logged to CSV and W&B), its argument checks and its AIPC progress bars."""

import csv
import glob
import os

import lightning.pytorch as pl
import pytest
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_interp.callbacks import FeatureQuantityMonitor, TIPMonitor
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_fit_with_both_monitors_logs_scalars_tables_and_images(tmp_path):
    pl.seed_everything(0)
    data = ShapesDataModule(num_train=96, num_val=64, num_test=16, batch_size=32, image_size=16)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), lr=3e-3)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    wandb_logger = WandbLogger(project="tip-test", save_dir=str(tmp_path), offline=True)
    tip = TIPMonitor(["model.relu2", "model.relu3"], probe_size=16, aipc_fractions=[0.5, 1.0], top_filters=2)
    fq = FeatureQuantityMonitor(["model.relu1", "model.relu3"], probe_size=8, top_neurons=4, num_diverse=2)
    trainer = make_trainer(tmp_path, logger=[csv_logger, wandb_logger], callbacks=[tip, fq], max_epochs=1)
    trainer.fit(module, datamodule=data)
    run_dir = wandb_logger.experiment.dir
    wandb_logger.experiment.finish()

    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    columns = set().union(*(r.keys() for r in rows if any(r.values())))
    for key in ("interp/tip/model.relu3/mean", "interp/tip/model.relu3/fg_correlation",
                "interp/tip/model.relu3/spearman/avou_variance", "interp/tip/model.relu2/types/H-H",
                "interp/tip/model.relu3/aipc_area/covariance", "interp/tip/model.relu3/type_masking/L-L",
                "interp/fq/model.relu1/fq_mean", "interp/fq/model.relu3/r_activation_fq",
                "interp/fq/model.relu3/diversity_mean", "interp/fq/model.relu3/mask_most_diverse",
                "interp/fq/model.relu3/mask_least_diverse_loss_pct", "interp/tip/model.relu3/aipc_area_top10_thesis/mean"):
        assert key in columns, key
    values = [float(r[k]) for r in rows for k in r if k.startswith("interp/") and r[k]]
    assert values and all(v == v for v in values), "no NaN in the logs"
    tables = glob.glob(os.path.join(run_dir, "media", "table", "**", "*.json"), recursive=True)
    images = glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True)
    assert any("filters" in t for t in tables) and any("type_masking" in t for t in tables)
    assert any("top_filters" in p for p in images) and any("aipc" in p for p in images)
    assert any("depth" in p for p in images)


def test_bad_arguments():
    with pytest.raises(ValueError, match="per"):
        TIPMonitor("model.relu3", per=0.7)
    with pytest.raises(ValueError, match="type_property"):
        TIPMonitor("model.relu3", type_property="median")


def test_aipc_sweep_shows_progress(tmp_path, capfd):
    data = ShapesDataModule(num_train=64, num_val=32, num_test=32)
    module = ImageClassifier(arch="simple_cnn", arch_kwargs={"in_channels": 3, "num_classes": 4, "width": [8, 8, 8]})
    tip = TIPMonitor(["model.relu2", "model.relu3"], probe_size=8, aipc_fractions=(0.0, 0.5), aipc_max_batches=1)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                         logger=False, enable_checkpointing=False, enable_model_summary=False, callbacks=[tip])
    trainer.fit(module, datamodule=data)
    err = capfd.readouterr().err
    assert "AIPC model.relu2" in err and "AIPC model.relu3" in err and "TIP scan" in err
