"""Per-sample gradient magnitude (thesis 6.3.3, table 6-3), within a memory budget."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from .memory import scan_budget
from .nns import check_inputs, scan_mode

__all__ = ["per_sample_gradient_magnitude", "per_sample_gradient_chunk"]


def _activation_bytes(model: nn.Module, x1: torch.Tensor) -> int:
    """Bytes of every module's tensor outputs for one sample (what a backward keeps alive, roughly)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x1)
    finally:
        for h in handles:
            h.remove()
    return total


def per_sample_gradient_chunk(model: nn.Module, x1: torch.Tensor, budget: int | None = None) -> int:
    """Samples per vmapped chunk that fit ``budget`` bytes (:func:`~lightning_interp.memory.scan_budget`
    of the model's device when None); 0 when one sample's vmapped gradient does not fit, in which case
    :func:`per_sample_gradient_magnitude` loops plain backward passes.

    A vmapped sample holds its full parameter gradient, its ``|g|`` temporaries and its activations and
    their gradients: ``3 × parameter bytes + 3 × activation bytes`` per sample.

    Args:
        x1: one input sample with its batch dimension, ``1 x ...``.
    """
    if budget is None:
        budget = scan_budget(x1.device)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    per_sample = 3 * param_bytes + 3 * _activation_bytes(model, x1)
    return int(budget // max(per_sample, 1))


def per_sample_gradient_magnitude(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """Mean absolute parameter gradient of each sample's loss, averaged over parameter tensors.

    For sample i: ``mean_t mean |∂ loss(model(x_i), y_i) / ∂θ_t|`` over the model's trainable
    parameter tensors θ_t (the thesis averages |gradient| within each layer, then across layers).
    Computed with ``torch.func.vmap`` over chunks of samples in eval mode; parameter ``.grad`` is
    untouched.

    Memory is budgeted (house rule 10): the chunk is sized from ``max_bytes``
    (:func:`lightning_interp.memory.scan_budget` when None) by :func:`per_sample_gradient_chunk`,
    down to one sample; when one sample's vmapped gradient does not fit (a VGG-sized network on the
    CPU), or the model cannot run under vmap, or a chunk still runs out of memory, the magnitudes
    come from a loop of plain backward passes, one sample at a time (one gradient alive at once).

    Args:
        model: the network, called as ``model(x)``; must return logits for ``loss_fn``.
        x: inputs ``B x ...``; y: labels ``B``.
        chunk_size: samples per vmapped chunk; sized from the budget when None.
        max_bytes: memory budget of one chunk in bytes (the scan budget of x's device when None).

    Returns:
        ``B`` tensor.

    Examples:
        >>> g = per_sample_gradient_magnitude(SimpleCNN(), torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long))
        >>> g.shape
        torch.Size([8])
    """
    check_inputs(x)
    if y is None or y.shape[0] != x.shape[0]:
        raise ValueError("Expected labels `y` with one entry per sample of `x`.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be a positive int or None but got {chunk_size!r}.")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    def magnitude(xi, yi):
        g = grad(sample_loss)(params, xi, yi)
        return torch.stack([t.abs().mean() for t in g.values()]).mean()

    with scan_mode(model):
        n = chunk_size if chunk_size is not None else per_sample_gradient_chunk(model, x[:1], max_bytes)
        parts = None
        if n >= 1:
            try:
                parts = [vmap(magnitude)(x[s : s + n], y[s : s + n]) for s in range(0, x.shape[0], n)]
            except RuntimeError as err:
                # Some forwards cannot run under vmap (e.g. a `.contiguous(memory_format=channels_last)`
                # inside the model); an allocator that fails raises a RuntimeError too (CUDA: its
                # OutOfMemoryError subclass). Either way: one backward pass per sample.
                text = str(err).lower()
                if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text:
                    warnings.warn(f"per-sample gradients: a chunk of {n} samples ran out of memory ({err}); "
                                  "looping one backward pass per sample instead.", stacklevel=2)
        if parts is None:
            parts = _loop_magnitudes(model, x, y, loss_fn, list(params))
    return torch.cat(parts).detach()


def _loop_magnitudes(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, names: list[str]) -> list[torch.Tensor]:
    """One plain backward per sample; each sample's gradient is reduced and freed before the next."""
    named = dict(model.named_parameters())
    tensors = [named[n] for n in names]
    parts = []
    for i in range(x.shape[0]):
        loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, tensors)
        parts.append(torch.stack([g.abs().mean() for g in grads]).mean()[None].detach())
        del grads, loss
    return parts
