"""Bad input is refused with a message naming what is valid — before the first training step
whenever a Trainer is involved (``trainer.global_step == 0``), in ``__init__`` otherwise."""

import inspect
import re

import pytest
import torch
from callback_factories import FACTORIES, exported_callback_classes
from conftest import make_trainer
from torch import nn
from torch.utils.data import TensorDataset

from lightning_interp.batch import Batch
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FeatureQuantityMonitor,
    FilterMasking,
    LearningImageLogger,
    TIPMonitor,
)
from lightning_interp.data import ShapesDataModule
from lightning_interp.losses import LOSSES
from lightning_interp.models import ImageClassifier, SimpleCNN


class WithOddModules(nn.Module):
    """SimpleCNN plus a module that outputs one number per sample and one that is never called."""

    def __init__(self):
        super().__init__()
        self.net = SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8))
        self.norm = Norm()
        self.unused = nn.ReLU()

    def forward(self, x):
        return self.net(x) + 0.0 * self.norm(x)[:, None]


class Norm(nn.Module):
    def forward(self, x):
        return x.flatten(1).norm(dim=1)  # (B,): no channel dimension


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataModule(num_train=32, num_val=16, num_test=8, batch_size=16, image_size=16)


def refused_before_training(tmp_path, data, callback, match, error=(ValueError, TypeError), module=None):
    module = module or ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[callback], max_epochs=1)
    with pytest.raises(error, match=match):
        trainer.fit(module, datamodule=data)
    assert trainer.global_step == 0


def _layer_argument(cls):
    params = inspect.signature(cls).parameters
    return "layers" if "layers" in params else "layer" if "layer" in params else None


LAYER_CALLBACKS = [cls for cls in exported_callback_classes() if _layer_argument(cls)]


@pytest.mark.parametrize("cls", LAYER_CALLBACKS, ids=lambda c: c.__name__)
def test_unknown_layer(tmp_path, shapes, cls):
    callback = FACTORIES[cls]({}, {_layer_argument(cls): "model.relu9"})
    refused_before_training(tmp_path, shapes, callback, r"'model.relu9'.*Closest valid choices: 'model.relu\d'")


def test_unknown_layer_in_filter_masking(tmp_path, shapes):
    refused_before_training(tmp_path, shapes, FilterMasking(filters={"model.conv9": [0]}), "Closest valid choices")


@pytest.mark.parametrize("layer", ["model.norm", "model.unused"])
@pytest.mark.parametrize("cls", [AnomalyFilterMonitor, TIPMonitor, FeatureQuantityMonitor, LearningImageLogger,
                                 AttentionGuidance], ids=lambda c: c.__name__)
def test_layer_without_filters(tmp_path, shapes, cls, layer):
    callback = FACTORIES[cls]({}, {_layer_argument(cls): layer})
    refused_before_training(tmp_path, shapes, callback, r"\(B, K, \.\.\.\).*Layers that do, nearest first: .*'model.net.conv1'",
                            module=ImageClassifier(WithOddModules()))


@pytest.mark.parametrize("split", ["train", "val"])
def test_probe_larger_than_the_dataset(tmp_path, shapes, split):
    cb = AnomalyFilterMonitor("model.relu3", probe_size=64, k_max=4, probe_split=split)
    refused_before_training(tmp_path, shapes, cb, r"`probe_size` <= the dataset size \((32|16)\) but got 64")


@pytest.mark.parametrize("mask,error,match", [
    (torch.ones(8, 1, 16, 16), TypeError, "boolean"),
    (torch.ones(8, 1, 15, 16, dtype=torch.bool), ValueError, r"\(B, 1 or C, H, W\) matching the inputs \(8, 3, 16, 16\)"),
    (torch.ones(8, 16, 16, dtype=torch.bool), ValueError, r"\(B, 1 or C, H, W\)"),
])
def test_foreground_masks_of_the_wrong_shape_or_type(tmp_path, shapes, mask, error, match):
    probe = Batch(torch.rand(8, 3, 16, 16), torch.zeros(8, dtype=torch.long), mask)
    refused_before_training(tmp_path, shapes, TIPMonitor("model.relu3", probe=probe, probe_size=8), match, error)


@pytest.mark.parametrize("filters,error,match", [
    ([3, 7], TypeError, r"map layer names to lists of filter indices"),
    ({"model.relu3": "3"}, TypeError, r"lists of filter indices"),
    ({"model.relu3": [1.5]}, TypeError, r"lists of filter indices"),
    ({"model.relu3": torch.ones(2, 2, dtype=torch.long)}, TypeError, r"tensor of shape \(2, 2\)"),
])
def test_filter_masks_of_the_wrong_type(filters, error, match):
    with pytest.raises(error, match=match):
        FilterMasking(filters=filters)


def test_filter_masks_out_of_range(tmp_path, shapes):
    refused_before_training(tmp_path, shapes, FilterMasking(filters={"model.relu3": [8]}), r"\[0, 7\]")


@pytest.mark.parametrize("x,match", [
    (torch.rand(8), r"shape \(B, C, H, W\) or \(B, D\)"),  # no batch dimension / not an image
    (torch.randint(0, 255, (8, 3, 16, 16), dtype=torch.uint8), "floating-point.*x.float\\(\\) / 255"),
    (torch.randint(0, 255, (8, 3, 16, 16)), "floating-point"),
])
def test_non_image_and_integer_inputs(tmp_path, shapes, x, match):
    cb = LearningImageLogger("model.relu2", probe=(x, torch.zeros(8, dtype=torch.long)), probe_size=8)
    refused_before_training(tmp_path, shapes, cb, match)


def test_integer_training_data(tmp_path):
    data = TensorDataset(torch.randint(0, 255, (32, 3, 16, 16), dtype=torch.uint8), torch.zeros(32, dtype=torch.long))
    cb = AnomalyFilterMonitor("model.relu3", probe_size=16, k_max=4)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb], max_epochs=1)
    with pytest.raises(TypeError, match="floating-point"):
        trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=16))
    assert trainer.global_step == 0


@pytest.mark.parametrize("kwargs,match", [
    ({"min_cluster_size": 40}, r"min_cluster_size"),
    ({"min_cluster_size": 1.5}, r"min_cluster_size"),
    ({"k_max": 1}, r"`k_max` to be an int >= 2 but got 1"),
    ({"probe_size": 5}, r"probe_size=5\): Expected more probe samples than `k_max` \+ 1"),
    ({"mode": "fast"}, r"\['exact', 'sketch', 'pooled'\]"),
])
def test_anomaly_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AnomalyFilterMonitor("model.relu3", **{"probe_size": 32, **kwargs})


@pytest.mark.parametrize("weights,match", [
    ({"rrr": -1.0}, r"non-negative loss weights but got \{'rrr': -1.0\}"),
    ({"gain": 1.0}, "loss names in " + re.escape(str(list(LOSSES)))),
    ({}, "Expected `weights` to map loss names"),
])
def test_guidance_loss_weights(weights, match):
    with pytest.raises(ValueError, match=match):
        AttentionGuidance("model.relu3", weights)


def test_a_pooled_grid_finer_than_the_inputs_is_refused_before_training(tmp_path, shapes):
    cb = AnomalyFilterMonitor("model.relu3", probe_size=16, k_max=3, mode="pooled", grid=32)
    refused_before_training(tmp_path, shapes, cb, r"grid.*no finer than the input's spatial size")
