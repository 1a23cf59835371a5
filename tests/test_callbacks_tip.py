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


def _scanned_monitor(**kwargs):
    """A TIPMonitor with one scan of SimpleCNN's relu3 on a masked, labelled probe, without a Trainer."""
    from types import SimpleNamespace

    import torch

    from lightning_interp.batch import Batch

    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 8, 8))
    probe = Batch(torch.randn(6, 1, 12, 12), torch.randint(0, 10, (6,)), torch.rand(6, 1, 12, 12) > 0.5)
    tip = TIPMonitor("relu3", mode="exact", **kwargs)
    trainer = SimpleNamespace(is_global_zero=False, progress_bar_callback=None, current_epoch=0)
    return tip, trainer, net, probe, tip.scan(trainer, net, probe)


def test_scan_spearman_is_each_saliency_against_each_property():
    from lightning_interp.metrics.tip import spearman

    tip, _, _, _, scalars = _scanned_monitor()
    t = tip.last["relu3"]
    props = [n for n in t if n not in ("avou", "sou")]
    want = {f"interp/tip/relu3/spearman/{s}_{p}": spearman(t[s], t[p]).item() for s in ("avou", "sou") for p in props}
    assert {k: v for k, v in scalars.items() if "/spearman/" in k} == want
    assert list(scalars).index(f"interp/tip/relu3/spearman/avou_{props[0]}") == len(props)  # after the properties


def test_top_filter_pictures_are_each_propertys_own_learning_images():
    import torch

    from lightning_interp.metrics.tip import PROPERTIES
    from lightning_interp.nns import filter_learning_images
    from lightning_interp.viz import heatmap, image_grid

    tip, trainer, net, probe, _ = _scanned_monitor(top_filters=3)
    t = tip.last["relu3"]
    images = {}
    tip.log_table = lambda *a, **k: None
    tip.log_image = lambda trainer, key, image, caption: images.update({key: (image, caption)})
    tip._log_layer(trainer, net, "relu3", t, probe)
    columns = [heatmap(filter_learning_images(net, "relu3", probe.x[:1], filters=t[n].argsort(descending=True)[:3])[0])
               for n in PROPERTIES]
    want = image_grid(list(torch.stack(columns, 0).unbind(1)), min_side=64)
    image, caption = images["interp/tip/relu3/top_filters"]
    assert (image == want).all() and image.shape == want.shape
    assert caption == f"epoch 0: rows {list(PROPERTIES)}, columns the top 3 filters"


def test_fit_end_measures_the_unmasked_model_once_and_logs_what_separate_sweeps_give(monkeypatch):
    import importlib

    import torch

    from lightning_interp.metrics.aipc import aipc, filter_types, type_masking

    aipc_module = importlib.import_module("lightning_interp.metrics.aipc")
    tip, trainer, net, _, _ = _scanned_monitor(aipc_fractions=(0.25, 1.0))
    loader = [(torch.randn(8, 1, 12, 12), torch.randint(0, 10, (8,))) for _ in range(2)]
    tip.eval_dataloader = lambda trainer: loader
    tip.log_curve = tip.log_table = lambda *a, **k: None
    t = tip.last["relu3"]
    names = [n for n in t if n not in ("avou", "sou")]
    want = {}
    for name in names:
        curve = aipc(net, "relu3", t[name], loader, (0.25, 1.0))
        for key, value in (("aipc_area", curve.area), ("aipc_area_top10", curve.area_top10),
                           ("aipc_area_top10_thesis", curve.area_top10_thesis)):
            want[f"interp/tip/relu3/{key}/{name}"] = value
    types = filter_types(t["fg_mean"], t["bg_mean"], 0.3)
    want.update({f"interp/tip/relu3/type_masking/{k}": v for k, v in type_masking(net, "relu3", types, loader).items()})

    calls = []
    accuracy = aipc_module.accuracy
    counted = lambda *a, **k: calls.append(1) or accuracy(*a, **k)  # noqa: E731
    monkeypatch.setattr(aipc_module, "accuracy", counted)
    monkeypatch.setattr(importlib.import_module("lightning_interp.callbacks.tip"), "accuracy", counted)
    assert tip._post_fit(trainer, net) == want
    # One unmasked evaluation, then only masked ones: 2 fractions per property and each non-empty type.
    assert len(calls) == 1 + 2 * len(names) + sum(bool(m.any()) for m in types.values())
