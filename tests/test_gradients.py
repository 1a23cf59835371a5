"""lightning_interp.gradients: per-sample gradient magnitudes against a loop of single-sample backward passes."""

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
