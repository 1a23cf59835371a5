"""lightning_interp.callbacks.masking: FilterMasking from a fixed list and live from a monitor's flags
(beside PruneFlaggedFilters fed by the same monitor)."""

import lightning.pytorch as pl
import pytest
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


# ---- masking from the overfitting alarm (start_on) ----------------------------------------------------------
ALARM = "interp/samples/overfit_alarm"


class MaskProbe(pl.Callback):
    """Per training epoch: whether relu3 carried a forward hook in a training batch, and the relu3 channels that
    were zero in every training batch (read at the next module's input); per validation: the loss, computed here."""

    def __init__(self, dm):
        self.dm, self.hooked, self.zero, self.val_loss = dm, {}, {}, {}

    def on_train_start(self, trainer, pl_module):
        self._handle = pl_module.model.pool3.register_forward_pre_hook(self._see)

    def _see(self, module, args):
        if module.training:
            zero = (args[0].abs().amax(dim=(0, 2, 3)) == 0).nonzero().flatten().tolist()
            self.zero[self._epoch] = sorted(set(self.zero.get(self._epoch, zero)) & set(zero))

    def on_train_epoch_start(self, trainer, pl_module):
        self._epoch = trainer.current_epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        hooked = len(pl_module.model.relu3._forward_hooks) > 0
        self.hooked[trainer.current_epoch] = self.hooked.get(trainer.current_epoch, False) or hooked

    def on_validation_epoch_end(self, trainer, pl_module):
        with torch.no_grad():
            batches = [(pl_module(x), y) for x, y, _ in self.dm.val_dataloader()]
        logits, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        self.val_loss[trainer.current_epoch] = torch.nn.functional.cross_entropy(logits, y).item()

    def on_train_end(self, trainer, pl_module):
        self._handle.remove()


def _chain(tmp_path, dm, epochs, ckpt_path=None, **kw):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_interp.callbacks import MemorisationScorer, SampleDynamicsMonitor
    from lightning_interp.scores import Selection

    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(8, 16, 16)), lr=0.03)
    from lightning_interp.overfitting import AlarmRule

    # 1 % over the best validation loss once, from epoch 3 (patience 1: the digits' loss is noisy).
    monitor = SampleDynamicsMonitor(track_size=256, num_images=0, alarm=AlarmRule("val_loss", patience=1))
    # Every flagged sample a suspect: masks every epoch once started (the default waits for fitted ones).
    scorer = MemorisationScorer(monitor, module, ["model.relu3"], max_suspects=32, fitted_only=False)
    masking = FilterMasking(scorer, select=Selection("taylor", amount=2), start_on=ALARM)
    probe = MaskProbe(dm)
    # Saved at validation end (the default saves at training-epoch end, after every callback): the harder case.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}", save_top_k=-1, every_n_epochs=1,
                            save_on_train_epoch_end=False)
    trainer = make_trainer(tmp_path, max_epochs=epochs, limit_train_batches=None, limit_val_batches=None, logger=False,
                           callbacks=[monitor, masking, probe, saver], **kw)
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    return monitor, masking, probe


def test_masking_starts_the_epoch_after_the_val_loss_alarm_and_a_resumed_run_keeps_it(tmp_path):
    from lightning_interp.data import DigitsDataModule
    from lightning_interp.overfitting import rise_alarm

    dm = DigitsDataModule(image_size=16, batch_size=64, label_noise=0.3)
    monitor, masking, probe = _chain(tmp_path, dm, epochs=10)
    # The alarm, recomputed from validation losses computed here: 1 % over the best, from epoch 3.
    losses = [probe.val_loss[e] for e in range(10)]
    at = rise_alarm(losses, rel=0.01, patience=1, min_index=2)
    assert at is not None and at < 8, losses  # fires with epochs left to mask
    assert monitor.alarm_epoch == masking.alarm_epoch == at
    counts = [h["num_masked"] for h in masking.history]
    assert counts == [0] * (at + 1) + [2] * (9 - at)
    # Before: no hook on the layer; after: the 2 masked filters are zero in every training batch.
    assert [probe.hooked[e] for e in range(10)] == [False] * (at + 1) + [True] * (9 - at)
    for h in masking.history[at + 1 :]:
        assert set(h["filters"]["model.relu3"]) <= set(probe.zero[h["epoch"]])
    # Resumed from the alarm epoch's own checkpoint (written at its validation end) and from the one after:
    # the same epochs masked, the same filters.
    for epoch in (at, at + 1):
        _, resumed, _ = _chain(tmp_path / f"resume{epoch}", dm, epochs=10,
                               ckpt_path=str(tmp_path / "ckpt" / f"epoch={epoch}.ckpt"))
        assert resumed.alarm_epoch == at
        assert resumed.history == masking.history


def test_bad_start_on_is_refused_and_a_key_never_logged_is_named(tmp_path, digits):
    import pytest

    from lightning_interp.callbacks import SampleDynamicsMonitor

    with pytest.raises(ValueError, match="`start_on`.*non-empty str"):
        FilterMasking(filters={"model.relu3": [0]}, start_on=1)
    # An alarm key no monitor in the Trainer logs: refused at setup, naming the keys that are.
    monitor = SampleDynamicsMonitor(track_size=64, num_images=0, alarm="val_loss", log_prefix="mine")
    masking = FilterMasking(filters={"model.relu3": [0]}, start_on=ALARM)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor, masking])
    with pytest.raises(ValueError, match=r"one of \['mine/samples/overfit_alarm'\]"):
        trainer.fit(ImageClassifier(SimpleCNN(width=(8, 16, 16))), datamodule=digits)
    assert trainer.global_step == 0
    # Any other key the module never logs: named once, with the argument, after the first epoch; nothing masked.
    masking = FilterMasking(filters={"model.relu3": [0]}, start_on="val/loss_rise")
    trainer = make_trainer(tmp_path, logger=False, callbacks=[masking], max_epochs=3)
    with pytest.warns(UserWarning, match="start_on='val/loss_rise'") as record:
        trainer.fit(ImageClassifier(SimpleCNN(width=(8, 16, 16))), datamodule=digits)
    assert sum("val/loss_rise" in str(w.message) for w in record) == 1
    assert [h["num_masked"] for h in masking.history] == [0, 0, 0] and masking.alarm_epoch is None


def test_named_maskings_log_and_checkpoint_apart_and_an_unnamed_pair_is_warned_about(tmp_path, digits):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(width=(8, 16, 16)))
    first = FilterMasking(filters={"model.relu3": [0, 1, 2]}, start_epoch=1, name="first")
    second = FilterMasking(filters={"model.relu2": [0]}, start_epoch=1, name="second")
    assert first.state_key != second.state_key  # without `name` they are equal: Lightning refuses the pair
    trainer = make_trainer(tmp_path, logger=CSVLogger(str(tmp_path)), callbacks=[first, second], max_epochs=2)
    trainer.fit(module, datamodule=digits)
    logged = trainer.logged_metrics
    assert float(logged["interp/masking/first/num_masked"]) == 3.0
    assert float(logged["interp/masking/second/num_masked"]) == 1.0
    assert "interp/masking/num_masked" not in logged
    # The unnamed default keeps the old key and the old checkpoint state key.
    plain = FilterMasking(filters={"model.relu3": [0]})
    assert plain.key == "interp/masking/num_masked"
    assert plain.state_key == "FilterMasking{'mode': 'train_and_eval', 'start_epoch': 0}"

    a = FilterMasking(filters={"model.relu3": [0]}, start_epoch=1)
    b = FilterMasking(filters={"model.relu2": [0]}, start_epoch=2)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b], max_epochs=1)
    with pytest.warns(UserWarning, match="2 FilterMasking callbacks log 'interp/masking/num_masked'.*name="):
        trainer.fit(ImageClassifier(SimpleCNN(width=(8, 16, 16))), datamodule=digits)
    for bad in ("", "a/b", 3):
        with pytest.raises(ValueError, match="Expected `name`"):
            FilterMasking(filters={"model.relu3": [0]}, name=bad)


def test_masking_listed_before_the_anomaly_monitor_starts_the_epoch_after_its_alarm(tmp_path):
    """The anomaly monitor decides its alarm at training-epoch end; FilterMasking listed before it reads the
    monitor's own alarm epoch (not the logged value, which it would see an epoch late)."""
    from lightning_interp.callbacks import AnomalyFilterMonitor
    from lightning_interp.data import DigitsDataModule

    pl.seed_everything(0)
    dm = DigitsDataModule(image_size=16, batch_size=64, label_noise=0.3)
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(8, 16, 16)), lr=0.03)
    monitor = AnomalyFilterMonitor("model.relu3", probe_size=64, k_max=3, alarm_patience=1, alarm_min_epoch=2,
                                   num_outlier_images=0)
    masking = FilterMasking(filters={"model.relu2": [0, 1]}, start_on=monitor.alarm_key)
    trainer = make_trainer(tmp_path, max_epochs=8, limit_train_batches=None, limit_val_batches=None, logger=False,
                           callbacks=[masking, monitor])
    trainer.fit(module, datamodule=dm)
    at = monitor.alarm_epoch
    assert at is not None and at < 7, monitor.val_history  # fires with epochs left to mask
    assert masking.alarm_epoch == at
    assert [h["num_masked"] for h in masking.history] == [0] * (at + 1) + [2] * (7 - at)
