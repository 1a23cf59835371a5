"""lightning_interp.gmm: the batched GMM sweep and Calinski-Harabasz index, against scikit-learn and itself.

(The sweep's agreement with scikit-learn's GaussianMixture on anomaly features is in test_anomaly.py,
``test_batched_backend_agrees_with_sklearn``, where the two backends meet.)"""

import pytest
import torch
from sklearn.metrics import calinski_harabasz_score

import lightning_interp.gmm as gmm
from lightning_interp.gmm import calinski_harabasz, gmm_sweep


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sweep_all_k_at_once_equals_one_k_at_a_time(seed):
    # The GPU path (every K padded to k_max components in one batch) against the per-K path that
    # test_batched_backend_agrees_with_sklearn checks against scikit-learn: same labels, K, CH.
    gen = torch.Generator().manual_seed(seed)
    n = [30, 61, 97][seed]
    blobs = torch.randn(12, n, 2, generator=gen, dtype=torch.float64) * torch.rand(12, 1, 2, generator=gen, dtype=torch.float64)
    blobs[:6, : n // 5] += 6.0  # planted outlier groups in half of the problems
    per_k = gmm_sweep(blobs, 8, seed=seed, all_k_at_once=False)
    at_once = gmm_sweep(blobs, 8, seed=seed, all_k_at_once=True)
    assert torch.equal(per_k[0], at_once[0]) and torch.equal(per_k[1], at_once[1])
    torch.testing.assert_close(per_k[2], at_once[2], rtol=1e-12, atol=0)


def test_ch_index_matches_sklearn_on_same_labels():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 40, 2, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 4, (7, 40), generator=gen)
    labels[3] = labels[3] % 2  # only two clusters used in one problem
    ours = calinski_harabasz(x, labels, 4)
    for p in range(7):
        ref = calinski_harabasz_score(x[p].numpy(), labels[p].numpy())
        assert ours[p].item() == pytest.approx(ref, rel=1e-4)
    single = calinski_harabasz(x[:1], torch.zeros(1, 40, dtype=torch.long), 4)
    assert single.item() == 0.0


def test_sweep_picks_true_number_of_blobs():
    gen = torch.Generator().manual_seed(3)
    centres = torch.tensor([[0.0, 0.0], [8.0, 0.0], [0.0, 8.0], [8.0, 8.0]], dtype=torch.float64)
    x = centres[torch.arange(80) % 4] + 0.5 * torch.randn(80, 2, generator=gen, dtype=torch.float64)
    labels, k, ch = gmm_sweep(x[None], 7)
    assert k.item() == 4 and ch.item() > 100


@pytest.mark.parametrize("all_k_at_once", [False, True])
def test_cpu_em_over_running_problems_equals_the_masked_em(monkeypatch, all_k_at_once):
    # The CPU iterates only unconverged problems; the GPU masks converged ones. Same labels, K and CH.
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(16, 64, 2, generator=gen, dtype=torch.float64) * torch.rand(16, 1, 2, generator=gen, dtype=torch.float64)
    x[:8, :10] += 5.0
    fast = gmm_sweep(x, 6, seed=1, all_k_at_once=all_k_at_once)
    monkeypatch.setattr(gmm, "_ACTIVE_ONLY_ON_CPU", False)
    masked = gmm_sweep(x, 6, seed=1, all_k_at_once=all_k_at_once)
    assert torch.equal(fast[0], masked[0]) and torch.equal(fast[1], masked[1])
    torch.testing.assert_close(fast[2], masked[2], rtol=1e-12, atol=0)
