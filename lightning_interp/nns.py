"""Neural Network Scanner (NNS): learning images of neurons, filters and layers (thesis ch. 3).

The thesis builds a unit's *learning image* by splitting the input into one-pixel images and
pushing each through the network along its active paths (weights times ReLU gates, bias
excluded, eqs. 3-1..3-14; max-pool passes the selected unit's image unchanged). For a network
that is piecewise linear in its input this equals input × gradient (DESIGN §1)::

    I_n(x) = x ⊙ ∂a_n(x)/∂x                                   (neuron n)
    L^k(x) = Σ_ij I_{k,ij}(x) · f_{k,ij}(x) = x ⊙ ∇_x ½ Σ_ij f_{k,ij}(x)²   (filter k, eq. 5-2)

and the layer learning image is Σ_k L^k. Exact filter learning images cost one
vector-Jacobian product per filter; they are batched with
``torch.autograd.grad(..., is_grads_batched=True)`` in chunks bounded by a memory budget.

Every scan runs the model in eval mode (running BatchNorm statistics, no dropout) with
autocast off, restores the caller's mode, never touches parameter ``.grad`` (gradients are
taken with respect to the input only) and keeps no graph alive after it returns. Scans work
inside ``torch.no_grad()`` and ``torch.inference_mode()`` blocks (Lightning's validation loop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layers import capture_output, get_layer

__all__ = [
    "filter_learning_images",
    "iter_filter_learning_images",
    "neuron_learning_images",
    "layer_learning_image",
    "layer_activations",
    "knowledge_quantity",
    "KnowledgeQuantity",
]

#: Default memory budget of one chunk of batched vector-Jacobian products, in bytes.
DEFAULT_CHUNK_BYTES = 512 * 2**20
#: Default VJPs per chunk on the CPU (measured, see ``_auto_chunk``).
CPU_CHUNK = 4


def check_inputs(x: torch.Tensor, name: str = "x") -> None:
    """Validate a batch for scanning: a floating tensor (B, ...) with B >= 1 and rank >= 2."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Expected `{name}` to be a torch.Tensor but got {type(x).__name__}.")
    if x.dim() < 2:
        raise ValueError(
            f"Expected `{name}` to be a batch of shape (B, C, H, W) or (B, D) but got a tensor of "
            f"shape {tuple(x.shape)}; add the batch dimension with `{name}.unsqueeze(0)`."
        )
    if x.shape[0] == 0:
        raise ValueError(f"Expected `{name}` to hold at least one sample but got an empty batch.")
    if not x.is_floating_point():
        raise TypeError(
            f"Expected `{name}` to be a floating-point tensor but got dtype {x.dtype}; convert images "
            "with `x.float() / 255` (or your normalisation) first."
        )


@contextmanager
def scan_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (also inside ``inference_mode``/``no_grad``), autocast off; restored on exit."""
    was_training = model.training
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    try:
        model.eval()
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autocast(device_type=device_type, enabled=False),
        ):
            yield
    finally:
        model.train(was_training)


def _leaf_input(x: torch.Tensor) -> torch.Tensor:
    # A fresh leaf outside inference mode, so autograd can differentiate with respect to it
    # even when the caller's tensor was made under `torch.inference_mode()`.
    return x.detach().clone().requires_grad_(True)


def _forward_to_layer(
    model: nn.Module, layer: str, x: torch.Tensor, rectify: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward ``x`` (already a leaf requiring grad) and return ``(x, f)`` with f the layer output."""
    module = get_layer(model, layer)
    with capture_output(module, layer) as store:
        model(x)
    f = store["output"]
    if f is None:
        raise ValueError(f"Layer {layer!r} was not called during the forward pass of {type(model).__name__}.")
    if f.dim() < 2:
        raise ValueError(f"Expected layer {layer!r} to output (B, K, ...) but got shape {tuple(f.shape)}.")
    if not f.requires_grad:
        raise ValueError(f"The output of layer {layer!r} does not depend on the input, so it has no learning image.")
    if rectify:
        f = torch.relu(f)
    return x, f


def _select_filters(filters: Sequence[int] | torch.Tensor | None, num_filters: int, layer: str) -> torch.Tensor:
    if filters is None:
        return torch.arange(num_filters)
    idx = torch.as_tensor(filters, dtype=torch.long).flatten()
    if idx.numel() == 0:
        raise ValueError("Expected `filters` to name at least one filter but got an empty selection.")
    bad = idx[(idx < 0) | (idx >= num_filters)]
    if bad.numel():
        raise ValueError(
            f"Expected `filters` of layer {layer!r} to be in [0, {num_filters - 1}] but got {bad.tolist()}."
        )
    return idx


def _auto_chunk(f: torch.Tensor, x: torch.Tensor, requested: int | None) -> int:
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"Expected `chunk_size` to be a positive int or None but got {requested}.")
        return int(requested)
    # One chunk element holds a cotangent like f and a gradient like x, plus backward workspace.
    per_item = 3 * (f.numel() + x.numel()) * f.element_size()
    by_memory = max(1, DEFAULT_CHUNK_BYTES // max(per_item, 1))
    # On the CPU the backward is compute-bound: batching more than a few VJPs only adds
    # vmap overhead (benchmarks/nns.py: chunks of 4 beat both 1 and 16+ on SimpleCNN/ResNet-18).
    return min(by_memory, CPU_CHUNK) if f.device.type == "cpu" else by_memory


def iter_filter_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    filters: Sequence[int] | torch.Tensor | None = None,
    rectify: bool = False,
    chunk_size: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield filter learning images chunk by chunk, for reductions that need not hold them all.

    Yields:
        ``(filters, learning_images)`` with ``filters`` a (n,) long tensor of channel indices
        and ``learning_images`` of shape ``B x n x <x.shape[1:]>`` (see
        :func:`filter_learning_images`). The model stays in eval mode until the generator is
        exhausted or closed.
    """
    check_inputs(x)
    with scan_mode(model):
        xl, f = _forward_to_layer(model, layer, _leaf_input(x), rectify)
        idx = _select_filters(filters, f.shape[1], layer)
        n = _auto_chunk(f, x, chunk_size)
        f_detached = f.detach()
        try:
            for start in range(0, idx.numel(), n):
                chunk = idx[start : start + n]
                # Cotangent of ½Σ f_k² with respect to f is f restricted to channel k.
                cot = f_detached.new_zeros((chunk.numel(), *f.shape))
                sel = torch.arange(chunk.numel())
                cot[sel, :, chunk] = f_detached[:, chunk].movedim(1, 0)
                last = start + n >= idx.numel()
                (grads,) = torch.autograd.grad(f, xl, cot, retain_graph=not last, is_grads_batched=True)
                yield chunk, (xl.detach().unsqueeze(0) * grads).movedim(0, 1)
        finally:
            del f, xl


def filter_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    filters: Sequence[int] | torch.Tensor | None = None,
    rectify: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Filter learning images L^k(x) = x ⊙ ∇_x(½ Σ_ij f_{k,ij}(x)²) (DESIGN §1, thesis eq. 5-2).

    Args:
        model: the network; called as ``model(x)``.
        layer: module path of the layer whose channels are the filters (``list_layers``).
        x: inputs, ``B x C x H x W`` images or ``B x D`` vectors, floating point.
        filters: channel indices to scan; all channels when ``None``.
        rectify: apply ReLU to the layer output first ("conv layer = convolution + activation").
        chunk_size: filters per batched vector-Jacobian product; chosen from a memory budget
            when ``None``.

    Returns:
        ``B x K x <x.shape[1:]>`` tensor, K = number of selected filters, detached, on x's device.

    Example:
        >>> model = SimpleCNN()
        >>> L = filter_learning_images(model, "conv3", torch.randn(4, 1, 32, 32), rectify=True)
        >>> L.shape
        torch.Size([4, 64, 1, 32, 32])
    """
    parts = [li for _, li in iter_filter_learning_images(
        model, layer, x, filters=filters, rectify=rectify, chunk_size=chunk_size
    )]
    return torch.cat(parts, dim=1)


def neuron_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    neurons: Sequence[Sequence[int]],
    *,
    rectify: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Neuron learning images I_n(x) = x ⊙ ∂a_n(x)/∂x (thesis eqs. 3-1..3-14).

    Args:
        neurons: N positions in the layer output without the batch dimension: ``(channel, i, j)``
            for a ``B x K x H x W`` output, ``(unit,)`` for a ``B x K`` output (Linear layers).
        rectify: the neuron's value is ReLU(a_n), so inactive neurons get a zero image (eq. 3-6).

    Returns:
        ``B x N x <x.shape[1:]>`` tensor.
    """
    check_inputs(x)
    if len(neurons) == 0:
        raise ValueError("Expected `neurons` to hold at least one position but got none.")
    with scan_mode(model):
        xl, f = _forward_to_layer(model, layer, _leaf_input(x), rectify)
        pos = torch.as_tensor([tuple(n) for n in neurons], dtype=torch.long)
        unit_shape = tuple(f.shape[1:])
        if pos.dim() != 2 or pos.shape[1] != len(unit_shape):
            kind = "(channel, i, j)" if len(unit_shape) == 3 else f"{len(unit_shape)}-tuples"
            raise ValueError(
                f"Expected `neurons` of layer {layer!r} (output {tuple(f.shape)}) to be {kind} but got "
                f"{[tuple(n) for n in neurons][:3]}..."
            )
        limits = torch.tensor(unit_shape)
        bad = ((pos < 0) | (pos >= limits)).any(1)
        if bad.any():
            raise ValueError(
                f"Expected `neurons` of layer {layer!r} within the unit grid {unit_shape} but got "
                f"{pos[bad].tolist()}."
            )
        n = _auto_chunk(f, x, chunk_size)
        out = []
        for start in range(0, pos.shape[0], n):
            chunk = pos[start : start + n]
            cot = torch.zeros((chunk.shape[0], *f.shape), dtype=f.dtype, device=f.device)
            cot[(torch.arange(chunk.shape[0]), slice(None), *chunk.unbind(1))] = 1.0
            last = start + n >= pos.shape[0]
            (grads,) = torch.autograd.grad(f, xl, cot, retain_graph=not last, is_grads_batched=True)
            out.append((xl.detach().unsqueeze(0) * grads).movedim(0, 1))
        return torch.cat(out, dim=1)


def layer_learning_image(model: nn.Module, layer: str, x: torch.Tensor, *, rectify: bool = False) -> torch.Tensor:
    """Layer learning image Σ_k L^k(x) = x ⊙ ∇_x ½ Σ_k,ij f_{k,ij}(x)² in one backward pass.

    Returns:
        ``B x <x.shape[1:]>`` tensor.
    """
    check_inputs(x)
    with scan_mode(model):
        xl, f = _forward_to_layer(model, layer, _leaf_input(x), rectify)
        (grad,) = torch.autograd.grad(f, xl, f.detach())
        return xl.detach() * grad


def layer_activations(model: nn.Module, layer: str, x: torch.Tensor, *, rectify: bool = False) -> torch.Tensor:
    """The layer output f(x) in scan mode (eval, no autocast), detached: ``B x K x ...``."""
    check_inputs(x)
    module = get_layer(model, layer)
    with scan_mode(model), torch.no_grad(), capture_output(module, layer) as store:
        model(x)
    f = store["output"]
    if f is None:
        raise ValueError(f"Layer {layer!r} was not called during the forward pass of {type(model).__name__}.")
    return torch.relu(f) if rectify else f


@dataclass(frozen=True)
class KnowledgeQuantity:
    """Knowledge quantity of learning images relative to their input (thesis 3.3.1).

    Attributes:
        activation_count: ``B x K`` fraction of active elements (|v| > eps) of each learning
            image divided by the same fraction for the input.
        activation_intensity: ``B x K`` sum of |elements| of each learning image divided by the
            input's.
    """

    activation_count: torch.Tensor
    activation_intensity: torch.Tensor


def knowledge_quantity(learning_images: torch.Tensor, x: torch.Tensor, *, eps: float = 0.0) -> KnowledgeQuantity:
    """Activation count and intensity of learning images relative to the input (thesis 3.3.1).

    The thesis' layer value is the mean over the layer's units (and samples) of these ratios.

    Args:
        learning_images: ``B x K x <x.shape[1:]>``.
        x: the inputs, ``B x ...``.
        eps: an element is active when ``|value| > eps``.

    Returns:
        :class:`KnowledgeQuantity` of ``B x K`` tensors; 0 where the input has no active element.
    """
    check_inputs(x)
    if learning_images.dim() != x.dim() + 1 or learning_images.shape[2:] != x.shape[1:] or (
        learning_images.shape[0] != x.shape[0]
    ):
        raise ValueError(
            f"Expected `learning_images` of shape (B, K, {', '.join(map(str, x.shape[1:]))}) with "
            f"B = {x.shape[0]} but got {tuple(learning_images.shape)}."
        )
    dims = tuple(range(2, learning_images.dim()))
    li = learning_images.abs()
    xa = x.abs().unsqueeze(1)
    count = (li > eps).sum(dims).to(x.dtype)
    x_count = (xa > eps).sum(dims).to(x.dtype)
    intensity = li.sum(dims)
    x_intensity = xa.sum(dims)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return KnowledgeQuantity(
        activation_count=torch.where(x_count > 0, count / x_count.clamp_min(1), zero),
        activation_intensity=torch.where(
            x_intensity > 0, intensity / x_intensity.clamp_min(torch.finfo(x.dtype).tiny), zero
        ),
    )

