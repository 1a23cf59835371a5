"""lightning_interp.metrics.aipc: the thesis' AIPC area in percent points times percent, and AIPC, filter
types and type masking on a trained net."""

import pytest
import torch

from lightning_interp.metrics.aipc import aipc, filter_types, type_masking
from lightning_interp.models import SimpleCNN


def test_aipc_thesis_area_is_percent_points_times_percent():
    from lightning_interp.metrics.aipc import AIPC, _trapezoid

    fr, ch = [0.0, 0.05, 0.1, 0.5], [0.0, -0.02, -0.06, -0.5]
    top = _trapezoid(fr[:3], ch[:3])
    # 5 % · (0 + 2 pp)/2 + 5 % · (2 + 6 pp)/2 = 25 pp·%.
    assert -1e4 * top == pytest.approx(5 * (0 + 2) / 2 + 5 * (2 + 6) / 2)
    assert AIPC(fr, [0.9] * 4, ch, 0.0, top, -1e4 * top).area_top10_thesis == pytest.approx(25.0)


def test_aipc_and_types_on_a_trained_net():
    from lightning_interp.data import DigitsDataModule

    torch.manual_seed(0)
    dm = DigitsDataModule(image_size=16, batch_size=128)
    dm.setup()
    net = SimpleCNN(width=(8, 16, 16))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(3):
        for x, y, _ in dm.train_dataloader():
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    from lightning_interp.metrics.aipc import accuracy

    loader = dm.val_dataloader()
    base = accuracy(net, loader)
    assert base > 0.5
    curve = aipc(net, "relu3", torch.randn(16), loader, fractions=[0.1, 0.5, 1.0])
    assert curve.fractions[0] == 0.0 and curve.accuracy[0] == pytest.approx(base)
    # Masking every filter of the last conv layer leaves a constant output: chance level.
    assert curve.accuracy[-1] < 0.2
    assert curve.area < 0
    assert curve.area_top10_thesis == pytest.approx(-1e4 * curve.area_top10)
    types = filter_types(torch.arange(16.0), torch.arange(16.0).flip(0), per=0.25)
    assert types["H-noH"].sum() == 4 and types["H-H"].sum() == 0 and types["L-noL"].sum() == 4
    changes = type_masking(net, "relu3", types, loader)
    assert changes["H-H"] == 0.0 and set(changes) == set(types)
