"""lightning_interp.callbacks.guidance: AttentionGuidance adds the same terms as a hand-written
training_step, and refuses bad weights and manual optimisation."""

import copy

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from lightning_interp.batch import default_batch_adapter
from lightning_interp.callbacks import AttentionGuidance
from lightning_interp.data import ShapesDataModule
from lightning_interp.losses import guidance_terms
from lightning_interp.models import ImageClassifier, SimpleCNN


class GuidedByHand(ImageClassifier):
    """The reference: the same terms added inside training_step."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        terms = guidance_terms(self, "model.relu3", default_batch_adapter(batch), WEIGHTS)
        return loss + sum(WEIGHTS[n] * t for n, t in terms.items())


WEIGHTS = {"attention_mining": 0.5, "attention_supervision": 2.0, "rrr": 0.1}


def test_callback_step_equals_loss_in_training_step(tmp_path):
    data = ShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=8, image_size=16)

    def fit(module, callbacks):
        trainer = make_trainer(tmp_path, logger=False, callbacks=callbacks, max_epochs=1, limit_train_batches=1,
                               limit_val_batches=0, enable_checkpointing=False)
        pl.seed_everything(1)
        trainer.fit(module, datamodule=data)
        return module

    pl.seed_everything(0)
    base = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    start = copy.deepcopy(base.state_dict())
    guided = fit(base, [AttentionGuidance("model.relu3", WEIGHTS, probe_size=8)])
    assert "training_step" not in vars(guided), "the wrapper is removed at teardown"
    by_hand = GuidedByHand(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    by_hand.load_state_dict(start)
    by_hand = fit(by_hand, [])
    plain = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)), optimizer="sgd", lr=0.1)
    plain.load_state_dict(start)
    plain = fit(plain, [])
    for (name, a), b in zip(guided.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert any(not torch.allclose(a, c) for a, c in zip(guided.state_dict().values(), plain.state_dict().values()))


class Manual(ImageClassifier):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.automatic_optimization = False


def test_guidance_refuses_bad_setups(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        AttentionGuidance("model.relu3", {"rrr": -1.0})
    with pytest.raises(ValueError, match="attention_mining"):
        AttentionGuidance("model.relu3", {"gain": 1.0})
    data = ShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=8, image_size=16)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[AttentionGuidance("model.relu3", {"rrr": 1.0})])
    with pytest.raises(ValueError, match="automatic optimisation"):
        trainer.fit(Manual(SimpleCNN(in_channels=3, num_classes=4)), datamodule=data)


def test_guidable_layers_against_the_pooled_masks_by_hand():
    # SimpleCNN at 16x16: relu1 16x16, pool1 8x8, relu2 8x8, pool2 4x4, relu3 4x4, gap 1x1. A box covering
    # pixels 2..13 touches every cell of a 4x4 grid (cells of 4 pixels) but leaves the border cells of 8x8
    # and 16x16 free: by hand, cam_background works at 8x8 and finer only.
    from lightning_interp.callbacks.guidance import guidable_layers

    model = ImageClassifier(SimpleCNN(in_channels=3, num_classes=3, width=(4, 8, 8)))
    mask = torch.zeros(2, 1, 16, 16, dtype=torch.bool)
    mask[:, :, 2:14, 2:14] = True
    reasons, grids = guidable_layers(model, torch.rand(2, 3, 16, 16), {"cam_background": 1.0}, mask)
    ok = {n for n, why in reasons.items() if not why}
    assert {n: grids[n] for n in ok} == {n: g for n, g in grids.items() if g[0] >= 8}
    assert "model.relu3" in grids and "no background cell" in reasons["model.relu3"]
    everywhere = torch.ones_like(mask)
    reasons, _ = guidable_layers(model, torch.rand(2, 3, 16, 16), {"rrr": 1.0}, everywhere)
    assert all("cover every pixel" in why for n, why in reasons.items() if n in grids)
