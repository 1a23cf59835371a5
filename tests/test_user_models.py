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
import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
import torchvision
from conftest import make_trainer
from lightning.pytorch.callbacks import EarlyStopping
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
from lightning_interp.pruning import load_pruned, prune_filters, prune_target
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
        x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else (batch[0], batch[1])
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


def small_convnext() -> nn.Module:
    """convnext_tiny's modules (stem, CNBlocks with their channels-last LayerNorm/Linear/GELU, layer scale,
    LayerNorm2d downsampling) at a quarter of its width and one block per stage: seconds, not half a minute."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    stages = [CNBlockConfig(24, 48, 1), CNBlockConfig(48, 96, 1), CNBlockConfig(96, 192, 1), CNBlockConfig(192, None, 1)]
    return ConvNeXt(stages, num_classes=4)


#: network, the layer a user would watch (a block where the network has them), extra checks.
MODELS = {
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=4), "net.features.1"),
    "vgg11_bn_narrow": (small_vgg, "net.features.2"),
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=4), "net.layer1.0"),
    "efficientnet_b0": (lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=4), "net.features.1.0"),
    "densenet121": (lambda: torchvision.models.densenet121(weights=None, num_classes=4),
                    "net.features.denseblock1.denselayer1"),
    # Three networks a user tried that the matrix did not name (issue 23), on 32 x 32 inputs: a residual block
    # with squeeze-excitation, the first conv block before channel-shuffling blocks (whose concatenated outputs
    # no single conv makes), and ConvNeXt's stem (its blocks are channels-last inside).
    "regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(weights=None, num_classes=4),
                       "net.trunk_output.block1.block1-0"),
    "shufflenet_v2_x0_5": (lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4), "net.conv1"),
    "convnext_tiny_narrow": (lambda: small_convnext(), "net.features.0"),
}


#: Networks Torch-Pruning cannot trace (ShuffleNet's channel shuffle): PruneFlaggedFilters is refused, see below.
NOT_PRUNABLE = {"shufflenet_v2_x0_5"}


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
        InterpReport(),
    ]
    if name not in NOT_PRUNABLE:
        # The two highest anomaly scores of the layer, flagged or not: every prunable network gets pruned.
        callbacks.insert(-1, PruneFlaggedFilters(monitor=monitor, select=Selection(amount=2), model_attr="net",
                                                 evaluate=False))
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
    if name in NOT_PRUNABLE:
        return
    target = prune_target(module.net, layer[len("net."):], x)
    pruned, summary = prune_filters(module.net, {target: [0, 1]}, x)
    assert pruned(x).shape == (2, 4) and summary.params_after < summary.params_before
    assert summary.latency_ms_before > 0 and summary.latency_ms_after > 0
    pruner = next(cb for cb in callbacks if isinstance(cb, PruneFlaggedFilters))
    net, saved = load_pruned(pruner.saved_to, build())  # the callback pruned the two selected filters at fit end
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


def test_prune_refuses_a_network_torch_pruning_cannot_trace_before_training(tmp_path):
    net = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=4)
    monitor = AnomalyFilterMonitor("net.conv1", probe_size=8, k_max=2, min_cluster_size=2)
    refused(tmp_path, UserModule(net), [monitor, PruneFlaggedFilters(monitor=monitor, model_attr="net")],
            r"Torch-Pruning cannot trace the channel dependencies of ShuffleNetV2 \(ZeroDivisionError.*channel shuffle")


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


def test_a_channels_last_layer_is_refused_with_the_channels_first_layers_near_it(tmp_path):
    # ConvNeXt's GELU outputs (B, H, W, C): read as channels it would be scanned as H "filters" (issue 23).
    net = torchvision.models.convnext_tiny(weights=None, num_classes=4)
    refused(tmp_path, UserModule(net), [AnomalyFilterMonitor("net.features.3.2.block.4", probe_size=8, k_max=2,
                                                             min_cluster_size=2)],
            r"filters on dim 1.*'net.features.3.2.block.4': shape \(2, 4, 4, 768\) with its 768 channels last.*"
            r"nearest first: 'net.features.3.2.block', 'net.features.3.2.block.0', 'net.features.3.2.block.6'")


def test_guidance_refuses_a_1x1_map(tmp_path):
    refused(tmp_path, UserModule(tiny_net()), [AttentionGuidance("net.5", {"attention_mining": 1.0}, probe_size=4)],
            r"outputs \(2, 8, 1, 1\), not a spatial map.*1x1.*Layers that pass every check: .*'net.4' \(32x32\)")


def test_guidance_without_masks_says_how_to_give_them(tmp_path):
    refused(tmp_path, UserModule(tiny_net()), [AttentionGuidance("net.2", {"rrr": 1.0}, probe_size=4)],
            r"foreground masks.*`\(x, y, mask\)`.*'mask'.*`batch_adapter=`")


def test_guidance_through_hardsigmoid_names_the_module_and_never_suggests_a_refused_layer(tmp_path):
    # On CIFAR-sized inputs every layer after MobileNetV3's last Hardsigmoid is 1x1 (issue 23): no layer passes
    # both checks, and the refusal says so instead of pointing at a layer the 1x1 check refuses.
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4)
    refused(tmp_path, UserModule(net), [AttentionGuidance("net.features.1", {"attention_mining": 1.0}, probe_size=4)],
            r"no second derivative for the Hardsigmoid modules after it.*'net.features.11.block.2.scale_activation'"
            r".*No layer of UserModule passes every check.*nn.Hardsigmoid -> nn.Sigmoid")


def sigmoid_mobilenet() -> nn.Module:
    net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4)
    for name, module in list(net.named_modules()):
        if isinstance(module, nn.Hardsigmoid):
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Sigmoid())
    return net


def centred_box_loaders():
    ds = images(16)
    mask = torch.zeros(16, 1, 32, 32, dtype=torch.bool)
    mask[:, :, 8:24, 8:24] = True  # a centred box: it touches every cell of a 2x2 grid
    data = TensorDataset(ds.tensors[0], ds.tensors[1], mask)
    return DataLoader(data, batch_size=8)


def test_guidance_term_that_cannot_be_non_zero_is_refused_with_a_layer_that_works(tmp_path):
    # At net.features.9.block.0.2 (2x2 at 32x32) the centred boxes leave no background cell: cam_background
    # would be exactly 0 at every step (issue 23). The refusal names layers that pass every check, and the
    # first one it names trains with a non-zero term.
    weights = {"cam_background": 1.0}
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=1, enable_checkpointing=False,
                           callbacks=[AttentionGuidance("net.features.9.block.0.2", weights, probe_size=8)])
    with pytest.raises(ValueError, match=r"at its 2x2 grid the probe's foreground masks leave no background cell in "
                                         r"any of its 8 samples, so cam_background would be 0.*pass every check: ") as err:
        trainer.fit(UserModule(sigmoid_mobilenet()), centred_box_loaders())
    suggested = re.findall(r"'([\w.]+)' \((\d+)x(\d+)\)", str(err.value).split("pass every check:")[1])
    assert suggested and all(int(h) * int(w) >= 16 for _, h, w in suggested)  # 4x4 and finer leave background
    cb = AttentionGuidance(suggested[-1][0], weights, probe_size=8)
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=1, enable_checkpointing=False,
                           callbacks=[cb])
    trainer.fit(UserModule(sigmoid_mobilenet()), centred_box_loaders())
    assert trainer.callback_metrics["interp/guidance/cam_background"] > 0


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
    assert (a.log_prefix, b.log_prefix) == ("interp/net.2+pooled", "interp/net.2+sketch+4")  # 4 projections


def test_early_stopping_on_the_single_monitor_key_with_two_monitors_is_refused_naming_the_keys(tmp_path):
    # The README's EarlyStopping with two monitors lost the run after epoch 0 (issue 23): now refused at setup,
    # with the keys to pass; with one of them the run trains its two epochs.
    def monitors():
        return [AnomalyFilterMonitor(layer, probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val_acc",
                                     val_loss_key="val_loss", alarm_min_epoch=0) for layer in ("net.2", "net.4")]

    stop = EarlyStopping(monitor="interp/anomaly/overfit_alarm", mode="max", stopping_threshold=0.5)
    refused(tmp_path, UserModule(tiny_net()), [*monitors(), stop],
            r"EarlyStopping\(monitor='interp/anomaly/overfit_alarm'\).*2 AnomalyFilterMonitor.*Pass monitor="
            r"'interp/net.2/anomaly/overfit_alarm' \(layers \['net.2'\]\) or 'interp/net.4/anomaly/overfit_alarm'.*"
            r"`log_prefix='interp'`")
    stop = EarlyStopping(monitor="interp/net.4/anomaly/overfit_alarm", mode="max", stopping_threshold=0.5)
    a, b = monitors()
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b, stop], max_epochs=2, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert trainer.current_epoch == 2 and [h["epoch"] for h in b.history] == [0, 1]
    # Or one of them keeps the plain keys the README names.
    a, b = monitors()
    a = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, log_prefix="interp")
    stop = EarlyStopping(monitor="interp/anomaly/overfit_alarm", mode="max", stopping_threshold=0.5)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b, stop], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert "interp/anomaly/overfit_alarm" in trainer.callback_metrics


def test_log_prefix_lets_two_monitors_watch_one_layer_and_resume_apart(tmp_path):
    # Lightning refused two monitors of one layer ("callback.state_key must be unique") whatever the
    # log_prefix (issue 23); now the prefix names the state, and each resumes its own history.
    def monitors():
        return [AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, **kw)
                for kw in ({"min_cluster_size": 2}, {"log_prefix": "second", "min_cluster_size": 3})]

    a, b = monitors()
    assert a.state_key != b.state_key and "second" in b.state_key
    assert a.state_key == "AnomalyFilterMonitor{'layers': ('net.2',), 'mode': 'pooled'}"  # as earlier releases wrote
    trainer = make_trainer(tmp_path, logger=False, callbacks=[a, b], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders())
    assert a.log_prefix == "interp" and b.log_prefix == "second"  # the other keeps the README's keys
    assert "second/anomaly/count" in trainer.callback_metrics and "interp/anomaly/count" in trainer.callback_metrics
    ckpt = str(tmp_path / "two.ckpt")
    trainer.save_checkpoint(ckpt)
    c, d = monitors()
    trainer = make_trainer(tmp_path, logger=False, callbacks=[c, d], max_epochs=2, limit_train_batches=1,
                           limit_val_batches=1, enable_checkpointing=False)
    trainer.fit(UserModule(tiny_net()), *loaders(), ckpt_path=ckpt)
    assert [h["epoch"] for h in c.history] == [h["epoch"] for h in d.history] == [0, 1]


def test_two_monitors_differing_only_in_grid_have_distinct_state_keys():
    a = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2)
    b = AnomalyFilterMonitor("net.2", probe_size=8, k_max=2, min_cluster_size=2, grid=4)
    assert a.state_key != b.state_key and "'grid': 4" in b.state_key


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
    with pytest.raises(SystemExit, match=r"`model_attr='model'` \(`--model_attr`.*nn.Module attributes: \['net'\]"):
        main(args)
    capsys.readouterr()
    main([*args, "--model_attr", "net"])
    module, summary = load_pruned(out, SavedUserModule())
    net = module.net
    assert net[0].out_channels == 6 and net(torch.rand(2, 3, 32, 32)).shape == (2, 4)
    assert summary["latency_ms_before"] > 0 and summary["latency_ms_after"] > 0
    # A short summary on the terminal (it printed ~150 lines of JSON), the full record in a file; whole MACs.
    printed = capsys.readouterr().out
    record = json.loads((tmp_path / "pruned_summary.json").read_text())
    assert record["pruned"] == {"0": [1, 2]} and isinstance(record["macs_after"], int)
    assert len(printed.splitlines()) <= 8 and "0: 8 -> 6 channels" in printed
    assert f"MACs {record['macs_before']:,} -> {record['macs_after']:,}" in printed and "_summary.json" in printed

    # `scan` takes the keys its warning names (it had no such option).
    args = ["scan", ckpt, "--model_class", "test_user_models.SavedUserModule", "--layers", "[net.2]",
            "--datamodule", "shapes", "--datamodule.num_train", "16", "--datamodule.num_val", "16",
            "--datamodule.num_test", "8", "--datamodule.batch_size", "16", "--monitors", "[anomaly]",
            "--probe_size", "16", "--min_cluster_size", "2", "--out", str(tmp_path / "scan"), "--progress", "false"]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*did not log.*")
        main([*args, "--val_acc_key", "val_acc", "--val_loss_key", "val_loss"])
    report = json.loads((tmp_path / "scan" / "anomaly_report.json").read_text())
    assert report["wt_epoch"] == 0 and report["history"][0]["val_acc"] is not None


def test_a_wrong_accuracy_key_and_a_skipped_scan_never_print_none_and_each_scan_says_it_ran(tmp_path, caplog):
    # "WT epoch None had None anomaly filters" / "final epoch 0 has 0.0" after a skipped scan (issue 23); and a
    # run with the progress bar off printed nothing for minutes.
    import logging

    class FailsSecondScan(AnomalyFilterMonitor):
        def scan(self, trainer, pl_module, probe):
            if trainer.current_epoch == 1:
                raise RuntimeError("boom")
            return super().scan(trainer, pl_module, probe)

    monitor = FailsSecondScan("net.2", probe_size=8, k_max=2, min_cluster_size=2, val_acc_key="val/acc",
                              val_loss_key="val_loss")
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor, InterpReport()], max_epochs=2,
                           limit_train_batches=1, limit_val_batches=1, enable_checkpointing=False)
    with caplog.at_level(logging.INFO), pytest.warns(UserWarning, match="skipped its scan at epoch 1"):
        trainer.fit(UserModule(tiny_net()), *loaders())
    text = monitor.summary_text()
    assert "None" not in text and "0.0" not in text
    assert text.startswith("no WT epoch (no validation accuracy was logged under `val_acc_key='val/acc'`)")
    assert "the last scan (epoch 0) found" in text and "the scans of epochs [1] after it were skipped" in text
    body = (tmp_path / "interp_report" / "index.html").read_text().split("<body")[1].split("<table")[0]
    assert "the last scan (epoch 0) found" in body and "None" not in body
    log = caplog.text
    assert "scan at epoch 0 done in" in log and "scan at epoch 1 skipped in" in log and text in log
