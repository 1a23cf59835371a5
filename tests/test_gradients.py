"""lightning_interp.gradients: per-sample gradient magnitudes and reductions against a loop of single-sample backward
passes."""

import pytest
import torch
from torch.nn import functional as F

from lightning_interp.gradients import per_sample_gradient_magnitude
from lightning_interp.models import SimpleCNN


def test_per_sample_gradient_magnitude_matches_a_loop():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 8, 8))
    net.train()
    x, y = torch.randn(5, 1, 16, 16), torch.randint(0, 10, (5,))
    got = per_sample_gradient_magnitude(net, x, y, chunk_size=2)
    assert net.training and all(p.grad is None for p in net.parameters())
    net.eval()
    for i in range(5):
        grads = torch.autograd.grad(F.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), list(net.parameters()))
        ref = torch.stack([g.abs().mean() for g in grads]).mean()
        assert got[i].item() == pytest.approx(ref.item(), rel=1e-5)


def test_reduce_per_sample_gradients_of_some_parameters_matches_a_loop():
    import copy

    from lightning_interp.gradients import reduce_per_sample_gradients

    torch.manual_seed(1)
    net = SimpleCNN(width=(4, 8, 8)).double()
    net.conv2.weight.requires_grad_(False)  # frozen parameters can be differentiated too
    x, y = torch.randn(6, 1, 16, 16, dtype=torch.float64), torch.randint(0, 10, (6,))

    def reduce(g):  # per filter of conv2: the gradient's L2 norm, plus the bias gradient of conv3
        return torch.cat([g["conv2.weight"].flatten(1).norm(dim=1), g["conv3.bias"]])

    oracle = copy.deepcopy(net).requires_grad_(True).eval()
    want = []
    for i in range(6):  # one plain backward per sample
        loss = F.cross_entropy(oracle(x[i : i + 1]), y[i : i + 1])
        gw, gb = torch.autograd.grad(loss, [oracle.conv2.weight, oracle.conv3.bias])
        want.append(torch.cat([gw.flatten(1).norm(dim=1), gb]))
    for chunk in (None, 4):
        got = reduce_per_sample_gradients(net, x, y, reduce, parameters=["conv2.weight", "conv3.bias"], chunk_size=chunk)
        assert got.shape == (6, 8 + 8)
        assert not net.conv2.weight.requires_grad and all(p.grad is None for p in net.parameters())
        torch.testing.assert_close(got, torch.stack(want), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="available: \\['conv1.weight'"):
        reduce_per_sample_gradients(net, x, y, reduce, parameters=["conv9.weight"])
