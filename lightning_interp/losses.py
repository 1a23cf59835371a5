"""Attention-guiding losses usable in any ``training_step`` (DESIGN §5, survey 4.4.1).

* GAIN (Li et al., CVPR 2018): attention mining — erase what the Grad-CAM map attends to and
  penalise the true class's remaining score; external supervision — pull the map towards a
  pixel mask. Total loss CE + α·L_am + ω_e·L_e.
* Right for the Right Reasons (Ross et al., IJCAI 2017): penalise input gradients of the
  log-probabilities on regions that must not matter.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .batch import Batch
from .cam import grad_cam
from .nns import check_inputs

__all__ = [
    "LOSSES",
    "soft_mask",
    "gain_attention_mining_loss",
    "attention_supervision_loss",
    "rrr_input_gradient_penalty",
    "guidance_terms",
]

#: The terms `guidance_terms` (and the AttentionGuidance callback) know.
LOSSES = ("attention_mining", "attention_supervision", "rrr")


def soft_mask(cam: torch.Tensor, sigma: float = 10.0, omega: float = 0.5) -> torch.Tensor:
    """GAIN's soft threshold T(A) = sigmoid(σ (A − ω)) of ``B x H x W`` maps in [0, 1]."""
    return torch.sigmoid(sigma * (cam - omega))


def gain_attention_mining_loss(
    model: nn.Module,
    x: torch.Tensor,
    cam: torch.Tensor,
    targets: torch.Tensor,
    *,
    sigma: float = 10.0,
    omega: float = 0.5,
) -> torch.Tensor:
    """GAIN attention-mining loss: mean sigmoid score of the true class on x* = x − T(A) ⊙ x.

    Args:
        model: the classifier (called once more, on the erased images).
        x: ``B x C x H x W`` inputs; cam: ``B x H x W`` maps in [0, 1] at the input resolution,
            from :func:`lightning_interp.cam.grad_cam` with ``create_graph=True``.
        targets: ``B`` true classes.

    Returns:
        scalar; small when nothing of the class is left once the attended region is erased.
    """
    check_inputs(x)
    if cam.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"Expected `cam` of shape {(x.shape[0], *x.shape[-2:])} but got {tuple(cam.shape)}.")
    erased = x - soft_mask(cam, sigma, omega)[:, None] * x
    logits = model(erased)
    t = torch.as_tensor(targets, device=x.device).long()
    return torch.sigmoid(logits.gather(1, t[:, None])).mean()


def attention_supervision_loss(cam: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GAIN external supervision: mean (A − mask)² between ``B x H x W`` maps and pixel masks
    (``B x H x W`` or ``B x 1 x H x W``, bool or float in [0, 1])."""
    m = mask.squeeze(1) if mask.dim() == 4 else mask
    if m.shape != cam.shape:
        raise ValueError(f"Expected `mask` of shape {tuple(cam.shape)} (or with a channel of 1) but got {tuple(mask.shape)}.")
    return ((cam - m.to(cam.dtype)) ** 2).mean()


def rrr_input_gradient_penalty(model: nn.Module, x: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
    """Right for the Right Reasons: Σ (A ⊙ ∂Σ_k log p_k / ∂x)², summed over input elements and
    averaged over the batch; A = 1 where the input must not matter (e.g. the background).

    Args:
        x: ``B x ...`` inputs; irrelevant: A, broadcastable to ``x`` (bool or float).

    Returns:
        scalar, differentiable in the parameters (double backward).
    """
    check_inputs(x)
    with torch.enable_grad():
        xi = x.detach().clone().requires_grad_(True) if not x.requires_grad else x
        log_p = torch.log_softmax(model(xi), dim=1)
        (g,) = torch.autograd.grad(log_p.sum(), xi, create_graph=True)
    a = irrelevant.to(g.dtype)
    return ((a * g) ** 2).flatten(1).sum(1).mean()


def guidance_terms(
    model: nn.Module,
    layer: str,
    batch: Batch,
    weights: Mapping[str, float],
    *,
    sigma: float = 10.0,
    omega: float = 0.5,
) -> dict[str, torch.Tensor]:
    """The unweighted loss terms named in ``weights`` for one batch: what ``AttentionGuidance`` adds.

    Grad-CAM of ``layer`` is computed once with ``create_graph=True`` and shared by the GAIN terms;
    ``rrr`` treats everything outside the foreground mask as irrelevant.

    Returns:
        dict ``{name: scalar}`` for the names in ``weights`` (see :data:`LOSSES`).
    """
    terms: dict[str, torch.Tensor] = {}
    if "attention_mining" in weights or "attention_supervision" in weights:
        if batch.y is None:
            raise ValueError("Expected labelled batches for the CAM losses but a batch has no labels.")
        cam = grad_cam(model, layer, batch.x, batch.y, create_graph=True)
        if "attention_mining" in weights:
            terms["attention_mining"] = gain_attention_mining_loss(model, batch.x, cam, batch.y, sigma=sigma, omega=omega)
        if "attention_supervision" in weights:
            terms["attention_supervision"] = attention_supervision_loss(cam, batch.mask)
    if "rrr" in weights:
        terms["rrr"] = rrr_input_gradient_penalty(model, batch.x, ~batch.mask)
    return terms
