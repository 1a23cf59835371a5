"""Per-sample gradient magnitude (thesis 6.3.3, table 6-3)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from .nns import check_inputs, scan_mode

__all__ = ["per_sample_gradient_magnitude"]


def per_sample_gradient_magnitude(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Mean absolute parameter gradient of each sample's loss, averaged over parameter tensors.

    For sample i: ``mean_t mean |∂ loss(model(x_i), y_i) / ∂θ_t|`` over the model's trainable
    parameter tensors θ_t (the thesis averages |gradient| within each layer, then across layers).
    Computed with ``torch.func.vmap`` over samples in eval mode (a loop of backward passes when
    the model cannot run under vmap); parameter ``.grad`` is untouched.

    Returns:
        ``B`` tensor.
    """
    check_inputs(x)
    if y is None or y.shape[0] != x.shape[0]:
        raise ValueError("Expected labels `y` with one entry per sample of `x`.")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    def magnitude(xi, yi):
        g = grad(sample_loss)(params, xi, yi)
        return torch.stack([t.abs().mean() for t in g.values()]).mean()

    with scan_mode(model):
        try:
            parts = [vmap(magnitude)(x[s : s + chunk_size], y[s : s + chunk_size]) for s in range(0, x.shape[0], chunk_size)]
        except RuntimeError:
            # Some forwards cannot run under vmap (e.g. a `.contiguous(memory_format=channels_last)`
            # inside the model): fall back to one backward per sample.
            names = list(params)
            tensors = [dict(model.named_parameters())[n] for n in names]
            parts = []
            for i in range(x.shape[0]):
                loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
                grads = torch.autograd.grad(loss, tensors)
                parts.append(torch.stack([g.abs().mean() for g in grads]).mean()[None])
    return torch.cat(parts).detach()
