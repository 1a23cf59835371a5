import os

import pytest
import torch

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
