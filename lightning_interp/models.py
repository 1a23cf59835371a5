"""Reference models of the thesis and a small LightningModule to train them.

Every activation is its own module (no shared ``nn.ReLU``), so each layer can be scanned by
name: ``conv1`` is the convolution, ``relu1`` the "conv layer" of the thesis (convolution +
activation). ``resnet18_cifar`` is torchvision's ResNet-18, whose ReLU modules *are* shared
inside each block: scan a conv, a bn or a whole block with ``rectify=True``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from .batch import default_batch_adapter

__all__ = ["SimpleCNN", "LeNet5", "resnet18_cifar", "resnet20_cifar", "ImageClassifier", "build_model"]


class SimpleCNN(nn.Module):
    """Three 3×3 conv layers (32-64-64 filters) with ReLU, two max-pools, a 64-unit hidden layer.

    Input ``B x in_channels x H x W`` (any H, W >= 4), output ``B x num_classes`` logits.
    ``batch_norm=True`` puts a BatchNorm (``bn1``..``bn3``) between each conv and its ReLU;
    the default model has none (and the same parameter names as before the option existed).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: tuple[int, int, int] = (32, 64, 64),
        batch_norm: bool = False,
    ):
        super().__init__()
        c1, c2, c3 = width
        self.batch_norm = batch_norm
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        if batch_norm:
            self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        if batch_norm:
            self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        if batch_norm:
            self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.AdaptiveMaxPool2d(4)
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c3 * 16, 64)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self._bn(1, self.conv1(x))))
        x = self.pool2(self.relu2(self._bn(2, self.conv2(x))))
        x = self.pool3(self.relu3(self._bn(3, self.conv3(x))))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))

    def _bn(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, f"bn{i}")(x) if self.batch_norm else x


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max-pooling: conv 6 → conv 16 → 120 → 84 → classes.

    Input ``B x in_channels x 32 x 32`` (28×28 inputs are padded by the first conv with
    ``padding=2``), output ``B x num_classes`` logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int = 32):
        super().__init__()
        pad = 2 if image_size == 28 else 0
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=pad)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = ((image_size + 2 * pad - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"Expected `image_size` >= 16 for LeNet5 but got {image_size}.")
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(16 * side * side, 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(self.flatten(x)))
        return self.fc3(self.relu4(self.fc2(x)))


def resnet18_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """torchvision ResNet-18 adapted to 32×32 inputs: 3×3 stride-1 stem, no stem max-pool.

    Layer names are torchvision's (``layer4.1.conv2`` has 512 filters). No weights are loaded.
    """
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class _BasicBlock(nn.Module):
    """He et al. (2016) CIFAR basic block: two 3×3 conv-BN layers; a 1×1 conv-BN shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """The CIFAR ResNet-20 of He et al. (2016, §4.2): a 3×3 stem of 16 filters, three stages of three
    basic blocks (16, 32, 64 filters; stride 2 at the start of stages 2 and 3), global average pooling
    and a linear classifier — 0.27 M parameters, small enough to train on a CPU. Shortcuts that change
    the shape are 1×1 conv-BN (the paper's option B), so Torch-Pruning can prune every block.

    Every ReLU is its own module (``layer3.2.relu2`` is the last block's output), so each can be watched.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, blocks: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        stages, c_in = [], 16
        for i, c_out in enumerate((16, 32, 64)):
            layers = []
            for b in range(blocks):
                layers.append(_BasicBlock(c_in, c_out, 2 if (b == 0 and i > 0) else 1))
                c_in = c_out
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def resnet20_cifar(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """:class:`ResNet20` (He et al. 2016's CIFAR ResNet-20). No weights are loaded."""
    return ResNet20(num_classes=num_classes, in_channels=in_channels)


_MODELS = {"simple_cnn": SimpleCNN, "lenet5": LeNet5, "resnet18_cifar": resnet18_cifar, "resnet20_cifar": resnet20_cifar}


def build_model(name: str, **kwargs) -> nn.Module:
    """Build a reference model by name: one of ``simple_cnn``, ``lenet5``, ``resnet18_cifar``, ``resnet20_cifar``."""
    if name not in _MODELS:
        raise ValueError(f"Expected `name` to be one of {sorted(_MODELS)} but got {name!r}.")
    return _MODELS[name](**kwargs)


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classifier around any backbone; layers are named ``model.<path>``.

    Give either ``model`` (any ``nn.Module``) or ``arch`` (a reference model name for
    :func:`build_model`, with ``arch_kwargs``): only the latter can be rebuilt from a checkpoint
    with ``ImageClassifier.load_from_checkpoint`` (the CLI's ``prune`` needs that).

    Batches are whatever :func:`lightning_interp.batch.default_batch_adapter` accepts:
    ``(x, y)``, ``(x, y, mask)`` or dicts with ``image`` and ``label``.
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        optimizer: str = "adam",
        arch: str | None = None,
        arch_kwargs: dict | None = None,
    ):
        super().__init__()
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"Expected `optimizer` to be one of ['adam', 'sgd'] but got {optimizer!r}.")
        if (model is None) == (arch is None):
            raise ValueError("Expected exactly one of `model` (an nn.Module) or `arch` (a reference model name).")
        self.model = model if model is not None else build_model(arch, **(arch_kwargs or {}))
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_name = optimizer
        self.save_hyperparameters(ignore=["model"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        b = default_batch_adapter(batch)
        logits = self(b.x)
        loss = F.cross_entropy(logits, b.y)
        acc = (logits.argmax(1) == b.y).float().mean()
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=False, on_epoch=True)
        self.log(f"{stage}/acc", acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def training_step(self, batch, batch_idx):
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx):
        self._step(batch, "val")

    def test_step(self, batch, batch_idx):
        self._step(batch, "test")

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
