"""Test with Interpretable Properties (TIP, DESIGN §3, thesis ch. 5).

Per filter k and sample x, over the elements of its learning image L = L^k(x) and the input:

    P_m = mean(L)   P_v = var(L)   P_c = cov(L, x)   P_cor = Pearson corr(L, x)

(population moments over all C·H·W elements; foreground/background variants over the elements
inside/outside the mask M^f). T^k is the mean over samples (eq. 5-7). Saliencies: AVoU^k, the
mean activation of filter k (eq. 5-8), and SoU^k, the loss sensitivity of its weights
(eqs. 5-9, 5-10): by default SNIP's mean |w ⊙ ∂loss/∂w| on the batch-mean loss (fast); the
per-sample first-order form the thesis' averaging implies, mean over samples of
mean |w ⊙ ∂ℓ_x/∂w|, with ``sou(..., estimate="per_sample")``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import Metric

from ..gradients import reduce_per_sample_gradients
from ..layers import filter_owner, get_layer
from ..nns import (
    ScanSpec,
    check_finite,
    check_inputs,
    check_scan_mode,
    iter_filter_learning_images,
    layer_activations,
    scan_mode,
    sketch_properties,
)

__all__ = [
    "PROPERTIES",
    "interpretable_properties",
    "layer_properties",
    "TIP_MODES",
    "check_tip_mode",
    "TIPAggregate",
    "avou",
    "sou",
    "SOU_ESTIMATES",
    "spearman",
    "weight_layer_for",
]

PROPERTIES = ("mean", "variance", "covariance", "correlation")


def _check_mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Expected `mask` to be a tensor but got {type(mask).__name__}.")
    if mask.dim() != x.dim() or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] or mask.shape[1] not in (
        1,
        x.shape[1],
    ):
        raise ValueError(
            f"Expected `mask` of shape (B, 1 or C, ...) matching inputs {tuple(x.shape)} but got {tuple(mask.shape)}."
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"Expected a boolean `mask` (foreground = True) but got dtype {mask.dtype}.")
    return mask.expand_as(x)


def _moments(li: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weighted population moments over the element dims: li (B,K,E), x (B,1,E), w (B,1,E) → (B,K)."""
    n = w.sum(-1)
    safe = n.clamp_min(1)
    ml = (w * li).sum(-1) / safe
    mx = (w * x).sum(-1) / safe
    dl = (li - ml[..., None]) * w
    dx = (x - mx[..., None]) * w
    var_l = (dl * dl).sum(-1) / safe
    var_x = (dx * dx).sum(-1) / safe
    cov = (dl * dx).sum(-1) / safe
    denom = (var_l * var_x).sqrt()
    tiny = torch.finfo(li.dtype).tiny
    corr = torch.where(denom > tiny, cov / denom.clamp_min(tiny), torch.zeros_like(cov)).clamp(-1, 1)
    empty = n == 0
    out = {"mean": ml, "variance": var_l, "covariance": cov.expand_as(ml), "correlation": corr.expand_as(ml)}
    return {k: torch.where(empty, torch.zeros_like(v), v) for k, v in out.items()}


def interpretable_properties(
    learning_images: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """The four TIP properties of every learning image (thesis ch. 5, DESIGN §3).

    Args:
        learning_images: ``B x K x <x.shape[1:]>``.
        x: inputs ``B x C x H x W`` (or ``B x D``).
        mask: optional boolean foreground ``B x 1|C x H x W``.

    Returns:
        dict of ``B x K`` tensors: ``mean``, ``variance``, ``covariance``, ``correlation`` over all
        elements and, with a mask, ``fg_<name>`` and ``bg_<name>`` over the foreground and
        background elements. A constant image has correlation 0; an empty region gives 0.
    """
    check_inputs(x)
    if learning_images.dim() != x.dim() + 1 or learning_images.shape[0] != x.shape[0] or (
        learning_images.shape[2:] != x.shape[1:]
    ):
        raise ValueError(
            f"Expected `learning_images` of shape (B, K, {', '.join(map(str, x.shape[1:]))}) with B = {x.shape[0]} "
            f"but got {tuple(learning_images.shape)}."
        )
    b, k = learning_images.shape[:2]
    li = learning_images.reshape(b, k, -1)
    xf = x.reshape(b, 1, -1).to(li.dtype)
    out = _moments(li, xf, torch.ones_like(xf))
    if mask is not None:
        m = _check_mask(mask, x).reshape(b, 1, -1).to(li.dtype)
        for prefix, w in (("fg_", m), ("bg_", 1 - m)):
            out.update({prefix + name: v for name, v in _moments(li, xf, w).items()})
    return out


class TIPAggregate(Metric):
    """T^k = mean over samples of each property (eq. 5-7), accumulated over batches (DDP-synced).

    ``update(properties)`` takes the dict of ``B x K`` tensors of :func:`interpretable_properties`;
    ``compute()`` returns a dict of ``K`` tensors.
    """

    full_state_update = False

    def __init__(self, num_filters: int, names: tuple[str, ...] = PROPERTIES, **kwargs):
        super().__init__(**kwargs)
        self.names = tuple(names)
        self.add_state("sums", default=torch.zeros(len(self.names), num_filters, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, properties: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in properties]
        if missing:
            raise ValueError(f"Expected properties {list(self.names)} but {missing} are missing.")
        stacked = torch.stack([properties[n].double().sum(0) for n in self.names])
        self.sums += stacked
        self.count += properties[self.names[0]].shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        mean = self.sums / self.count.clamp_min(1)
        return {n: mean[i] for i, n in enumerate(self.names)}


def avou(activations: torch.Tensor) -> torch.Tensor:
    """AVoU^k (eq. 5-8): the mean activation of each filter, ``B x K x ...`` → ``K``."""
    if activations.dim() < 2:
        raise ValueError(f"Expected activations of shape (B, K, ...) but got {tuple(activations.shape)}.")
    return activations.transpose(0, 1).reshape(activations.shape[1], -1).mean(1)


def weight_layer_for(model: nn.Module, layer: str) -> str:
    """The module whose weights make the filters of ``layer``: :func:`lightning_interp.layers.filter_owner`,
    the conv or linear layer pruning cuts too (the conv of a conv → BN → ReLU chain, the last conv of
    a block)."""
    return filter_owner(model, layer)


SOU_ESTIMATES = ("snip", "per_sample")


def sou(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    estimate: str = "snip",
) -> torch.Tensor:
    """SoU^k, the loss sensitivity of filter k's connections (eqs. 5-9, 5-10; SNIP, Lee et al. 2019).

    The thesis defines, per sample x and connection w of filter k (W connections, S samples),
    Δloss_w(x) = loss_x(ω) − loss_x(ω with w removed) and SoU^k = Σ_x Σ_w |Δloss_w(x)| / (W·S).
    To first order Δloss_w(x) ≈ w · ∂ℓ_x/∂w, which gives the two estimates offered here:

    * ``estimate="snip"`` (default, the fast one, what :class:`TIPMonitor` logs): SNIP's
      connection sensitivity on the batch-mean loss, mean_w |w · ∂(mean_x ℓ_x)/∂w|: one backward
      pass. The mean over samples is taken *inside* the absolute value, so samples whose
      gradients disagree cancel; it is ≤ the per-sample form.
    * ``estimate="per_sample"`` (the thesis' averaging): mean_x mean_w |w · ∂ℓ_x/∂w|, the
      absolute first-order loss change per sample and connection, then averaged as eq. 5-10 does.
      It costs per-sample gradients of the weight, within the scan memory budget
      (:func:`~lightning_interp.gradients.reduce_per_sample_gradients`: vmapped chunks sized from the
      budget, one backward per sample where a chunk of one does not fit or the model cannot run under vmap).

    The weights are those of :func:`weight_layer_for` ``(model, layer)``; row k of its weight is
    filter k. Gradients are taken with ``torch.autograd.grad`` in eval mode, so parameter
    ``.grad`` is untouched. ``loss_fn(logits, y)`` must return the batch mean; the per-sample
    form calls it on one sample at a time.

    Returns:
        ``K`` tensor.
    """
    check_inputs(x)
    if estimate not in SOU_ESTIMATES:
        raise ValueError(f"Expected `estimate` to be one of {list(SOU_ESTIMATES)} but got {estimate!r}.")
    return _sou(model, get_layer(model, weight_layer_for(model, layer)).weight, x, y, loss_fn=loss_fn, estimate=estimate)


def _sou(
    model: nn.Module,
    weight: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    estimate: str = "snip",
) -> torch.Tensor:
    """:func:`sou` of the filters whose rows ``weight`` holds, the owner already resolved."""
    if estimate == "snip":
        with scan_mode(model):
            loss = loss_fn(model(x), y)
            (g,) = torch.autograd.grad(loss, weight)
        return (weight.detach() * g).abs().reshape(weight.shape[0], -1).mean(1)
    name = next(n for n, p in model.named_parameters() if p is weight)
    w = weight.detach()

    def per_filter(grads: dict[str, torch.Tensor]) -> torch.Tensor:  # (K,): mean_w |w · ∂ℓ_x/∂w| of each filter
        return (w * grads[name]).abs().reshape(w.shape[0], -1).mean(1)

    return reduce_per_sample_gradients(model, x, y, per_filter, parameters=[name], loss_fn=loss_fn).mean(0)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of two ``K`` vectors (average ranks for ties); 0 if either is constant."""
    from torchmetrics.functional import spearman_corrcoef

    a, b = a.double().flatten(), b.double().flatten()
    if a.numel() < 2 or torch.all(a == a[0]) or torch.all(b == b[0]):
        return torch.zeros((), dtype=torch.float64, device=a.device)
    return spearman_corrcoef(a, b)


#: The :data:`~lightning_interp.nns.SCAN_MODES` TIP computes (``"pooled"`` is an anomaly embedding only).
TIP_MODES = ("exact", "sketch")


def check_tip_mode(mode: str) -> str:
    """``mode`` if TIP computes it; ``ValueError`` naming :data:`TIP_MODES` otherwise."""
    check_scan_mode(mode)
    if mode not in TIP_MODES:
        raise ValueError(
            f"Expected `mode` to be one of {list(TIP_MODES)} for TIP but got {mode!r}: pooled learning images "
            "summarise where a filter's energy comes from, their mean/variance/covariance are not T^k."
        )
    return mode


def layer_properties(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    *,
    mode: str = "exact",
    num_projections: int = 64,
    seed: int = 0,
    rectify: bool = True,
    spec: ScanSpec | None = None,
) -> dict[str, torch.Tensor]:
    """T^k of every filter of ``layer`` on inputs ``x``, averaged over the batch: what ``TIPMonitor`` scans.

    ``spec`` (a :class:`~lightning_interp.nns.ScanSpec`) gives ``mode``, ``num_projections`` and
    ``rectify`` at once (the keywords are then ignored).

    ``mode="exact"``: :func:`interpretable_properties` of the filter learning images, chunked over
    filters (overall, and with a foreground ``mask`` also ``fg_``/``bg_``); ``mode="sketch"``:
    :func:`lightning_interp.nns.sketch_properties` (T_m, T_c exact from forward-mode products, T_v and
    T_cor from ``num_projections`` Hutchinson directions, drawn independently for every sample so the
    error of the mean over the B samples shrinks as 1/√B). ``mode="pooled"`` is an anomaly-scan
    embedding (:func:`lightning_interp.nns.pooled_learning_images`): the properties of a pooled image
    are not T^k, so TIP refuses it. Adds ``avou`` (eq. 5-8) and, with labels ``y``, ``sou``
    (eqs. 5-9, 5-10; the SNIP estimate of :func:`sou`).

    Returns:
        ``{name: K tensor}``.

    Raises:
        FloatingPointError: NaN/inf in the learning images or the activations.
    """
    if spec is not None:
        mode, num_projections, rectify = spec.mode, spec.num_projections, spec.rectify
    check_tip_mode(mode)
    if mode == "sketch":
        props = sketch_properties(model, layer, x, mask, num_projections=num_projections, seed=seed, rectify=rectify,
                                  per_sample=True)
        out = {name: value.mean(0) for name, value in props.items()}
    else:
        parts: dict[str, list[torch.Tensor]] = {}
        for _, li in iter_filter_learning_images(model, layer, x, rectify=rectify):
            check_finite(li, f"learning images of {layer}")
            for name, value in interpretable_properties(li, x, mask).items():
                parts.setdefault(name, []).append(value.mean(0))
        out = {name: torch.cat(chunks) for name, chunks in parts.items()}
    f = layer_activations(model, layer, x, rectify=rectify)
    out["avou"] = avou(check_finite(f, f"activations of {layer}"))
    if y is not None:
        try:
            owner = weight_layer_for(model, layer)
        except ValueError as err:  # an optional side metric: a layer no conv owns (e.g. a custom module)
            warnings.warn(f"SoU of {layer!r} skipped: {err}", stacklevel=2)
            return out
        weight = get_layer(model, owner).weight
        # Row k of the owner's weight is filter k (what `sou` scores), so the row count is checked
        # before paying for SoU's forward and backward pass.
        if weight.shape[0] == out["avou"].shape[0]:
            out["sou"] = _sou(model, weight, x, y)
        else:  # an optional side metric: a layer whose filters no single weight makes (e.g. a concatenation)
            warnings.warn(
                f"SoU of {layer!r} skipped: the weights of {owner!r} make "
                f"{weight.shape[0]} filters but the layer outputs {out['avou'].shape[0]}.", stacklevel=2,
            )
    return out
