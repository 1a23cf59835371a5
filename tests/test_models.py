"""lightning_interp.models: the bundled networks and build_model."""

import pytest
import torch

from lightning_interp.models import LeNet5, SimpleCNN, build_model, resnet18_cifar


def test_models_forward_shapes():
    assert SimpleCNN(in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert SimpleCNN()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert LeNet5()(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert LeNet5(image_size=28, in_channels=3)(torch.randn(2, 3, 28, 28)).shape == (2, 10)
    assert resnet18_cifar()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert isinstance(build_model("lenet5"), LeNet5)
    with pytest.raises(ValueError, match="resnet18_cifar"):
        build_model("vgg")
