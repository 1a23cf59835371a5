import numpy as np
import pytest
import torch

from lightning_interp.metrics.anomaly import detect_anomaly_filters, project_filters_2d


def planted(b, d, gen, n_out=(3, 2), far=10.0):
    """One tight blob and a few far outliers in two small groups."""
    x = torch.randn(b, d, generator=gen, dtype=torch.float64) * 0.3
    x[: n_out[0]] += far
    x[n_out[0] : n_out[0] + n_out[1]] -= far
    return x


def balanced(b, d, gen, blobs=3):
    centres = torch.randn(blobs, d, generator=gen, dtype=torch.float64) * 4
    return centres[torch.arange(b) % blobs] + torch.randn(b, d, generator=gen, dtype=torch.float64)


def layer(kinds, b=64, d=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = {"planted": planted, "balanced": balanced, "noise": lambda b, d, g: torch.randn(b, d, generator=g, dtype=torch.float64)}
    return torch.stack([make[k](b, d, gen) for k in kinds], 1)  # (B, K, D)


def test_planted_outliers_flagged_balanced_not():
    kinds = ["planted", "balanced", "planted", "balanced", "noise", "balanced"]
    feats = layer(kinds)
    res = detect_anomaly_filters(feats, torch.ones(len(kinds)), min_cluster_size=6, k_max=6)
    assert res.flagged == [0, 2]
    assert res.imbalanced[[0, 2]].all() and not res.imbalanced[[1, 3, 5]].any()
    # The outlier samples are the planted ones.
    assert res.sample_is_outlier.nonzero().flatten().tolist() == [0, 1, 2, 3, 4]
    assert res.outlier_samples.shape == (6, 64) and res.embedding.shape == (6, 64, 2)
    assert (res.cluster_sizes.sum(1) == 64).all()


def test_each_criterion_vetoes_on_its_own():
    kinds = ["planted", "balanced", "balanced", "noise"]
    feats = layer(kinds, seed=1)
    act = torch.ones(4)
    base = detect_anomaly_filters(feats, act, min_cluster_size=6, k_max=6)
    assert base.flagged == [0]
    # 1. imbalance: with λ below the outlier groups' size, no cluster is an outlier cluster.
    veto1 = detect_anomaly_filters(feats, act, min_cluster_size=1, k_max=6)
    assert not veto1.imbalanced[0] and veto1.high_ch[0] and veto1.flagged == []
    # 2. CH: demand a CH index far above the layer mean.
    veto2 = detect_anomaly_filters(feats, act, min_cluster_size=6, k_max=6, beta=1e6)
    assert veto2.imbalanced[0] and not veto2.high_ch[0] and veto2.flagged == []
    # 3. activation: the planted filter barely activates.
    veto3 = detect_anomaly_filters(feats, torch.tensor([0.01, 1.0, 1.0, 1.0]), min_cluster_size=6, k_max=6)
    assert veto3.imbalanced[0] and veto3.high_ch[0] and not veto3.active[0] and veto3.flagged == []


def test_fractional_min_cluster_size_and_dead_filters():
    feats = layer(["planted", "balanced", "balanced"], b=100)
    feats = torch.cat([feats, torch.zeros(100, 1, 12, dtype=torch.float64)], 1)  # a dead filter
    res = detect_anomaly_filters(feats, torch.ones(4), min_cluster_size=0.06, k_max=5)
    assert res.min_cluster_size == 6
    assert res.flagged == [0]
    assert res.num_clusters[3] == 1 and res.ch_index[3] == 0 and not res.anomaly[3]


@pytest.mark.parametrize("seed", [0, 1])
def test_batched_backend_agrees_with_sklearn(seed):
    kinds = ["planted", "balanced", "noise"] * 4
    gen = torch.Generator().manual_seed(seed)
    feats = layer(kinds, b=48, d=8, seed=seed)
    feats = feats * torch.rand(1, len(kinds), 1, generator=gen, dtype=torch.float64) * 100  # scale per filter
    act = torch.rand(len(kinds), generator=gen, dtype=torch.float64) + 0.5
    kw = dict(min_cluster_size=5, k_max=5)
    fast = detect_anomaly_filters(feats, act, backend="batched", **kw)
    ref = detect_anomaly_filters(feats, act, backend="sklearn", **kw)
    assert (fast.num_clusters == ref.num_clusters).double().mean() >= 0.9
    assert (fast.anomaly == ref.anomaly).double().mean() >= 0.95
    assert fast.anomaly.any(), "the planted filters should be flagged"
    torch.testing.assert_close(fast.ch_index, ref.ch_index, rtol=1e-4, atol=1e-8)


def test_projection_is_pca():
    gen = torch.Generator().manual_seed(0)
    from sklearn.decomposition import PCA

    for d in (5, 300):  # covariance route and Gram route
        feats = torch.randn(50, 3, d, generator=gen, dtype=torch.float64) * torch.linspace(1, 3, d, dtype=torch.float64)
        emb, deg = project_filters_2d(feats)
        for f in range(3):
            ref = PCA(2).fit_transform(feats[:, f].numpy())
            ref = ref / np.sqrt((ref**2).sum() / 100)
            np.testing.assert_allclose(np.abs(emb[f].numpy()), np.abs(ref), atol=1e-8)
        assert not deg.any()


def test_bad_arguments():
    feats, act = layer(["planted", "balanced"]), torch.ones(2)
    with pytest.raises(ValueError, match="k_max"):
        detect_anomaly_filters(feats, act, min_cluster_size=5, k_max=1)
    with pytest.raises(ValueError, match="min_cluster_size"):
        detect_anomaly_filters(feats, act, min_cluster_size=64)
    with pytest.raises(ValueError, match="min_cluster_size"):
        detect_anomaly_filters(feats, act, min_cluster_size=1.5)
    with pytest.raises(ValueError, match=r"\['auto', 'batched', 'sklearn'\]"):
        detect_anomaly_filters(feats, act, min_cluster_size=5, backend="gpu")
    with pytest.raises(ValueError, match=r"activations.*\(2,\)"):
        detect_anomaly_filters(feats, torch.ones(3), min_cluster_size=5)
    with pytest.raises(ValueError, match="NaN"):
        detect_anomaly_filters(feats * float("nan"), act, min_cluster_size=5)


def test_median_reference_is_robust_to_one_huge_ch():
    """Criterion 2 against the layer's mean CH (thesis) vs its median: one filter with a huge CH
    lifts the mean above every other imbalanced filter, not the median."""
    from lightning_interp.metrics.anomaly import apply_criteria, cluster_filters

    kinds = ["planted", "planted", "planted", "balanced", "balanced", "noise"]
    feats = layer(kinds, b=64, d=12, seed=3)
    feats[:, 0] = planted(64, 12, torch.Generator().manual_seed(9), far=1e4)  # huge CH for filter 0
    clusters = cluster_filters(feats, k_max=6)
    act = torch.ones(len(kinds))
    ch = clusters.ch_index
    thesis = apply_criteria(clusters, act, min_cluster_size=6, ch_reference="mean")
    robust = apply_criteria(clusters, act, min_cluster_size=6, ch_reference="median")
    # The criteria written out (thesis 6.2.5) on the same clustering.
    sizes = torch.stack([torch.bincount(lab, minlength=6) for lab in clusters.labels])
    outl = ((sizes > 0) & (sizes <= 6)).sum(1)
    imb = outl.double() > 0.2 * clusters.num_clusters.double()
    assert thesis.anomaly.tolist() == (imb & (ch > ch.mean())).tolist()
    assert robust.anomaly.tolist() == (imb & (ch > ch.median())).tolist()
    assert thesis.flagged == [0]  # the mean is dominated by filter 0
    assert set(robust.flagged) >= {0, 1, 2}
    # detect_anomaly_filters is cluster_filters + apply_criteria.
    direct = detect_anomaly_filters(feats, act, min_cluster_size=6, k_max=6, ch_reference="median")
    assert direct.anomaly.tolist() == robust.anomaly.tolist()
    with pytest.raises(ValueError, match="ch_reference"):
        apply_criteria(clusters, act, min_cluster_size=6, ch_reference="max")


def test_pooled_anomaly_features_are_exact_images_pooled_by_hand():
    from lightning_interp.metrics.anomaly import anomaly_features
    from lightning_interp.models import SimpleCNN
    from lightning_interp.nns import filter_learning_images

    torch.manual_seed(0)
    model = SimpleCNN(in_channels=3).double().eval()
    x = torch.randn(6, 3, 16, 16, dtype=torch.float64)
    feats = anomaly_features(model, "relu3", x, mode="pooled", grid=2)
    oracle = torch.nn.functional.adaptive_avg_pool2d(filter_learning_images(model, "relu3", x).sum(2), 2).flatten(2)
    torch.testing.assert_close(feats, oracle)
    with pytest.raises(ValueError, match="'exact', 'sketch', 'pooled'"):
        anomaly_features(model, "relu3", x, mode="cheap")
