"""lightning_interp.callbacks.fq: FeatureQuantityMonitor logs the layer statistics of its scan (against
NumPy); without foreground masks it warns once and skips (TIPMonitor beside it warns once and logs what
needs no mask). Its logged keys are checked in test_callbacks_tip.py's fit with both monitors."""

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import make_trainer

from lightning_interp.callbacks import FeatureQuantityMonitor, TIPMonitor
from lightning_interp.data import ShapesDataModule
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


def test_logged_layer_statistics_are_those_of_the_scan(tmp_path):
    # The last scan runs on the final weights: recompute the layer's neuron FQ and activations and check
    # the logged mean, variance and r against NumPy.
    pl.seed_everything(0)
    data = ShapesDataModule(num_train=16, num_val=8, num_test=8, batch_size=8, image_size=16)
    fq = FeatureQuantityMonitor(["model.relu2", "model.relu3"], probe_size=4, top_neurons=3, diversity_layers=[])
    trainer = make_trainer(tmp_path, logger=False, callbacks=[fq], max_epochs=1, limit_train_batches=1,
                           limit_val_batches=1)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=4, width=(4, 8, 8)))
    trainer.fit(module, datamodule=data)
    scan = [h for h in fq.history if "fit_end" not in h][-1]  # the last entry is the fit-end analysis
    for layer in ("model.relu2", "model.relu3"):
        r = fq.layer_fq(module, layer, fq.probe)
        q, a = r["neuron_fq"].double().numpy().ravel(), r["neuron_activation"].double().numpy().ravel()
        logged = {k.rsplit("/", 1)[1]: v for k, v in scan.items() if k.startswith(f"interp/fq/{layer}/")}
        assert logged["fq_mean"] == pytest.approx(q.mean(), abs=1e-6)
        assert logged["fq_variance"] == pytest.approx(q.var(), abs=1e-6)
        assert logged["r_activation_fq"] == pytest.approx(np.corrcoef(a, q)[0, 1], abs=1e-5)
        assert logged["filter_fq_mean"] == pytest.approx(r["filter_fq"].double().mean().item(), abs=1e-6)
        assert q.var() > 0
