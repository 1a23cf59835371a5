"""Pruning follows real networks: every elementwise activation passes through, blocks map to the
layer that owns their output channels (or are refused), latency is measured before and after; masking then pruning leaves a network's outputs unchanged, and bad
requests are refused with the valid range."""

import copy

import pytest
import torch
import torchvision
from conftest import randomise_bn
from torch import nn

from lightning_interp.masking import FilterMask
from lightning_interp.models import LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.pruning import (
    check_prunable,
    is_pass_through,
    measure_latency,
    prune_filters,
    prune_target,
)

torch.set_num_threads(1)

ACTIVATIONS = [nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
               nn.ReLU6, nn.Softplus, nn.Hardtanh, nn.Tanh, nn.Sigmoid]


@pytest.mark.parametrize("act", ACTIVATIONS, ids=lambda a: a.__name__)
def test_masking_then_pruning_through_any_elementwise_activation(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), nn.Conv2d(8, 8, 3, padding=1), act(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 16, 16)
    assert prune_target(net, "2") == "0" and prune_target(net, "4") == "3"
    pruned, summary = prune_filters(net, {"4": [1, 5]}, x)
    assert summary.channels["3"] == (8, 6) and pruned(x).shape == (2, 4)
    # Masking the activation's output (what the next layer sees) is what pruning does, for any activation.
    with FilterMask(net, {"4": [1, 5]}), torch.no_grad():
        torch.testing.assert_close(pruned(x), net(x), atol=1e-5, rtol=1e-5)
    # Masking the conv's output instead leaves act(0) in channels 1 and 5, constant after pooling: the
    # pruned output is the masked one with act(0)·W[:, 1] + act(0)·W[:, 5] taken out of the linear bias.
    a0 = act()(torch.zeros(1)).item()
    folded = copy.deepcopy(net)
    with torch.no_grad():
        folded[7].bias -= a0 * folded[7].weight[:, [1, 5]].sum(1)
    with FilterMask(folded, {"3": [1, 5]}), torch.no_grad():
        torch.testing.assert_close(pruned(x), folded(x), atol=1e-5, rtol=1e-5)
    if abs(a0) > 1e-6:  # and the fold is needed: without it the outputs differ
        with FilterMask(net, {"3": [1, 5]}), torch.no_grad():
            assert not torch.allclose(pruned(x), net(x), atol=1e-4)


def test_channel_mixing_modules_are_not_pass_through():
    assert not is_pass_through(nn.Softmax(dim=1)) and not is_pass_through(nn.Flatten())
    assert is_pass_through(nn.Hardswish()) and is_pass_through(nn.Dropout2d()) and is_pass_through(nn.MaxPool2d(2))


def test_blocks_map_to_the_layer_that_owns_their_output_channels():
    x = torch.rand(2, 3, 32, 32)
    mobilenet = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    assert prune_target(mobilenet, "features.1", x) == "features.1.block.2.0"  # InvertedResidual: project conv
    assert prune_target(mobilenet, "features.0.2", x) == "features.0.0"  # Hardswish after the stem conv
    pruned, summary = prune_filters(mobilenet, {"features.4": [0, 3]}, x)  # a residual InvertedResidual
    assert pruned(x).shape == (2, 4) and summary.params_after < summary.params_before
    resnet = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    assert prune_target(resnet, "layer2.0", x) == "layer2.0.downsample.0"  # the last conv; one residual group
    densenet = torchvision.models.densenet121(weights=None, num_classes=4).eval()
    with pytest.raises(ValueError, match=r"block 'features.denseblock1'.*concatenates.*e.g. 'features.denseblock1"):
        check_prunable(densenet, ["features.denseblock1"], x)
    assert check_prunable(densenet, ["features.transition1"], x) == {"features.transition1": "features.transition1.conv"}


class Sleeper(nn.Module):
    """A forward that sleeps a scripted time per call (sleep never returns early: lower bounds are safe)."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds, self.modes = list(seconds), []

    def forward(self, x):
        import time

        self.modes.append(self.training)
        time.sleep(self.seconds.pop(0))
        return x


def test_latency_is_the_median_of_the_timed_forwards_in_ms():
    # Two warm-up calls, then 1, 40, 80, 120 and 160 ms: each call lasts at least its sleep, so the median
    # is at least 80 ms (the second-smallest or the minimum would be ~40 or ~1 ms, a value in seconds 0.08),
    # and the model is in eval mode while timed and in training mode after.
    net = Sleeper([0.0, 0.0, 0.001, 0.04, 0.08, 0.12, 0.16]).train()
    assert measure_latency(net, torch.zeros(1), repeats=5, warmup=2) >= 80.0
    assert net.seconds == [] and net.modes == [False] * 7 and net.training
    # By default 2 warm-up and 7 timed forwards: exactly 9 calls.
    net = Sleeper([0.0] * 9)
    measure_latency(net, torch.zeros(1))
    assert net.seconds == [] and len(net.modes) == 9
    # Inputs on a device other than CUDA never synchronise CUDA (a meta tensor would make it raise).
    assert measure_latency(nn.Identity(), torch.zeros(1, device="meta"), repeats=1, warmup=0) >= 0


def test_latency_is_measured_before_and_after():
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 4))
    x = torch.rand(2, 3, 8, 8)
    assert measure_latency(net, x, repeats=3) > 0
    _, summary = prune_filters(net, {"1": [0, 1, 2]}, x)
    d = summary.as_dict()
    assert d["latency_ms_before"] > 0 and d["latency_ms_after"] > 0 and d["latency_device"] == "cpu"
    _, quiet = prune_filters(net, {"1": [0]}, x, latency=False)
    assert "latency_ms_before" not in quiet.as_dict()


def mask_then_prune(model, filters, x):
    model.eval()
    with FilterMask(model, filters), torch.no_grad():
        masked = model(x)
    pruned, summary = prune_filters(model, filters, x)
    with torch.no_grad():
        out = pruned(x)
    return masked, out, summary


@pytest.mark.parametrize(
    "model,filters,shape",
    [
        (lambda: SimpleCNN(in_channels=3), {"relu1": [0, 31], "relu2": [1, 5, 9], "relu3": [0, 63], "relu4": [7]}, (2, 3, 32, 32)),
        (lambda: LeNet5(), {"relu1": [2], "relu2": [0, 15], "relu3": [0, 5], "relu4": [3]}, (2, 1, 32, 32)),
        (lambda: randomise_bn(resnet18_cifar()), {"layer1.0.bn1": [3, 7], "layer2.1.bn1": [0], "layer4.0.bn1": [5, 500]}, (2, 3, 32, 32)),
    ],
)
def test_masking_then_pruning_leaves_outputs_unchanged(model, filters, shape):
    torch.manual_seed(0)
    net = model()
    x = torch.randn(*shape)
    masked, out, summary = mask_then_prune(net, filters, x)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    assert summary.params_after < summary.params_before and summary.macs_after < summary.macs_before
    for target, (before, after) in summary.channels.items():
        assert after == before - len(summary.pruned[target])


def test_pruning_errors():
    net = SimpleCNN()
    x = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[0, 63\]"):
        prune_filters(net, {"relu2": [64]}, x)
    with pytest.raises(ValueError, match=r"\[0, 63\] but got \[65, 300\]"):
        prune_filters(net, {"relu2": [1, 65, 300]}, x)
    with pytest.raises(ValueError, match="no channels|channels to prune"):
        prune_filters(net, {"flatten": [0]}, x)
    with pytest.raises(ValueError, match="ignored layer"):
        prune_filters(net, {"fc2": [0]}, x)
    with pytest.raises(ValueError, match="without channels"):
        prune_filters(net, {"relu1": list(range(32))}, x)
