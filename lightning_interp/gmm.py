"""Batched Gaussian mixtures on 2-D points: many problems × one K at once, as tensors.

The anomaly detector (DESIGN §4) clusters the 2-D PCA projection of every filter's learning
images with Gaussian mixtures for K = 2..K_max and keeps the K with the highest
Calinski-Harabasz index. scikit-learn does one filter and one K per call (about 0.3 s per
filter for the sweep); here all filters of a layer are fitted together, one K at a time on the
CPU and all K at once on a GPU (:func:`gmm_sweep`), on any device. The algorithm mirrors ``sklearn.mixture.GaussianMixture`` with its defaults
(full covariances, ``reg_covar=1e-6``, ``tol=1e-3``, ``max_iter=100``, k-means
initialisation with ``random_state=seed``), so scikit-learn is the test oracle. The k-means
initialisation replays scikit-learn's k-means++ random stream, so both start from the same
seeds and usually reach the same solution.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["kmeans", "fit_gmm", "calinski_harabasz", "gmm_sweep"]

_LOG_2PI = math.log(2 * math.pi)
#: Iterations between convergence checks on a GPU (each check is a device sync; on the CPU every
#: iteration is checked, since a wasted iteration costs real work there).
_CHECK_EVERY = 8


def _check_every(x: torch.Tensor) -> int:
    return 1 if x.device.type == "cpu" else _CHECK_EVERY


def _sq_dist(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(P, N, D) points, (P, K, D) centres → (P, N, K) squared distances (D is small: 2)."""
    out = (x[:, :, None, 0] - c[:, None, :, 0]) ** 2
    for d in range(1, x.shape[2]):
        out += (x[:, :, None, d] - c[:, None, :, d]) ** 2
    return out


def _plusplus_draws(k: int, seed: int) -> tuple[float, np.ndarray]:
    """The uniforms scikit-learn's k-means++ draws from ``RandomState(seed)`` for k clusters.

    ``GaussianMixture(random_state=seed)`` seeds a fresh ``RandomState`` per fit, so every
    filter's k-means++ consumes the same stream: one draw for the first centre, then
    ``2 + ⌊ln k⌋`` per further centre. Sharing them makes this backend pick the same seeds
    as the reference.
    """
    rs = np.random.RandomState(seed)
    first = rs.random_sample()
    trials = 2 + int(np.log(k))
    return first, rs.uniform(size=(max(k - 1, 0), trials))


def _plusplus_table(ks: torch.Tensor, k_max: int, seed: int) -> tuple[float, torch.Tensor]:
    """Per-problem k-means++ uniforms, ``(first, P x (k_max − 1) x T)``, for problems of ``ks`` components.

    Problems with fewer trials than the widest pad their rows with copies of the first trial (a
    duplicate candidate never wins ``argmin`` over the original, so the choice is unchanged).
    """
    first = 0.0
    width = 2 + int(np.log(k_max))
    table = torch.zeros(ks.shape[0], max(k_max - 1, 0), width, dtype=torch.float64)
    for k in torch.unique(ks).tolist():
        first, trials = _plusplus_draws(k, seed)
        padded = np.concatenate([trials, np.repeat(trials[:, :1], width - trials.shape[1], 1)], 1)
        table[ks.cpu() == k, : k - 1] = torch.from_numpy(padded)
    return first, table


def _kmeans(x: torch.Tensor, ks: torch.Tensor, k_max: int, seed: int, max_iter: int, tol: float) -> torch.Tensor:
    """k-means of P problems with ``ks[p]`` clusters each (components ≥ ``ks[p]`` unused) → (P, N) labels."""
    p, n, _ = x.shape
    rows = torch.arange(p, device=x.device)
    first_u, table = _plusplus_table(ks, k_max, seed)
    table = table.to(dtype=x.dtype, device=x.device)
    first = min(int(first_u * n), n - 1)  # choice() with uniform weights
    centres = [x[:, first]]
    closest = _sq_dist(x, centres[0][:, None]).squeeze(-1)  # (P, N)
    pot = closest.sum(1)
    for c in range(1, k_max):
        growing = ks > c  # problems that still take a centre
        targets = table[:, c - 1] * pot[:, None]  # (P, T)
        cand = torch.searchsorted(closest.cumsum(1).contiguous(), targets.contiguous()).clamp_max(n - 1)
        cand_pts = x[rows[:, None], cand]  # (P, T, D)
        d = torch.minimum(closest[:, None, :], _sq_dist(cand_pts, x))  # (P, T, N)
        cand_pot = d.sum(2)
        best = cand_pot.argmin(1)
        centres.append(cand_pts[rows, best])
        closest = torch.where(growing[:, None], d[rows, best], closest)
        pot = torch.where(growing, cand_pot[rows, best], pot)
    cen = torch.stack(centres, 1)  # (P, K, D)
    unused = torch.arange(k_max, device=x.device)[None, :] >= ks[:, None]  # (P, K)
    padded = bool((ks < k_max).any())
    check_every = _check_every(x)

    def nearest(cen: torch.Tensor) -> torch.Tensor:
        d = _sq_dist(x, cen)
        return (d.masked_fill(unused[:, None, :], torch.inf) if padded else d).argmin(2)

    threshold = tol * x.var(1, unbiased=False).mean(1)
    labels = nearest(cen)
    active = torch.ones(p, dtype=torch.bool, device=x.device)
    for it in range(max_iter):
        onehot = torch.nn.functional.one_hot(labels, k_max).to(x.dtype)  # (P, N, K)
        counts = onehot.sum(1)
        new = torch.bmm(onehot.transpose(1, 2), x) / counts.clamp_min(1)[..., None]
        new = torch.where((counts[..., None] > 0) & active[:, None, None], new, cen)
        shift = ((new - cen) ** 2).sum((1, 2))
        cen = new
        new_labels = nearest(cen)
        active = active & ~(new_labels == labels).all(1) & (shift > threshold)
        labels = new_labels
        # Finished problems are frozen by `active`, so checking less often (fewer device syncs)
        # changes nothing but the wasted iterations.
        if it % check_every == check_every - 1 and not bool(active.any()):
            break
    return labels


def kmeans(x: torch.Tensor, k: int, *, seed: int = 0, max_iter: int = 300, tol: float = 1e-4) -> torch.Tensor:
    """Batched k-means → (P, N) labels for (P, N, D) points, as ``sklearn.cluster.KMeans(n_init=1)``.

    k-means++ seeding (greedy, with scikit-learn's random stream, see :func:`_plusplus_draws`),
    then Lloyd iterations until the labels stop changing or the centre shift falls below
    ``tol`` × the mean per-feature variance.
    """
    ks = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
    return _kmeans(x, ks, k, seed, max_iter, tol)


def _m_step(x: torch.Tensor, resp: torch.Tensor, reg_covar: float):
    """Weights (P, K), means (P, K, 2) and covariances as (cxx, cxy, cyy), each (P, K)."""
    nk = resp.sum(1) + 10 * torch.finfo(x.dtype).eps  # (P, K)
    means = torch.bmm(resp.transpose(1, 2), x) / nk[..., None]
    dx = x[:, :, None, 0] - means[:, None, :, 0]  # (P, N, K)
    dy = x[:, :, None, 1] - means[:, None, :, 1]
    rdx = resp * dx
    cxx = (rdx * dx).sum(1) / nk + reg_covar
    cxy = (rdx * dy).sum(1) / nk
    cyy = (resp * dy * dy).sum(1) / nk + reg_covar
    return nk / x.shape[1], means, (cxx, cxy, cyy)


def _log_prob(x: torch.Tensor, weights, means, cov) -> torch.Tensor:
    """(P, N, K) log w_k + log N(x | μ_k, Σ_k) with closed-form 2×2 inverses."""
    a, b, d = cov
    det = (a * d - b * b).clamp_min(torch.finfo(x.dtype).tiny)
    dx = x[:, :, None, 0] - means[:, None, :, 0]
    dy = x[:, :, None, 1] - means[:, None, :, 1]
    maha = (d[:, None] * dx * dx - 2 * b[:, None] * dx * dy + a[:, None] * dy * dy) / det[:, None]
    return (torch.log(weights) - 0.5 * torch.log(det) - _LOG_2PI)[:, None] - 0.5 * maha


#: Whether EM on the CPU iterates only the problems still converging (True) or masks the finished ones,
#: as on the GPU (False). Both give the same labels; the flag lets the tests check that on the CPU.
_ACTIVE_ONLY_ON_CPU = True


def _fit_gmm(
    x: torch.Tensor, ks: torch.Tensor, k_max: int, seed: int, max_iter: int, tol: float, reg_covar: float
) -> torch.Tensor:
    """EM for P problems with ``ks[p]`` components each (the others get log-weight −∞) → (P, N) labels."""
    unused = (torch.arange(k_max, device=x.device)[None, :] >= ks[:, None])[:, None, :]  # (P, 1, K)
    padded = bool((ks < k_max).any())
    check_every = _check_every(x)

    def log_prob(weights, means, cov) -> torch.Tensor:
        logp = _log_prob(x, weights, means, cov)
        return logp.masked_fill(unused, -torch.inf) if padded else logp

    init = _kmeans(x, ks, k_max, seed, 300, 1e-4)
    resp = torch.nn.functional.one_hot(init, k_max).to(x.dtype)
    weights, means, cov = _m_step(x, resp, reg_covar)
    lower = torch.full((x.shape[0],), -math.inf, dtype=x.dtype, device=x.device)
    if x.device.type == "cpu" and _ACTIVE_ONLY_ON_CPU:
        # On the CPU each iteration works on the problems still running only: they converge after
        # 13-23 iterations on average but the slowest takes 40-60 (SimpleCNN relu3, 64 filters), so
        # masking finished problems, as the GPU path does to avoid syncs, wastes 2-3x the work.
        idx = torch.arange(x.shape[0])
        cov = list(cov)
        for _ in range(max_iter):
            if idx.numel() == 0:
                break
            xa = x[idx]
            logp = _log_prob(xa, weights[idx], means[idx], tuple(c[idx] for c in cov))
            if padded:
                logp = logp.masked_fill(unused[idx], -torch.inf)
            # log-sum-exp by hand: the exponentials are the responsibilities' numerators too.
            top = logp.amax(2, keepdim=True)
            e = (logp - top).exp()
            total = e.sum(2, keepdim=True)
            new_lower = (top + total.log()).squeeze(-1).mean(1)
            w2, m2, c2 = _m_step(xa, e / total, reg_covar)
            weights[idx], means[idx] = w2, m2
            for c, new in zip(cov, c2, strict=True):
                c[idx] = new
            running = (new_lower - lower[idx]).abs() >= tol
            idx = idx[running]
            lower[idx] = new_lower[running]
        return log_prob(weights, means, tuple(cov)).argmax(2)
    active = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    for it in range(max_iter):
        logp = log_prob(weights, means, cov)
        norm = torch.logsumexp(logp, 2, keepdim=True)
        resp_new = (logp - norm).exp()
        new_lower = norm.squeeze(-1).mean(1)
        # Converged problems keep their parameters; the others take another M-step.
        resp = torch.where(active[:, None, None], resp_new, resp)
        w2, m2, c2 = _m_step(x, resp, reg_covar)
        act = active[:, None]
        weights = torch.where(act, w2, weights)
        means = torch.where(act[..., None], m2, means)
        cov = tuple(torch.where(act, new, old) for new, old in zip(c2, cov, strict=False))
        active = active & ((new_lower - lower).abs() >= tol)
        lower = torch.where(active, new_lower, lower)
        if it % check_every == check_every - 1 and not bool(active.any()):
            break
    return log_prob(weights, means, cov).argmax(2)


def fit_gmm(
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    max_iter: int = 100,
    tol: float = 1e-3,
    reg_covar: float = 1e-6,
) -> torch.Tensor:
    """Fit a K-component full-covariance mixture to each of P 2-D problems; return (P, N) labels.

    Args:
        x: ``P x N x 2`` points.
    Returns:
        ``P x N`` long tensor: the most probable component of every point after EM.
    """
    if x.dim() != 3 or x.shape[-1] != 2:
        raise ValueError(f"Expected `x` of shape (P, N, 2) but got {tuple(x.shape)}.")
    ks = torch.full((x.shape[0],), k, dtype=torch.long, device=x.device)
    return _fit_gmm(x, ks, k, seed, max_iter, tol, reg_covar)


def calinski_harabasz(x: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Calinski-Harabasz index of P labelled problems, as ``sklearn.metrics.calinski_harabasz_score``.

    CH = [Σ_i n_i ‖c_i − c‖² / (L − 1)] / [Σ ‖x − c_label‖² / (N − L)] with L the number of
    non-empty clusters; 1 where the within-cluster dispersion is 0, and 0 (not an error) where
    fewer than 2 or more than N − 1 clusters are used.

    Args:
        x: ``P x N x D`` points; labels: ``P x N`` in [0, k).
    Returns:
        ``P`` tensor.
    """
    n = x.shape[1]
    onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
    counts = onehot.sum(1)  # (P, K)
    used = (counts > 0).sum(1).to(x.dtype)
    centres = torch.einsum("pnk,pnd->pkd", onehot, x) / counts.clamp_min(1)[..., None]
    mean = x.mean(1, keepdim=True)
    extra = (counts * ((centres - mean) ** 2).sum(2)).sum(1)
    intra = ((x - torch.gather(centres, 1, labels[..., None].expand(-1, -1, x.shape[2]))) ** 2).sum((1, 2))
    ch = extra * (n - used) / (intra * (used - 1)).clamp_min(torch.finfo(x.dtype).tiny)
    ch = torch.where(intra == 0, torch.ones_like(ch), ch)
    return torch.where((used >= 2) & (used <= n - 1), ch, torch.zeros_like(ch))


def gmm_sweep(
    x: torch.Tensor, k_max: int = 10, *, seed: int = 0, all_k_at_once: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each of P 2-D problems, fit GMMs with K = 2..k_max and keep the highest CH index.

    Ties keep the larger K (thesis algorithm 6.1 updates on ``CH >= max``).

    Args:
        x: ``P x N x 2`` points.
        all_k_at_once: fit every K as one batch of P·(k_max − 1) problems padded to k_max
            components (one pass of kernels instead of k_max − 1: what a GPU wants, where the
            sweep is bound by kernel launches), or one K at a time (fewer operations: what a CPU
            wants). ``None``: at once on CUDA, one at a time elsewhere. Both give the same labels.

    Returns:
        ``(labels P x N, num_clusters P, ch_index P)``.
    """
    p = x.shape[0]
    if all_k_at_once is None:
        all_k_at_once = x.device.type == "cuda"
    ks = range(2, k_max + 1)
    if all_k_at_once:
        problems = torch.arange(2, k_max + 1, device=x.device).repeat_interleave(p)
        xs = x.repeat(k_max - 1, 1, 1)
        labels_all = _fit_gmm(xs, problems, k_max, seed, 100, 1e-3, 1e-6).view(k_max - 1, p, -1)
        ch_all = calinski_harabasz(xs, labels_all.flatten(0, 1), k_max).view(k_max - 1, p)
        results = ((labels_all[i], ch_all[i]) for i in range(k_max - 1))
    else:
        results = ((labels, calinski_harabasz(x, labels, k)) for k in ks for labels in [fit_gmm(x, k, seed=seed)])
    best_ch = torch.full((p,), -1.0, dtype=x.dtype, device=x.device)
    best_k = torch.zeros(p, dtype=torch.long, device=x.device)
    best_labels = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
    for k, (labels, ch) in zip(ks, results, strict=True):
        better = ch >= best_ch
        best_ch = torch.where(better, ch, best_ch)
        best_k = torch.where(better, torch.full_like(best_k, k), best_k)
        best_labels = torch.where(better[:, None], labels, best_labels)
    return best_labels, best_k, best_ch
