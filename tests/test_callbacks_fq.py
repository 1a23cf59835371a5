"""lightning_interp.callbacks.fq: FeatureQuantityMonitor without foreground masks warns once and skips
(TIPMonitor beside it warns once and logs what needs no mask). Its logged keys are checked in
test_callbacks_tip.py's fit with both monitors."""

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer

from lightning_interp.callbacks import FeatureQuantityMonitor, TIPMonitor
from lightning_interp.models import ImageClassifier, SimpleCNN


def test_no_masks_warn_once_and_skip(tmp_path):
    pl.seed_everything(0)
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 10, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32)
    module = ImageClassifier(SimpleCNN(width=(4, 8, 8)))
    tip = TIPMonitor("model.relu3", probe_size=8, aipc_fractions=[1.0], top_filters=0)
    fq = FeatureQuantityMonitor("model.relu3", probe_size=8)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[tip, fq], max_epochs=2)
    with pytest.warns(UserWarning, match="no foreground masks") as record:
        trainer.fit(module, loader, loader)
    assert sum("no foreground masks" in str(w.message) for w in record) == 2  # once per monitor
    assert fq.history == [] and "interp/tip/model.relu3/mean" in tip.history[0]
    assert not any(k.startswith("interp/tip/model.relu3/fg_") for k in tip.history[0])
    # The skip is said once more in the HTML report, by each monitor's own words (InterpCallback.report_notes),
    # and is run progress in the state (a resumed run does not warn again).
    assert fq.report_notes() == [
        "Skipped because the probe has no foreground masks: feature quantity. Give masks as `(x, y, mask)` batches, "
        "dicts with a 'mask' entry, or with `batch_adapter=` (docs/guide/own_module.md)."]
    assert "filter types" in tip.report_notes()[0] and tip.state_dict()["warned_no_mask"] is True
