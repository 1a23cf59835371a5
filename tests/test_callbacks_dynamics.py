"""SampleDynamicsMonitor in real Lightning runs: both ways of getting logits agree, resume continues the state
exactly, a dataset without indices is refused before the first step, users' own modules and torchvision
networks, W&B (offline) pictures/tables and the fit-end files cleanlab takes."""

import csv
import os

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import SampleDynamicsMonitor
from lightning_interp.data import DigitsDataModule, with_index
from lightning_interp.models import SimpleCNN


class UserModule(pl.LightningModule):
    """The kind of module users write: the network in ``self.net``, ``val_acc``/``val_loss`` keys, and a
    training_step that calls ``self.net`` directly (so the LightningModule's own forward never runs)."""

    def __init__(self, net: nn.Module, lr: float = 0.05):
        super().__init__()
        self.net = net
        self.lr = lr
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        self.steps += 1
        loss = F.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=96, size=16, channels=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    x = torch.randn(n, channels, size, size, generator=g) + y[:, None, None, None] / 5
    return TensorDataset(x, y)


def _fit(tmp_path, monitors, *, lr=0.05, epochs=3, indexed=True, net=None, data=None, **trainer_kw):
    torch.manual_seed(0)
    data = data or _data()
    module = UserModule(net or SimpleCNN(in_channels=1, width=(4, 8, 8)), lr=lr)
    train = DataLoader(with_index(data) if indexed else data, batch_size=32, shuffle=False)
    val = DataLoader(_data(32, seed=1, channels=data[0][0].shape[0], size=data[0][0].shape[-1]), batch_size=32)
    kw = dict(max_epochs=epochs, limit_train_batches=None, limit_val_batches=None)
    kw.update(trainer_kw)
    trainer = make_trainer(tmp_path, **kw)
    trainer.fit(module, train, val)
    return trainer, module


def test_training_batches_and_the_tracked_subset_agree_on_the_same_samples_and_weights(tmp_path):
    # lr = 0 and a network without dropout or BatchNorm: the training forward passes and the eval-mode pass
    # after the epoch see the same function, so both ways must hold the same statistics for every sample.
    a = SampleDynamicsMonitor(source="batches")
    b = SampleDynamicsMonitor(source="subset", track_size="all", log_prefix="subset")
    _fit(tmp_path, [a, b], lr=0.0, callbacks=[a, b])
    assert b.tracked == list(range(96))
    da, db = a.dynamics.state_dict(), b.dynamics.state_dict()
    assert da["epochs"].tolist() == [3] * 96
    for name in ("labels", "epochs", "misclassified", "forgetting", "last_pred", "fit_since"):
        assert torch.equal(da[name], db[name]), name
    for name in ("margin_sum", "prob_sum", "prob_sq_sum", "probs_sum"):
        torch.testing.assert_close(da[name], db[name], rtol=1e-5, atol=1e-5)
    assert [h["interp/samples/fit"] for h in a.history] == pytest.approx([h["subset/samples/fit"] for h in b.history])


@pytest.mark.parametrize("source,at_train_epoch_end", [("batches", False), ("subset", False), ("batches", True)])
def test_resume_continues_the_state_exactly(tmp_path, source, at_train_epoch_end):
    def monitor():
        return SampleDynamicsMonitor(source=source, track_size=40)

    full = monitor()
    _fit(tmp_path / "full", None, epochs=4, callbacks=[full, ModelCheckpoint(save_top_k=-1)])
    first = monitor()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, save_on_train_epoch_end=at_train_epoch_end)
    _fit(tmp_path / "part", None, epochs=2, callbacks=[first, ckpt])
    path = sorted(os.listdir(tmp_path / "ckpt"))[-1]
    saved = torch.load(tmp_path / "ckpt" / path, weights_only=False)["callbacks"][first.state_key]
    if at_train_epoch_end:  # saved after the monitor's epoch end
        assert saved["dynamics"]["last_epoch"] == 1
    else:  # saved at validation end, before the monitor's epoch end: epoch 1 is applied on resuming
        assert saved["dynamics"]["last_epoch"] == 0
    resumed = monitor()
    torch.manual_seed(0)
    module = UserModule(SimpleCNN(in_channels=1, width=(4, 8, 8)))
    trainer = make_trainer(tmp_path / "resumed", max_epochs=4, limit_train_batches=None, limit_val_batches=None,
                           callbacks=[resumed])
    data = _data()
    trainer.fit(module, DataLoader(with_index(data), batch_size=32), DataLoader(_data(32, seed=1), batch_size=32),
                ckpt_path=str(tmp_path / "ckpt" / path))
    assert resumed.dynamics.last_epoch == 3 and resumed.dynamics.epochs.max() == 4
    for name, value in full.dynamics.state_dict().items():
        other = resumed.dynamics.state_dict()[name]
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(other, value, rtol=1e-6, atol=1e-6, equal_nan=True, msg=name)
        else:
            assert other == value, name
    assert resumed.tracked == full.tracked


def test_a_dataset_without_indices_is_refused_before_the_first_step(tmp_path):
    monitor = SampleDynamicsMonitor(source="batches")
    with pytest.raises(ValueError, match=r"with_index\(train_set\).*source='subset'"):
        _fit(tmp_path, None, indexed=False, callbacks=[monitor])


def test_bad_arguments_name_the_valid_choices():
    from lightning_interp.overfitting import AlarmRule

    with pytest.raises(ValueError, match=r"`source` to be one of \['batches', 'subset'\]"):
        SampleDynamicsMonitor(source="logits")
    with pytest.raises(ValueError, match="`score` to be one of"):
        SampleDynamicsMonitor(score="el2n")
    with pytest.raises(ValueError, match=r"`alarm` to be one of \['val_loss', 'flagged_fit', 'label_wave'\]"):
        SampleDynamicsMonitor(alarm="val_los")
    with pytest.raises(ValueError, match="rule 'val_loss' but got rule 'count'"):
        SampleDynamicsMonitor(alarm=AlarmRule("count"))
    with pytest.raises(ValueError, match="`val_loss_key`"):
        SampleDynamicsMonitor(alarm="val_loss", val_loss_key="")
    with pytest.raises(ValueError, match="`flag_rule`"):
        SampleDynamicsMonitor(flag_rule=-3)
    with pytest.raises(ValueError, match="only with source='batches'"):
        SampleDynamicsMonitor(logits_module="net")
    with pytest.raises(ValueError, match="`track_size` to be 'auto', 'all' or a positive int but got 0"):
        SampleDynamicsMonitor(track_size=0)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_users_own_module_with_a_torchvision_network_in_self_net(tmp_path, arch):
    import torchvision

    net = getattr(torchvision.models, arch)(weights=None, num_classes=10)
    monitor = SampleDynamicsMonitor(source="batches", num_images=4)
    trainer, module = _fit(tmp_path, None, epochs=2, net=net, data=_data(48, size=32, channels=3),
                           callbacks=[monitor])
    # training_step called self.net directly: the logits came from the `net` child's hook.
    assert monitor.dynamics.epochs.tolist() == [2] * 48
    assert monitor.latest is not None and len(monitor.latest) == 48
    folder = os.path.join(trainer.log_dir, "sample_dynamics")
    rows = list(csv.DictReader(open(os.path.join(folder, "label_issues.csv"))))
    assert len(rows) == 48 and {"index", "is_label_issue", "label_score", "given_label"} <= set(rows[0])
    probs, labels = np.load(os.path.join(folder, "pred_probs.npy")), np.load(os.path.join(folder, "labels.npy"))
    assert probs.shape == (48, 10) and labels.shape == (48,)
    import cleanlab.filter as cleanlab
    assert cleanlab.find_label_issues(labels, probs).shape == (48,)


def test_logs_to_wandb_and_scores_the_flags_against_the_datamodules_flipped_labels(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    from lightning_interp.models import ImageClassifier

    dm = DigitsDataModule(image_size=16, batch_size=64, label_noise=0.3)
    monitor = SampleDynamicsMonitor(track_size=200, num_images=4)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=2, logger=logger,
                           callbacks=[monitor])
    trainer.fit(ImageClassifier(SimpleCNN(in_channels=1, width=(4, 8, 8)), lr=0.01), datamodule=dm)
    logger.experiment.finish()  # else the next WandbLogger in this process writes into this run
    assert [h["epoch"] for h in monitor.history if "fit_end" not in h] == [0, 1, 2]
    assert "interp/samples/flagged_fraction" in trainer.callback_metrics
    end = monitor.history[-1]
    truth = dm.flipped[torch.tensor(monitor.tracked)]
    flags = monitor.latest.flagged
    assert end["interp/samples/flipped_precision"] == pytest.approx(float(truth[flags].double().mean()) if flags.any() else 0.0)
    assert end["interp/samples/flipped_recall"] == pytest.approx(float(flags[truth].double().mean()))
    grid, caption, epoch = monitor.figures["interp/samples/suspects"]
    assert grid.ndim == 3 and grid.shape[2] == 3 and epoch == 2 and "most suspect" in caption
    # The run's W&B files hold the suspects picture and the tracked-samples table.
    media = [f for _, _, fs in os.walk(tmp_path / "wandb") for f in fs]
    assert any(f.startswith("interp/samples/suspects".split("/")[-1]) or "suspects" in f for f in media)
    assert any("tracked" in f for f in media)


def test_alarm_key_drives_early_stopping(tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    monitor = SampleDynamicsMonitor(source="batches", alarm="label_wave")
    stop = EarlyStopping(monitor="interp/samples/overfit_alarm", mode="max", stopping_threshold=0.5,
                         check_on_train_epoch_end=True, patience=100)
    trainer, _ = _fit(tmp_path, None, epochs=12, lr=0.2, callbacks=[monitor, stop])
    flips = [h["interp/samples/flips"] for h in monitor.history]
    from lightning_interp.dynamics import label_wave_alarm

    expected = label_wave_alarm(flips, patience=2, min_index=2)
    assert expected is not None, flips
    assert monitor.alarm_epoch == monitor.history[expected]["epoch"]
    assert trainer.current_epoch == monitor.alarm_epoch + 1, "EarlyStopping stopped at the alarm"


class BackboneHead(UserModule):
    """A module whose training_step calls two children, the first with a 2-D (B, 32) feature output."""

    def __init__(self):
        super().__init__(nn.Identity(), lr=0.0)  # lr 0: the training forward passes see the final weights
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU())
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.cross_entropy(self.head(self.backbone(x)), y)


def test_the_logits_are_the_last_child_called_not_a_feature_vector(tmp_path):
    monitor = SampleDynamicsMonitor(source="batches", num_images=0)
    data = _data(64)
    module = BackboneHead()
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=None, limit_val_batches=0, callbacks=[monitor])
    trainer.fit(module, DataLoader(with_index(data), batch_size=32))
    assert monitor.dynamics.num_classes == 10  # the head's (B, 10), not the backbone's (B, 32)
    with torch.no_grad():
        module.eval()
        preds = module(data.tensors[0]).argmax(1)
    assert torch.equal(monitor.dynamics.last_pred, preds)


def test_memorisation_scorer_scores_the_monitors_flagged_samples_and_feeds_masking(tmp_path):
    from lightning_interp.callbacks import FilterMasking, MemorisationScorer
    from lightning_interp.memorisation import memorisation_scores
    from lightning_interp.models import ImageClassifier
    from lightning_interp.scores import Selection

    dm = DigitsDataModule(image_size=16, batch_size=64, label_noise=0.3)
    module = ImageClassifier(SimpleCNN(in_channels=1, width=(4, 8, 8)), lr=0.01)
    monitor = SampleDynamicsMonitor(track_size=200, num_images=0, flag_rule=20)
    # Every flagged sample a suspect (after 3 epochs few are fitted yet); the default takes only the fitted ones.
    held = MemorisationScorer(monitor, module, ["model.relu3"], max_suspects=16, fitted_only=False)
    fitted = MemorisationScorer(monitor, module, ["model.relu3"], max_suspects=16)
    # Before the monitor has flagged anything: no flags (a masking callback masks nothing yet).
    assert held.filter_scores().flags() == {}
    masking = FilterMasking(held, select=Selection("taylor", amount=2), start_epoch=1)
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=None, limit_val_batches=2,
                           callbacks=[monitor, masking])
    trainer.fit(module, datamodule=dm)
    # The scorer's answer is memorisation_scores on the 16 most suspect flagged samples and 32 others.
    x, y, suspects = monitor.flagged_samples(16)
    assert int(suspects.sum()) == 16 and len(x) == 48
    expected = memorisation_scores(module, ["model.relu3"], x, y, suspects, variant="taylor")
    torch.testing.assert_close(held.filter_scores().scores["model.relu3"], expected.scores["model.relu3"])
    assert held.filter_scores("activation").scorer == "memorisation/activation"
    # fitted_only: the suspects are the flagged samples predicted as their given label, the most suspect first.
    latest = monitor.latest
    memorised = latest.flagged & (latest.predicted == latest.labels)
    order = [p for p in latest.top(len(latest)).tolist() if memorised[p]][:16]
    if order:
        x, y, suspects = monitor.flagged_samples(16, fitted=True)
        torch.testing.assert_close(x[suspects], monitor._inputs(order))
        expected = memorisation_scores(module, ["model.relu3"], x, y, suspects, variant="taylor")
        torch.testing.assert_close(fitted.filter_scores().scores["model.relu3"], expected.scores["model.relu3"])
    else:
        assert monitor.flagged_samples(16, fitted=True) is None and fitted.filter_scores().flags() == {}
    # Masking took the 2 highest-scoring filters from epoch 1 on.
    assert [h["num_masked"] for h in masking.history][-1] == 2
    with pytest.raises(TypeError, match="SampleDynamicsMonitor"):
        MemorisationScorer(object(), module, ["model.relu3"])


def test_val_loss_alarm_follows_the_validation_loss_and_names_a_key_never_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_interp.overfitting import AlarmRule, rise_alarm

    # The module logs "val_loss", not the default "val/loss": named once, with the fix, after the first epoch.
    monitor = SampleDynamicsMonitor(track_size=32, num_images=0, alarm="val_loss")
    with pytest.warns(UserWarning, match="`val_loss_key='val/loss'` \\(did you mean `val_loss_key='val_loss'`") as rec:
        _fit(tmp_path / "a", [monitor], epochs=3, callbacks=[monitor])
    assert sum("val_loss_key" in str(w.message) for w in rec) == 1 and monitor.alarm_epoch is None
    rule = AlarmRule("val_loss", rel=0.0, patience=1, min_epoch=1)
    monitor = SampleDynamicsMonitor(track_size=32, num_images=0, alarm=rule, val_loss_key="val_loss")
    trainer, _ = _fit(tmp_path / "b", [monitor], epochs=8, lr=0.3, callbacks=[monitor],
                      logger=CSVLogger(str(tmp_path / "b")))
    rows = list(csv.DictReader(open(os.path.join(trainer.logger.log_dir, "metrics.csv"))))
    losses = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    alarms = [float(r["interp/samples/overfit_alarm"]) for r in rows if r.get("interp/samples/overfit_alarm")]
    at = rise_alarm(losses, rel=0.0, patience=1, min_index=0)
    assert at is not None, losses
    assert monitor.alarm_epoch == at and alarms == [0.0] * at + [1.0] * (8 - at)
