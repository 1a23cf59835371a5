"""Shared fixtures and helpers; where tests live.

A test of ``lightning_interp/<m>.py`` or ``lightning_interp/metrics/<m>.py`` lives in ``tests/test_<m>.py``,
a test of ``lightning_interp/callbacks/<m>.py`` in ``tests/test_callbacks_<m>.py``. Tests that exercise many
modules at once keep topic names (test_setups, test_ddp, test_resume, test_compile, test_user_models,
test_bad_input, test_recipes, test_properties_hypothesis, test_thesis, ...).
"""

import os

import pytest
import torch
from torch import nn

# Tests are offline: W&B writes runs to disk only.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def digits():
    from lightning_interp.data import DigitsDataModule

    return DigitsDataModule(image_size=16, batch_size=64, val_fraction=0.2)


def make_trainer(tmp_path, **kwargs):
    import lightning.pytorch as pl

    defaults = dict(
        default_root_dir=tmp_path,
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def randomise_bn(model):
    """Random BatchNorm statistics and affine parameters, so an eval-mode network is not near-identity there."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model


RECIPES = os.path.join(os.path.dirname(__file__), "..", "recipes")


def write_fake_imagefolder(root, classes=("airplane", "cat", "dog"), n=(8, 4), size=32):
    """CIFAR-10's exported on-disk layout: <root>/<split>/<class>/<i>.png, 32×32 RGB."""
    from lightning_interp.data import write_toy_imagefolder

    return write_toy_imagefolder(str(root), classes=classes, images=n, size=size)


def shrink(config: dict, tmp_path, data_root: str | None = None) -> dict:
    """The recipe at a size CI can run: two short epochs, small probes, logs under tmp_path."""
    t = config["trainer"]
    t.update(max_epochs=2, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
             default_root_dir=str(tmp_path), enable_model_summary=False, log_every_n_steps=1)
    t["logger"]["init_args"]["save_dir"] = str(tmp_path)
    data = config["data"]["init_args"]
    if config["data"]["class_path"].endswith("ShapesDataModule"):
        data.update(num_train=64, num_val=32, num_test=32)
    if config["data"]["class_path"].endswith("ImageFolderDataModule"):
        data.update(root=data_root, batch_size=4)
        config["model"]["init_args"]["arch_kwargs"]["num_classes"] = 3
    big = config["model"]["init_args"].get("arch") == "resnet18_cifar"
    if big:
        t["max_epochs"] = 1
    for cb in t["callbacks"]:
        args = cb.setdefault("init_args", {})
        name = cb["class_path"].rsplit(".", 1)[-1]
        if big and name in ("AnomalyFilterMonitor", "TIPMonitor"):
            # A forward pass of resnet18_cifar is ~0.25 s per image on one busy CPU core and 512
            # exact backward passes per scan are minutes: one epoch, tiny probes, sketch mode in CI.
            args.update(mode="sketch", num_projections=2)
        if "probe_size" in args:
            args["probe_size"] = (16 if name == "AnomalyFilterMonitor" else 8) // (2 if big else 1)
        if name == "AnomalyFilterMonitor":
            args.update(k_max=4, min_cluster_size=2)
        if name == "TIPMonitor":
            args.update(every_n_epochs=1, aipc_fractions=[0.0, 0.5], aipc_max_batches=1, top_filters=2)
        if name == "LearningImageLogger":
            args.update(num_images=2, max_filters=2 if big else 8, every_n_epochs=1)
        if name == "FeatureQuantityMonitor":
            args.update(top_neurons=2, eval_max_batches=1, diversity_neurons=8)
    return config


def run_recipe(name, tmp_path, data_root=None):
    """Run ``recipes/<name>.yaml`` shrunk to CI size through ``lightning-interp fit``; returns its config."""
    import yaml

    from lightning_interp.cli import main

    with open(os.path.join(RECIPES, f"{name}.yaml")) as fh:
        config = shrink(yaml.safe_load(fh), tmp_path, data_root)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(path)]) == 0
    import wandb

    wandb.finish()  # a process runs one recipe; here the next WandbLogger must not reuse this run
    return config
