"""lightning_interp.metrics.tip: the interpretable properties (mean, variance, covariance, correlation; whole,
foreground, background) against NumPy, their NaN-free edge cases, TIPAggregate over batches, and the
saliencies (AVOU, SOU in both estimates, Spearman) against written-out oracles."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from lightning_interp.metrics.tip import (
    TIPAggregate,
    avou,
    interpretable_properties,
    layer_properties,
    sou,
    spearman,
    weight_layer_for,
)
from lightning_interp.models import SimpleCNN


def np_props(li, x, sel):
    out = {}
    for name in ("mean", "variance", "covariance", "correlation"):
        out[name] = np.zeros(li.shape[:2])
    for b in range(li.shape[0]):
        xs = x[b][sel[b]]
        for k in range(li.shape[1]):
            ls = li[b, k][sel[b]]
            if ls.size == 0:
                continue
            out["mean"][b, k] = ls.mean()
            out["variance"][b, k] = ls.var()
            out["covariance"][b, k] = ((ls - ls.mean()) * (xs - xs.mean())).mean()
            sd = ls.std() * xs.std()
            out["correlation"][b, k] = out["covariance"][b, k] / sd if sd > 0 else 0.0
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_properties_match_numpy_with_and_without_masks(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((3, 2, 6, 5))
    li = rng.standard_normal((3, 4, 2, 6, 5)) * (rng.random((3, 4, 2, 6, 5)) > 0.4)
    mask = rng.random((3, 1, 6, 5)) > 0.5
    got = interpretable_properties(torch.from_numpy(li), torch.from_numpy(x), torch.from_numpy(mask))
    full = np.ones_like(x, dtype=bool)
    fg = np.broadcast_to(mask, x.shape)
    for prefix, sel in (("", full), ("fg_", fg), ("bg_", ~fg)):
        ref = np_props(li, x, sel)
        for name, value in ref.items():
            np.testing.assert_allclose(got[prefix + name].numpy(), value, atol=1e-12, err_msg=prefix + name)


def test_constant_images_and_empty_regions_do_not_leak_nan():
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    li = torch.ones(2, 3, 1, 4, 4, dtype=torch.float64)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)  # no foreground at all
    props = interpretable_properties(li, x, mask)
    assert all(torch.isfinite(v).all() for v in props.values())
    assert torch.all(props["correlation"] == 0) and torch.all(props["fg_mean"] == 0)
    with pytest.raises(TypeError, match="boolean"):
        interpretable_properties(li, x, mask.double())
    with pytest.raises(ValueError, match="mask"):
        interpretable_properties(li, x, torch.zeros(2, 1, 3, 4, dtype=torch.bool))


def test_aggregate_over_batches_equals_one_batch():
    gen = torch.Generator().manual_seed(0)
    li = torch.randn(10, 5, 1, 4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(10, 1, 4, 4, generator=gen, dtype=torch.float64)
    split, whole = TIPAggregate(5), TIPAggregate(5)
    for s in (slice(0, 3), slice(3, 7), slice(7, 10)):
        split.update(interpretable_properties(li[s], x[s]))
    whole.update(interpretable_properties(li, x))
    for name, value in whole.compute().items():
        torch.testing.assert_close(split.compute()[name], value)
        torch.testing.assert_close(value, interpretable_properties(li, x)[name].mean(0))


def test_saliencies_against_oracles():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6)).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (5,))
    act = torch.rand(5, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(avou(act), act.mean((0, 2, 3)))
    assert weight_layer_for(net, "relu2") == "conv2" and weight_layer_for(net, "conv2") == "conv2"
    got = sou(net, "relu2", x, y)
    net.eval()
    loss = torch.nn.functional.cross_entropy(net(x), y)
    loss.backward()
    ref = (net.conv2.weight * net.conv2.weight.grad).abs().mean((1, 2, 3))
    torch.testing.assert_close(got, ref.detach())
    # The thesis' averaging (eq. 5-10): |w ⊙ ∂ℓ_x/∂w| per sample, then the mean over samples.
    per_sample = []
    for i in range(5):
        (g,) = torch.autograd.grad(torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]), net.conv2.weight)
        per_sample.append((net.conv2.weight * g).abs().mean((1, 2, 3)).detach())
    got_ps = sou(net, "relu2", x, y, estimate="per_sample")
    torch.testing.assert_close(got_ps, torch.stack(per_sample).mean(0))
    assert torch.all(got_ps >= got - 1e-12)  # |mean| <= mean |.|
    with pytest.raises(ValueError, match="one of \\['snip', 'per_sample'\\]"):
        sou(net, "relu2", x, y, estimate="exact")
    a, b = torch.randn(20, dtype=torch.float64), torch.randn(20, dtype=torch.float64)
    assert spearman(a, b).item() == pytest.approx(spearmanr(a.numpy(), b.numpy()).statistic)
    assert spearman(torch.ones(5), a[:5]).item() == 0.0


def test_per_sample_sou_stays_within_the_scan_budget(monkeypatch):
    """The per-sample SoU goes through gradients.reduce_per_sample_gradients: with a budget too small
    for one vmapped sample it loops one backward per sample, and the values stay the loop oracle's."""
    from lightning_interp import gradients
    from lightning_interp.memory import limit_scan_memory

    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6)).double()
    x, y = torch.randn(5, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (5,))
    want = torch.stack([
        (net.conv2.weight * torch.autograd.grad(torch.nn.functional.cross_entropy(net(x[i : i + 1]), y[i : i + 1]),
                                                net.conv2.weight)[0]).abs().mean((1, 2, 3)).detach()
        for i in range(5)
    ]).mean(0)
    loops = []
    loop = gradients._loop_reduce
    monkeypatch.setattr(gradients, "_loop_reduce", lambda *a: loops.append(1) or loop(*a))
    torch.testing.assert_close(sou(net, "relu2", x, y, estimate="per_sample"), want)
    assert not loops  # the default budget holds a vmapped chunk
    with limit_scan_memory(1):
        torch.testing.assert_close(sou(net, "relu2", x, y, estimate="per_sample"), want)
    assert loops == [1]
    assert all(p.grad is None for p in net.parameters())


class _Concat(torch.nn.Module):
    """A block whose one conv makes 4 channels but which outputs 8 (its output twice)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        f = self.conv(x)
        return torch.cat([f, f], 1)


def test_sou_is_skipped_before_it_is_computed_when_the_owner_makes_other_filters(monkeypatch):
    import lightning_interp.metrics.tip as tip

    net = torch.nn.Sequential(_Concat(), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 3))
    x, y = torch.randn(2, 1, 6, 6), torch.randint(0, 3, (2,))
    monkeypatch.setattr(tip, "_sou", lambda *a, **k: pytest.fail("SoU computed for a mismatched owner"))
    with pytest.warns(UserWarning, match=r"SoU of '0' skipped: the weights of '0.conv' make 4 filters but the "
                                         r"layer outputs 8\."):
        out = layer_properties(net, "0", x, y=y)
    assert "sou" not in out and out["avou"].shape == (8,)


def test_layer_properties_sou_is_sou_of_the_layer():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6)).double()
    x, y = torch.randn(3, 1, 12, 12, dtype=torch.float64), torch.randint(0, 10, (3,))
    out = layer_properties(net, "relu2", x, y=y, mode="sketch")
    torch.testing.assert_close(out["sou"], sou(net, "relu2", x, y), rtol=0, atol=0)
