"""lightning_interp.callbacks.base: the probe every monitor scans."""

import torch
from torch.utils.data import TensorDataset

from lightning_interp.callbacks.base import select_probe


def test_select_probe_is_seeded_and_reuses_recorded_indices():
    data = TensorDataset(torch.rand(50, 1, 8, 8), torch.arange(50))
    a, ia = select_probe(data, 10, seed=3)
    b, ib = select_probe(data, 10, seed=3)
    assert ia == ib and torch.equal(a.x, b.x) and a.y.tolist() == ia  # labels are the indices here
    other, io = select_probe(data, 10, seed=4)
    assert io != ia
    # A resumed run passes the indices its checkpoint recorded: the same samples whatever the seed.
    resumed, ir = select_probe(data, 10, seed=4, indices=ia)
    assert ir == ia and torch.equal(resumed.x, a.x)
    # Indices that no longer fit the data (another dataset, another size) fall back to the seeded choice.
    fallback, jf = select_probe(data, 10, seed=4, indices=[0, 99])
    assert jf == io


def test_class_names_come_from_the_datamodule_or_the_dataset_behind_the_loaders(tmp_path):
    from conftest import make_trainer
    from torch.utils.data import DataLoader, Subset

    from lightning_interp.callbacks.base import class_names
    from lightning_interp.data import ShapesDataModule
    from lightning_interp.models import ImageClassifier, SimpleCNN

    assert class_names(None)(3) == "3"
    dm = ShapesDataModule(num_train=8, num_val=8, num_test=8, batch_size=8, image_size=16, num_classes=3)
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(ImageClassifier(SimpleCNN(in_channels=3, num_classes=3, width=(4, 8, 8))), datamodule=dm)
    assert [class_names(trainer)(c) for c in (0, 2, 7)] == ["circle", "triangle", "7"]

    data = TensorDataset(torch.rand(8, 3, 16, 16), torch.arange(8) % 3)
    data.classes = ["cat", "dog", "owl"]  # as torchvision's CIFAR10 has them, here seen through a Subset
    trainer = make_trainer(tmp_path, logger=False, max_epochs=1, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(ImageClassifier(SimpleCNN(in_channels=3, num_classes=3, width=(4, 8, 8))),
                DataLoader(Subset(data, range(8)), batch_size=8))
    assert class_names(trainer)(1) == "dog"
