"""The thesis' chapter 3-5 analyses (lightning_interp.metrics.thesis) against NumPy/SciPy oracles."""

import numpy as np
import pytest
import torch
from scipy.signal import correlate2d
from scipy.stats import spearmanr
from torch import nn

from lightning_interp.metrics.thesis import (
    feature_map_correlation,
    filter_type_phases,
    fq_saliency_iou,
    global_ssim,
    layer_fq_ssim,
    map_iou,
    masked_loss_change,
    saliency_property_spearman,
    sample_distance,
    top2_neuron_iou,
    winning_neuron_stats,
)


def linear_net(c=1, s=6, o=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * s * s, o)).double()


def test_sample_distance_and_winning_neuron_match_numpy():
    net = linear_net()
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(7, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    w = net[1].weight.detach().numpy()  # (O, 36)
    xs = x.reshape(7, -1).numpy()
    li = xs[:, None, :] * w[None]  # learning image of a linear output: x ⊙ W_o (eq. 3-13 without ReLU)
    dist = np.linalg.norm(li - xs[:, None, :], axis=-1)  # eq. 3-15
    got = sample_distance(torch.from_numpy(li).reshape(7, 3, 1, 6, 6), x)
    np.testing.assert_allclose(got.numpy(), dist)
    stats = winning_neuron_stats(net, "1", x, y)
    for c in range(3):  # eq. 3-16
        np.testing.assert_allclose(stats["class_distance"][c].numpy(), dist[y.numpy() == c].mean(0))
    win = li[np.arange(7), y.numpy()]
    assert stats["distance"] == pytest.approx(dist[np.arange(7), y.numpy()].mean())
    assert stats["activation_count"] == pytest.approx(((np.abs(win) > 0).sum(1) / (np.abs(xs) > 0).sum(1)).mean())
    assert stats["activation_intensity"] == pytest.approx((np.abs(win).sum(1) / np.abs(xs).sum(1)).mean())
    assert stats["winner_closest"] == pytest.approx((dist.argmin(1) == y.numpy()).mean())


def conv_net(k=3, ksize=3, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, k, ksize, padding=ksize // 2, bias=True), nn.ReLU()).double()


@pytest.mark.parametrize("threshold", [0.0, 0.5])
def test_feature_map_correlation_matches_numpy(threshold):
    # 1x1 conv: f_k = relu(w_k x + b_k) at the input's resolution, L^k = x ⊙ ∂(½Σf_k²)/∂x = x·f_k·w_k.
    net = conv_net(k=4, ksize=1, seed=2)
    x = torch.randn(5, 1, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    w = net[0].weight.detach().numpy().reshape(-1)
    b = net[0].bias.detach().numpy()
    xs = x[:, 0].numpy()
    expected = np.zeros(4)
    for k in range(4):
        vals = []
        for i in range(5):
            f = np.maximum(w[k] * xs[i] + b[k], 0)
            li = np.abs(xs[i] * f * w[k])
            s = f > threshold * f.max()
            a = (li > threshold * li.max()) & (li > 0)
            vals.append((s & a).sum() / a.sum() if a.sum() else 0.0)  # eq. 3-17
        expected[k] = np.mean(vals)
    got = feature_map_correlation(net, "1", x, threshold=threshold)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_top2_neuron_iou_matches_numpy():
    # 3x3 conv: neuron (k, i, j)'s learning image is x ⊙ the kernel placed at (i, j) (when active).
    net = conv_net(k=3, ksize=3, seed=4)
    x = torch.rand(4, 1, 7, 7, generator=torch.Generator().manual_seed(5), dtype=torch.float64) + 0.1
    w = net[0].weight.detach().numpy()[:, 0]
    b = net[0].bias.detach().numpy()
    xs = np.stack([np.pad(v, 1) for v in x[:, 0].numpy()])
    expected = np.full(3, np.nan)
    for k in range(3):
        vals = []
        for i in range(4):
            f = np.maximum(correlate2d(xs[i], w[k], mode="valid") + b[k], 0)  # (7, 7)
            order = np.argsort(-f.ravel(), kind="stable")[:2]
            imgs = []
            for p in order:
                r, c = divmod(int(p), 7)
                img = np.zeros((9, 9))
                if f[r, c] > 0:
                    img[r:r + 3, c:c + 3] = xs[i][r:r + 3, c:c + 3] * w[k]
                imgs.append(np.abs(img[1:-1, 1:-1]) > 0)
            union = (imgs[0] | imgs[1]).sum()
            if union:
                vals.append((imgs[0] & imgs[1]).sum() / union)  # eq. 3-19
        if vals:
            expected[k] = np.mean(vals)
    got = top2_neuron_iou(net, "1", x)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_global_ssim_matches_written_out_formula():
    g = np.random.default_rng(0)
    a, b = g.random((3, 50)), g.random((3, 50))
    c1, c2 = 0.01**2, 0.03**2
    for i in range(3):
        ma, mb = a[i].mean(), b[i].mean()
        va, vb = a[i].var(), b[i].var()
        cov = ((a[i] - ma) * (b[i] - mb)).mean()
        want = (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2))
        assert global_ssim(torch.from_numpy(a[i]), torch.from_numpy(b[i])).item() == pytest.approx(want)
    assert global_ssim(torch.from_numpy(a), torch.from_numpy(a)).numpy() == pytest.approx(np.ones(3))


def test_fq_saliency_iou_picks_the_max_fq_output_image():
    from lightning_interp.metrics.fq import feature_quantity

    net = linear_net(o=3, seed=6)
    gen = torch.Generator().manual_seed(7)
    x = torch.rand(4, 1, 6, 6, generator=gen, dtype=torch.float64) + 0.05
    mask = torch.zeros(4, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 1:4, 2:5] = True
    w = net[1].weight.detach().reshape(3, 1, 6, 6)
    li = x[:, None] * w[None]  # (B, O, 1, 6, 6)
    best = feature_quantity(li, x, mask).argmax(1).numpy()
    want = []
    for i in range(4):
        m = np.abs(li[i, best[i], 0].numpy())
        m = (m - m.min()) / (m.max() - m.min() + 1e-7)
        pred, gt = m >= 0.5, mask[i, 0].numpy()
        want.append((pred & gt).sum() / (pred | gt).sum())
    np.testing.assert_allclose(fq_saliency_iou(net, "1", x, mask).numpy(), want)
    assert map_iou(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.bool)).item() == 1.0


def small_cnn_and_loader(seed=0):
    from lightning_interp.models import SimpleCNN

    torch.manual_seed(seed)
    net = SimpleCNN(width=(3, 4, 5)).double().eval()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (24,), generator=g)
    return net, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=12), x, y


def np_ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Global SSIM of two images (Wang et al. 2004, population moments, data range 1), written out."""
    c1, c2 = 0.01**2, 0.03**2
    ma, mb = a.mean(), b.mean()
    cov = ((a - ma) * (b - mb)).mean()
    return (2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (a.var() + b.var() + c2))


@pytest.mark.parametrize("max_neurons", [None, 10])
def test_layer_fq_ssim_equals_the_closed_form_of_a_3x3_conv(max_neurons):
    # Table 4-2 on f_k = ReLU(w_k * x + b_k) (3 x 3, zero padding): neuron (k, r, c)'s learning image is x ⊙ w_k
    # placed on its 3 x 3 window when it is active, else 0 (eq. 3-13); FQ = max over samples of F (eq. 4-7,
    # tests/test_fq.py's np_f), SSIM averaged over samples; both then over the neurons. 3 x 6 x 6 = 108 neurons:
    # the scan's chunks of 64 are crossed.
    from test_fq import np_f

    from lightning_interp.nns import sample_neurons

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU()).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 6, 6, generator=g, dtype=torch.float64) - 0.3
    mask = torch.zeros(4, 1, 6, 6, dtype=torch.bool)
    mask[:, :, 1:5, 1:4] = True
    w, b = net[0].weight.detach().numpy()[:, 0], net[0].bias.detach().numpy()  # K x 3 x 3, K
    xs, ms = x[:, 0].numpy(), mask[:, 0].numpy()
    xp = np.pad(xs, ((0, 0), (1, 1), (1, 1)))
    neurons = sample_neurons((3, 6, 6), max_neurons, seed=3)
    fq, ssim = [], []
    for k, r, c in neurons:
        images = []
        for i in range(4):
            window = xp[i, r : r + 3, c : c + 3]
            img = np.zeros((8, 8))
            if (window * w[k]).sum() + b[k] > 0:
                img[r : r + 3, c : c + 3] = window * w[k]
            images.append(img[1:7, 1:7])
        fq.append(max(np_f(images[i], xs[i], ms[i]) for i in range(4)))
        ssim.append(np.mean([np_ssim(images[i].ravel(), xs[i].ravel()) for i in range(4)]))
    got = layer_fq_ssim(net, "1", x, mask, max_neurons=max_neurons, seed=3)
    assert got["neurons"] == len(neurons) == (108 if max_neurons is None else 10)
    assert got["fq"] == pytest.approx(np.mean(fq), rel=1e-9)
    assert got["fq_variance"] == pytest.approx(np.var(fq), rel=1e-9)
    assert got["ssim"] == pytest.approx(np.mean(ssim), rel=1e-9)
    assert max(fq) > 0.01 and np.var(fq) > 0  # the case is not degenerate (many neurons have F = 0)


def test_spearman_table_and_type_phases():
    g = torch.Generator().manual_seed(8)
    scores = {n: torch.randn(12, generator=g) for n in ("avou", "sou", "mean", "variance", "covariance", "correlation")}
    table = saliency_property_spearman(scores)
    for s in ("avou", "sou"):
        for p in ("mean", "variance", "covariance", "correlation"):
            assert table[s][p] == pytest.approx(spearmanr(scores[s].numpy(), scores[p].numpy())[0])
    net, loader, x, y = small_cnn_and_loader(seed=1)
    fg, bg = torch.arange(5.0), torch.tensor([4.0, 3.0, 2.0, 0.0, 1.0])
    out = filter_type_phases([(net, fg, bg), (net, fg, fg)], "relu3", loader, per=0.4)
    # per 0.4 of 5 filters = 2: H_f = {3, 4}, H_b = {0, 1}, L_f = {0, 1}, L_b = {3, 4}.
    assert out["H-noH"]["proportion"][0] == pytest.approx(0.4) and out["H-H"]["proportion"][0] == 0.0
    assert out["H-H"]["proportion"][1] == pytest.approx(0.4) and out["H-noH"]["proportion"][1] == 0.0
    assert out["H-H"]["accuracy_change"][0] == 0.0
    expect = masked_loss_change(net, "relu3", [3, 4], loader)["accuracy_change"]
    assert out["H-H"]["accuracy_change"][1] == pytest.approx(expect)


def test_type_phases_mask_every_type_of_every_phase():
    from lightning_interp.metrics.aipc import FILTER_TYPES, filter_types

    net, loader, x, y = small_cnn_and_loader(seed=2)
    g = torch.Generator().manual_seed(4)
    phases = [(net, torch.rand(5, generator=g), torch.rand(5, generator=g)) for _ in range(2)]
    out = filter_type_phases(phases, "relu3", loader, per=0.4)
    assert list(out) == list(FILTER_TYPES)
    for p, (model, fg, bg) in enumerate(phases):
        for name, members in filter_types(fg, bg, 0.4).items():
            idx = members.nonzero().flatten().tolist()
            assert out[name]["proportion"][p] == len(idx) / 5
            want = masked_loss_change(model, "relu3", idx, loader)["accuracy_change"] if idx else 0.0
            assert out[name]["accuracy_change"][p] == pytest.approx(want, abs=1e-12)
