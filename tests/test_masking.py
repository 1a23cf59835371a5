"""lightning_interp.masking: FilterMask zeroes the named channels, removes its hooks, names bad layers,
and two masks nested compose like one."""

import pytest
import torch

from lightning_interp.masking import FilterMask
from lightning_interp.models import LeNet5, SimpleCNN


def test_filter_mask_zeroes_channels_and_is_removed():
    torch.manual_seed(0)
    net = SimpleCNN().eval()
    x = torch.randn(3, 1, 16, 16)
    plain = net(x)
    seen = {}
    handle = net.relu2.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out))
    with FilterMask(net, {"relu2": [1, 5]}) as mask:
        assert mask.applied
        masked = net(x)
    handle.remove()
    # Reference: zero the channels by hand and run the rest of the network.
    h = net.relu2(net.conv2(net.pool1(net.relu1(net.conv1(x)))))
    h[:, [1, 5]] = 0
    ref = net.fc2(net.relu4(net.fc1(net.flatten(net.pool3(net.relu3(net.conv3(net.pool2(h))))))))
    torch.testing.assert_close(masked, ref)
    assert not torch.allclose(masked, plain)
    torch.testing.assert_close(net(x), plain)  # hooks removed
    assert not mask.applied


def test_filter_mask_errors():
    net = LeNet5()
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        FilterMask(net, {"conv1": [6]})
    with pytest.raises(ValueError, match="conv1"):
        FilterMask(net, {"cnv1": [0]})
    mask = FilterMask(net, {"relu1": [7]})  # channels unknown statically: checked at forward
    with pytest.raises(ValueError, match="relu1"), mask:
        net(torch.randn(1, 1, 32, 32))


def test_filter_mask_composes():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6)).eval()
    x = torch.randn(2, 1, 12, 12)
    with FilterMask(net, {"relu2": [0, 1]}), FilterMask(net, {"relu3": [2]}):
        both = net(x)
    with FilterMask(net, {"relu2": [0, 1], "relu3": [2]}):
        together = net(x)
    torch.testing.assert_close(both, together)
