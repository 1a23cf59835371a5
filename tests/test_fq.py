"""lightning_interp.metrics.fq: feature quantity F (its limits, the foreground-to-background leak, each
factor of eqs. 4-1..4-6 and the ablations, all neurons of a layer), the DBSCAN diversity against sklearn,
the per-layer FQ scan and the diversity masking of table 4-3, each against the equations written out (a
1x1 conv whose learning images are known in closed form; masked filters as zeroed weights)."""

import numpy as np
import pytest
import torch
from sklearn.cluster import DBSCAN
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.metrics.fq import (
    diversity_masking,
    feature_quantity,
    fq_diversity,
    fq_layer_stats,
    layer_feature_quantity,
)
from lightning_interp.models import SimpleCNN

torch.set_num_threads(1)


def np_f(li: np.ndarray, x: np.ndarray, m: np.ndarray, drop: tuple[str, ...] = ()) -> float:
    """F(I, x) of eq. 4-6 (standard SSIM constants, nf = N_x/N, no scale) for one C x H x W image; the
    factors named in ``drop`` left out (the ablation of table 4-4)."""
    s = np.abs(li) > 1e-8
    if not s.any():
        return 0.0
    act = np.abs(x) > 1e-8
    ie, ife = (li * m)[s], (x * m)[s]
    mu_e, mu_f, sd_e, sd_f = ie.mean(), ife.mean(), ie.std(), ife.std()
    cov = ((ie - mu_e) * (ife - mu_f)).mean()
    factors = {
        "nf": s.sum() / act.sum(),
        "vf": (s & m).sum() / (act & m).sum(),
        "l": (2 * mu_f * mu_e + 1e-4) / (mu_f**2 + mu_e**2 + 1e-4),
        "c": (2 * sd_f * sd_e + 3e-4) / (sd_f**2 + sd_e**2 + 3e-4),
        "s": (cov + 1.5e-4) / (sd_f * sd_e + 1.5e-4),
    }
    return float(np.prod([v for k, v in factors.items() if k not in drop]))


def test_layer_feature_quantity_equals_the_closed_form_of_a_1x1_conv():
    # f_k = ReLU(w_k x + b_k): filter image L^k = x ⊙ w_k f_k (eq. 5-2); neuron (k, i, j): x_ij w_k at (i, j) if active.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.ReLU()).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 5, 5, generator=g, dtype=torch.float64) - 0.3
    mask = torch.zeros(4, 1, 5, 5, dtype=torch.bool)
    mask[:, :, 1:4, 1:4] = True
    w = net[0].weight.detach().numpy().reshape(-1)
    b = net[0].bias.detach().numpy()
    xs, ms = x[:, 0].numpy(), mask[:, 0].numpy()
    f = np.maximum(w[None, :, None, None] * xs[:, None] + b[None, :, None, None], 0)  # B x K x 5 x 5
    n = 6
    got = layer_feature_quantity(net, "1", x, mask, top_neurons=n)

    filter_fq = [max(np_f(xs[i] * w[k] * f[i, k], xs[i], ms[i]) for i in range(4)) for k in range(3)]
    np.testing.assert_allclose(got["filter_fq"].numpy(), filter_fq, rtol=1e-6, atol=1e-12)

    mean_act = f.mean(0).reshape(3, -1)  # K x 25
    for k in range(3):
        top = np.argsort(-mean_act[k], kind="stable")[:n]
        np.testing.assert_allclose(got["neuron_activation"][k].numpy(), mean_act[k][top], rtol=1e-12)
        for j, p in enumerate(top):
            r, c = divmod(int(p), 5)
            values = []
            for i in range(4):
                img = np.zeros((5, 5))
                if f[i, k, r, c] > 0:
                    img[r, c] = xs[i, r, c] * w[k]
                values.append(np_f(img, xs[i], ms[i]))
            assert got["neuron_fq"][k, j].item() == pytest.approx(max(values), abs=1e-12), (k, j)
    # The conv's own output, rectified by default, gives what its ReLU gives; unrectified, other values.
    conv = layer_feature_quantity(model=net, layer="0", x=x, fg_mask=mask, top_neurons=n)  # documented keywords
    for key in got:
        torch.testing.assert_close(conv[key], got[key])
    raw = layer_feature_quantity(net, "0", x, mask, top_neurons=n, rectify=False)
    assert not torch.allclose(raw["neuron_activation"], got["neuron_activation"])


def test_diversity_masking_equals_zeroed_weights():
    torch.manual_seed(0)
    net = SimpleCNN(width=(4, 6, 6), num_classes=3).double().eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(12, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    diversity = torch.tensor([2, 0, 3, 2, 1, 0])
    got = diversity_masking(net, {"relu3": diversity}, loader, num_diverse=2)

    def acc_loss(model):
        with torch.no_grad():
            logits = model(x)
        return (logits.argmax(1) == y).double().mean().item(), F.cross_entropy(logits, y).item()

    def zeroed(filters):
        copy = SimpleCNN(width=(4, 6, 6), num_classes=3).double().eval()
        copy.load_state_dict(net.state_dict())
        with torch.no_grad():
            copy.conv3.weight[filters] = 0  # ReLU(0) = 0: the same as masking relu3's filters
            copy.conv3.bias[filters] = 0
        return copy

    acc0, loss0 = acc_loss(net)
    most = sorted(range(6), key=lambda k: (-int(diversity[k]), k))[:2]  # ties: lower index first
    least = sorted(range(6), key=lambda k: (int(diversity[k]), -k))[:2]
    assert (most, least) == ([2, 0], [5, 1])
    for tag, filters in (("most", most), ("least", least)):
        acc, loss = acc_loss(zeroed(filters))
        r = got["relu3"][tag]
        assert r["filters"] == 2
        assert r["accuracy_change"] == pytest.approx(acc - acc0)
        assert r["loss_pct"] == pytest.approx(100 * (loss - loss0) / loss0)
        assert r["base_loss"] == pytest.approx(loss0)
    capped = diversity_masking(net, {"relu3": diversity}, loader, num_diverse=50)
    assert capped["relu3"]["most"]["filters"] == 6


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


def test_fq_layer_stats_equal_numpy():
    # Thesis 4.3: the layer's FQ mean and (population) variance, and Pearson r(activation, FQ) (eq. 4-12).
    gen = np.random.default_rng(0)
    fq = gen.uniform(0, 1, (4, 5))
    activation = fq * 2 + gen.normal(0, 0.3, (4, 5))  # correlated, not perfectly
    stats = fq_layer_stats(torch.from_numpy(fq).float(), torch.from_numpy(activation).float())
    assert stats["fq_mean"] == pytest.approx(np.mean(fq), rel=1e-6)
    assert stats["fq_variance"] == pytest.approx(np.var(fq), rel=1e-5)
    assert stats["r_activation_fq"] == pytest.approx(np.corrcoef(activation.ravel(), fq.ravel())[0, 1], rel=1e-5)
    assert 0.5 < stats["r_activation_fq"] < 0.99
    # A constant FQ: variance 0 and r defined as 0 rather than NaN.
    flat = fq_layer_stats(torch.full((6,), 0.3), torch.arange(6.0))
    assert flat == pytest.approx({"fq_mean": 0.3, "fq_variance": 0.0, "r_activation_fq": 0.0})
    with pytest.raises(ValueError, match="same number of units"):
        fq_layer_stats(torch.ones(3), torch.ones(4))


def test_dbscan_diversity_equals_sklearn():
    gen = torch.Generator().manual_seed(0)
    fq = torch.cat([torch.rand(4, 12, generator=gen) * 0.1, torch.rand(4, 12, generator=gen) * 0.1 + 0.8], 1)
    got = fq_diversity(fq)
    for k in range(4):
        labels = DBSCAN(eps=0.3, min_samples=6).fit_predict(fq[k].double().numpy().reshape(-1, 1))
        assert got[k].item() == len(set(labels) - {-1}) == 2


def test_diversity_counts_the_groups_built_into_the_fq():
    # Rows built with a known number of groups of >= 6 neurons, 0.01 apart inside a group and >= 0.5 apart
    # between groups (eps 0.3); isolated neurons are noise and do not count.
    group = lambda centre, n=6: [centre + 0.01 * i for i in range(n)]  # noqa: E731
    rows = [
        group(0.0) + group(0.5) + group(1.0) + group(1.5),  # 4 groups
        group(0.0, 9) + [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5],  # 1 + noise
        [0.5 * i for i in range(24)],  # all noise: 0
        group(0.2, 5) + group(0.9, 7) + group(2.0, 12),  # 5 neurons are too few for a group: 2
    ]
    fq = torch.tensor(rows)
    assert fq_diversity(fq).tolist() == [4, 1, 0, 2]
    # `scale` multiplies the FQ first (the thesis' K): 10 x finer values show the same groups.
    assert fq_diversity(fq / 10, scale=10.0).tolist() == [4, 1, 0, 2]
    # eps 0.6: row 0's groups (0.45 apart) merge into one; row 2's points (0.5 apart) have only 3
    # neighbours each: still noise; row 3's groups are 0.66 and 1.04 apart: unchanged.
    assert fq_diversity(fq, eps=0.6).tolist() == [1, 1, 0, 2]
    assert fq_diversity(fq, min_samples=7).tolist() == [0, 1, 0, 2]  # groups of 6 become noise
    with pytest.raises(ValueError, match=r"\(K, N\)"):
        fq_diversity(fq[0])


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
    with torch.no_grad():  # positive weights: every neuron of relu3 is active, each with its own FQ
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.abs_()
                m.bias.fill_(0.05)
    img = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    fg = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    fg[:, :, 2:6, 2:6] = True
    got = all_neuron_feature_quantity(net, "relu3", img, fg, filters_per_chunk=2)
    neurons = [(c, i, j) for c in range(3) for i in range(2) for j in range(2)]
    ref = feature_quantity(neuron_learning_images(net, "relu3", img, neurons, rectify=True), img, fg).amax(0)
    ref = ref.reshape(3, 4)
    assert len(set(ref.flatten().tolist())) == 12  # twelve distinct values: a wrong neuron shows
    torch.testing.assert_close(got, ref)
    sub = all_neuron_feature_quantity(net, "relu3", img, fg, max_neurons=3, seed=1)
    from lightning_interp.metrics.fq import sample_positions

    torch.testing.assert_close(sub, ref[:, sample_positions(2, 2, 3, seed=1)])


def test_combine_fq_is_the_product_of_the_kept_factors():
    from lightning_interp.metrics.fq import combine_fq, fq_components

    gen = torch.Generator().manual_seed(5)
    x = torch.rand(2, 1, 6, 6, generator=gen, dtype=torch.float64)
    mask = torch.zeros(2, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 2:5, 1:5] = True
    li = torch.randn(2, 3, 1, 6, 6, generator=gen, dtype=torch.float64) * (torch.rand(2, 3, 1, 6, 6, generator=gen) > 0.5)
    li[1, 2] = 0  # a silent unit: F = 0 whatever the factors
    parts = fq_components(li, x, mask)
    for drop in ((), ("l",), ("nf", "s")):
        # Each learning image's F written out in NumPy (np_f), times the scale.
        want = torch.tensor([[1e4 * np_f(li[b, k].numpy(), x[b].numpy(), mask[b].numpy(), drop) for k in range(3)]
                             for b in range(2)], dtype=torch.float64)
        torch.testing.assert_close(combine_fq(parts, drop=drop, scale=1e4), want)
        assert torch.equal(combine_fq(parts, drop=drop, scale=1e4), feature_quantity(li, x, mask, drop=drop, scale=1e4))
    assert combine_fq(parts)[1, 2] == 0
    with pytest.raises(ValueError, match="Expected `drop`"):
        combine_fq(parts, drop=("q",))


def test_layer_feature_quantity_runs_one_forward_for_neuron_choice_and_activation():
    torch.manual_seed(0)
    net = SimpleCNN(in_channels=1, width=(2, 3, 3)).double()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    mask = torch.zeros(3, 1, 8, 8, dtype=torch.bool)
    mask[:, :, 2:6, 2:6] = True
    calls = []
    handle = net.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = layer_feature_quantity(net, "relu3", x, mask, top_neurons=3)
    finally:
        handle.remove()
    assert len(calls) == 3  # filter images, the neuron choice with its activations, neuron images
    seen = {}
    handle = net.relu3.register_forward_hook(lambda m, i, o: seen.update(f=o))
    with torch.no_grad():
        net.eval()(x)
    handle.remove()
    mean = seen["f"].mean(0).reshape(3, -1)
    torch.testing.assert_close(got["neuron_activation"], mean.sort(1, descending=True).values[:, :3])
