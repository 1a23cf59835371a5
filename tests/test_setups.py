"""Training set-ups users have: each works with every callback (or is refused with a message)."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FeatureQuantityMonitor,
    FilterMasking,
    LearningImageLogger,
    TIPMonitor,
)
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN

CALLBACKS = {
    "learning_images": lambda: LearningImageLogger("model.relu2", probe_size=8, num_images=2),
    "anomaly": lambda: AnomalyFilterMonitor("model.relu3", probe_size=32, k_max=4, num_outlier_images=2),
    "anomaly_sketch": lambda: AnomalyFilterMonitor("model.relu3", probe_size=32, k_max=4, mode="sketch", num_projections=8),
    "tip": lambda: TIPMonitor("model.relu3", probe_size=8, aipc_fractions=[0.5], top_filters=1),
    "fq": lambda: FeatureQuantityMonitor("model.relu3", probe_size=8, top_neurons=4, num_diverse=2),
    "guidance": lambda: AttentionGuidance("model.relu3", {"attention_supervision": 1.0, "rrr": 0.1}, probe_size=8),
    "masking": lambda: FilterMasking(filters={"model.relu3": [0, 1]}, mode="eval_only"),
}

SETUPS = {
    "bf16-mixed": dict(precision="bf16-mixed"),
    "grad-accumulation": dict(accumulate_grad_batches=2),
    "no-validation": dict(limit_val_batches=0),
    "fast_dev_run": dict(fast_dev_run=True),
    "limit_train_batches": dict(limit_train_batches=0.5),
}


class ChannelsLast(ImageClassifier):
    def forward(self, x):
        return self.model(x.contiguous(memory_format=torch.channels_last))


@pytest.fixture(scope="module")
def shapes():
    return ShapesDataModule(num_train=48, num_val=32, num_test=8, batch_size=16, image_size=16)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_callback_in_each_setup(tmp_path, shapes, setup, recwarn):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    callbacks = [make() for make in CALLBACKS.values()]
    trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=2, **SETUPS[setup])
    trainer.fit(module, datamodule=shapes)
    assert trainer.global_step > 0
    skipped = [str(w.message) for w in recwarn if "skipped" in str(w.message) or "did not" in str(w.message)]
    assert not skipped, skipped
    monitors = [cb for name, cb in zip(CALLBACKS, callbacks) if name not in ("guidance", "masking")]
    assert all(cb.history for cb in monitors), [type(c).__name__ for c in monitors if not c.history]


def test_channels_last_model(tmp_path, shapes, recwarn):
    pl.seed_everything(0)
    net = SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)).to(memory_format=torch.channels_last)
    module = ChannelsLast(net)
    callbacks = [CALLBACKS[name]() for name in ("learning_images", "anomaly", "tip", "guidance")]
    make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1).fit(module, datamodule=shapes)
    assert all(cb.history for cb in callbacks[:3])
    assert not [w for w in recwarn if "skipped" in str(w.message)]
