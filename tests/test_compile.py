"""torch.compile: every exported callback works with a compiled network or a compiled LightningModule.

Dynamo skips forward hooks added after compilation, so scans run eagerly (``layers.eager``) and
FilterMasking makes dynamo guard on its hooks; layer names are given without ``_orig_mod``.

Backend ``aot_eager``: it goes through dynamo and aot_autograd like the default ``inductor`` (so
the hook and double-backward limits are the real ones) without inductor's code generation, which
takes about 20 s per graph on this CPU.
"""

import math

import lightning.pytorch as pl
import pytest
import torch
from callback_factories import make_callbacks
from conftest import make_trainer
from lightning.pytorch.callbacks import Callback

from lightning_interp.batch import default_batch_adapter
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    AttentionGuidance,
    FilterMasking,
    InterpCallback,
    PruneFlaggedFilters,
)
from lightning_interp.data import ShapesDataModule
from lightning_interp.layers import get_layer, list_layers
from lightning_interp.models import ImageClassifier, SimpleCNN


class MaskedOutputsAreConstant(Callback):
    """From epoch 1 every filter of relu3 is masked in evaluation (hooks added after the compiled
    forward first ran): the compiled forward's logits must no longer depend on the input."""

    def __init__(self):
        self.checked = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if trainer.current_epoch == 1:
            with torch.no_grad():
                logits = pl_module(default_batch_adapter(batch).x)  # the compiled forward
            assert torch.allclose(logits, logits[:1].expand_as(logits)), "masks did not reach the compiled code"
            self.checked += 1


def test_layer_names_resolve_without_orig_mod():
    net = torch.compile(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), backend="aot_eager")
    module = ImageClassifier(net)
    assert get_layer(module, "model.relu3") is get_layer(module, "model._orig_mod.relu3")
    assert "model.conv3" in list_layers(module) and not any("_orig_mod" in n for n in list_layers(module))


def fit_compiled(tmp_path, how, options, max_epochs=2, extra=()):
    torch._dynamo.reset()
    guards = torch._dynamo.config.skip_nnmodule_hook_guards
    pl.seed_everything(0)
    net = SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8))
    if how == "network":
        module = ImageClassifier(torch.compile(net, backend="aot_eager"))
    else:
        module = torch.compile(ImageClassifier(net), backend="aot_eager")
    made = make_callbacks(options)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[*made.values(), *extra], max_epochs=max_epochs)
    try:
        trainer.fit(module, datamodule=ShapesDataModule(num_train=48, num_val=16, num_test=8, batch_size=16, image_size=16))
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = guards
        torch._dynamo.reset()
    return made


@pytest.mark.parametrize("how", ["network", "lightning_module"])
def test_every_callback_with_a_compiled_model(tmp_path, how, recwarn):
    # The mask check needs a second epoch; once (on the compiled network) is enough.
    check = MaskedOutputsAreConstant()
    made = fit_compiled(tmp_path, how, {
        FilterMasking: {"monitor": None, "filters": {"model.relu3": list(range(8))}, "mode": "eval_only",
                        "start_epoch": 1 if how == "network" else 0},
        # Not "rrr": see test_rrr_guidance_with_a_compiled_network.
        AttentionGuidance: {"weights": {"attention_supervision": 1.0}},
        # Loose criteria: filters are flagged, so PruneFlaggedFilters prunes.
        AnomalyFilterMonitor: {"alpha": 0.0, "beta": 0.0, "theta": 0.0},
    }, max_epochs=2 if how == "network" else 1, extra=[check])
    assert check.checked > 0 or how != "network"
    problems = [str(w.message) for w in recwarn if "skipped" in str(w.message) or "did not" in str(w.message)]
    assert not problems, problems
    monitors = [cb for cb in made.values() if isinstance(cb, InterpCallback) and type(cb).__name__ != "AttentionGuidance"]
    assert all(cb.history for cb in monitors), [type(c).__name__ for c in monitors if not c.history]
    assert made[PruneFlaggedFilters].summary is not None, "filters were flagged and pruned"


class RecordMetrics(pl.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_rrr_guidance_with_a_compiled_network(tmp_path):
    record = RecordMetrics()
    fit_compiled(tmp_path, "network", {AttentionGuidance: {"weights": {"rrr": 0.1}}}, max_epochs=1, extra=[record])
    # The double backward through the compiled network ran and its penalty was added and logged.
    term = record.metrics.get("interp/guidance/rrr_epoch", record.metrics.get("interp/guidance/rrr"))
    assert term is not None, sorted(record.metrics)
    assert math.isfinite(term) and term > 0


def test_filter_masking_restores_the_dynamo_setting_it_changes():
    from lightning_interp.callbacks import FilterMasking

    before = torch._dynamo.config.skip_nnmodule_hook_guards
    try:
        torch._dynamo.config.skip_nnmodule_hook_guards = True
        module = ImageClassifier(torch.compile(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), backend="aot_eager"))
        cb = FilterMasking(filters={"model.relu3": [0]})
        cb.setup(None, module, "fit")
        assert torch._dynamo.config.skip_nnmodule_hook_guards is False  # masks must apply to compiled code
        cb.teardown(None, module, "fit")
        assert torch._dynamo.config.skip_nnmodule_hook_guards is True
    finally:
        torch._dynamo.config.skip_nnmodule_hook_guards = before
