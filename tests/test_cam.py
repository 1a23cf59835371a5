"""lightning_interp.cam: Grad-CAM against pytorch-grad-cam, and the CAM of global-pooling networks."""

import numpy as np
import pytest
import torch
from conftest import randomise_bn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from lightning_interp.cam import class_activation_map, grad_cam
from lightning_interp.models import SimpleCNN, resnet18_cifar


@pytest.mark.parametrize("name", ["resnet18_cifar", "simple_cnn"])
def test_grad_cam_equals_pytorch_grad_cam(name):
    torch.manual_seed(0)
    if name == "resnet18_cifar":
        model, layer, module = randomise_bn(resnet18_cifar()).eval(), "layer4", None
        module = model.layer4[-1]
    else:
        model = SimpleCNN(in_channels=3).eval()
        with torch.no_grad():
            model.conv3.bias.fill_(0.1)  # keep the last conv layer alive at random init
        layer, module = "relu3", model.relu3
    x = torch.randn(6, 3, 32, 32)
    targets = [0, 3, 5, 7, 9, 2]
    ours = grad_cam(model, layer, x, torch.tensor(targets))
    ref = GradCAM(model=model, target_layers=[module])(input_tensor=x, targets=[ClassifierOutputTarget(c) for c in targets])
    compared = 0
    for i in range(len(targets)):
        a, b = ours[i].flatten().numpy(), ref[i].flatten()
        if b.std() == 0:
            assert np.allclose(a, a[0]), "both maps must be constant"
            continue
        assert np.corrcoef(a, b)[0, 1] > 0.999
        compared += 1
    assert compared >= 3
    assert ours.shape == (6, 32, 32) and ours.min() >= 0 and ours.max() <= 1


def test_cam_for_global_pooling_networks():
    torch.manual_seed(0)
    model = randomise_bn(resnet18_cifar()).eval()
    x = torch.randn(2, 3, 32, 32)
    cam = class_activation_map(model, "layer4", x, torch.tensor([1, 2]), fc="fc")
    # For GAP + linear, Grad-CAM's weights are the fc weights / (h·w): same normalised map.
    torch.testing.assert_close(cam.detach(), grad_cam(model, "layer4", x, torch.tensor([1, 2])), atol=1e-5, rtol=1e-4)
