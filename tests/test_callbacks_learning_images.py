import csv
import glob
import os

import lightning.pytorch as pl
import pytest
import torch
from conftest import make_trainer
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from lightning_interp.callbacks import LearningImageLogger
from lightning_interp.data import ShapesDataModule
from lightning_interp.models import ImageClassifier, SimpleCNN


def classifier(in_channels=1):
    pl.seed_everything(0)
    return ImageClassifier(SimpleCNN(in_channels=in_channels), lr=1e-3)


def read_csv(logger):
    with open(os.path.join(logger.log_dir, "metrics.csv")) as fh:
        return list(csv.DictReader(fh))


def test_fit_with_wandb_offline_and_csv(tmp_path, digits):
    wandb_logger = WandbLogger(project="interp-test", save_dir=str(tmp_path), offline=True)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    cb = LearningImageLogger(["model.relu1", "model.conv3", "model.fc1"], probe_size=16, num_images=4, rectify=False)
    trainer = make_trainer(tmp_path, logger=[wandb_logger, csv_logger], callbacks=[cb])
    trainer.fit(classifier(), datamodule=digits)
    run_dir = wandb_logger.experiment.dir
    wandb_logger.experiment.finish()

    images = glob.glob(os.path.join(run_dir, "media", "images", "**", "*.png"), recursive=True)
    # 3 layers x 2 epochs, one grid each.
    assert len(images) == 6, images
    assert any("model.conv3" in p for p in images)
    rows = read_csv(csv_logger)
    key = "interp/nns/model.conv3/activation_count"
    values = [float(r[key]) for r in rows if r.get(key)]
    assert len(values) == 2 and all(v > 0 for v in values)
    intensity = [float(r["interp/nns/model.fc1/activation_intensity"]) for r in rows if r.get(key)]
    assert all(v > 0 for v in intensity)
    assert [h["epoch"] for h in cb.history] == [0, 1]
    assert trainer.callback_metrics[key].item() == pytest.approx(values[-1])


def test_png_files_without_image_logger_and_dict_batches(tmp_path):
    data = ShapesDataModule(num_train=64, num_val=32, num_test=16, batch_size=32)
    csv_logger = CSVLogger(str(tmp_path), name="csv")
    cb = LearningImageLogger("model.relu2", probe_size=8, num_images=2, top_filters=2, every_n_epochs=2,
                             thesis_neurons=8)
    trainer = make_trainer(tmp_path, logger=csv_logger, callbacks=[cb], max_epochs=4)
    trainer.fit(classifier(in_channels=3), datamodule=data)
    pngs = sorted(glob.glob(os.path.join(csv_logger.log_dir, "interp_images", "**", "*.png"), recursive=True))
    assert [os.path.basename(p) for p in pngs] == ["epoch=1.png", "epoch=3.png"]
    assert [h["epoch"] for h in cb.history] == [1, 3]
    assert 0 <= cb.history[0]["interp/nns/model.relu2/thesis_activation_count"] <= 1


def test_bad_layer_fails_before_training(tmp_path, digits):
    cb = LearningImageLogger("model.conv9")
    module = classifier()
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb])
    with pytest.raises(ValueError, match="model.conv1"):
        trainer.fit(module, datamodule=digits)
    assert trainer.global_step == 0


@pytest.mark.parametrize(
    "probe,match",
    [
        (torch.utils.data.TensorDataset(torch.zeros(0, 1, 16, 16), torch.zeros(0)), "empty"),
        (torch.utils.data.TensorDataset(torch.zeros(4, 1, 16, 16), torch.zeros(4)), "probe_size"),
        ((torch.zeros(4, 16, 16, dtype=torch.uint8),), "floating-point"),
    ],
)
def test_bad_probe_fails_before_training(tmp_path, digits, probe, match):
    cb = LearningImageLogger("model.conv1", probe=probe, probe_size=8)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb])
    with pytest.raises((ValueError, TypeError), match=match):
        trainer.fit(classifier(), datamodule=digits)
    assert trainer.global_step == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="every_n_epochs"):
        LearningImageLogger("model.conv1", every_n_epochs=0)
    with pytest.raises(ValueError, match="probe_split"):
        LearningImageLogger("model.conv1", probe_split="test")
    with pytest.raises(ValueError, match="layers"):
        LearningImageLogger([])
    with pytest.raises(ValueError, match="thesis_neurons"):
        LearningImageLogger("model.conv1", thesis_neurons=-1)


def test_failing_scan_warns_and_training_goes_on(tmp_path, digits):
    wrong = (torch.randn(4, 3, 16, 16),)  # three channels for a one-channel model
    cb = LearningImageLogger("model.conv1", probe=wrong, probe_size=4)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb])
    with pytest.warns(UserWarning, match="skipped its scan"):
        trainer.fit(classifier(), datamodule=digits)
    assert trainer.global_step == 6 and cb.history == []
    strict = LearningImageLogger("model.conv1", probe=wrong, probe_size=4, strict=True)
    with pytest.raises(RuntimeError):
        make_trainer(tmp_path, logger=False, callbacks=[strict]).fit(classifier(), datamodule=digits)


def test_history_survives_checkpoint_resume(tmp_path, digits):
    cb = LearningImageLogger("model.conv2", probe_size=8, num_images=0)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb], max_epochs=2)
    trainer.fit(classifier(), datamodule=digits)
    ckpt = os.path.join(tmp_path, "mid.ckpt")
    trainer.save_checkpoint(ckpt)

    resumed = LearningImageLogger("model.conv2", probe_size=8, num_images=0)
    trainer2 = make_trainer(tmp_path, logger=False, callbacks=[resumed], max_epochs=3)
    trainer2.fit(classifier(), datamodule=digits, ckpt_path=ckpt)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    assert resumed.history[:2] == cb.history
    assert resumed.probe_indices == cb.probe_indices
    assert resumed.state_key == cb.state_key != LearningImageLogger("model.conv3").state_key


def test_nan_in_a_scan_is_skipped_with_a_warning(tmp_path, digits):
    nan_probe = (torch.full((4, 1, 16, 16), float("nan")),)
    cbs = [LearningImageLogger("model.conv2", probe=nan_probe, probe_size=4, num_images=0)]
    trainer = make_trainer(tmp_path, logger=False, callbacks=cbs, max_epochs=1)
    with pytest.warns(UserWarning, match="skipped its scan.*non-finite"):
        trainer.fit(classifier(), datamodule=digits)
    assert trainer.global_step == 3 and cbs[0].history == []


def test_unwritable_log_dir_warns_not_crashes(tmp_path, digits):
    logger = CSVLogger(str(tmp_path), name="csv")
    os.makedirs(logger.log_dir)
    # A file where the image folder should go: writing fails for any user, root included.
    open(os.path.join(logger.log_dir, "interp_images"), "w").close()
    cb = LearningImageLogger("model.conv2", probe_size=4, num_images=2)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[cb], max_epochs=1)
    with pytest.warns(UserWarning, match="could not write"):
        trainer.fit(classifier(), datamodule=digits)
    assert trainer.global_step == 3 and len(cb.history) == 1


def test_max_filters_below_top_filters_counts_only_the_scanned(tmp_path, digits):
    from lightning_interp.metrics.tip import avou
    from lightning_interp.nns import filter_learning_images, knowledge_quantity, layer_activations

    cb = LearningImageLogger("model.relu2", probe_size=8, num_images=2, top_filters=4, max_filters=2, strict=True)
    trainer = make_trainer(tmp_path, logger=False, callbacks=[cb], max_epochs=1)
    module = classifier()
    trainer.fit(module, datamodule=digits)
    assert "interp/nns/model.relu2/learning_images" in cb.figures  # the four shown filters were all computed
    x = cb.probe.x
    top2 = avou(layer_activations(module, "model.relu2", x)).argsort(descending=True)[:2]
    kq = knowledge_quantity(filter_learning_images(module, "model.relu2", x, filters=top2), x)
    assert cb.history[-1]["interp/nns/model.relu2/activation_count"] == pytest.approx(kq.activation_count.mean().item(), rel=1e-5)
