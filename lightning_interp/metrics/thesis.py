"""The thesis' remaining analyses of chapters 3-5 as plain functions (DESIGN §1-§3).

Chapter 3 (NNS): the distance between a learning image and its sample (eq. 3-15), the
winning output neuron's distance, activation intensity and count (eq. 3-16, table 3-2), the
correlation of feature maps with filter learning images (eqs. 3-17, 3-18, table 3-3), and the
IoU of the learning images of each filter's two most activated neurons (eqs. 3-19, 3-20,
table 3-4). Chapter 4 (FQ): the SSIM baseline of table 4-2, FQ and SSIM per layer, the
foreground IoU of the max-FQ output learning image (table 4-5), and the % loss change when
filters are masked (tables 4-3, 4-4: :func:`~lightning_interp.metrics.aipc.masked_loss_change`, kept with the
other masking evaluations in ``metrics.aipc`` and importable from here too). Chapter 5 (TIP): the Spearman table of saliencies against
properties (table 5-2) and filter types masked at several training phases (tables 5-3..5-6).

Binary maps. Eqs. 3-17..3-20 and table 4-5 intersect images as sets and the thesis does not say
how an image becomes a set. Here a map is first reduced over channels (Σ_c |v|) and an element
is *active* when its value exceeds ``threshold`` × the map's maximum: ``threshold = 0`` (the
chapter-3 default) means "non-zero", the thesis' notion of an active pixel in its knowledge
quantity (3.3.1); table 4-5 binarises min-max normalised saliency maps at 0.5, as
:func:`lightning_interp.cam.cam_iou` does.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from ..batch import BatchAdapter, default_batch_adapter
from ..nns import (
    _auto_chunk,
    _forward_to_layer,
    _leaf_input,
    check_inputs,
    iter_filter_learning_images,
    knowledge_quantity,
    layer_activations,
    neuron_learning_images,
    sample_neurons,
    scan_mode,
)
from .aipc import FILTER_TYPES, filter_types, masked_loss_change, type_masking
from .fq import feature_quantity
from .tip import PROPERTIES, _check_mask, spearman

__all__ = [
    "binary_map",
    "sample_distance",
    "winning_neuron_stats",
    "feature_map_correlation",
    "top2_neuron_iou",
    "global_ssim",
    "layer_fq_ssim",
    "fq_saliency_iou",
    "map_iou",
    "masked_loss_change",
    "saliency_property_spearman",
    "filter_type_phases",
]


def binary_map(images: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """Active elements of input-sized maps: Σ over channels of |v|, then ``> threshold · max``.

    Args:
        images: ``N x C x H x W`` (or ``N x H x W``, already one channel).
        threshold: fraction of each map's maximum; 0 = every non-zero element.

    Returns:
        ``N x H x W`` bool.
    """
    m = images.abs().sum(1) if images.dim() == 4 else images.abs()
    peak = m.flatten(1).amax(1).view(-1, 1, 1)
    return (m > threshold * peak) & (m > 0)


# ---- chapter 3 ---------------------------------------------------------------------------------


def sample_distance(learning_images: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dist_o^I = ‖I_o − I‖ (eq. 3-15), the Euclidean distance over all C·H·W elements.

    Args:
        learning_images: ``B x K x <x.shape[1:]>``; x: ``B x ...`` the samples they came from.

    Returns:
        ``B x K`` distances (input units).
    """
    check_inputs(x)
    if learning_images.dim() != x.dim() + 1 or learning_images.shape[0] != x.shape[0] or (
        learning_images.shape[2:] != x.shape[1:]
    ):
        raise ValueError(f"Expected `learning_images` of shape (B, K, {tuple(x.shape[1:])}) with B = {x.shape[0]} "
                         f"but got {tuple(learning_images.shape)}.")
    b, k = learning_images.shape[:2]
    return (learning_images.reshape(b, k, -1) - x.reshape(b, 1, -1)).norm(dim=-1)


def winning_neuron_stats(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int | None = None,
    eps: float = 0.0,
) -> dict[str, torch.Tensor | float]:
    """The winning neuron (thesis 3.3.3, eq. 3-16, table 3-2).

    The output neurons o of ``layer`` (the logits layer, no ReLU) get learning images
    I^o(x) = x ⊙ ∂z_o/∂x; the *winning* neuron is the one of the true class.

    Returns:
        dict with ``class_distance`` (``classes x O``: DIST_o^c, the mean over the samples of
        class c of ‖I^o − I‖, eq. 3-16; NaN for a class without samples), ``distance`` (mean
        over samples of the winner's distance, table 3-2 "距离"), ``activation_intensity`` and
        ``activation_count`` (mean over samples of the winner image's knowledge quantity,
        :func:`~lightning_interp.nns.knowledge_quantity`), ``winner_closest`` (share of samples
        whose winner image is the closest of all outputs' images to the sample).
    """
    check_inputs(x)
    out = layer_activations(model, layer, x[:1], rectify=False)  # logits: signed, not rectified
    if out.dim() != 2:
        raise ValueError(f"Expected layer {layer!r} to output (B, O) logits but got {tuple(out.shape)}.")
    o = out.shape[1]
    y = torch.as_tensor(y, device=x.device).long().flatten()
    if y.numel() != x.shape[0] or (y < 0).any() or (y >= o).any():
        raise ValueError(f"Expected one label in [0, {o - 1}] per sample ({x.shape[0]}) but got {y.tolist()[:8]}.")
    li = neuron_learning_images(model, layer, x, [(c,) for c in range(o)], rectify=False)  # (B, O, ...)
    dist = sample_distance(li, x)  # (B, O)
    c = num_classes or o
    class_distance = torch.full((c, o), float("nan"), dtype=dist.dtype, device=dist.device)
    for cls in range(c):
        sel = y == cls
        if sel.any():
            class_distance[cls] = dist[sel].mean(0)
    ar = torch.arange(x.shape[0], device=x.device)
    winner = li[ar, y].unsqueeze(1)  # (B, 1, ...)
    kq = knowledge_quantity(winner, x, eps=eps)
    return {
        "class_distance": class_distance,
        "distance": float(dist[ar, y].mean()),
        "activation_intensity": float(kq.activation_intensity.mean()),
        "activation_count": float(kq.activation_count.mean()),
        "winner_closest": float((dist.argmin(1) == y).double().mean()),
    }


def feature_map_correlation(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    rectify: bool = True,
    threshold: float = 0.0,
) -> torch.Tensor:
    """C^{k,l} = |S^{k,l} ∩ I^{k,l}| / |I^{k,l}| per filter, averaged over samples (eq. 3-17).

    S^{k,l} is filter k's feature map upsampled bilinearly to the input's H x W, I^{k,l} its
    filter learning image Σ_xy I_(x,y) f_(x,y) (eq. 5-2), both binarised with :func:`binary_map`.
    The layer value C^l (eq. 3-18) is the mean over filters. A sample whose learning image has no
    active element contributes 0.

    Returns:
        ``K`` tensor in [0, 1].
    """
    check_inputs(x)
    if x.dim() != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W) but got {tuple(x.shape)}.")
    f = layer_activations(model, layer, x, rectify=rectify)
    if f.dim() != 4:
        raise ValueError(f"Expected layer {layer!r} to output (B, K, h, w) but got {tuple(f.shape)}.")
    b, k = f.shape[:2]
    s = F.interpolate(f, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    out = torch.zeros(k, dtype=torch.float64, device=x.device)
    for filters, li in iter_filter_learning_images(model, layer, x, rectify=rectify):
        n = filters.numel()
        img = binary_map(li.reshape(b * n, *x.shape[1:]), threshold).reshape(b, n, -1)
        sm = binary_map(s[:, filters].reshape(b * n, *x.shape[-2:]), threshold).reshape(b, n, -1)
        size = img.sum(-1).double()
        c = torch.where(size > 0, (img & sm).sum(-1).double() / size.clamp_min(1), torch.zeros_like(size))
        out[filters.to(out.device)] = c.mean(0)
    return out


def top2_neuron_iou(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    rectify: bool = True,
    threshold: float = 0.0,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """IoU^{k,l} of the learning images of filter k's two most activated neurons (eq. 3-19),
    averaged over samples; the layer value IoU^l (eq. 3-20) is the mean over filters.

    The two neurons are chosen per sample (the two largest values of the feature map; ties by
    position). One vector-Jacobian product per (filter, rank) serves every sample at once: in
    eval mode samples do not interact, so a cotangent with one 1 per sample gives each sample's
    own neuron image. Images are binarised with :func:`binary_map`; a sample where both images
    are empty (the filter is silent) is left out of the mean.

    Returns:
        ``K`` tensor in [0, 1]; NaN for a filter silent on every sample.
    """
    check_inputs(x)
    with scan_mode(model):
        xl, f = _forward_to_layer(model, layer, _leaf_input(x), rectify)
        if f.dim() != 4:
            raise ValueError(f"Expected layer {layer!r} to output (B, K, h, w) but got {tuple(f.shape)}.")
        b, k, h, w = f.shape
        if h * w < 2:
            raise ValueError(f"Expected layer {layer!r} to have at least 2 neurons per filter but it has {h * w}.")
        top = f.detach().reshape(b, k, -1).topk(2, dim=2).indices  # (B, K, 2)
        jobs = [(c, r) for c in range(k) for r in range(2)]
        n = _auto_chunk(f, x, chunk_size)
        images: dict[tuple[int, int], torch.Tensor] = {}
        ar = torch.arange(b, device=f.device)
        for start in range(0, len(jobs), n):
            chunk = jobs[start : start + n]
            cot = torch.zeros((len(chunk), b, k, h * w), dtype=f.dtype, device=f.device)
            for i, (c, r) in enumerate(chunk):
                cot[i, ar, c, top[:, c, r]] = 1.0
            last = start + n >= len(jobs)
            (grads,) = torch.autograd.grad(f, xl, cot.reshape(len(chunk), *f.shape), retain_graph=not last,
                                           is_grads_batched=True)
            for i, job in enumerate(chunk):
                images[job] = binary_map(xl.detach() * grads[i], threshold)  # (B, H, W)
    out = torch.full((k,), float("nan"), dtype=torch.float64, device=x.device)
    for c in range(k):
        a, bb = images[(c, 0)].flatten(1), images[(c, 1)].flatten(1)
        union = (a | bb).sum(1).double()
        valid = union > 0
        if valid.any():
            out[c] = ((a & bb).sum(1).double()[valid] / union[valid]).mean()
    return out


# ---- chapter 4 ---------------------------------------------------------------------------------


def global_ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0) -> torch.Tensor:
    """Global (unwindowed) SSIM between paired images, over all elements of each pair (table 4-2's
    baseline): ((2 μ_a μ_b + C1)(2 σ_ab + C2)) / ((μ_a² + μ_b² + C1)(σ_a² + σ_b² + C2)) with
    C1 = (0.01·L)², C2 = (0.03·L)², L = ``data_range`` (Wang et al. 2004, population moments).

    The thesis names "SSIM" without a window; the global form is the one FQ's own l, c, s use.

    Args:
        a: ``... x E`` tensor (the last dim holds the elements), broadcastable with ``b``.
        b: ``... x E`` tensor, broadcastable with ``a``.

    Returns:
        ``...`` tensor.
    """
    a, b = torch.broadcast_tensors(a, b)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    ma, mb = a.mean(-1), b.mean(-1)
    da, db = a - ma[..., None], b - mb[..., None]
    va, vb, cov = (da * da).mean(-1), (db * db).mean(-1), (da * db).mean(-1)
    return ((2 * ma * mb + c1) * (2 * cov + c2)) / ((ma**2 + mb**2 + c1) * (va + vb + c2))


def layer_fq_ssim(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    max_neurons: int | None = 128,
    seed: int = 0,
    rectify: bool = True,
) -> dict[str, float]:
    """FQ and its SSIM baseline for one layer (table 4-2): the mean over the layer's neurons of
    FQ (max over samples of F, eq. 4-7) and of SSIM(I_x, I) (:func:`global_ssim` of the neuron
    learning image and its sample, averaged over samples).

    Neurons: all (channel, position) units of the layer, or a seeded uniform subsample of
    ``max_neurons`` (one vector-Jacobian product each).

    Returns:
        ``{"fq": float, "ssim": float, "fq_variance": float, "neurons": int}``.
    """
    f = layer_activations(model, layer, x[:1], rectify=rectify)
    neurons = sample_neurons(tuple(f.shape[1:]), max_neurons, seed)
    fq, ssim = [], []
    for start in range(0, len(neurons), 64):
        li = neuron_learning_images(model, layer, x, neurons[start : start + 64], rectify=rectify)
        fq.append(feature_quantity(li, x, fg_mask).amax(0))
        b, n = li.shape[:2]
        ssim.append(global_ssim(li.reshape(b, n, -1), x.reshape(b, 1, -1).to(li.dtype)).mean(0))
    q = torch.cat(fq).double()
    return {"fq": float(q.mean()), "ssim": float(torch.cat(ssim).mean()), "fq_variance": float(q.var(unbiased=False)),
            "neurons": len(neurons)}


def map_iou(maps: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-sample IoU between maps thresholded at ``threshold`` and boolean masks (table 4-5).

    Args:
        maps: ``B x H x W`` (already normalised to [0, 1] when ``threshold`` is absolute).
        mask: ``B x [1 x] H x W`` bool.

    Returns:
        ``B`` tensor; 1 where both are empty.
    """
    m = mask.squeeze(1) if mask.dim() == 4 else mask
    pred = maps >= threshold
    inter = (pred & m).flatten(1).sum(1).double()
    union = (pred | m).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter))


def fq_saliency_iou(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    threshold: float = 0.5,
) -> torch.Tensor:
    """The FQ column of table 4-5: per sample, the learning image of the output neuron (of the
    logits ``layer``) with the highest F (eq. 4-6) is the saliency map; Σ_c |I|, min-max
    normalised, thresholded at ``threshold``, compared with the foreground by IoU.

    Returns:
        ``B`` tensor of IoUs (compare with :func:`map_iou` of Grad-CAM or CAM maps).
    """
    from ..cam import normalize_maps

    mask = _check_mask(fg_mask, x)
    out = layer_activations(model, layer, x[:1], rectify=False)  # logits: signed, not rectified
    if out.dim() != 2:
        raise ValueError(f"Expected layer {layer!r} to output (B, O) logits but got {tuple(out.shape)}.")
    li = neuron_learning_images(model, layer, x, [(c,) for c in range(out.shape[1])], rectify=False)  # (B, O, ...)
    best = feature_quantity(li, x, mask).argmax(1)
    chosen = li[torch.arange(x.shape[0], device=x.device), best]  # (B, C, H, W)
    return map_iou(normalize_maps(chosen.abs().sum(1)), mask[:, :1], threshold)


# ---- chapter 5 ---------------------------------------------------------------------------------


def saliency_property_spearman(
    scores: Mapping[str, torch.Tensor],
    saliencies: Sequence[str] = ("avou", "sou"),
    properties: Sequence[str] = PROPERTIES,
) -> dict[str, dict[str, float]]:
    """Table 5-2: Spearman rank correlation of each saliency with each property across filters.

    Args:
        scores: ``{name: K tensor}`` holding the saliencies and properties (e.g. the output of
            :func:`~lightning_interp.metrics.tip.layer_properties`).

    Returns:
        ``{saliency: {property: rho}}`` (0 where either is constant).
    """
    missing = [n for n in (*saliencies, *properties) if n not in scores]
    if missing:
        raise ValueError(f"Expected scores for {missing}; available: {sorted(scores)}.")
    return {s: {p: float(spearman(scores[s], scores[p])) for p in properties} for s in saliencies}


def filter_type_phases(
    phases: Sequence[tuple[nn.Module, torch.Tensor, torch.Tensor]],
    layer: str,
    dataloader: Iterable,
    *,
    per: float = 0.3,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Tables 5-3..5-6: filter types and their masking, at several training phases.

    Args:
        phases: one ``(model, fg_scores, bg_scores)`` per phase (e.g. checkpoints at the start,
            middle and end of training), scores ``K`` tensors of a foreground/background property
            of ``layer`` (T_m, T_v, ...).
        per: the top/bottom share defining H and L (thesis: 0.3).

    Returns:
        ``{type: {"proportion": [...], "accuracy_change": [...]}}`` with one value per phase:
        |rfb| / K and accuracy(masked) − accuracy (fraction; the thesis' tables print the drop,
        −100 × this, in percentage points). An empty type has change 0.
    """
    out = {t: {"proportion": [], "accuracy_change": []} for t in FILTER_TYPES}
    for model, fg, bg in phases:
        types = filter_types(fg, bg, per)
        changes = type_masking(model, layer, types, dataloader, batch_adapter=batch_adapter, max_batches=max_batches)
        for name, members in types.items():
            out[name]["proportion"].append(int(members.sum()) / members.numel())
            out[name]["accuracy_change"].append(changes[name])
    return out
