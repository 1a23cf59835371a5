"""lightning_interp.metrics.aipc: the thesis' AIPC area in percent points times percent, and AIPC, filter
types and type masking on a trained net."""

import pytest
import torch

from lightning_interp.metrics.aipc import aipc, filter_types, masked_loss_change, type_masking
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


def test_a_measured_base_gives_the_same_curve_and_changes_without_evaluating_it_again(monkeypatch):
    import importlib

    aipc_module = importlib.import_module("lightning_interp.metrics.aipc")  # the package exports `aipc` the function

    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 8, 8))
    loader = [(torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))) for _ in range(3)]
    ranking = torch.randn(8)
    types = filter_types(torch.randn(8), torch.randn(8), per=0.25)
    base = aipc_module.accuracy(net, loader, max_batches=2)
    fractions = [0.02, 0.25, 0.5, 1.0]  # 0.02 of 8 filters masks none: it is the base as well
    want_curve = aipc(net, "relu3", ranking, loader, fractions, max_batches=2)
    want_changes = type_masking(net, "relu3", types, loader, max_batches=2)

    calls = []
    accuracy = aipc_module.accuracy
    monkeypatch.setattr(aipc_module, "accuracy", lambda *a, **k: calls.append(1) or accuracy(*a, **k))
    assert aipc(net, "relu3", ranking, loader, fractions, max_batches=2, base_accuracy=base) == want_curve
    assert len(calls) == 3  # the masked fractions only
    calls.clear()
    assert type_masking(net, "relu3", types, loader, max_batches=2, base=base) == want_changes
    assert len(calls) == sum(bool(m.any()) for m in types.values())


def one_filter_per_class():
    """Filter k of layer "1" carries class k's evidence alone; a fifth logit (0.5) wins when it is masked.

    Sample of class k: one-hot channel k, so its logits are 1 for k, 0 for the other classes and 0.5 for
    the reject class: right unmasked, wrong once filter k is masked. With 1, 2, 3 and 4 samples of
    classes 0-3, masking the filter set S gives accuracy 1 − Σ_{k∈S} n_k / 10.
    """
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 5))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4)[:, :, None, None])
        net[0].bias.zero_()
        net[4].weight.copy_(torch.cat([torch.eye(4), torch.zeros(1, 4)]))
        net[4].bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.5]))
    y = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3, 3])
    x = torch.eye(4)[y][:, :, None, None].expand(10, 4, 3, 3).contiguous()
    return net, [(x[:6], y[:6]), (x[6:], y[6:])]


def test_aipc_masks_the_highest_ranked_filters_first():
    net, loader = one_filter_per_class()
    ranking = torch.tensor([0.1, 0.4, 0.3, 0.2])  # masked in the order 1, 2, 3, 0
    curve = aipc(net, "1", ranking, loader, fractions=[0.25, 0.5, 0.75, 1.0])
    assert curve.fractions == [0.0, 0.25, 0.5, 0.75, 1.0]
    # Masked {}, {1}, {1, 2}, {1, 2, 3}, all: 10, 8, 5, 1, 0 of 10 samples right.
    assert curve.accuracy == pytest.approx([1.0, 0.8, 0.5, 0.1, 0.0])
    assert curve.change == pytest.approx([0.0, -0.2, -0.5, -0.9, -1.0])
    # Trapezoid of the change over the fractions, and over r <= 0.1 (only r = 0 there: no area).
    assert curve.area == pytest.approx(0.25 * (0 - 0.2 - 0.5 - 0.9 - 0.5))
    assert curve.area_top10 == 0.0
    # The reverse ranking masks class 0's filter first: another curve.
    assert aipc(net, "1", -ranking, loader, fractions=[0.25]).accuracy == pytest.approx([1.0, 0.9])
    types = {"one": torch.tensor([False, True, False, False]), "none": torch.zeros(4, dtype=torch.bool),
             "two": torch.tensor([True, False, False, True])}
    assert type_masking(net, "1", types, loader) == pytest.approx({"one": -0.2, "none": 0.0, "two": -0.5})


def test_default_fractions_progress_and_bad_fractions():
    from lightning_interp.metrics.aipc import DEFAULT_FRACTIONS

    net, loader = one_filter_per_class()
    calls = []
    curve = aipc(net, "1", torch.tensor([0.1, 0.4, 0.3, 0.2]), loader, progress=lambda done, total: calls.append((done, total)))
    assert curve.fractions == list(DEFAULT_FRACTIONS)
    # round(r · 4) filters masked, in the order 1, 2, 3, 0: 0 up to r = 0.1, then 1, 1, 2, 2, 2, 3, 3, 4, 4.
    masked = [0] * 6 + [1, 1, 2, 2, 2, 3, 3, 4, 4]
    assert curve.accuracy == pytest.approx([[1.0, 0.8, 0.5, 0.1, 0.0][n] for n in masked])
    assert calls == [(i, 15) for i in range(1, 16)]
    for bad in ([-0.1, 0.5], [0.5, 1.5]):
        with pytest.raises(ValueError, match=r"Expected `fractions` in \[0, 1\]"):
            aipc(net, "1", torch.zeros(4), loader, fractions=bad)


def test_filter_types_are_the_set_operations_of_the_thesis():
    import numpy as np

    gen = torch.Generator().manual_seed(1)
    fg, bg = torch.randperm(10, generator=gen).double(), torch.randperm(10, generator=gen).double()
    types = filter_types(fg, bg, per=0.3)
    top = lambda s: set(np.argsort(-s.numpy())[:3].tolist())  # noqa: E731
    bottom = lambda s: set(np.argsort(s.numpy())[:3].tolist())  # noqa: E731
    hf, hb, lf, lb = top(fg), top(bg), bottom(fg), bottom(bg)
    want = {"H-H": hf & hb, "H-noH": hf - hb, "noH-H": hb - hf, "L-L": lf & lb, "L-noL": lf - lb, "noL-L": lb - lf}
    for name, members in types.items():
        assert members.dtype == torch.bool and set(members.nonzero().flatten().tolist()) == want[name], name
    assert all(want[name] for name in ("H-noH", "noH-H", "L-noL", "noL-L"))  # the seed makes none of them empty
def test_masked_loss_change_equals_zeroed_weights():
    import copy

    torch.manual_seed(0)
    net = SimpleCNN(width=(3, 4, 5)).double().eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (24,), generator=g)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12)
    got = masked_loss_change(net, "relu3", [1, 3], loader)
    zeroed = copy.deepcopy(net)
    with torch.no_grad():  # relu(0·x + 0) = 0: the same as masking the channels' outputs
        zeroed.conv3.weight[[1, 3]] = 0
        zeroed.conv3.bias[[1, 3]] = 0
        base = torch.nn.functional.cross_entropy(net(x), y).item()
        masked = torch.nn.functional.cross_entropy(zeroed(x), y).item()
        acc0 = (net(x).argmax(1) == y).double().mean().item()
        acc1 = (zeroed(x).argmax(1) == y).double().mean().item()
    assert got["loss_pct"] == pytest.approx(100 * (masked - base) / base, rel=1e-5)
    assert got["accuracy_change"] == pytest.approx(acc1 - acc0)
