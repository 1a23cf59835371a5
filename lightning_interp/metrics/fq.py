"""Feature quantity (FQ, DESIGN §2, thesis ch. 4): how much of the foreground a unit took.

For a learning image I_x of unit x, its input I and a foreground mask M^f (active = |v| > eps):
N = active elements of I, N_f = active elements of I ⊙ M^f, N_x = active elements of I_x,
N_x^e = active elements of I_x inside M^f. I^e = I_x ⊙ M^f and I^fe = I ⊙ M^f, both over the
elements where I_x is active (eqs. 4-1, 4-2); l, c, s are the global SSIM luminance, contrast
and structure terms between I^fe and I^e (C1 = 1e-4, C2 = 3e-4, C3 = 1.5e-4)::

    F(I, x) = scale · nf · vf · l · c · s,   nf = N_x / N,  vf = N_x^e / N_f      (eq. 4-6)
    FQ(x) = max over samples of F                                                  (eq. 4-7)

Two documented deviations from the thesis:

* **Standard SSIM terms.** l, c, s are SSIM's standard forms (Wang et al. 2004) with the
  constants in numerator *and* denominator: l = (2μμ' + C1)/(μ² + μ'² + C1),
  c = (2σσ' + C2)/(σ² + σ'² + C2), s = (σ_fe,e + C3)/(σσ' + C3). Eqs. 4-3..4-5 put C1, C2, C3
  in the denominators only; then F(I, I) = (1 - O(C)) < 1 and s of two constant images is 0,
  so the thesis' own limiting case "F → 1 when I_x = I" (eqs. 4-8..4-10) only holds as C → 0.
  With the standard terms F(I, I) = 1 exactly (DESIGN §2).
* **nf = N_x / N and no scale.** The thesis writes N_x^n/N (background-active elements) and a
  scale K = 1e4; its limits (F → 1 for I_x = I, F = 0 for I_x = 0, eqs. 4-8..4-11) hold with
  N_x/N and no scale, which is used here (``scale`` = 1; pass ``scale=1e4`` for the thesis' K).

The five factors are named as in the thesis' ablation (table 4-4): ``nf`` (the "noise feature"
ratio, first factor), ``vf`` (the "valid feature" ratio, second factor), ``l``, ``c``, ``s``;
:func:`fq_components` returns them separately and ``drop=`` leaves one out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from ..batch import BatchAdapter, default_batch_adapter
from ..nns import (
    check_finite,
    check_inputs,
    iter_filter_learning_images,
    layer_activations,
    neuron_learning_images,
    sample_indices,
)
from .aipc import evaluate, masked_loss_change
from .tip import _check_mask

__all__ = [
    "FQ_COMPONENTS",
    "feature_quantity",
    "combine_fq",
    "fq_components",
    "neuron_feature_quantity",
    "layer_feature_quantity",
    "all_neuron_feature_quantity",
    "sample_positions",
    "fq_layer_stats",
    "fq_diversity",
    "diversity_masking",
]

C1, C2, C3 = 1e-4, 3e-4, 1.5e-4
#: The factors of F (eq. 4-6) in the thesis' ablation order (table 4-4).
FQ_COMPONENTS = ("l", "c", "s", "vf", "nf")


def fq_components(
    learning_images: torch.Tensor,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """The five factors of F (eq. 4-6) for every learning image: ``nf``, ``vf``, ``l``, ``c``, ``s``.

    Args:
        learning_images: ``B x K x C x H x W``; x: ``B x C x H x W``; fg_mask: boolean
            ``B x 1|C x H x W`` (True = foreground).
        eps: an element is active when ``|value| > eps``.

    Returns:
        dict of ``B x K`` tensors plus ``active`` (``B x K`` bool: the learning image has an active
        element). ``nf`` and ``vf`` are 0 where the input (its foreground) has no active element.
    """
    check_inputs(x)
    if learning_images.dim() != x.dim() + 1 or learning_images.shape[2:] != x.shape[1:]:
        raise ValueError(f"Expected `learning_images` of shape (B, K, {tuple(x.shape[1:])}) but got {tuple(learning_images.shape)}.")
    b, k = learning_images.shape[:2]
    m = _check_mask(fg_mask, x).reshape(b, 1, -1)
    li = learning_images.reshape(b, k, -1)
    xi = x.reshape(b, 1, -1).to(li.dtype)
    act_i = xi.abs() > eps
    act_x = li.abs() > eps  # S: where I_x is active, (B, K, E)
    n = act_i.sum(-1).to(li.dtype)  # (B, 1)
    n_f = (act_i & m).sum(-1).to(li.dtype)
    n_x = act_x.sum(-1).to(li.dtype)  # (B, K)
    n_xe = (act_x & m).sum(-1).to(li.dtype)
    s = act_x.to(li.dtype)
    cnt = n_x.clamp_min(1)
    ie = li * m * s  # I^e over S
    ife = (xi * m) * s  # I^fe over S
    mu_e = ie.sum(-1) / cnt
    mu_f = ife.sum(-1) / cnt
    var_e = (((ie - mu_e[..., None]) * s) ** 2).sum(-1) / cnt
    var_f = (((ife - mu_f[..., None]) * s) ** 2).sum(-1) / cnt
    cov = ((ie - mu_e[..., None]) * (ife - mu_f[..., None]) * s).sum(-1) / cnt
    sd_e, sd_f = var_e.sqrt(), var_f.sqrt()
    return {
        "nf": torch.where(n > 0, n_x / n.clamp_min(1), torch.zeros_like(n_x)),
        "vf": torch.where(n_f > 0, n_xe / n_f.clamp_min(1), torch.zeros_like(n_x)),
        "l": (2 * mu_f * mu_e + C1) / (mu_f**2 + mu_e**2 + C1),
        "c": (2 * sd_f * sd_e + C2) / (var_f + var_e + C2),
        "s": (cov + C3) / (sd_f * sd_e + C3),
        "active": n_x > 0,
    }


def feature_quantity(
    learning_images: torch.Tensor,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    scale: float = 1.0,
    drop: str | Sequence[str] = (),
) -> torch.Tensor:
    """F of every learning image (eq. 4-6 with the deviations of the module docstring).

    Args:
        learning_images: ``B x K x C x H x W``; x: ``B x C x H x W``; fg_mask: boolean
            ``B x 1|C x H x W`` (True = foreground).
        eps: an element is active when ``|value| > eps``.
        scale: the thesis' K (1e4); 1 by default so that F(I, I) = 1.
        drop: factor(s) of :data:`FQ_COMPONENTS` left out of the product (the ablation of table 4-4).

    Returns:
        ``B x K`` tensor; 0 for a unit with no active element or an input with an empty foreground.
        The FQ of a unit is ``F.amax(0)``.
    """
    _check_drop(drop)
    return combine_fq(fq_components(learning_images, x, fg_mask, eps=eps), drop=drop, scale=scale)


def _check_drop(drop: str | Sequence[str]) -> set[str]:
    dropped = {drop} if isinstance(drop, str) else set(drop)
    bad = dropped - set(FQ_COMPONENTS)
    if bad:
        raise ValueError(f"Expected `drop` to name factors among {list(FQ_COMPONENTS)} but got {sorted(bad)}.")
    return dropped


def combine_fq(
    components: Mapping[str, torch.Tensor],
    *,
    drop: str | Sequence[str] = (),
    scale: float = 1.0,
) -> torch.Tensor:
    """F (eq. 4-6) from its factors: ``scale`` times the product of the factors of
    :data:`FQ_COMPONENTS` not in ``drop``, 0 where the learning image has no active element.

    Args:
        components: what :func:`fq_components` returns (or ``all_neuron_feature_quantity(...,
            components=True)``): the five factors and ``active``, tensors of one shape (``B x K`` or
            ``B x K x N``).
        drop: factor(s) left out of the product (the ablation of table 4-4).
        scale: the thesis' K (1e4); 1 by default so that F(I, I) = 1.

    Returns:
        a tensor of the components' shape; the FQ of a unit is its ``amax(0)`` (eq. 4-7).

    Examples:
        >>> parts = fq_components(learning_images, x, fg_mask)
        >>> combine_fq(parts, drop="nf").amax(0)  # FQ without the first factor, ``K``
    """
    dropped = _check_drop(drop)
    f = torch.full_like(components["nf"], float(scale))
    for name in FQ_COMPONENTS:
        if name not in dropped:
            f = f * components[name]
    return torch.where(components["active"], f, torch.zeros_like(f))


def neuron_feature_quantity(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    top_neurons: int = 16,
    rectify: bool = True,
) -> torch.Tensor:
    """FQ of the ``top_neurons`` most activated neurons of each filter (highest mean activation
    over the samples), from their neuron learning images: ``K x top_neurons``.

    For r(activation, FQ) (thesis 4.3.1); diversity uses :func:`all_neuron_feature_quantity`."""
    neurons, activation = _top_neurons(model, layer, x, top_neurons, rectify)
    return _neurons_fq(model, layer, x, fg_mask, neurons, rectify).reshape(activation.shape)


def _top_neurons(
    model: nn.Module, layer: str, x: torch.Tensor, top_neurons: int, rectify: bool
) -> tuple[list[tuple[int, int, int]], torch.Tensor]:
    """The ``n = min(top_neurons, h·w)`` neurons of each filter with the highest mean activation over
    the samples, filter by filter and most activated first (``K·n`` ``(c, i, j)``), and those mean
    activations (``K x n``), from one forward pass."""
    f = layer_activations(model, layer, x, rectify=rectify)
    if f.dim() != 4:
        raise ValueError(f"Expected layer {layer!r} to output (B, K, H, W) for neuron FQ but got {tuple(f.shape)}.")
    k, h, w = f.shape[1:]
    n = min(top_neurons, h * w)
    mean = f.mean(0).reshape(k, -1)
    order = mean.argsort(1, descending=True)[:, :n]  # (K, n)
    neurons = [(c, int(p) // w, int(p) % w) for c in range(k) for p in order[c].tolist()]
    return neurons, mean.gather(1, order)


def _neurons_fq(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    neurons: list[tuple[int, int, int]],
    rectify: bool,
) -> torch.Tensor:
    """FQ (eq. 4-7) of each of ``neurons``: ``N``."""
    li = neuron_learning_images(model, layer, x, neurons, rectify=rectify)  # (B, N, C, H, W)
    return feature_quantity(li, x, fg_mask).amax(0)


def layer_feature_quantity(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    top_neurons: int = 16,
    rectify: bool = True,
) -> dict[str, torch.Tensor]:
    """What :class:`~lightning_interp.callbacks.FeatureQuantityMonitor` scans in one layer (thesis 4.3.1, 4.3.2).

    * ``filter_fq`` (``K``): the FQ of every filter, max over the samples of F (eq. 4-7) of its
      filter learning image L^k (eq. 5-2);
    * ``neuron_fq`` (``K x n``): the FQ of each filter's ``n = min(top_neurons, h·w)`` most activated
      neurons (:func:`neuron_feature_quantity`), most activated first;
    * ``neuron_activation`` (``K x n``): those neurons' mean activation over the samples, in the same
      order, so ``fq_layer_stats(neuron_fq, neuron_activation)`` gives r(activation, FQ) (eq. 4-12).

    Args:
        x: ``B x C x H x W``; fg_mask: boolean ``B x 1|C x H x W`` (True = foreground).

    Raises:
        FloatingPointError: NaN/inf in the learning images.

    Examples:
        >>> r = layer_feature_quantity(SimpleCNN(in_channels=3), "relu3", x, mask, top_neurons=4)
        >>> r["filter_fq"].shape, r["neuron_fq"].shape
        (torch.Size([64]), torch.Size([64, 4]))
    """
    filter_fq = torch.cat([
        feature_quantity(check_finite(li, f"learning images of {layer}"), x, fg_mask).amax(0)
        for _, li in iter_filter_learning_images(model, layer, x, rectify=rectify)
    ])
    neurons, activation = _top_neurons(model, layer, x, top_neurons, rectify)
    neuron_fq = _neurons_fq(model, layer, x, fg_mask, neurons, rectify).reshape(activation.shape)
    return {"filter_fq": filter_fq, "neuron_fq": neuron_fq, "neuron_activation": activation}


def sample_positions(h: int, w: int, max_neurons: int | None, seed: int = 0) -> torch.Tensor:
    """Flat spatial positions (``N`` long tensor, sorted) of an ``h x w`` map: all of them when
    ``max_neurons`` is None or ≥ h·w, else a seeded uniform subsample of ``max_neurons``
    (:func:`~lightning_interp.nns.sample_indices`)."""
    return sample_indices(h * w, max_neurons, seed)


def all_neuron_feature_quantity(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    max_neurons: int | None = 64,
    seed: int = 0,
    rectify: bool = True,
    filters_per_chunk: int = 8,
    components: bool = False,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """FQ of every neuron (every spatial position) of every filter of ``layer``: ``K x N``.

    This is what the thesis clusters for diversity (4.3.3): the FQ of all neurons of a filter in
    the last conv layer. One neuron costs one vector-Jacobian product on the B samples, so the
    cost is K·N products: with ``max_neurons`` set and h·w larger, the same seeded subsample of
    ``max_neurons`` positions (:func:`sample_positions`) is taken in every filter (the default,
    64, keeps all 8×8 positions of SimpleCNN's ``relu3`` on 32×32 inputs). Learning images are
    reduced to FQ ``filters_per_chunk`` filters at a time, so memory stays at
    ``B x filters_per_chunk·N x C x H x W``.

    Args:
        components: return, instead of FQ, the per-sample factors of :func:`fq_components`
            (``B x K x N`` each, ``active`` included) so that FQ variants (the ablation of
            table 4-4) need no second scan.

    Returns:
        ``K x N`` FQ (max over samples), or the dict of ``B x K x N`` factors.
    """
    f = layer_activations(model, layer, x, rectify=rectify)
    if f.dim() != 4:
        raise ValueError(f"Expected layer {layer!r} to output (B, K, H, W) for neuron FQ but got {tuple(f.shape)}.")
    k, h, w = f.shape[1:]
    pos = sample_positions(h, w, max_neurons, seed).tolist()
    n = len(pos)
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, k, filters_per_chunk):
        chans = range(start, min(k, start + filters_per_chunk))
        neurons = [(c, p // w, p % w) for c in chans for p in pos]
        li = neuron_learning_images(model, layer, x, neurons, rectify=rectify)  # (B, c·N, ...)
        comp = fq_components(li, x, fg_mask)
        for name, value in comp.items():
            parts.setdefault(name, []).append(value.reshape(x.shape[0], len(chans), n))
        del li
    out = {name: torch.cat(v, 1) for name, v in parts.items()}
    if components:
        return out
    return combine_fq(out).amax(0)


def fq_layer_stats(fq: torch.Tensor, activation: torch.Tensor) -> dict[str, float]:
    """Per-layer summary (thesis 4.3): FQ mean and variance, and Pearson r(activation, FQ) (eq. 4-12).

    Args:
        fq: FQ per unit (any shape); activation: the units' mean activations, same shape.
    """
    a, q = activation.double().flatten(), fq.double().flatten()
    if a.shape != q.shape:
        raise ValueError(f"Expected `fq` and `activation` with the same number of units but got {tuple(fq.shape)} and {tuple(activation.shape)}.")
    da, dq = a - a.mean(), q - q.mean()
    denom = (da.pow(2).sum() * dq.pow(2).sum()).sqrt()
    r = float((da * dq).sum() / denom) if denom > 0 else 0.0
    return {"fq_mean": float(q.mean()), "fq_variance": float(q.var(unbiased=False)), "r_activation_fq": r}


def fq_diversity(
    neuron_fq: torch.Tensor, *, eps: float = 0.3, min_samples: int = 6, scale: float = 1.0
) -> torch.Tensor:
    """Diversity of each filter (thesis 4.3.3): the number of DBSCAN clusters (noise excluded) of
    the FQ of its neurons.

    The thesis clusters the FQ of **all** neurons of each filter of the last conv layer
    (eps 0.3, min_samples 6): pass :func:`all_neuron_feature_quantity`'s ``K x N``. eps is in the
    units of F; the thesis' F carries K = 1e4 (eq. 4-6), this library's none, so ``scale``
    multiplies the FQ before clustering (``scale=1e4`` reproduces the thesis' resolution; with
    ``scale=1`` and FQ in [0, 1], eps 0.3 allows at most about 3 clusters).

    Args:
        neuron_fq: ``K x N`` FQ of N neurons per filter.
    Returns:
        ``K`` long tensor.
    """
    from sklearn.cluster import DBSCAN

    if neuron_fq.dim() != 2:
        raise ValueError(f"Expected `neuron_fq` of shape (K, N) but got {tuple(neuron_fq.shape)}.")
    values = neuron_fq.detach().double().cpu().numpy() * float(scale)
    counts = []
    for row in values:
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(row.reshape(-1, 1))
        counts.append(len(set(labels.tolist()) - {-1}))
    return torch.tensor(counts, dtype=torch.long)


def diversity_masking(
    model: nn.Module,
    diversity: Mapping[str, torch.Tensor],
    dataloader: Iterable,
    *,
    num_diverse: int = 20,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
    base: tuple[float, float] | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Table 4-3: the % change in loss and the accuracy change when the ``num_diverse`` most and least
    diverse filters of each layer are masked (:func:`fq_diversity` scores, ties broken by filter index).

    Args:
        diversity: ``{layer: K tensor}`` of diversity scores (e.g. from :func:`fq_diversity`).
        num_diverse: filters masked per side (thesis: 20), at most K.
        base: ``(accuracy, loss)`` of the unmasked model if already measured
            (:func:`~lightning_interp.metrics.aipc.evaluate`).

    Returns:
        ``{layer: {"most": r, "least": r}}``, each ``r`` with ``filters`` (the masked count) and what
        the masking evaluation :func:`~lightning_interp.metrics.aipc.masked_loss_change` returns: ``loss_pct``
        = 100·(L_masked − L)/L (NaN when L = 0), ``accuracy_change``, ``loss``, ``base_loss``. The
        unmasked model is evaluated once (not at all with ``base``).
    """
    if base is None:
        base = evaluate(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for layer, div in diversity.items():
        n = min(num_diverse, len(div))
        order = torch.as_tensor(div).double().argsort(descending=True, stable=True).tolist()
        out[layer] = {}
        for tag, idx in (("most", order[:n]), ("least", order[::-1][:n])):
            r = masked_loss_change(model, layer, idx, dataloader, batch_adapter=batch_adapter,
                                   max_batches=max_batches, base=base)
            out[layer][tag] = {"filters": n, **r}
    return out
