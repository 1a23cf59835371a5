"""lightning_interp.callbacks.masking: FilterMasking from a fixed list and live from a monitor's flags
(beside PruneFlaggedFilters fed by the same monitor)."""

import lightning.pytorch as pl
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_interp.callbacks import AnomalyFilterMonitor, FilterMasking, PruneFlaggedFilters
from lightning_interp.callbacks.prune import load_pruned
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_filter_masking_callback_from_list_and_from_monitor(tmp_path, digits):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    masking = FilterMasking(filters={"model.relu3": [0, 1, 2]}, start_epoch=1, when="eval_only")
    trainer = make_trainer(tmp_path, logger=CSVLogger(str(tmp_path)), callbacks=[masking], max_epochs=2)
    trainer.fit(module, datamodule=digits)
    assert [h["num_masked"] for h in masking.history] == [0, 3]
    assert masking._mask is None and not any(m._forward_hooks for m in module.modules())

    monitor = AnomalyFilterMonitor("model.relu3", probe_size=64, k_max=4, min_cluster_size=0.1)
    live = FilterMasking(monitor=monitor, start_epoch=1)
    prune = PruneFlaggedFilters(monitor=monitor, out_path=str(tmp_path / "pruned.pt"))
    module2 = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor, live, prune], max_epochs=2)
    trainer.fit(module2, datamodule=digits)
    flagged_after_epoch0 = monitor.history[0]["interp/anomaly/model.relu3/count"]
    assert live.history[1]["num_masked"] == flagged_after_epoch0
    if monitor.flagged.get("model.relu3"):
        pruned, summary = load_pruned(str(tmp_path / "pruned.pt"))
        assert summary["params_after"] < summary["params_before"]
        assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)
