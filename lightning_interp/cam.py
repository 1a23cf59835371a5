"""Differentiable class activation maps (DESIGN §5).

Grad-CAM (Selvaraju et al. 2017): A^c = ReLU(Σ_k w_k^c f_k) with w_k^c the spatial mean of
∂y^c/∂f_k, normalised to [0, 1] per sample (min-max) and upsampled bilinearly to the input
size. CAM (Zhou et al. 2016) for networks ending in global average pooling + linear:
A^c = ReLU(Σ_k W_ck f_k), normalised and upsampled the same way. With ``create_graph=True``
the maps stay differentiable in the parameters and the input, for use in a loss.

Unlike the scans, these functions do not change the model's mode: inside ``training_step``
they see the network as the training step does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .layers import capture_output, get_layer
from .nns import check_inputs

__all__ = ["grad_cam", "class_activation_map", "normalize_maps", "cam_iou", "Targets"]

Targets = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]


def normalize_maps(maps: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Per-sample min-max normalisation of ``B x H x W`` maps to [0, 1] (differentiable)."""
    flat = maps.flatten(1)
    lo = flat.min(1).values[:, None, None]
    hi = (maps - lo).flatten(1).max(1).values[:, None, None]
    return (maps - lo) / (hi + eps)


def _scores(logits: torch.Tensor, targets: Targets) -> torch.Tensor:
    if callable(targets):
        scores = targets(logits)
    else:
        t = torch.as_tensor(targets, device=logits.device).long().flatten()
        if t.numel() != logits.shape[0]:
            raise ValueError(f"Expected one target class per sample ({logits.shape[0]}) but got {t.numel()}.")
        if (t < 0).any() or (t >= logits.shape[1]).any():
            raise ValueError(f"Expected target classes in [0, {logits.shape[1] - 1}] but got {t.tolist()}.")
        scores = logits.gather(1, t[:, None]).squeeze(1)
    if scores.shape != (logits.shape[0],):
        raise ValueError(f"Expected the targets callable to return one score per sample but got {tuple(scores.shape)}.")
    return scores


def _finish(raw: torch.Tensor, size: tuple[int, int], normalize: bool) -> torch.Tensor:
    cam = torch.relu(raw)
    if normalize:
        cam = normalize_maps(cam)
    if cam.shape[-2:] != size:
        cam = F.interpolate(cam[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return cam


def grad_cam(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    targets: Targets,
    *,
    create_graph: bool = False,
    normalize: bool = True,
) -> torch.Tensor:
    """Grad-CAM maps of ``layer`` for the target classes, at the input resolution.

    Args:
        model: a classifier returning ``B x classes`` logits.
        layer: a layer with ``B x K x h x w`` outputs (usually the last conv block).
        x: ``B x C x H x W`` inputs.
        targets: ``B`` class indices, or a callable mapping the logits to ``B`` scores.
        create_graph: keep the graph so the maps can be differentiated (loss use).
        normalize: min-max normalise each map to [0, 1] before upsampling.

    Returns:
        ``B x H x W`` maps (detached unless ``create_graph``).
    """
    check_inputs(x)
    if x.dim() != 4:
        raise ValueError(f"Expected images of shape (B, C, H, W) for Grad-CAM but got {tuple(x.shape)}.")
    module = get_layer(model, layer)
    with torch.inference_mode(False), torch.enable_grad():
        inputs = x.clone() if x.is_inference() else x  # inference tensors cannot enter a graph
        with capture_output(module, layer) as store:
            logits = model(inputs)
        f = store["output"]
        if f is None or f.dim() != 4:
            raise ValueError(f"Expected layer {layer!r} to output (B, K, h, w) for Grad-CAM but got "
                             f"{None if f is None else tuple(f.shape)}.")
        scores = _scores(logits, targets)
        (grads,) = torch.autograd.grad(scores.sum(), f, create_graph=create_graph)
        weights = grads.mean((2, 3), keepdim=True)
        cam = _finish((weights * f).sum(1), tuple(x.shape[-2:]), normalize)
    return cam if create_graph else cam.detach()


def class_activation_map(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    targets: torch.Tensor,
    *,
    fc: str = "fc",
    normalize: bool = True,
) -> torch.Tensor:
    """CAM for a network whose ``layer`` feeds global average pooling and the linear layer ``fc``.

    Returns:
        ``B x H x W`` maps, differentiable when the inputs or parameters require grad.
    """
    check_inputs(x)
    linear = get_layer(model, fc)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"Expected `fc` to name a Linear layer but {fc!r} is {type(linear).__name__}.")
    with capture_output(get_layer(model, layer), layer) as store:
        logits = model(x)
    f = store["output"]
    t = torch.as_tensor(targets, device=x.device).long().flatten()
    if f.shape[1] != linear.in_features:
        raise ValueError(f"Expected layer {layer!r} to have {linear.in_features} channels (the inputs of {fc!r}) "
                         f"but it has {f.shape[1]}.")
    del logits
    w = linear.weight[t]  # (B, K)
    return _finish((w[:, :, None, None] * f).sum(1), tuple(x.shape[-2:]), normalize)


def cam_iou(cam: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Mean IoU between maps thresholded at ``threshold`` and boolean masks (``B x [1 x] H x W``)."""
    m = mask.squeeze(1) if mask.dim() == 4 else mask
    pred = cam >= threshold
    inter = (pred & m).flatten(1).sum(1).double()
    union = (pred | m).flatten(1).sum(1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter)).mean()
