"""Per-sample gradients within a memory budget: any reduction of each sample's loss gradient
(:func:`reduce_per_sample_gradients`), the gradient magnitude of thesis 6.3.3 / table 6-3
(:func:`per_sample_gradient_magnitude`) and TIP's per-sample SoU (``metrics.tip.sou(estimate="per_sample")``)
among them."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from .memory import scan_budget
from .nns import check_inputs, scan_mode

__all__ = ["per_sample_gradient_magnitude", "per_sample_gradient_chunk", "reduce_per_sample_gradients"]

#: ``reduce(grads) -> tensor``: one sample's gradients ``{parameter name: tensor of that parameter's shape}``
#: to what is kept of them (a scalar, a ``K`` vector, ...).
GradientReduction = Callable[[dict[str, torch.Tensor]], torch.Tensor]


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


def _trainable(model: nn.Module, parameters: Sequence[str] | None) -> dict[str, torch.Tensor]:
    """``{name: parameter}`` of ``parameters`` (names of ``model.named_parameters()``), or of every
    trainable parameter when None; ``ValueError`` naming the available ones for an unknown name."""
    named = dict(model.named_parameters())
    if parameters is None:
        return {k: v for k, v in named.items() if v.requires_grad}
    unknown = [n for n in parameters if n not in named]
    if unknown:
        raise ValueError(f"Expected parameter names of the model but got {unknown}; available: {list(named)}.")
    return {n: named[n] for n in parameters}


def per_sample_gradient_chunk(
    model: nn.Module, x1: torch.Tensor, budget: int | None = None, parameters: Sequence[str] | None = None
) -> int:
    """Samples per vmapped chunk that fit ``budget`` bytes (:func:`~lightning_interp.memory.scan_budget`
    of the model's device when None); 0 when one sample's vmapped gradient does not fit, in which case
    :func:`reduce_per_sample_gradients` loops plain backward passes.

    A vmapped sample holds its gradient (of ``parameters``, every trainable parameter when None), its
    reduction's temporaries and its activations and their gradients: ``3 × parameter bytes + 3 ×
    activation bytes`` per sample.

    Args:
        x1: one input sample with its batch dimension, ``1 x ...``.
    """
    if budget is None:
        budget = scan_budget(x1.device)
    param_bytes = sum(p.numel() * p.element_size() for p in _trainable(model, parameters).values())
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
    parameter tensors θ_t (the thesis averages |gradient| within each layer, then across layers):
    :func:`reduce_per_sample_gradients` with that reduction, so within the memory budget.

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
    return reduce_per_sample_gradients(model, x, y, _mean_abs, loss_fn=loss_fn, chunk_size=chunk_size,
                                       max_bytes=max_bytes)


def _mean_abs(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([g.abs().mean() for g in grads.values()]).mean()


def reduce_per_sample_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    reduce: GradientReduction,
    *,
    parameters: Sequence[str] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    chunk_size: int | None = None,
    max_bytes: int | None = None,
) -> torch.Tensor:
    """``reduce`` of each sample's loss gradient, without holding the gradients of all samples at once.

    For sample i, ``reduce({name: ∂ loss(model(x_i), y_i) / ∂θ_name})`` over ``parameters`` (names from
    ``model.named_parameters()``; every trainable parameter when None), stacked over samples.
    ``loss_fn(logits, y)`` is called on one sample at a time (a batch of one) and must return the mean.
    Computed with ``torch.func.vmap`` over chunks of samples in eval mode; parameter ``.grad`` is
    untouched.

    Memory is budgeted (house rule 10): the chunk is sized from ``max_bytes``
    (:func:`lightning_interp.memory.scan_budget` when None) by :func:`per_sample_gradient_chunk`,
    down to one sample; when one sample's vmapped gradient does not fit (a VGG-sized network on the
    CPU), or the model cannot run under vmap, or a chunk still runs out of memory, the gradients
    come from a loop of plain backward passes, one sample at a time (one gradient alive at once).

    Args:
        reduce: one sample's gradients ``{name: tensor}`` to a tensor; the same shape for every sample.
        parameters: names of the parameters to differentiate (frozen ones allowed).
        chunk_size: samples per vmapped chunk; sized from the budget when None.
        max_bytes: memory budget of one chunk in bytes (the scan budget of x's device when None).

    Returns:
        ``B x <reduce's shape>`` tensor.

    Example:
        >>> net = SimpleCNN()
        >>> norms = reduce_per_sample_gradients(net, torch.randn(8, 1, 32, 32), torch.zeros(8, dtype=torch.long),
        ...                                     lambda g: g["conv3.weight"].flatten(1).norm(dim=1),
        ...                                     parameters=["conv3.weight"])
        >>> norms.shape  # one gradient norm per sample and filter of conv3
        torch.Size([8, 64])
    """
    check_inputs(x)
    if y is None or y.shape[0] != x.shape[0]:
        raise ValueError("Expected labels `y` with one entry per sample of `x`.")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"Expected `chunk_size` to be a positive int or None but got {chunk_size!r}.")
    params = {k: v.detach() for k, v in _trainable(model, parameters).items()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    def reduced(xi, yi):
        return reduce(grad(sample_loss)(params, xi, yi))

    with scan_mode(model):
        n = chunk_size if chunk_size is not None else per_sample_gradient_chunk(model, x[:1], max_bytes, parameters)
        parts = None
        if n >= 1:
            try:
                parts = [vmap(reduced)(x[s : s + n], y[s : s + n]) for s in range(0, x.shape[0], n)]
            except RuntimeError as err:
                # Some forwards cannot run under vmap (e.g. a `.contiguous(memory_format=channels_last)`
                # inside the model); an allocator that fails raises a RuntimeError too (CUDA: its
                # OutOfMemoryError subclass). Either way: one backward pass per sample.
                text = str(err).lower()
                if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate" in text:
                    warnings.warn(f"per-sample gradients: a chunk of {n} samples ran out of memory ({err}); "
                                  "looping one backward pass per sample instead.", stacklevel=2)
        if parts is None:
            parts = _loop_reduce(model, x, y, loss_fn, list(params), reduce)
    return torch.cat(parts).detach()


def _loop_reduce(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, names: list[str], reduce: GradientReduction
) -> list[torch.Tensor]:
    """One plain backward per sample; each sample's gradient is reduced and freed before the next.
    Frozen parameters are differentiated too (``requires_grad`` switched on for the loop, then restored)."""
    named = dict(model.named_parameters())
    tensors = [named[n] for n in names]
    frozen = [t for t in tensors if not t.requires_grad]
    for t in frozen:
        t.requires_grad_(True)
    try:
        parts = []
        for i in range(x.shape[0]):
            loss = loss_fn(model(x[i : i + 1]), y[i : i + 1])
            grads = torch.autograd.grad(loss, tensors)
            parts.append(reduce(dict(zip(names, grads, strict=True)))[None].detach())
            del grads, loss
    finally:
        for t in frozen:
            t.requires_grad_(False)
    return parts
