"""Training set-ups users have: each works with every callback (or is refused with a message)."""

import lightning.pytorch as pl
import pytest
import torch
from callback_factories import FACTORIES, exported_callback_classes, make_callbacks
from conftest import make_trainer

from lightning_interp.callbacks import AnomalyFilterMonitor, FilterMasking, InterpCallback
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN

# Variants beyond the one instance per exported class that `make_callbacks` builds.
EXTRA = {
    "anomaly_sketch": lambda: AnomalyFilterMonitor("model.relu3", probe_size=32, k_max=4, mode="sketch", num_projections=8),
    "masking_eval_only": lambda: FilterMasking(filters={"model.relu3": [0, 1]}, when="eval_only"),
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


def test_every_exported_callback_has_a_factory():
    exported = exported_callback_classes()
    assert AnomalyFilterMonitor in exported and InterpCallback not in exported
    missing = [cls.__name__ for cls in exported if cls not in FACTORIES]
    assert not missing, f"add a factory to tests/callback_factories.py for {missing}"


def all_callbacks():
    made = make_callbacks()
    return list(made.values()) + [make() for make in EXTRA.values()]


@pytest.mark.parametrize("setup", list(SETUPS))
def test_every_callback_in_each_setup(tmp_path, shapes, setup, recwarn):
    pl.seed_everything(0)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    callbacks = all_callbacks()
    trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=2, **SETUPS[setup])
    trainer.fit(module, datamodule=shapes)
    assert trainer.global_step > 0
    skipped = [str(w.message) for w in recwarn if "skipped" in str(w.message) or "did not" in str(w.message)]
    assert not skipped, skipped
    monitors = [cb for cb in callbacks if isinstance(cb, InterpCallback) and type(cb).__name__ != "AttentionGuidance"]
    assert all(cb.history for cb in monitors), [type(c).__name__ for c in monitors if not c.history]


def test_channels_last_model(tmp_path, shapes, recwarn):
    pl.seed_everything(0)
    net = SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)).to(memory_format=torch.channels_last)
    module = ChannelsLast(net)
    callbacks = all_callbacks()
    make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1).fit(module, datamodule=shapes)
    monitors = [cb for cb in callbacks if isinstance(cb, InterpCallback) and type(cb).__name__ != "AttentionGuidance"]
    assert all(cb.history for cb in monitors)
    assert not [w for w in recwarn if "skipped" in str(w.message) or "did not" in str(w.message)]
