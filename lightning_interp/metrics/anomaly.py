"""Anomaly filters as an overfitting indicator (DESIGN §4, thesis ch. 6).

For each filter k of a layer, the probe samples' learning images (or any per-filter
projection of them) are flattened, projected to 2-D by a PCA fitted per filter, and clustered
with Gaussian mixtures for K = 2..K_max; the K with the highest Calinski-Harabasz index wins
(thesis algorithm 6.1, eqs. 6-5..6-7 with the standard squared-distance index). The filter is
an **anomaly filter** when all three criteria hold (thesis 6.2.5, table 6-1):

1. imbalance — clusters with at most λ points (``min_cluster_size``) are outlier clusters,
   and there are more than α·K of them;
2. high CH — its CH index exceeds β × the layer's mean CH index;
3. active — its mean activation is at least θ × the layer's mean activation.

Samples in the outlier clusters of anomaly filters are *outlier samples*.

Before clustering, each filter's 2-D projection is divided by its own RMS spread
(√(total variance / 2)): GMM's absolute ``reg_covar`` then means the same on every filter
whatever the scale of its learning images, and the CH index does not change (it is scale
invariant). A filter whose learning images do not vary over the probe (a dead filter) has a
single cluster, CH 0, and is never flagged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import nn

from ..gmm import gmm_sweep
from ..nns import (
    ScanSpec,
    check_finite,
    check_scan_mode,
    iter_filter_learning_images,
    layer_activations,
    pooled_learning_images,
    sketch_learning_images,
)
from ..scores import FilterScores
from .tip import avou

__all__ = [
    "AnomalyCriteria",
    "AnomalyFilters",
    "FilterClusters",
    "anomaly_features",
    "apply_criteria",
    "cluster_filters",
    "detect_anomaly_filters",
    "project_filters_2d",
    "resolve_min_cluster_size",
    "scan_anomaly_filters",
    "anomaly_scores",
]

BACKENDS = ("auto", "batched", "sklearn")


@dataclass(frozen=True)
class AnomalyFilters:
    """Per-filter result of :func:`detect_anomaly_filters` (K filters, B samples).

    Attributes:
        anomaly: ``K`` bool, all three criteria hold.
        num_clusters: ``K`` long, the K of the mixture with the highest CH index (1 if degenerate).
        ch_index: ``K`` float, CH index of the chosen clustering.
        cluster_sizes: ``K x k_max`` long, points per component (component order, 0 if unused).
        outlier_clusters: ``K`` long, non-empty clusters with at most ``min_cluster_size`` points.
        imbalanced, high_ch, active: ``K`` bool, the three criteria.
        labels: ``K x B`` long, cluster of every sample.
        embedding: ``K x B x 2``, the normalised 2-D PCA projection that was clustered.
        outlier_samples: ``K x B`` bool, samples in outlier clusters of anomaly filters.
        min_cluster_size: λ in samples.
    """

    anomaly: torch.Tensor
    num_clusters: torch.Tensor
    ch_index: torch.Tensor
    cluster_sizes: torch.Tensor
    outlier_clusters: torch.Tensor
    imbalanced: torch.Tensor
    high_ch: torch.Tensor
    active: torch.Tensor
    labels: torch.Tensor
    embedding: torch.Tensor
    outlier_samples: torch.Tensor
    min_cluster_size: int

    @property
    def count(self) -> int:
        """Number of anomaly filters."""
        return int(self.anomaly.sum())

    @property
    def flagged(self) -> list[int]:
        """Indices of the anomaly filters."""
        return self.anomaly.nonzero().flatten().tolist()

    @property
    def sample_is_outlier(self) -> torch.Tensor:
        """``B`` bool: in an outlier cluster of at least one anomaly filter."""
        return self.outlier_samples.any(0)


@dataclass(frozen=True)
class AnomalyCriteria:
    """The anomaly detector's settings (thesis table 6-1), validated once and passed down whole.

    Args:
        min_cluster_size: λ, an int (samples) or a float in (0, 1) (fraction of the probe). Thesis:
            50 for small CNNs, 10 for AlexNet/ResNet-18/VGG-16.
        k_max: largest number of mixture components tried (K = 2..k_max).
        alpha: the threshold of criterion 1 (thesis: 0.2).
        beta: the threshold of criterion 2 (thesis: 1).
        theta: the threshold of criterion 3 (thesis: 0.1).
        ch_reference: criterion 2's layer reference, ``"mean"`` (thesis) or ``"median"``
            (:func:`apply_criteria`).
        backend: GMM sweep backend, one of :data:`BACKENDS` (:func:`cluster_filters`).

    ``dataclasses.asdict(criteria)`` is what the monitor writes to its report.
    """

    min_cluster_size: int | float = 0.1
    k_max: int = 10
    alpha: float = 0.2
    beta: float = 1.0
    theta: float = 0.1
    ch_reference: str = "mean"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.k_max, bool) or not isinstance(self.k_max, int) or self.k_max < 2:
            raise ValueError(f"Expected `k_max` to be an int >= 2 but got {self.k_max!r}.")
        if isinstance(self.min_cluster_size, bool) or not isinstance(self.min_cluster_size, (int, float)):
            raise TypeError(
                f"Expected `min_cluster_size` to be an int or a fraction in (0, 1) but got {self.min_cluster_size!r}."
            )
        if isinstance(self.min_cluster_size, float) and not self.min_cluster_size.is_integer():
            if not 0 < self.min_cluster_size < 1:
                raise ValueError(f"Expected a fractional `min_cluster_size` in (0, 1) but got {self.min_cluster_size}.")
        elif self.min_cluster_size < 1:
            raise ValueError(f"Expected `min_cluster_size` >= 1 sample or a fraction in (0, 1) but got {self.min_cluster_size}.")
        for name in ("alpha", "beta", "theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
                raise ValueError(f"Expected `{name}` >= 0 but got {value!r}.")
        if self.ch_reference not in CH_REFERENCES:
            raise ValueError(f"Expected `ch_reference` to be one of {list(CH_REFERENCES)} but got {self.ch_reference!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"Expected `backend` to be one of {list(BACKENDS)} but got {self.backend!r}.")

    def check_probe(self, num_samples: int) -> int:
        """λ in samples for a probe of ``num_samples``; a ``ValueError`` when the probe is too small."""
        if num_samples <= self.k_max + 1:
            raise ValueError(
                f"Expected more probe samples than `k_max` + 1 = {self.k_max + 1} but got {num_samples}; "
                "give a larger probe or a smaller `k_max`."
            )
        return resolve_min_cluster_size(self.min_cluster_size, num_samples)


def _criteria(criteria: AnomalyCriteria | None, settings: dict) -> AnomalyCriteria:
    """``criteria`` (default :class:`AnomalyCriteria`) with single settings given as keywords replaced."""
    if criteria is not None and not isinstance(criteria, AnomalyCriteria):
        raise TypeError(f"Expected `criteria` to be an AnomalyCriteria but got {type(criteria).__name__}.")
    unknown = [k for k in settings if k not in AnomalyCriteria.__dataclass_fields__]
    if unknown:
        raise TypeError(f"Unexpected anomaly settings {unknown}; valid: {list(AnomalyCriteria.__dataclass_fields__)}.")
    return replace(criteria or AnomalyCriteria(), **settings)


def resolve_min_cluster_size(min_cluster_size: int | float, num_samples: int) -> int:
    """λ in samples: an int as is, a float in (0, 1) as a fraction of the probe size."""
    if isinstance(min_cluster_size, bool) or not isinstance(min_cluster_size, (int, float)):
        raise TypeError(
            f"Expected `min_cluster_size` to be an int or a fraction in (0, 1) but got {min_cluster_size!r}."
        )
    if isinstance(min_cluster_size, float) and not float(min_cluster_size).is_integer():
        if not 0 < min_cluster_size < 1:
            raise ValueError(f"Expected a fractional `min_cluster_size` in (0, 1) but got {min_cluster_size}.")
        return max(1, int(round(min_cluster_size * num_samples)))
    lam = int(min_cluster_size)
    if lam < 1 or lam >= num_samples:
        raise ValueError(
            f"Expected `min_cluster_size` in [1, {num_samples - 1}] (smaller than the {num_samples} probe "
            f"samples) or a fraction in (0, 1) but got {min_cluster_size}."
        )
    return lam


def project_filters_2d(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-filter PCA to 2-D, each projection divided by its RMS spread.

    Args:
        features: ``B x K x ...`` (flattened per filter to ``B x K x D``).

    Returns:
        ``(embedding K x B x 2, degenerate K bool)`` — degenerate filters (no variance over the
        samples) get an all-zero embedding.
    """
    b, k = features.shape[:2]
    x = features.reshape(b, k, -1).transpose(0, 1).to(torch.float64)  # (K, B, D)
    if x.shape[2] < 2:
        x = torch.cat([x, torch.zeros_like(x)], 2)
    x = x - x.mean(1, keepdim=True)
    d = x.shape[2]
    if d <= b:
        evals, evecs = torch.linalg.eigh(x.transpose(1, 2) @ x)  # (K, D, D), ascending
        emb = x @ evecs[..., -2:].flip(-1)
    else:
        evals, evecs = torch.linalg.eigh(x @ x.transpose(1, 2))  # (K, B, B)
        emb = evecs[..., -2:].flip(-1) * evals[:, -2:].flip(-1).clamp_min(0).sqrt()[:, None, :]
    spread = emb.pow(2).sum((1, 2)).div(2 * b).sqrt()  # √(variance per dimension)
    total = x.pow(2).sum((1, 2)).div(b)
    degenerate = (spread <= 1e-12 * total.sqrt().clamp_min(1e-300)) | (total == 0)
    emb = torch.where(degenerate[:, None, None], torch.zeros_like(emb), emb / spread.clamp_min(1e-300)[:, None, None])
    return emb, degenerate


def _sweep_sklearn(emb: np.ndarray, degenerate: np.ndarray, k_max: int, seed: int):
    from sklearn.metrics import calinski_harabasz_score
    from sklearn.mixture import GaussianMixture

    k_filters, b = emb.shape[:2]
    labels = np.zeros((k_filters, b), dtype=np.int64)
    best_k = np.ones(k_filters, dtype=np.int64)
    best_ch = np.zeros(k_filters)
    for f in range(k_filters):
        if degenerate[f]:
            continue
        best = -1.0
        for k in range(2, k_max + 1):
            lab = GaussianMixture(n_components=k, random_state=seed).fit_predict(emb[f])
            used = len(np.unique(lab))
            ch = calinski_harabasz_score(emb[f], lab) if 2 <= used <= b - 1 else 0.0
            if ch >= best:
                best, best_k[f], labels[f] = ch, k, lab
        best_ch[f] = best
    return labels, best_k, best_ch


def _embed_sklearn(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The reference embedding: scikit-learn's PCA per filter, same normalisation."""
    from sklearn.decomposition import PCA

    b, k = features.shape[:2]
    x = features.reshape(b, k, -1).detach().cpu().double().numpy()
    emb = np.zeros((k, b, 2))
    degenerate = np.zeros(k, dtype=bool)
    for f in range(k):
        xf = x[:, f]
        if xf.shape[1] < 2:
            xf = np.concatenate([xf, np.zeros_like(xf)], 1)
        centred = xf - xf.mean(0)
        total = (centred**2).sum() / b
        if total == 0:
            degenerate[f] = True
            continue
        e = PCA(n_components=2, svd_solver="full").fit_transform(xf)
        spread = np.sqrt((e**2).sum() / (2 * b))
        if spread <= 1e-12 * np.sqrt(total):
            degenerate[f] = True
            continue
        emb[f] = e / spread
    return emb, degenerate


CH_REFERENCES = ("mean", "median")


@dataclass(frozen=True)
class FilterClusters:
    """Per-filter clustering of one layer (K filters, B samples): thesis algorithm 6.1 before its criteria.

    Attributes:
        labels: ``K x B`` long, cluster of every sample.
        num_clusters: ``K`` long, the K of the mixture with the highest CH index (1 if degenerate).
        ch_index: ``K`` float, CH index of the chosen clustering (0 if degenerate).
        embedding: ``K x B x 2``, the normalised 2-D PCA projection that was clustered.
        k_max: the largest K tried.
    """

    labels: torch.Tensor
    num_clusters: torch.Tensor
    ch_index: torch.Tensor
    embedding: torch.Tensor
    k_max: int

    @property
    def cluster_sizes(self) -> torch.Tensor:
        """``K x k_max`` long, points per component (component order, 0 if unused)."""
        return torch.nn.functional.one_hot(self.labels, self.k_max).sum(1)


def cluster_filters(
    features: torch.Tensor, *, k_max: int = 10, backend: str = "auto", seed: int = 0
) -> FilterClusters:
    """Per-filter 2-D PCA and GMM sweep K = 2..k_max by Calinski-Harabasz (thesis algorithm 6.1).

    Args:
        features: ``B x K x ...`` — learning images or any per-filter projection of them.
        k_max: see :func:`detect_anomaly_filters`.
        backend: see :func:`detect_anomaly_filters`.
        seed: see :func:`detect_anomaly_filters`.
    """
    if backend not in BACKENDS:
        raise ValueError(f"Expected `backend` to be one of {list(BACKENDS)} but got {backend!r}.")
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        raise ValueError(
            f"Expected `features` of shape (B, K, ...) but got {getattr(features, 'shape', type(features).__name__)}."
        )
    b = features.shape[0]
    if not isinstance(k_max, int) or k_max < 2:
        raise ValueError(f"Expected `k_max` to be an int >= 2 but got {k_max!r}.")
    if b < 3 or k_max > b - 1:
        raise ValueError(
            f"Expected more samples than `k_max` + 1 (clustering {b} samples into up to {k_max} clusters); "
            "use a larger probe or a smaller `k_max`."
        )
    if not torch.isfinite(features).all():
        raise ValueError("Expected finite `features` but got NaN or inf.")
    device = features.device
    if backend == "sklearn":
        emb_np, deg_np = _embed_sklearn(features)
        labels_np, k_np, ch_np = _sweep_sklearn(emb_np, deg_np, k_max, seed)
        embedding = torch.from_numpy(emb_np).to(device)
        labels = torch.from_numpy(labels_np).to(device)
        num_clusters = torch.from_numpy(k_np).to(device)
        ch = torch.from_numpy(ch_np).to(device)
    else:
        embedding, degenerate = project_filters_2d(features)
        labels, num_clusters, ch = gmm_sweep(embedding, k_max, seed=seed)
        labels = torch.where(degenerate[:, None], torch.zeros_like(labels), labels)
        num_clusters = torch.where(degenerate, torch.ones_like(num_clusters), num_clusters)
        ch = torch.where(degenerate, torch.zeros_like(ch), ch)
    return FilterClusters(labels=labels, num_clusters=num_clusters, ch_index=ch, embedding=embedding, k_max=k_max)


def _check_activations(activations, k_filters: int, device: torch.device) -> torch.Tensor:
    """``activations`` as a flat ``K`` tensor on ``device``, or a ValueError naming the expected shape."""
    activations = torch.as_tensor(activations, device=device).flatten()
    if activations.numel() != k_filters:
        raise ValueError(
            f"Expected `activations` of shape ({k_filters},), one per filter of `features`, but got "
            f"{tuple(activations.shape)}."
        )
    return activations


def apply_criteria(
    clusters: FilterClusters,
    activations: torch.Tensor,
    criteria: AnomalyCriteria | None = None,
    **settings,
) -> AnomalyFilters:
    """The three anomaly criteria (thesis 6.2.5) on a clustering from :func:`cluster_filters`.

    Args:
        clusters: the layer's :class:`FilterClusters`.
        activations: ``K`` mean activation of each filter (AVoU, eq. 5-8).
        criteria: λ, α, β, θ (thesis table 6-1) and criterion 2's layer reference
            (``criteria.ch_reference``): ``"mean"`` (the thesis: CH > β × the layer's mean CH) or
            ``"median"`` (CH > β × the layer's median CH; one filter with a huge CH cannot lift the
            reference above every other filter — a deviation from the thesis, measured in
            ``experiments/overfitting_signals.py``). ``k_max`` and ``backend`` are not used here.
        **settings: single :class:`AnomalyCriteria` fields that replace those of ``criteria``
            (``apply_criteria(clusters, act, min_cluster_size=50)``).
    """
    c = _criteria(criteria, settings)
    min_cluster_size, alpha, beta, theta, ch_reference = c.min_cluster_size, c.alpha, c.beta, c.theta, c.ch_reference
    k_filters, b = clusters.labels.shape
    activations = _check_activations(activations, k_filters, clusters.labels.device)
    if not torch.isfinite(activations).all():
        raise ValueError("Expected finite `features` and `activations` but got NaN or inf.")
    lam = resolve_min_cluster_size(min_cluster_size, b)
    labels, num_clusters, ch = clusters.labels, clusters.num_clusters, clusters.ch_index
    sizes = clusters.cluster_sizes  # (K, k_max)
    outlier_component = (sizes > 0) & (sizes <= lam)
    outlier_clusters = outlier_component.sum(1)
    imbalanced = outlier_clusters.double() > alpha * num_clusters.double()
    reference = ch.mean() if ch_reference == "mean" else ch.double().median()
    high_ch = ch > beta * reference
    act = activations.double()
    active = act >= theta * act.mean()
    anomaly = imbalanced & high_ch & active
    in_outlier = torch.gather(outlier_component, 1, labels)  # (K, B)
    return AnomalyFilters(
        anomaly=anomaly,
        num_clusters=num_clusters,
        ch_index=ch,
        cluster_sizes=sizes,
        outlier_clusters=outlier_clusters,
        imbalanced=imbalanced,
        high_ch=high_ch,
        active=active,
        labels=labels,
        embedding=clusters.embedding,
        outlier_samples=in_outlier & anomaly[:, None],
        min_cluster_size=lam,
    )


def detect_anomaly_filters(
    features: torch.Tensor,
    activations: torch.Tensor,
    criteria: AnomalyCriteria | None = None,
    *,
    seed: int = 0,
    **settings,
) -> AnomalyFilters:
    """Flag anomaly filters of one layer (DESIGN §4, thesis algorithm 6.1).

    :func:`cluster_filters` then :func:`apply_criteria`.

    Args:
        features: ``B x K x ...`` — learning images ``B x K x C x H x W`` or any per-filter
            projection of them; flattened per filter.
        activations: ``K`` mean activation of each filter on the same samples (AVoU, eq. 5-8).
        criteria: the settings (:class:`AnomalyCriteria`; its defaults when None): ``k_max``, λ
            (``min_cluster_size``, an int or a fraction of B), α, β, θ, ``ch_reference`` and the GMM
            ``backend`` — ``"batched"`` (all filters × all K as tensors on ``features``' device),
            ``"sklearn"`` (``GaussianMixture`` + ``calinski_harabasz_score`` per filter, the
            reference) or ``"auto"`` (batched).
        seed: seed of the mixture initialisation.
        **settings: single :class:`AnomalyCriteria` fields replacing those of ``criteria``.

    Returns:
        :class:`AnomalyFilters` with tensors on ``features``' device.

    Examples:
        >>> L = filter_learning_images(model, "relu3", probe_x)        # B x K x C x H x W
        >>> act = layer_activations(model, "relu3", probe_x).mean((0, 2, 3))
        >>> result = detect_anomaly_filters(L, act, AnomalyCriteria(min_cluster_size=0.1))
        >>> result.flagged
    """
    c = _criteria(criteria, settings)
    if isinstance(features, torch.Tensor) and features.dim() >= 2:
        # The cheap checks of the criteria before the sweep, so bad settings fail fast.
        _check_activations(activations, features.shape[1], features.device)
        resolve_min_cluster_size(c.min_cluster_size, features.shape[0])
    clusters = cluster_filters(features, k_max=c.k_max, backend=c.backend, seed=seed)
    return apply_criteria(clusters, activations, c)


def anomaly_features(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    mode: str = "exact",
    num_projections: int = 64,
    rectify: bool = True,
    seed: int = 0,
    grid: int | tuple[int, ...] = 2,
) -> torch.Tensor:
    """The per-filter features :func:`scan_anomaly_filters` clusters, ``B x K x F``.

    ``mode="exact"`` — the filter learning images projected to 2-D by a per-filter PCA
    (:func:`project_filters_2d`, F = 2), chunked so all K images are never held at once;
    ``mode="sketch"`` — ``num_projections`` random projections of every filter's learning images
    (:func:`lightning_interp.nns.sketch_learning_images`, F = P);
    ``mode="pooled"`` — every filter's learning images pooled onto a ``grid`` of cells, channels
    summed (:func:`lightning_interp.nns.pooled_learning_images`, F = cells: 4 for the default 2×2),
    exact, from F forward-mode products for all filters at once. The per-filter PCA of
    :func:`cluster_filters` then runs on these F coordinates instead of the full learning images: a
    redefinition of the thesis' embedding, judged on the overfitting-signal benchmark
    (``experiments/cheap_scan_signal.py``).

    Raises:
        FloatingPointError: NaN/inf in the learning images.
    """
    check_scan_mode(mode)
    if mode == "sketch":
        features = sketch_learning_images(model, layer, x, num_projections=num_projections, seed=seed, rectify=rectify)
    elif mode == "pooled":
        features = pooled_learning_images(model, layer, x, grid=grid, rectify=rectify)
    else:
        embeddings = [project_filters_2d(li)[0] for _, li in iter_filter_learning_images(model, layer, x, rectify=rectify)]
        features = torch.cat(embeddings, 0).transpose(0, 1)  # (B, K, 2)
    return check_finite(features, f"learning images of {layer}")


def scan_anomaly_filters(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    mode: str = "exact",
    num_projections: int = 64,
    rectify: bool = True,
    seed: int = 0,
    grid: int | tuple[int, ...] = 2,
    spec: ScanSpec | None = None,
    **criteria,
) -> AnomalyFilters:
    """Anomaly filters of ``layer`` on inputs ``x`` (``B x C x H x W``): what ``AnomalyFilterMonitor`` scans.

    The activations (AVoU) and :func:`anomaly_features` (exact, sketch or pooled on ``grid``) go to
    :func:`detect_anomaly_filters` with ``criteria`` (an :class:`AnomalyCriteria` as ``criteria=``, or
    its fields as keywords) and ``seed``. ``spec``, a :class:`~lightning_interp.nns.ScanSpec`, gives
    ``mode``, ``num_projections``, ``grid`` and ``rectify`` at once (the keywords are then ignored).

    Raises:
        FloatingPointError: NaN/inf in the activations or the learning images.
    """
    spec = spec or ScanSpec(mode=mode, num_projections=num_projections, grid=grid, rectify=rectify)
    f = check_finite(layer_activations(model, layer, x, rectify=spec.rectify), f"activations of {layer}")
    features = anomaly_features(model, layer, x, mode=spec.mode, num_projections=spec.num_projections,
                                rectify=spec.rectify, seed=seed, grid=spec.grid)
    return detect_anomaly_filters(features, avou(f), seed=seed, **criteria)


def anomaly_scores(
    results: dict[str, AnomalyFilters],
    *,
    epoch: int | None = None,
    settings: dict | AnomalyCriteria | None = None,
) -> FilterScores:
    """The :class:`~lightning_interp.scores.FilterScores` of anomaly scans, ``{layer: result}``.

    Score of filter k: its CH index (the clustering's strength; the monitor shows the flagged
    filters with the highest first). Flags: the anomaly filters (all three criteria). Details of
    each flagged filter: ``num_clusters``, ``ch_index``, ``outlier_clusters``, ``cluster_sizes``
    (non-empty, largest first), ``outlier_samples`` and ``epoch`` — the columns of the
    flagged-filter table and of the JSON report.
    """
    if isinstance(settings, AnomalyCriteria):
        settings = asdict(settings)
    details = {}
    for layer, res in results.items():
        items = []
        for k in res.flagged:
            sizes = sorted((int(v) for v in res.cluster_sizes[k].tolist() if v > 0), reverse=True)
            items.append({
                "num_clusters": int(res.num_clusters[k]),
                "ch_index": float(res.ch_index[k]),
                "outlier_clusters": int(res.outlier_clusters[k]),
                "cluster_sizes": sizes,
                "outlier_samples": int(res.outlier_samples[k].sum()),
                "epoch": epoch,
            })
        details[layer] = items
    return FilterScores(
        scores={layer: res.ch_index for layer, res in results.items()},
        flagged={layer: res.flagged for layer, res in results.items()},
        scorer="anomaly", higher_is="stronger clustering (CH index)", epoch=epoch,
        settings=dict(settings or {}), details=details,
    )
