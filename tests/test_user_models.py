"""The callbacks on a user's own LightningModule around torchvision networks (issue 14).

A plain module as a new user writes it: the network in ``self.net`` (not ``model``), keys without
slashes (``train_loss``, ``val_loss``, ``val_acc``). Each torchvision network runs one tiny epoch
with the monitors, the report and pruning: no exception, the report written, a pruned network
whose forward pass works. Then every bad input found while trying this is refused before the first
training step with a message that names the fix.
"""

from __future__ import annotations

import json
import os
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import make_trainer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.batch import Batch
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FeatureQuantityMonitor,
    FilterMasking,
    InterpReport,
    LearningImageLogger,
    PruneFlaggedFilters,
    TIPMonitor,
)
from lightning_interp.callbacks.prune import load_pruned
from lightning_interp.pruning import prune_filters, prune_target
from lightning_interp.scores import Selection

torch.set_num_threads(1)


class UserModule(pl.LightningModule):
    """What a user writes: ``self.net``, plain keys, Adam; batches ``(x, y)`` or ``(x, y, mask)``."""

    def __init__(self, net: nn.Module, returns_dict: bool = False):
        super().__init__()
        self.net = net
        self.returns_dict = returns_dict

    def forward(self, x):
        logits = self.net(x)
        return {"logits": logits} if self.returns_dict else logits

    def _logits(self, batch):
        x, y = batch[0], batch[1]
        out = self(x)
        return (out["logits"] if self.returns_dict else out), y

    def training_step(self, batch, batch_idx):
        logits, y = self._logits(batch)
        loss = F.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits, y = self._logits(batch)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def small_vgg() -> nn.Module:
    net = torchvision.models.VGG(torchvision.models.vgg.make_layers([8, "M", 16, "M"], batch_norm=True), num_classes=4)
    net.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 32), nn.ReLU(), nn.Linear(32, 4))
    return net


#: network, the layer a user would watch (a block where the network has them), extra checks.
MODELS = {
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=4), "net.features.1"),
    "vgg11_bn_narrow": (small_vgg, "net.features.2"),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=4), "net.layer1.0"),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=4), "net.features.1.0"),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None, num_classes=4),
                    "net.features.denseblock1.denselayer1"),
}


def images(n: int = 16, masks: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 32, 32, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    if not masks:
        return TensorDataset(x, y)
    return TensorDataset(x, y, torch.rand(n, 1, 32, 32, generator=g) > 0.5)


def loaders(masks: bool = False):
    return DataLoader(images(16, masks), batch_size=8), DataLoader(images(8, masks, seed=1), batch_size=8)


@pytest.mark.parametrize("name", list(MODELS))
def test_torchvision_networks_in_a_user_module(tmp_path, name):
    pl.seed_everything(0)
    build, layer = MODELS[name]
    module = UserModule(build())
    monitor = AnomalyFilterMonitor(layer, probe_size=12, k_max=3, min_cluster_size=2, num_outlier_images=2,
                                   val_acc_key="val_acc", val_loss_key="val_loss")
    callbacks = [
        monitor,
        LearningImageLogger(layer, probe_size=2, num_images=1, top_filters=1, max_filters=2),
        TIPMonitor(layer, probe_size=4, top_filters=1, aipc_fractions=[0.5], aipc_max_batches=1),
        FeatureQuantityMonitor(layer, probe_size=2, top_neurons=2, num_diverse=2, eval_max_batches=1,
                               diversity_neurons=4),
        FilterMasking(monitor=monitor, start_epoch=1),
        # The two highest anomaly scores of the layer, flagged or not: every network gets pruned.
        PruneFlaggedFilters(monitor=monitor, select=Selection(amount=2), model_attr="net", evaluate=False),
        InterpReport(),
    ]
    if name != "mobilenet_v3_small":  # its Hardsigmoid has no double backward: refused, see below
        callbacks.insert(0, AttentionGuidance(layer, {"attention_mining": 0.1, "attention_supervision": 0.1},
                                              probe_size=4))
    trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1, limit_train_batches=2,
                           limit_val_batches=1, enable_checkpointing=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(skipped|did not prune|could not write).*")
        trainer.fit(module, *loaders(masks=True))
    assert all(cb.history for cb in callbacks if isinstance(cb, (AnomalyFilterMonitor, TIPMonitor, FeatureQuantityMonitor)))
    html = (tmp_path / "interp_report" / "index.html").read_text()
    report = json.loads((tmp_path / "anomaly_report.json").read_text())
    assert report["wt_epoch"] == 0 and report["settings"]["probe_size"] == 12
    x = torch.rand(2, 3, 32, 32)
    target = prune_target(module.net, layer[len("net."):], x)
    pruned, summary = prune_filters(module.net, {target: [0, 1]}, x)
    assert pruned(x).shape == (2, 4) and summary.params_after < summary.params_before
    assert summary.latency_ms_before > 0 and summary.latency_ms_after > 0
    pruner = next(cb for cb in callbacks if isinstance(cb, PruneFlaggedFilters))
    net, saved = load_pruned(pruner.saved_to)  # the callback pruned the two selected filters at fit end
    assert [len(v) for v in saved["pruned"].values()] == [2] and saved["params_after"] < saved["params_before"]
    assert net(x).shape == (2, 4) and "Pruning (flagged filters removed)" in html


# ---- bad input: refused before the first step, with the fix named -----------------------------------


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def refused(tmp_path, module, callbacks, match, train=None, error=ValueError):
    trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    train_loader, val_loader = loaders() if train is None else (train, None)
    with pytest.raises(error, match=match):
        trainer.fit(module, train_loader, val_loader)
    assert trainer.global_step == 0


def test_prune_without_model_attr_names_it_and_the_module_attributes(tmp_path):
    monitor = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2)
    refused(tmp_path, UserModule(tiny_net()), [monitor, PruneFlaggedFilters(monitor=monitor)],
            r"`model_attr='model'`.*nn.Module attributes: \['net'\]; pass `model_attr='net'`")


def test_prune_refuses_a_concatenating_block_and_names_the_layers_to_use(tmp_path):
    net = torchvision.models.densenet121(weights=None, num_classes=4)
    monitor = AnomalyFilterMonitor("net.features.denseblock1", probe_size=8, k_max=2, min_cluster_size=2)
    refused(tmp_path, UserModule(net), [monitor, PruneFlaggedFilters(monitor=monitor, model_attr="net")],
            r"block 'features.denseblock1'.*Monitor and prune a conv or norm layer instead, e.g. 'features.denseblock1")


def test_vector_inputs_are_refused_for_image_monitors(tmp_path):
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))
    data = DataLoader(TensorDataset(torch.rand(16, 10), torch.randint(0, 4, (16,))), batch_size=8)
    refused(tmp_path, UserModule(mlp), [AnomalyFilterMonitor("net.1", probe_size=8, k_max=2, min_cluster_size=2)],
            r"Expected image inputs \(B, C, H, W\).*\(8, 10\)", train=data)


def test_a_batch_the_default_adapter_cannot_read_points_to_batch_adapter(tmp_path):
    ds = images(16, masks=True)
    data = DataLoader([(y, m, x) for x, y, m in ds], batch_size=8)
    refused(tmp_path, UserModule(tiny_net()), [LearningImageLogger("net.2", probe_size=4)],
            r"the first looks like labels. Pass `batch_adapter=`", train=data)


def test_batch_adapter_reads_any_layout(tmp_path):
    ds = images(16, masks=True)
    data = DataLoader([(y, m, x) for x, y, m in ds], batch_size=8)

    class Reordered(UserModule):
        def _logits(self, batch):
            y, _, x = batch
            return self(x), y

    cb = LearningImageLogger("net.2", probe_size=4, num_images=1, top_filters=1,
                             batch_adapter=lambda b: Batch(x=b[2], y=b[0], mask=b[1]))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb], max_epochs=1, limit_train_batches=1)
    trainer.fit(Reordered(tiny_net()), data)
    assert cb.history and cb.probe.mask is not None


def test_a_model_returning_a_dict_is_told_the_monitors_need_logits(tmp_path):
    refused(tmp_path, UserModule(tiny_net(), returns_dict=True), [TIPMonitor("net.2", probe_size=4)],
            r"forward to return logits \(a Tensor.*got a dict with keys \['logits'\]")


def test_guidance_refuses_a_1x1_map(tmp_path):
    refused(tmp_path, UserModule(tiny_net()), [AttentionGuidance("net.5", {"attention_mining": 1.0}, probe_size=4)],
            r"spatial map.*\(2, 8, 1, 1\).*1x1.*Choose an earlier layer, e.g. .*'net.4'")


def test_guidance_without_masks_says_how_to_give_them(tmp_path):
    refused(tmp_path, UserModule(tiny_net()), [AttentionGuidance("net.2", {"rrr": 1.0}, probe_size=4)],
            r"foreground masks.*`\(x, y, mask\)`.*'mask'.*`batch_adapter=`")


def test_guidance_through_hardsigmoid_names_the_module_at_setup(tmp_path):
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4)
    refused(tmp_path, UserModule(net), [AttentionGuidance("net.features.1", {"attention_mining": 1.0}, probe_size=4)],
            r"cannot train through Hardsigmoid modules.*second derivative.*choose a layer after the last of them")


def test_metric_keys_the_module_does_not_log_are_named_with_the_logged_ones(tmp_path):
    monitor = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2)  # default "val/acc"
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    with pytest.warns(UserWarning, match=r"`val_acc_key='val/acc'` \(did you mean `val_acc_key='val_acc'`\?\).*"
                                         r"'train_loss', 'val_acc', 'val_loss'"):
        trainer.fit(UserModule(tiny_net()), *loaders())


def test_two_monitors_of_one_class_log_and_write_apart(tmp_path):
    a = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val_acc")
    b = AnomalyFilterMonitor("net.4", probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val_acc")
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert a.log_prefix == "interp/net.2" and b.log_prefix == "interp/net.4"
    assert "interp/net.2/anomaly/count" in trainer.callback_metrics
    assert "interp/net.4/anomaly/count" in trainer.callback_metrics
    assert a.resolve_report_path(trainer) != b.resolve_report_path(trainer)
    assert os.path.isfile(a.resolve_report_path(trainer)) and os.path.isfile(b.resolve_report_path(trainer))


def test_two_monitors_that_would_still_collide_are_refused(tmp_path):
    a = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, log_prefix="mine")
    b = AnomalyFilterMonitor("net.4", probe_size=8, k_max=2, min_cluster_size=2, log_prefix="mine")
    refused(tmp_path, UserModule(tiny_net()), [a, b], r"pass `log_prefix=` to one of them")


def test_same_layers_in_another_mode_get_the_mode_in_their_prefix(tmp_path):
    a = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val_acc")
    b = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val_acc",
                             mode="sketch", num_projections=4)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert (a.log_prefix, b.log_prefix) == ("interp/net.2+pooled", "interp/net.2+sketch")


def test_without_a_logger_files_go_under_default_root_dir(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    probe = Batch(torch.rand(10, 3, 32, 32), torch.randint(0, 4, (10,)))
    monitor = AnomalyFilterMonitor("net.2", probe=probe, k_max=2, min_cluster_size=2, val_acc_key="val_acc",
                                   val_loss_key="val_loss")
    root = tmp_path / "root"
    trainer = make_trainer(root, logger=False, callbacks=[monitor, InterpReport()], max_epochs=1,
                           limit_train_batches=1, limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert list(cwd.iterdir()) == []
    report = json.loads((root / "anomaly_report.json").read_text())
    assert report["settings"]["probe_size"] == 10  # an explicit probe of 10, not the default 512
    assert "probe of 10 samples" in (root / "interp_report" / "index.html").read_text()


class SavedUserModule(UserModule):
    """A user module ``scan``/``prune`` can rebuild from its checkpoint (hyperparameters saved)."""

    def __init__(self, width: int = 8):
        super().__init__(tiny_net())
        self.save_hyperparameters()


def test_cli_prune_on_a_user_class_with_model_attr(tmp_path, capsys):
    from lightning_interp.cli import main
    from lightning_interp.scores import FilterScores

    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=1, limit_val_batches=1,
                           enable_checkpointing=False)
    trainer.fit(SavedUserModule(), *loaders())
    ckpt = str(tmp_path / "user.ckpt")
    trainer.save_checkpoint(ckpt)
    report = FilterScores({}, {"net.2": [1, 2]}, "given").save(tmp_path / "report.json")
    out = str(tmp_path / "pruned.pt")
    args = ["prune", ckpt, "--model_class", "test_user_models.SavedUserModule", "--report", report, "--out", out,
            "--input-shape", "2,3,32,32"]
    with pytest.raises(SystemExit, match=r"--model_attr 'model' is not an nn.Module attribute.*\['net'\]"):
        main(args)
    main([*args, "--model_attr", "net"])
    net, summary = load_pruned(out)
    assert net[0].out_channels == 6 and net(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert summary["latency_ms_before"] > 0 and summary["latency_ms_after"] > 0
    assert '"latency_ms_after"' in capsys.readouterr().out
