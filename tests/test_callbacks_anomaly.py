"""lightning_interp.callbacks.anomaly: AnomalyFilterMonitor in a fit (counts logged, report written,
resumed; early stopping on the count and on the overfit alarm), its alarm rules, captions, probe losses and
argument checks, and the anomaly and TIP monitors running in sketch mode."""

import csv
import glob
import json
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_interp.callbacks import AnomalyFilterMonitor, TIPMonitor
from lightning_interp.callbacks.anomaly import overfit_alarm
from lightning_interp.masking import FilterMask
from lightning_interp.models import ImageClassifier, SimpleCNN
from lightning_interp.scores import FilterScores


def classifier():
    pl.seed_everything(0)
    return ImageClassifier(SimpleCNN(width=(8, 16, 16)), lr=3e-3)


def monitor(**kw):
    kw.setdefault("probe_size", 96)
    kw.setdefault("k_max", 5)
    kw.setdefault("min_cluster_size", 0.1)
    return AnomalyFilterMonitor(["model.relu2", "model.relu3"], **kw)


def test_fit_logs_counts_writes_report_and_resumes(tmp_path, digits):
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    wandb_logger = WandbLogger(project="anomaly-test", save_dir=str(tmp_path), offline=True)
    mon = monitor()
    trainer = make_trainer(tmp_path, logger=[csv_logger, wandb_logger], callbacks=[mon], max_epochs=2)
    trainer.fit(classifier(), datamodule=digits)
    run_dir = wandb_logger.experiment.dir
    wandb_logger.experiment.finish()

    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as fh:
        rows = list(csv.DictReader(fh))
    totals = [float(r["interp/anomaly/count"]) for r in rows if r.get("interp/anomaly/count")]
    per_layer = [float(r["interp/anomaly/model.relu3/count"]) for r in rows if r.get("interp/anomaly/model.relu3/count")]
    assert len(totals) == 2 and len(per_layer) == 2
    assert any(r.get("interp/anomaly/count_final") for r in rows)
    assert totals == [h["interp/anomaly/count"] for h in mon.history]

    report_path = mon.resolve_report_path(trainer)
    assert report_path.startswith(str(tmp_path))
    with open(report_path) as fh:
        report = json.load(fh)
    assert report["format"] == "lightning_interp.anomaly_report/1"
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    # The WT epoch is the epoch of the best validation accuracy the logger recorded (the first on ties;
    # test_early_stopping_on_the_alarm_as_in_the_readme has a run whose best epoch is neither end).
    val_acc = [float(r["val/acc"]) for r in rows if r.get("val/acc")]
    assert len(val_acc) == 2
    assert report["wt_epoch"] == int(np.argmax(val_acc)) and report["final_count"] == totals[-1]
    assert report["layers"]["model.relu3"]["num_filters"] == 16
    scores = FilterScores.load(report_path)  # the report is the monitor's FilterScores plus the run's story
    # The scans ran in the default (pooled) mode; the flags consumers get were rescanned exactly at fit end.
    assert mon.mode == "pooled" and scores.settings["mode"] == "pooled"
    assert scores.settings["flags_mode"] == "exact" and scores.settings["flags_scanned"] == "fit end"
    exact = mon.exact_scores(trainer.lightning_module, mon.probe)  # the same scan again: the same flags
    assert scores.scorer == "anomaly" and scores.flags() == exact.flags() == mon.filter_scores().flags()
    assert scores.scores["model.relu3"].shape == (16,)
    exact_counts = [float(r[k]) for r in rows for k in r if k.endswith("/count_exact") and r[k]]
    assert sum(exact_counts) == scores.count
    for _layer, entry in report["layers"].items():
        for item in entry["flagged"]:
            assert item["outlier_clusters"] > 0.2 * item["num_clusters"]
    # This run flags filters, and their pictures (cluster scatter plots) went to W&B.
    assert totals[-1] > 0
    pngs = glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True)
    assert any("clusters" in p for p in pngs)
    # The flagged filters can be masked by name, with the "model." prefix stripped for the bare net.
    net = trainer.lightning_module.model
    with FilterMask(net, FilterScores.load(report_path).strip_prefix("model.").flags()):
        net(torch.randn(2, 1, 16, 16))

    ckpt = os.path.join(tmp_path, "mid.ckpt")
    trainer.save_checkpoint(ckpt)
    resumed = monitor()
    trainer2 = make_trainer(tmp_path, logger=False, callbacks=[resumed], max_epochs=3)
    trainer2.fit(classifier(), datamodule=digits, ckpt_path=ckpt)
    assert resumed.history[:2] == mon.history
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.val_history[:2] == mon.val_history
    assert resumed.wt_epoch is not None


def test_early_stopping_can_monitor_the_count(tmp_path, digits):
    mon = monitor()
    stop = EarlyStopping(monitor="interp/anomaly/count", mode="min", patience=0, check_on_train_epoch_end=True)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[mon, stop], max_epochs=6)
    trainer.fit(classifier(), datamodule=digits)
    assert "interp/anomaly/count" in trainer.callback_metrics
    counts = [h["interp/anomaly/count"] for h in mon.history]
    stopped_early = len(counts) < 6
    # It stops exactly when the count fails to improve on its best.
    assert stopped_early == any(c >= min(counts[:i]) for i, c in enumerate(counts) if i > 0)


#: The validation loss a scripted run reports each epoch: best at epoch 2, above it by more than 1 % from
#: epoch 3 on. The default rule (rise > 1 % over the best for 2 consecutive scans, not before 3 epochs)
#: therefore fires at epoch 4 and not before.
SCRIPTED_VAL_LOSS = [1.0, 0.8, 0.6, 0.7, 0.9, 1.1, 1.2, 1.3]
#: ... and its validation accuracy: best at epoch 2 (the WT epoch), neither the first nor the last scan.
SCRIPTED_VAL_ACC = [0.3, 0.5, 0.7, 0.6, 0.65, 0.6, 0.6, 0.6]


class ScriptedValLoss(ImageClassifier):
    """Logs ``scripted/val_loss`` = SCRIPTED_VAL_LOSS[epoch]: an overfitting run whose alarm epoch is known."""

    def validation_step(self, batch, batch_idx):
        out = super().validation_step(batch, batch_idx)
        self.log("scripted/val_loss", SCRIPTED_VAL_LOSS[self.current_epoch])
        self.log("scripted/val_acc", SCRIPTED_VAL_ACC[self.current_epoch])
        return out


def test_early_stopping_on_the_alarm_as_in_the_readme(tmp_path, digits):
    # The README's idiom on a run whose validation loss turns at epoch 2: the alarm fires at epoch 4 and
    # EarlyStopping stops the run at that epoch's end (max_epochs is 8). With validation every epoch,
    # EarlyStopping checks at the training epoch's end, after the monitor (listed first) has logged.
    mon = monitor(probe_size=32, k_max=3, val_loss_key="scripted/val_loss", val_acc_key="scripted/val_acc")
    stop = EarlyStopping(monitor="interp/anomaly/overfit_alarm", mode="max", stopping_threshold=0.5, patience=10**6)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[mon, stop], max_epochs=len(SCRIPTED_VAL_LOSS),
                           limit_train_batches=1, limit_val_batches=1)
    pl.seed_everything(0)
    trainer.fit(ScriptedValLoss(SimpleCNN(width=(8, 16, 16)), lr=3e-3), datamodule=digits)
    assert [mon._val_at(h["epoch"], "val_loss") for h in mon.history] == pytest.approx(SCRIPTED_VAL_LOSS[:5])
    alarms = [h["interp/anomaly/overfit_alarm"] for h in mon.history]
    assert alarms == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert trainer.current_epoch == 5 and stop.stopped_epoch == 4
    assert mon.wt_epoch == 2
    report = json.loads(open(mon.resolve_report_path(trainer)).read())
    assert report["wt_epoch"] == 2 and report["alarm_epoch"] == 4


def test_overfit_alarm_rule():
    assert overfit_alarm([1, 2, 4], [0.3, 0.35, 0.5], patience=2)
    assert not overfit_alarm([1, 2, 4], [0.5, 0.35, 0.3], patience=2)  # validation loss falls
    assert not overfit_alarm([1, 3, 2], [0.3, 0.35, 0.5], patience=2)  # count fell in between
    assert not overfit_alarm([2, 2, 2], [0.3, 0.35, 0.5], patience=2)  # count flat
    assert not overfit_alarm([1, 2], [0.3, 0.5], patience=2)  # too few scans
    assert not overfit_alarm([1, 2, 3], [0.3, None, 0.5], patience=2)


def test_bad_configuration_is_refused_early():
    with pytest.raises(ValueError, match="k_max"):
        monitor(k_max=1)
    with pytest.raises(ValueError, match="min_cluster_size"):
        monitor(min_cluster_size=500)
    with pytest.raises(ValueError, match="probe_size"):
        monitor(probe_size=5)
    with pytest.raises(ValueError, match="backend"):
        monitor(backend="cuda")


def test_alarm_rules_on_a_hand_computed_history():
    from lightning_interp.callbacks import AnomalyFilterMonitor

    epochs = [0, 1, 2, 3, 4, 5]  # 0-based: epoch 2 is the third trained epoch
    counts = [5, 4, 4, 5, 7, 9]
    losses = [1.0, 0.8, 0.7, 0.72, 0.75, 0.9]
    val = AnomalyFilterMonitor(["model.relu3"], alarm="val_loss", alarm_rel=0.05, alarm_patience=1)  # > 0.735
    assert [val.alarm_fired(epochs[: i + 1], counts[: i + 1], losses[: i + 1]) for i in range(6)] == [
        False, False, False, False, True, True]
    count = AnomalyFilterMonitor(["model.relu3"], alarm="count", alarm_rel=0.0, alarm_margin=2.0,
                                 alarm_patience=1)  # > 4 + 2
    # The default: 1 % over the best (0.707) for 2 scans: epochs 3 (0.72) and 4 (0.75).
    default = AnomalyFilterMonitor(["model.relu3"])
    assert [default.alarm_fired(epochs[: i + 1], counts[: i + 1], losses[: i + 1]) for i in range(6)] == [
        False, False, False, False, True, True]
    assert [count.alarm_fired(epochs[: i + 1], counts[: i + 1], losses[: i + 1]) for i in range(6)] == [
        False, False, False, False, True, True]
    # Validation every second epoch: the scans without a validation loss are skipped, not a break.
    sparse = [1.0, None, 0.7, None, 0.75, None, 0.8]
    assert default.alarm_fired(list(range(7)), [0] * 7, sparse)
    assert not default.alarm_fired(list(range(5)), [0] * 5, sparse[:5])  # one scan above the best so far
    # Never before `alarm_min_epoch` epochs, even when the rule holds earlier.
    early = AnomalyFilterMonitor(["model.relu3"], alarm="count", alarm_rel=0.1, alarm_patience=1, alarm_min_epoch=5)
    assert not early.alarm_fired(epochs[:4], counts[:4], losses[:4])
    assert early.alarm_fired(epochs[:5], counts[:5], losses[:5])
    both = AnomalyFilterMonitor(["model.relu3"], alarm="count_and_val_loss", alarm_patience=2)
    assert both.alarm_fired(epochs, counts, losses)
    with pytest.raises(ValueError, match="alarm"):
        AnomalyFilterMonitor(["model.relu3"], alarm="loss")
    with pytest.raises(ValueError, match="ch_reference"):
        AnomalyFilterMonitor(["model.relu3"], ch_reference="max")


def test_outlier_captions_name_label_prediction_and_filters():
    from lightning_interp.batch import Batch
    from lightning_interp.metrics.anomaly import detect_anomaly_filters

    gen = torch.Generator().manual_seed(0)
    b = 40
    feats = torch.randn(b, 3, 6, generator=gen, dtype=torch.float64) * 0.3
    feats[:3, 0] += 10.0  # samples 0-2: a small far group for filter 0
    feats[3:5, 0] -= 10.0
    res = detect_anomaly_filters(feats, torch.ones(3), min_cluster_size=5, k_max=4, beta=0.0)
    assert res.sample_is_outlier[:5].all()
    module = classifier()
    x = torch.randn(b, 1, 16, 16, generator=gen)
    y = torch.arange(b) % 10
    mon = monitor(num_outlier_images=4)
    idx, captions = mon.outlier_captions(module, {"model.relu3": res}, Batch(x=x, y=y))
    assert len(idx) == 4 and set(idx.tolist()) <= set(res.sample_is_outlier.nonzero().flatten().tolist())
    with torch.no_grad():
        pred = module.eval()(x[idx]).argmax(1)
    for i, p, text in zip(idx.tolist(), pred.tolist(), captions):
        who = [k for k in res.flagged if res.outlier_samples[k, i]]  # the anomaly filters that put sample i there
        assert 0 in who and text.startswith(f"given: {int(y[i])} / pred: {p} / f: {len(who)}/{len(res.flagged)} 0")


def test_probe_losses_are_the_per_sample_cross_entropy():
    from lightning_interp.batch import Batch

    module = classifier()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 1, 16, 16, generator=gen), torch.arange(12) % 10
    loss, pred = AnomalyFilterMonitor.probe_losses(module, Batch(x=x, y=y))
    with torch.no_grad():
        logits = module.eval()(x)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, y, reduction="none"))
    assert pred.tolist() == logits.argmax(1).tolist()
    assert AnomalyFilterMonitor.probe_losses(module, Batch(x=x)) is None  # no labels


def test_settings_are_one_validated_criteria_and_alarm_rule_passed_whole():
    from dataclasses import asdict

    from lightning_interp.metrics.anomaly import AnomalyCriteria
    from lightning_interp.overfitting import AlarmRule

    criteria = AnomalyCriteria(min_cluster_size=5, k_max=4, ch_reference="median")
    rule = AlarmRule("count", rel=0.2, patience=3, min_epoch=1)
    mon = AnomalyFilterMonitor("model.relu3", probe_size=32, criteria=criteria, alarm=rule, mode="exact")
    assert mon.criteria is criteria and mon.alarm_rule is rule and mon.alarm == "count"
    settings = mon.settings()
    assert {k: settings[k] for k in asdict(criteria)} == asdict(criteria)
    assert (settings["alarm"], settings["alarm_rel"], settings["alarm_patience"]) == ("count", 0.2, 3)
    # The keyword shorthands build the same dataclasses.
    short = AnomalyFilterMonitor("model.relu3", probe_size=32, min_cluster_size=5, k_max=4, ch_reference="median",
                                 alarm="count", alarm_rel=0.2, alarm_patience=3, alarm_min_epoch=1)
    assert short.criteria == criteria and short.alarm_rule == rule
    with pytest.raises(TypeError, match="AnomalyCriteria"):
        AnomalyFilterMonitor("model.relu3", criteria={"k_max": 4})
    with pytest.raises(ValueError, match=r"probe_size=5\): Expected more probe samples"):
        AnomalyFilterMonitor("model.relu3", probe_size=5, criteria=criteria)


def test_monitors_run_in_sketch_mode(tmp_path, digits):
    module = ImageClassifier(SimpleCNN(width=(4, 8, 8)))
    anomaly = AnomalyFilterMonitor("model.relu3", probe_size=48, k_max=4, mode="sketch", num_projections=16)
    tip = TIPMonitor("model.relu3", probe_size=16, mode="sketch", num_projections=8, aipc_fractions=[1.0], top_filters=0)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[anomaly, tip], max_epochs=1)
    trainer.fit(module, datamodule=digits)
    assert "interp/anomaly/count" in anomaly.history[0]
    assert "interp/tip/model.relu3/fg_covariance" in tip.history[0]
    with pytest.raises(ValueError, match="mode"):
        AnomalyFilterMonitor("model.relu3", mode="fast")
