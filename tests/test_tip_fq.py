import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from sklearn.cluster import DBSCAN

from lightning_interp.masking import FilterMask
from lightning_interp.metrics.aipc import aipc, filter_types, type_masking
from lightning_interp.metrics.fq import feature_quantity, fq_diversity, fq_layer_stats
from lightning_interp.metrics.tip import (
    TIPAggregate,
    avou,
    interpretable_properties,
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


def test_feature_quantity_limits_and_leak():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 8, 8, generator=gen, dtype=torch.float64) + 0.1
    mask = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    same = feature_quantity(x.unsqueeze(1), x, mask)
    torch.testing.assert_close(same, torch.ones_like(same))
    assert torch.all(feature_quantity(torch.zeros(2, 1, 1, 8, 8, dtype=torch.float64), x, mask) == 0)
    # The unit's image moves from the foreground to the background: F falls to 0.
    values = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        li = x * ((1 - t) * mask + (t + (t == 0) * 1.0) * (~mask))  # t = 0: the whole input
        values.append(feature_quantity(li.unsqueeze(1), x, mask)[0, 0].item())
    assert values[0] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(values, values[1:])), values
    assert values[-1] == 0.0
    stats = fq_layer_stats(torch.tensor([0.1, 0.2, 0.4]), torch.tensor([1.0, 2.0, 4.0]))
    assert stats["r_activation_fq"] == pytest.approx(1.0)


def test_dbscan_diversity_equals_sklearn():
    gen = torch.Generator().manual_seed(0)
    fq = torch.cat([torch.rand(4, 12, generator=gen) * 0.1, torch.rand(4, 12, generator=gen) * 0.1 + 0.8], 1)
    got = fq_diversity(fq)
    for k in range(4):
        labels = DBSCAN(eps=0.3, min_samples=6).fit_predict(fq[k].double().numpy().reshape(-1, 1))
        assert got[k].item() == len(set(labels) - {-1}) == 2


def test_fq_components_ablation_and_all_neurons():
    from lightning_interp.metrics.fq import FQ_COMPONENTS, all_neuron_feature_quantity, fq_components
    from lightning_interp.nns import neuron_learning_images

    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 6, 6, generator=gen, dtype=torch.float64)
    mask = torch.zeros(3, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 1:5, 1:4] = True
    li = torch.randn(3, 2, 1, 6, 6, generator=gen, dtype=torch.float64) * (torch.rand(3, 2, 1, 6, 6, generator=gen) > 0.4)
    parts = fq_components(li, x, mask)
    # The thesis' factors written out (eqs. 4-1..4-6) with standard SSIM constants, for one image.
    b, k = 1, 0
    xi, lk, m = x[b, 0].numpy(), li[b, k, 0].numpy(), mask[b, 0].numpy()
    s = np.abs(lk) > 1e-8
    ie, ife = (lk * m)[s], (xi * m)[s]
    mu_e, mu_f, sd_e, sd_f = ie.mean(), ife.mean(), ie.std(), ife.std()
    cov = ((ie - mu_e) * (ife - mu_f)).mean()
    want = {"nf": s.sum() / (np.abs(xi) > 1e-8).sum(), "vf": (s & m).sum() / ((np.abs(xi) > 1e-8) & m).sum(),
            "l": (2 * mu_f * mu_e + 1e-4) / (mu_f**2 + mu_e**2 + 1e-4),
            "c": (2 * sd_f * sd_e + 3e-4) / (sd_f**2 + sd_e**2 + 3e-4), "s": (cov + 1.5e-4) / (sd_f * sd_e + 1.5e-4)}
    for name, value in want.items():
        assert parts[name][b, k].item() == pytest.approx(value), name
    for drop in FQ_COMPONENTS:
        rest = torch.stack([parts[n] for n in FQ_COMPONENTS if n != drop]).prod(0)
        torch.testing.assert_close(feature_quantity(li, x, mask, drop=drop), torch.where(parts["active"], rest, 0 * rest))
    with pytest.raises(ValueError, match="Expected `drop`"):
        feature_quantity(li, x, mask, drop="q")
    # All neurons of every filter = FQ of the neuron learning images of every position.
    torch.manual_seed(0)
    net = SimpleCNN(in_channels=1, width=(2, 3, 3)).double()
    img = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    fg = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    fg[:, :, 2:6, 2:6] = True
    got = all_neuron_feature_quantity(net, "relu3", img, fg, filters_per_chunk=2)
    neurons = [(c, i, j) for c in range(3) for i in range(2) for j in range(2)]
    ref = feature_quantity(neuron_learning_images(net, "relu3", img, neurons, rectify=True), img, fg).amax(0)
    torch.testing.assert_close(got, ref.reshape(3, 4))
    sub = all_neuron_feature_quantity(net, "relu3", img, fg, max_neurons=3, seed=1)
    assert sub.shape == (3, 3)


def test_aipc_thesis_area_is_percent_points_times_percent():
    from lightning_interp.metrics.aipc import AIPC, _trapezoid

    fr, ch = [0.0, 0.05, 0.1, 0.5], [0.0, -0.02, -0.06, -0.5]
    top = _trapezoid(fr[:3], ch[:3])
    # 5 % · (0 + 2 pp)/2 + 5 % · (2 + 6 pp)/2 = 25 pp·%.
    assert -1e4 * top == pytest.approx(5 * (0 + 2) / 2 + 5 * (2 + 6) / 2)
    assert AIPC(fr, [0.9] * 4, ch, 0.0, top, -1e4 * top).area_top10_thesis == pytest.approx(25.0)


def test_filter_mask_composes():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6)).eval()
    x = torch.randn(2, 1, 12, 12)
    with FilterMask(net, {"relu2": [0, 1]}), FilterMask(net, {"relu3": [2]}):
        both = net(x)
    with FilterMask(net, {"relu2": [0, 1], "relu3": [2]}):
        together = net(x)
    torch.testing.assert_close(both, together)


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
