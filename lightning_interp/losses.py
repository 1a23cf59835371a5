"""Attention-guiding losses usable in any ``training_step`` (DESIGN §5, survey 4.4.1).

* GAIN (Li et al., CVPR 2018): attention mining — erase what the Grad-CAM map attends to and
  penalise the true class's remaining score; external supervision — pull the map towards a
  pixel mask. Total loss CE + α·L_am + ω_e·L_e.
* Right for the Right Reasons (Ross et al., IJCAI 2017): penalise input gradients of the
  log-probabilities on regions that must not matter.
* Class-evidence background penalty: the signed, unnormalised Grad-CAM-style evidence maps
  S_c = Σ_k A_k ⊙ ∂z_c/∂A_k of a conv layer, for every class c, must vanish on cells that hold
  no foreground pixel. Unlike GAIN's supervision of the ReLU'd, min-max normalised target-class
  map, this also sees negative evidence and the other classes' logits.

Each term has a key (what ``AttentionGuidance(weights=...)`` and :func:`guidance_terms` take, and
what is logged as ``interp/guidance/<key>``) and a function named ``<key>_loss``:

| key                       | function                            | term                                     |
| ------------------------- | ----------------------------------- | ---------------------------------------- |
| ``attention_mining``      | :func:`attention_mining_loss`       | GAIN attention mining                    |
| ``attention_supervision`` | :func:`attention_supervision_loss`  | GAIN external supervision                |
| ``rrr``                   | :func:`rrr_loss`                    | Right for the Right Reasons              |
| ``cam_background``        | :func:`cam_background_loss`         | class evidence on the background         |
| ``cam_background_share``  | :func:`cam_background_share_loss`   | its share of all the evidence            |

Renamed in this release (the old names still work, with a ``FutureWarning``, for one release):
the key ``cam_background_raw`` is now ``cam_background`` — **the key ``cam_background`` changed
meaning**: it used to be the share-normalised penalty, now ``cam_background_share`` —, and
``gain_attention_mining_loss``, ``rrr_input_gradient_penalty`` and ``cam_background_penalty`` are
now :func:`attention_mining_loss`, :func:`rrr_loss` and :func:`cam_background_loss` /
:func:`cam_background_share_loss`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from .batch import Batch
from .cam import grad_cam
from .layers import capture_output, get_layer
from .nns import check_inputs

__all__ = [
    "LOSSES",
    "MASK_LOSSES",
    "DEPRECATED_LOSSES",
    "canonical_weights",
    "soft_mask",
    "attention_mining_loss",
    "attention_supervision_loss",
    "rrr_loss",
    "class_evidence_maps",
    "cam_background_loss",
    "cam_background_share_loss",
    "guidance_terms",
    # deprecated aliases, kept for one release
    "gain_attention_mining_loss",
    "rrr_input_gradient_penalty",
    "cam_background_penalty",
]

#: The terms `guidance_terms` (and the AttentionGuidance callback) know; term ``key`` is computed by
#: the function ``<key>_loss`` of this module.
LOSSES = ("attention_mining", "attention_supervision", "rrr", "cam_background", "cam_background_share")
#: The terms that need foreground masks in the batches.
MASK_LOSSES = ("attention_supervision", "rrr", "cam_background", "cam_background_share")
#: Old keys still accepted for one release: old key → new key.
DEPRECATED_LOSSES = {"cam_background_raw": "cam_background"}
_WARNED_CHANGED_MEANING = False


def canonical_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """``weights`` with deprecated keys (:data:`DEPRECATED_LOSSES`) replaced by their new names.

    Raises a ``FutureWarning`` naming the new key for each old one, and a ``ValueError`` when an old key
    and its new key are both given (they name the same term).
    """
    global _WARNED_CHANGED_MEANING
    if "cam_background" in weights and not _WARNED_CHANGED_MEANING:
        # The key stays valid but names another term than before this release: say it once per process.
        _WARNED_CHANGED_MEANING = True
        warnings.warn(
            "The loss key 'cam_background' changed meaning in this release: it is now the unnormalised "
            "background penalty (the recommended one, formerly 'cam_background_raw'); the share-normalised "
            "term it named before is 'cam_background_share'. Its scale differs: check your weight.",
            UserWarning, stacklevel=3,
        )
    out: dict[str, float] = {}
    for name, weight in weights.items():
        new = DEPRECATED_LOSSES.get(name)
        if new is not None:
            warnings.warn(
                f"The loss key {name!r} is deprecated and will be removed in the next release; use {new!r} "
                f"(the same term: {new!r} is now the unnormalised background penalty, the share-normalised "
                "one is 'cam_background_share').", FutureWarning, stacklevel=3,
            )
            if new in weights:
                raise ValueError(f"Expected one of {name!r} and {new!r} (the same term) in `weights` but got both.")
            name = new
        out[name] = weight
    return out


def _deprecated(old: str, new: str) -> None:
    warnings.warn(f"`lightning_interp.losses.{old}` is deprecated and will be removed in the next release; "
                  f"use `{new}`.", FutureWarning, stacklevel=3)


def soft_mask(cam: torch.Tensor, sigma: float = 10.0, omega: float = 0.5) -> torch.Tensor:
    """GAIN's soft threshold T(A) = sigmoid(σ (A − ω)) of ``B x H x W`` maps in [0, 1]."""
    return torch.sigmoid(sigma * (cam - omega))


def attention_mining_loss(
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


def rrr_loss(model: nn.Module, x: torch.Tensor, irrelevant: torch.Tensor) -> torch.Tensor:
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


def class_evidence_maps(activations: torch.Tensor, logits: torch.Tensor, *, create_graph: bool = True) -> torch.Tensor:
    """Signed, unnormalised evidence maps S_c = Σ_k A_k ⊙ ∂z_c/∂A_k for every class c.

    Args:
        activations: A, a layer's ``B x K x h x w`` output inside the graph of ``logits``.
        logits: z, ``B x C``.
        create_graph: keep the graph (loss use: the maps are differentiated again).

    Returns:
        ``B x C x h x w``. One backward pass per class; sample b's map uses ∂Σ_b' z_b'c/∂A_b, which
        is ∂z_bc/∂A_b when nothing after the layer mixes samples (no BatchNorm in training mode).
    """
    if activations.dim() != 4:
        raise ValueError(f"Expected activations of shape (B, K, h, w) but got {tuple(activations.shape)}.")
    if logits.dim() != 2 or logits.shape[0] != activations.shape[0]:
        raise ValueError(f"Expected logits of shape ({activations.shape[0]}, C) but got {tuple(logits.shape)}.")
    maps = []
    for c in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, c].sum(), activations, create_graph=create_graph, retain_graph=True)
        maps.append((activations * g).sum(1))
    return torch.stack(maps, 1)


def cam_background_loss(activations: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Class evidence on the background (key ``cam_background``, the recommended background term):
    Σ_background S_c², averaged over the batch and the classes (see :func:`class_evidence_maps`), in
    squared logit units.

    The pixel mask (``B x [1 x] H x W``, True on the foreground) is brought to the layer's ``h x w``
    grid by max-pooling: a cell is background only where it contains no foreground pixel. In the decoy
    experiment (docs/measurements/decoy_guidance.md, experiments/results/decoy*.json) this unnormalised penalty
    recovers nearly all of the accuracy the decoy costs, :func:`cam_background_share_loss` only about
    3/4 of it: a large foreground evidence dilutes the share while the patch's absolute evidence,
    which is what moves the logits, stays.

    Args:
        activations: A, a layer's ``B x K x h x w`` output inside the graph of ``logits``;
            logits: ``B x C``; mask: ``B x [1 x] H x W`` bool.

    Returns:
        scalar, differentiable in the parameters and inputs (double backward).
    """
    return _background_evidence(class_evidence_maps(activations, logits), mask, normalize=False)


def cam_background_share_loss(
    activations: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, *, eps: float = 1e-8
) -> torch.Tensor:
    """The share of the squared class evidence that lies on the background (key ``cam_background_share``):
    per sample Σ_c Σ_bg S_c² / (Σ_c Σ_all S_c² + eps), in [0, 1] and invariant to the logits' scale,
    averaged over the batch. Same inputs as :func:`cam_background_loss`; weaker in the decoy
    experiment (it recovers about 3/4 of what the decoy costs).

    Returns:
        scalar, differentiable in the parameters and inputs (double backward).
    """
    return _background_evidence(class_evidence_maps(activations, logits), mask, normalize=True, eps=eps)


def cam_background_penalty(
    activations: torch.Tensor,
    logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    normalize: bool = False,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Deprecated (one release): :func:`cam_background_loss` (``normalize=False``) or
    :func:`cam_background_share_loss` (``normalize=True``)."""
    _deprecated("cam_background_penalty", "cam_background_share_loss" if normalize else "cam_background_loss")
    return _background_evidence(class_evidence_maps(activations, logits), mask, normalize, eps)


def gain_attention_mining_loss(*args, **kwargs) -> torch.Tensor:
    """Deprecated (one release): :func:`attention_mining_loss`."""
    _deprecated("gain_attention_mining_loss", "attention_mining_loss")
    return attention_mining_loss(*args, **kwargs)


def rrr_input_gradient_penalty(*args, **kwargs) -> torch.Tensor:
    """Deprecated (one release): :func:`rrr_loss`."""
    _deprecated("rrr_input_gradient_penalty", "rrr_loss")
    return rrr_loss(*args, **kwargs)


def _background_evidence(s: torch.Tensor, mask: torch.Tensor, normalize: bool, eps: float = 1e-8) -> torch.Tensor:
    """:func:`cam_background_loss` (:func:`cam_background_share_loss` with ``normalize``) from evidence maps
    ``s`` (``B x C x h x w``) already computed."""
    m = mask if mask.dim() == 4 else mask[:, None]
    if m.shape[0] != s.shape[0] or m.shape[1] != 1:
        raise ValueError(f"Expected `mask` of shape ({s.shape[0]}, [1,] H, W) but got {tuple(mask.shape)}.")
    background = 1 - F.adaptive_max_pool2d(m.to(s.dtype), tuple(s.shape[-2:]))  # B x 1 x h x w
    sq = s**2
    on_bg = (background * sq).sum((2, 3))  # B x C
    if not normalize:
        return on_bg.mean()
    return (on_bg.sum(1) / (sq.sum((1, 2, 3)) + eps)).mean()


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
    ``rrr`` treats everything outside the foreground mask as irrelevant; ``cam_background`` and
    ``cam_background_share`` are :func:`cam_background_loss` and :func:`cam_background_share_loss` of
    ``layer``, from one set of evidence maps. Deprecated keys are accepted (:func:`canonical_weights`).

    Returns:
        dict ``{name: scalar}`` for the names in ``weights`` (see :data:`LOSSES`), under their
        current names.
    """
    weights = canonical_weights(weights)
    terms: dict[str, torch.Tensor] = {}
    if "attention_mining" in weights or "attention_supervision" in weights:
        if batch.y is None:
            raise ValueError("Expected labelled batches for the CAM losses but a batch has no labels.")
        cam = grad_cam(model, layer, batch.x, batch.y, create_graph=True)
        if "attention_mining" in weights:
            terms["attention_mining"] = attention_mining_loss(model, batch.x, cam, batch.y, sigma=sigma, omega=omega)
        if "attention_supervision" in weights:
            terms["attention_supervision"] = attention_supervision_loss(cam, batch.mask)
    if "rrr" in weights:
        terms["rrr"] = rrr_loss(model, batch.x, ~batch.mask)
    background = [name for name in ("cam_background", "cam_background_share") if name in weights]
    if background:  # one forward and one set of evidence maps for both variants
        check_inputs(batch.x)
        with torch.enable_grad(), capture_output(get_layer(model, layer), layer) as store:
            logits = model(batch.x)
        if store["output"] is None:
            raise ValueError(f"Expected layer {layer!r} to be called in the forward pass but it was not.")
        evidence = class_evidence_maps(store["output"], logits)
        for name in background:
            terms[name] = _background_evidence(evidence, batch.mask, normalize=name == "cam_background_share")
    return terms
