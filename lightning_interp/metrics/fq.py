"""Feature quantity (FQ, DESIGN §2, thesis ch. 4): how much of the foreground a unit took.

For a learning image I_x of unit x, its input I and a foreground mask M^f (active = |v| > eps):
N = active elements of I, N_f = active elements of I ⊙ M^f, N_x = active elements of I_x,
N_x^e = active elements of I_x inside M^f. I^e = I_x ⊙ M^f and I^fe = I ⊙ M^f, both over the
elements where I_x is active (eqs. 4-1, 4-2); l, c, s are the global SSIM luminance, contrast
and structure terms between I^fe and I^e (C1 = 1e-4, C2 = 3e-4, C3 = 1.5e-4)::

    F(I, x) = scale · (N_x / N) · (N_x^e / N_f) · l · c · s          FQ(x) = max over samples of F

The thesis writes N_x^n/N and a scale 1e4; its own limits (F → 1 for I_x = I, F = 0 for
I_x = 0, eqs. 4-8..4-11) hold with N_x/N and no scale, which is used here (``scale`` = 1).
"""

from __future__ import annotations

import torch
from torch import nn

from ..nns import check_inputs, layer_activations, neuron_learning_images
from .tip import _check_mask

__all__ = ["feature_quantity", "neuron_feature_quantity", "fq_layer_stats", "fq_diversity"]

C1, C2, C3 = 1e-4, 3e-4, 1.5e-4


def feature_quantity(
    learning_images: torch.Tensor,
    x: torch.Tensor,
    fg_mask: torch.Tensor,
    *,
    eps: float = 1e-8,
    scale: float = 1.0,
) -> torch.Tensor:
    """F of every learning image (DESIGN §2).

    Args:
        learning_images: ``B x K x C x H x W``; x: ``B x C x H x W``; fg_mask: boolean
            ``B x 1|C x H x W`` (True = foreground).
        eps: an element is active when ``|value| > eps``.

    Returns:
        ``B x K`` tensor; 0 for a unit with no active element or an input with an empty foreground.
        The FQ of a unit is ``F.amax(0)``.
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
    lum = (2 * mu_f * mu_e + C1) / (mu_f**2 + mu_e**2 + C1)
    con = (2 * sd_f * sd_e + C2) / (var_f + var_e + C2)
    struct = (cov + C3) / (sd_f * sd_e + C3)
    ratio = torch.where(n > 0, n_x / n.clamp_min(1), torch.zeros_like(n_x))
    ratio_f = torch.where(n_f > 0, n_xe / n_f.clamp_min(1), torch.zeros_like(n_x))
    f = scale * ratio * ratio_f * lum * con * struct
    return torch.where(n_x > 0, f, torch.zeros_like(f))


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
    over the samples), from their neuron learning images: ``K x top_neurons``."""
    f = layer_activations(model, layer, x, rectify=rectify)
    if f.dim() != 4:
        raise ValueError(f"Expected layer {layer!r} to output (B, K, H, W) for neuron FQ but got {tuple(f.shape)}.")
    k, h, w = f.shape[1:]
    n = min(top_neurons, h * w)
    order = f.mean(0).reshape(k, -1).argsort(1, descending=True)[:, :n]  # (K, n)
    neurons = [(c, int(p) // w, int(p) % w) for c in range(k) for p in order[c].tolist()]
    li = neuron_learning_images(model, layer, x, neurons, rectify=rectify)  # (B, K*n, C, H, W)
    return feature_quantity(li, x, fg_mask).amax(0).reshape(k, n)


def fq_layer_stats(fq: torch.Tensor, activation: torch.Tensor) -> dict[str, float]:
    """Per-layer summary (thesis 4.3): FQ mean and variance, and Pearson r(activation, FQ).

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


def fq_diversity(neuron_fq: torch.Tensor, *, eps: float = 0.3, min_samples: int = 6) -> torch.Tensor:
    """Diversity of each filter: the number of DBSCAN clusters (noise excluded) of its neurons' FQ.

    Args:
        neuron_fq: ``K x N`` FQ of N neurons per filter.
    Returns:
        ``K`` long tensor.
    """
    from sklearn.cluster import DBSCAN

    values = neuron_fq.detach().double().cpu().numpy()
    counts = []
    for row in values:
        labels = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(row.reshape(-1, 1))
        counts.append(len(set(labels.tolist()) - {-1}))
    return torch.tensor(counts, dtype=torch.long)
