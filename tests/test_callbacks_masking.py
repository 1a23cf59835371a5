"""lightning_interp.callbacks.masking: FilterMasking from a fixed list and live from a monitor's flags
(beside PruneFlaggedFilters fed by the same monitor)."""

import lightning.pytorch as pl
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_interp.callbacks import AnomalyFilterMonitor, FilterMasking, PruneFlaggedFilters
from lightning_interp.models import ImageClassifier, SimpleCNN
from lightning_interp.pruning import load_pruned


def test_filter_masking_callback_from_list_and_from_monitor(tmp_path, digits):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    masking = FilterMasking(filters={"model.relu3": [0, 1, 2]}, start_epoch=1, when="eval_only")
    trainer = make_trainer(tmp_path, logger=CSVLogger(str(tmp_path)), callbacks=[masking], max_epochs=2)
    trainer.fit(module, datamodule=digits)
    assert [h["num_masked"] for h in masking.history] == [0, 3]
    assert masking._mask is None and not any(m._forward_hooks for m in module.modules())

    # Loose criteria (any imbalanced, clustered, live filter) so that filters are flagged and pruned.
    loose = dict(probe_size=64, k_max=4, min_cluster_size=0.3, alpha=0.0, beta=0.0, theta=0.1)
    monitor = AnomalyFilterMonitor("model.relu3", **loose)
    live = FilterMasking(monitor=monitor, start_epoch=1)
    prune = PruneFlaggedFilters(monitor=monitor, out_path=str(tmp_path / "pruned.pt"))
    module2 = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    # Pruning listed before the monitor: the exact rescan runs at train end, before every on_fit_end.
    trainer = make_trainer(tmp_path, logger=False, callbacks=[prune, monitor, live], max_epochs=2)
    trainer.fit(module2, datamodule=digits)
    flagged_after_epoch0 = monitor.history[0]["interp/anomaly/model.relu3/count"]
    assert flagged_after_epoch0 > 0 and live.history[1]["num_masked"] == flagged_after_epoch0
    exact = monitor.filter_scores()
    assert exact.settings["scanned"] == "fit end" and exact.count > 0
    # The rescan saw the network unmasked: the same exact scan now, with no masks on, gives the same flags.
    assert not any(m._forward_hooks for m in module2.modules())
    assert monitor.exact_scores(module2, monitor.probe).flags() == exact.flags()
    pruned, summary = load_pruned(tmp_path / "pruned.pt", SimpleCNN(width=(8, 16, 16)))
    k = len(exact.flags()["model.relu3"])
    assert summary["channels"]["conv3"] == [16, 16 - k] and summary["params_after"] < summary["params_before"]
    assert pruned(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_a_report_written_later_in_the_run_is_a_valid_source(tmp_path, digits):
    path = tmp_path / "later" / "anomaly_report.json"
    monitor = AnomalyFilterMonitor("model.relu3", probe_size=64, k_max=4, alpha=0.0, beta=0.0, report_path=str(path))
    masking = FilterMasking(report=str(path), start_epoch=1)  # the file does not exist at setup
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor, masking], max_epochs=2)
    trainer.fit(ImageClassifier(SimpleCNN(width=(8, 16, 16))), datamodule=digits)
    assert masking.history[1]["num_masked"] == monitor.history[0]["interp/anomaly/model.relu3/count"] > 0
