"""Datasets that ship with the package: nothing is downloaded.

* :class:`DigitsDataModule` — scikit-learn's bundled handwritten digits (1,797 8×8 images),
  resized, with the digit's pixels as foreground mask. Batches are ``(x, y, mask)``.
* :func:`write_toy_imagefolder` — a few generated images in CIFAR-10's exported ImageFolder layout, for
  trying an :class:`ImageFolderDataModule` recipe or a benchmark's ``--tiny`` run offline.
* :class:`ShapesDataModule` — generated shapes on textured backgrounds with foreground masks
  and bounding boxes; ``label_noise`` makes a model overfit, ``decoy`` adds a background patch
  whose colour predicts the label in train only. Batches are dicts with ``image``, ``label``,
  ``mask`` and ``bbox``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "DigitsDataModule", "ImageFolderDataModule", "IndexedDataset", "ShapesDataModule", "ShapesDataset", "make_shapes",
    "SHAPES", "with_index", "CIFAR10_CLASSES", "write_toy_imagefolder",
]


def _check_fraction(name: str, value: float, upper: float = 1.0) -> None:
    if not 0.0 <= float(value) < upper:
        raise ValueError(f"Expected `{name}` in [0, {upper}) but got {value}.")


def _noisy_labels(y: torch.Tensor, fraction: float, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """Replace ``fraction`` of the labels by a different, uniformly drawn class."""
    y = y.clone()
    n = int(round(fraction * len(y)))
    if n == 0:
        return y
    idx = torch.randperm(len(y), generator=generator)[:n]
    shift = torch.randint(1, num_classes, (n,), generator=generator)
    y[idx] = (y[idx] + shift) % num_classes
    return y


class IndexedDataset(Dataset):
    """A map-style dataset whose items carry their index last (see :func:`with_index`)."""

    def __init__(self, dataset: Dataset):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(
                f"Expected a map-style dataset (with __getitem__ and __len__) but got {type(dataset).__name__}; an "
                "iterable dataset has no stable sample indices: use SampleDynamicsMonitor(source='subset') instead."
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        if isinstance(item, dict):
            if "index" in item:
                raise ValueError("Expected dataset items without an 'index' key: with_index adds it.")
            return {**item, "index": i}
        if isinstance(item, (tuple, list)):
            return (*item, i)
        return item, i

    def __getattr__(self, name: str):
        # Attributes of the wrapped dataset (e.g. `classes`) stay reachable.
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def with_index(dataset: Dataset) -> IndexedDataset:
    """Wrap a map-style dataset so that every item carries its dataset index last.

    Items ``(x, y)`` become ``(x, y, index)``, ``(x, y, mask)`` become ``(x, y, mask, index)``, dicts
    gain an ``"index"`` key; after the default collate, ``training_step`` receives the indices as a
    ``B`` long tensor in the same place (``x, y, index = batch``). :class:`SampleDynamicsMonitor`
    (``source="batches"``) reads them to follow every training sample across epochs for free, from the
    logits of the training forward passes.

    Examples:
        >>> from torch.utils.data import TensorDataset
        >>> ds = with_index(TensorDataset(torch.zeros(4, 1, 8, 8), torch.arange(4)))
        >>> ds[2][2]
        2
    """
    return dataset if isinstance(dataset, IndexedDataset) else IndexedDataset(dataset)


class _DataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int, num_workers: int):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"Expected `batch_size` >= 1 but got {batch_size}.")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup(split)  # idempotent: the data is generated once
        return DataLoader(
            getattr(self, f"{split}_set"),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


class DigitsDataModule(_DataModule):
    """scikit-learn's handwritten digits, resized to ``image_size`` and scaled to [0, 1].

    Batches are ``(x, y, mask)``: ``x`` is ``B x 1 x S x S`` float, ``y`` the digit, ``mask``
    ``B x 1 x S x S`` bool, true on the digit's pixels (intensity > ``mask_threshold``).
    The split is seeded; the test set is the validation set. ``label_noise`` relabels that
    fraction of the training set only; :attr:`flipped` says which (``N_train`` bool, after ``setup``),
    so a demo can score the samples a monitor flags against the truth.
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        image_size: int = 32,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        label_noise: float = 0.0,
        mask_threshold: float = 0.25,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, num_workers)
        if image_size < 8:
            raise ValueError(f"Expected `image_size` >= 8 but got {image_size}.")
        _check_fraction("val_fraction", val_fraction)
        _check_fraction("label_noise", label_noise)
        self.image_size = image_size
        self.val_fraction = val_fraction
        self.label_noise = label_noise
        self.mask_threshold = mask_threshold
        self.seed = seed
        self.flipped: torch.Tensor | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False).clamp(0, 1)
        y = torch.as_tensor(digits.target, dtype=torch.long)
        mask = x > self.mask_threshold
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(len(y), generator=g)
        n_val = int(round(self.val_fraction * len(y)))
        val, train = perm[:n_val], perm[n_val:]
        y_train = _noisy_labels(y[train], self.label_noise, self.num_classes, g)
        #: ``N_train`` bool: the training samples whose label ``label_noise`` flipped (index = dataset index).
        self.flipped = y_train != y[train]
        self.train_set = TensorDataset(x[train], y_train, mask[train])
        self.val_set = TensorDataset(x[val], y[val], mask[val])
        self.test_set = self.val_set


SHAPES = ("circle", "square", "triangle", "cross", "ring")
# Decoy colours, one per class, well apart in RGB.
_DECOY_COLOURS = np.array(
    [[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0], [1.0, 1.0, 0.1], [1.0, 0.1, 1.0]], dtype=np.float32
)


def _shape_mask(kind: str, size: int, cx: np.ndarray, cy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean masks (N, size, size) of shapes centred at (cx, cy) with radius r (pixels)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    r = r[:, None, None]
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "triangle":
        # Apex up: inside when below the two slanted edges and above the base.
        return (dy <= 0.8 * r) & (dy >= -r + 2 * np.abs(dx))
    if kind == "cross":
        w = 0.3 * r
        return ((np.abs(dx) <= w) & (np.abs(dy) <= r)) | ((np.abs(dy) <= w) & (np.abs(dx) <= r))
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"Expected a shape in {list(SHAPES)} but got {kind!r}.")


def make_shapes(
    n: int,
    *,
    num_classes: int = 4,
    image_size: int = 32,
    decoy: str = "none",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Generate ``n`` images of shapes on textured backgrounds.

    Args:
        decoy: ``"none"``; ``"predictive"`` — a 5×5 patch in a random corner coloured by the
            label; ``"random"`` — the same patch with a random class's colour.

    Returns:
        dict with ``image`` (n x 3 x S x S, float in [0, 1]), ``label`` (n,), ``mask``
        (n x 1 x S x S, bool, the shape's pixels) and ``bbox`` (n x 4: x0, y0, x1, y1, inclusive).
    """
    if not 2 <= num_classes <= len(SHAPES):
        raise ValueError(f"Expected `num_classes` in [2, {len(SHAPES)}] but got {num_classes}.")
    if decoy not in ("none", "predictive", "random"):
        raise ValueError(f"Expected `decoy` to be one of ['none', 'predictive', 'random'] but got {decoy!r}.")
    if image_size < 16:
        raise ValueError(f"Expected `image_size` >= 16 but got {image_size}.")
    rng = np.random.default_rng(seed)
    s = image_size
    labels = rng.integers(0, num_classes, n)
    # Textured background: two random oriented sinusoids plus pixel noise, random tint.
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    theta = rng.uniform(0, np.pi, (n, 2, 1, 1))
    freq = rng.uniform(2, 6, (n, 2, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 2, 1, 1))
    waves = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase).mean(1)
    tint = rng.uniform(0.2, 0.6, (n, 3, 1, 1))
    bg = tint + 0.15 * waves[:, None] + 0.05 * rng.standard_normal((n, 3, s, s))
    # Shapes: random centre and radius fully inside the image, colour away from the tint.
    r = rng.uniform(0.18 * s, 0.3 * s, n).astype(np.float32)
    cx = rng.uniform(r + 1, s - r - 2).astype(np.float32)
    cy = rng.uniform(r + 1, s - r - 2).astype(np.float32)
    mask = np.zeros((n, s, s), dtype=bool)
    for c in range(num_classes):
        sel = labels == c
        if sel.any():
            mask[sel] = _shape_mask(SHAPES[c], s, cx[sel], cy[sel], r[sel])
    colour = np.clip(1.0 - tint + rng.uniform(-0.1, 0.1, (n, 3, 1, 1)), 0, 1)
    image = np.where(mask[:, None], colour + 0.03 * rng.standard_normal((n, 3, s, s)), bg)
    if decoy != "none":
        patch_class = labels if decoy == "predictive" else rng.integers(0, num_classes, n)
        corner = rng.integers(0, 4, n)
        for i in range(n):
            y0 = 1 if corner[i] < 2 else s - 6
            x0 = 1 if corner[i] % 2 == 0 else s - 6
            image[i, :, y0 : y0 + 5, x0 : x0 + 5] = _DECOY_COLOURS[patch_class[i]][:, None, None]
            mask[i, y0 : y0 + 5, x0 : x0 + 5] = False
    image = np.clip(image, 0, 1).astype(np.float32)
    rows = mask.any(2)
    cols = mask.any(1)
    bbox = np.stack(
        [cols.argmax(1), rows.argmax(1), s - 1 - cols[:, ::-1].argmax(1), s - 1 - rows[:, ::-1].argmax(1)], 1
    )
    return {
        "image": torch.from_numpy(image),
        "label": torch.from_numpy(labels).long(),
        "mask": torch.from_numpy(mask).unsqueeze(1),
        "bbox": torch.from_numpy(bbox).long(),
    }


class ShapesDataset(Dataset):
    """Map-style dataset over the tensors of :func:`make_shapes`; items are dicts."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["label"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


class ShapesDataModule(_DataModule):
    """Generated shapes (circle, square, triangle, cross, ring) on textured backgrounds.

    Batches are dicts: ``image`` ``B x 3 x S x S``, ``label`` (B,), ``mask`` ``B x 1 x S x S``
    bool (the shape), ``bbox`` ``B x 4``. ``label_noise`` relabels that fraction of the
    training set (validation and test stay clean), so a model memorises noise and overfits.
    ``decoy=True`` adds a 5×5 patch whose colour encodes the label in train, and a random
    class's colour in validation and test: a shortcut that does not generalise.
    """

    in_channels = 3

    def __init__(
        self,
        num_train: int = 2000,
        num_val: int = 500,
        num_test: int = 500,
        num_classes: int = 4,
        image_size: int = 32,
        label_noise: float = 0.0,
        decoy: bool = False,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, num_workers)
        for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
            if value < 1:
                raise ValueError(f"Expected `{name}` >= 1 but got {value}.")
        _check_fraction("label_noise", label_noise)
        if not 2 <= num_classes <= len(SHAPES):
            raise ValueError(f"Expected `num_classes` in [2, {len(SHAPES)}] but got {num_classes}.")
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_classes = num_classes
        self.image_size = image_size
        self.label_noise = label_noise
        self.decoy = decoy
        self.seed = seed

    @property
    def classes(self) -> list[str]:
        """The class names, index by index (what the monitors' captions show)."""
        return list(SHAPES[: self.num_classes])

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        common = {"num_classes": self.num_classes, "image_size": self.image_size}
        train = make_shapes(self.num_train, decoy="predictive" if self.decoy else "none", seed=self.seed, **common)
        held = "random" if self.decoy else "none"
        val = make_shapes(self.num_val, decoy=held, seed=self.seed + 1, **common)
        test = make_shapes(self.num_test, decoy=held, seed=self.seed + 2, **common)
        g = torch.Generator().manual_seed(self.seed)
        train["label"] = _noisy_labels(train["label"], self.label_noise, self.num_classes, g)
        self.train_set = ShapesDataset(train)
        self.val_set = ShapesDataset(val)
        self.test_set = ShapesDataset(test)


class ImageFolderDataModule(_DataModule):
    """Images in torchvision ``ImageFolder`` layout: ``root/train/<class>/*.jpg`` and ``root/val/<class>/*``.

    For CIFAR-10 exported as image files (32×32 RGB) and any other small labelled image set.
    Images become ``3 x S x S`` floats in [0, 1]; with ``preload=True`` (default) every image is
    decoded once into memory, so epochs do not decode JPEGs again. Batches are ``(x, y)``; there
    is no foreground mask. The test split is ``root/test`` when present, else ``val``.
    ``label_noise`` relabels that fraction of the training set.
    """

    in_channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 32,
        batch_size: int = 128,
        label_noise: float = 0.0,
        preload: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ):
        super().__init__(batch_size, num_workers)
        _check_fraction("label_noise", label_noise)
        self.root = root
        self.image_size = image_size
        self.label_noise = label_noise
        self.preload = preload
        self.seed = seed
        self.classes: list[str] = []

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.classes)

    def _split_dir(self, split: str) -> str:
        import os

        path = os.path.join(self.root, split)
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"Expected an ImageFolder split at {path!r} (layout: {self.root}/{{train,val}}/<class>/<image>) "
                "but it does not exist. For CIFAR-10, export the images into that layout (e.g. with "
                "torchvision.datasets.CIFAR10(download=True) on a machine with network access, saving each "
                "image as <split>/<class>/<index>.png) and pass its folder as `root`."
            )
        return path

    def _load(self, split: str, noise: float) -> Dataset:
        import os

        from torchvision import datasets, transforms

        tf = transforms.Compose([transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor()])
        ds = datasets.ImageFolder(self._split_dir(split), transform=tf)
        if not self.classes:
            self.classes = list(ds.classes)
        elif ds.classes != self.classes:
            raise ValueError(f"Expected the classes of {split!r} to be {self.classes} but got {ds.classes}.")
        if len(ds) == 0:
            raise ValueError(f"Expected images under {os.path.join(self.root, split)} but found none.")
        targets = torch.as_tensor(ds.targets, dtype=torch.long)
        g = torch.Generator().manual_seed(self.seed)
        targets = _noisy_labels(targets, noise, len(self.classes), g)
        if not self.preload:
            ds.samples = [(path, int(t)) for (path, _), t in zip(ds.samples, targets, strict=True)]
            ds.targets = targets.tolist()
            return ds
        images = torch.stack([ds[i][0] for i in range(len(ds))])
        return TensorDataset(images, targets)

    def setup(self, stage: str | None = None) -> None:
        import os

        if self.train_set is not None:
            return
        self.train_set = self._load("train", self.label_noise)
        self.val_set = self._load("val", 0.0)
        self.test_set = self._load("test", 0.0) if os.path.isdir(os.path.join(self.root, "test")) else self.val_set


#: CIFAR-10's class names, in its label order.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def write_toy_imagefolder(
    root: str, classes: tuple[str, ...] = CIFAR10_CLASSES, images: tuple[int, int] = (8, 4), size: int = 32, seed: int = 0
) -> str:
    """Write a toy image set in CIFAR-10's exported layout, ``<root>/{train,val}/<class>/<i>.png``.

    ``images`` = (per class in ``train``, per class in ``val``), ``size x size`` RGB PNGs: uniform noise
    tinted by a colour of the class, so a model learns something in a few steps. Stands in for
    ``../shared/data/cifar10`` where that folder is not available (tests, the ``--tiny`` runs of the
    benchmarks and experiments); nothing is downloaded. Returns ``root``.

    Example:
        >>> root = write_toy_imagefolder("/tmp/toy_cifar10", images=(4, 2))
        >>> ImageFolderDataModule(root, batch_size=8).num_classes
        10
    """
    import os

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    tints = torch.rand(len(classes), 1, 1, 3, generator=g)
    for split, count in zip(("train", "val"), images, strict=True):
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                pixels = 0.5 * torch.rand(size, size, 3, generator=g) + 0.5 * tints[c]
                Image.fromarray((pixels * 255).to(torch.uint8).numpy()).save(os.path.join(folder, f"{i}.png"))
    return str(root)
