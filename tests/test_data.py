"""lightning_interp.data: the digits, shapes and image-folder data modules."""

import pytest
import torch

from lightning_interp.data import DigitsDataModule, ShapesDataModule, make_shapes


def test_digits_split_masks_and_label_noise():
    clean = DigitsDataModule(image_size=28, val_fraction=0.25, seed=3)
    clean.setup()
    x, y, mask = next(iter(clean.train_dataloader()))
    assert x.shape[1:] == (1, 28, 28) and mask.shape == x.shape and mask.dtype == torch.bool
    assert 0.0 <= x.min() and x.max() <= 1.0
    # The mask is the digit's pixels: bright inside, dark outside.
    assert x[mask].mean() > 0.5 > x[~mask].mean()
    assert len(clean.train_set) + len(clean.val_set) == 1797
    assert len(clean.val_set) == round(0.25 * 1797)
    noisy = DigitsDataModule(image_size=28, val_fraction=0.25, seed=3, label_noise=0.3)
    noisy.setup()
    changed = (noisy.train_set.tensors[1] != clean.train_set.tensors[1]).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.01)
    assert torch.equal(noisy.val_set.tensors[1], clean.val_set.tensors[1])
    with pytest.raises(ValueError, match="label_noise"):
        DigitsDataModule(label_noise=1.5)


def test_shapes_masks_bboxes_and_decoy():
    data = make_shapes(200, num_classes=4, seed=0)
    m = data["mask"][:, 0]
    for i in range(0, 200, 17):
        ys, xs = torch.nonzero(m[i], as_tuple=True)
        assert data["bbox"][i].tolist() == [xs.min().item(), ys.min().item(), xs.max().item(), ys.max().item()]
    assert m.float().mean(dim=(1, 2)).min() > 0.03
    dm = ShapesDataModule(num_train=400, num_val=200, num_test=100, decoy=True, label_noise=0.2, seed=1)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label", "mask", "bbox"}
    assert batch["image"].shape[1:] == (3, 32, 32)

    def decoy_colour_class(tensors):
        # The decoy is a 5x5 patch in one corner; read its colour and map it to a class.
        from lightning_interp.data import _DECOY_COLOURS

        img = tensors["image"]
        corners = [img[:, :, 2, 2], img[:, :, 2, -4], img[:, :, -4, 2], img[:, :, -4, -4]]
        palette = torch.from_numpy(_DECOY_COLOURS[:4])
        best = torch.stack([torch.cdist(c, palette).min(1).values for c in corners], 1).argmin(1)
        colour = torch.stack(corners, 1)[torch.arange(len(img)), best]
        return torch.cdist(colour, palette).argmin(1)

    clean_train = make_shapes(400, decoy="predictive", seed=1)
    assert (decoy_colour_class(clean_train) == clean_train["label"]).float().mean() > 0.99
    val = dm.val_set.tensors
    assert (decoy_colour_class(val) == val["label"]).float().mean() < 0.5
    changed = (dm.train_set.tensors["label"] != clean_train["label"]).float().mean().item()
    assert changed == pytest.approx(0.2, abs=0.01)
    with pytest.raises(ValueError, match="decoy"):
        make_shapes(10, decoy="sometimes")


def test_image_folder_datamodule_on_real_layout(tmp_path):
    from PIL import Image

    from lightning_interp.data import ImageFolderDataModule

    rng = torch.Generator().manual_seed(0)
    for split, n in (("train", 6), ("val", 3)):
        for cls in ("cat", "dog"):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                pixels = (torch.rand(32, 32, 3, generator=rng) * 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=95)
    dm = ImageFolderDataModule(str(tmp_path), batch_size=4)
    dm.setup()
    assert dm.classes == ["cat", "dog"] and dm.num_classes == 2
    assert len(dm.train_set) == 12 and len(dm.val_set) == 6
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and 0 <= x.min() and x.max() <= 1
    lazy = ImageFolderDataModule(str(tmp_path), batch_size=4, preload=False)
    lazy.setup()
    torch.testing.assert_close(lazy.val_set[0][0], dm.val_set[0][0])
    with pytest.raises(FileNotFoundError, match="ImageFolder split"):
        ImageFolderDataModule(str(tmp_path / "missing")).setup()


def test_toy_imagefolder_is_cifar10s_layout_and_learnable(tmp_path):
    from lightning_interp.data import CIFAR10_CLASSES, ImageFolderDataModule, write_toy_imagefolder

    root = write_toy_imagefolder(str(tmp_path / "toy"), images=(3, 2), size=16)
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (tmp_path / "toy" / "train").iterdir()) == sorted(CIFAR10_CLASSES)
    dm = ImageFolderDataModule(root, image_size=16, batch_size=8)
    dm.setup()
    assert dm.classes == sorted(CIFAR10_CLASSES) and len(dm.train_set) == 30 and len(dm.val_set) == 20
    x, y = dm.train_set.tensors
    assert x.shape == (30, 3, 16, 16)
    # Noise tinted by a class colour: the class means are far apart next to the noise (a nearest-mean
    # classifier fitted on train labels the validation images).
    means = torch.stack([x[y == c].mean((0, 2, 3)) for c in range(10)])  # 10 x 3
    xv, yv = dm.val_set.tensors
    nearest = torch.cdist(xv.mean((2, 3)), means).argmin(1)
    assert (nearest == yv).double().mean() >= 0.9
    # Seeded: the same files again.
    again = write_toy_imagefolder(str(tmp_path / "again"), images=(3, 2), size=16)
    assert (tmp_path / "again" / "val" / "cat" / "1.png").read_bytes() == (tmp_path / "toy" / "val" / "cat" / "1.png").read_bytes()
    assert again == str(tmp_path / "again")
