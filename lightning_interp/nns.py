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

import math
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .layers import capture_output, eval_mode, get_layer
from .memory import scan_budget

__all__ = [
    "filter_learning_images",
    "iter_filter_learning_images",
    "neuron_learning_images",
    "layer_learning_image",
    "layer_activations",
    "knowledge_quantity",
    "layer_knowledge_quantity",
    "sample_indices",
    "sample_neurons",
    "filter_knowledge_quantity",
    "reduce_knowledge_quantity",
    "KnowledgeQuantity",
    "sketch_learning_images",
    "sketch_properties",
    "rademacher_directions",
    "SCAN_MODES",
    "ScanSpec",
    "check_scan_mode",
    "pooling_basis",
    "pooled_learning_images",
]

#: Default VJPs per chunk on the CPU (measured, see ``_auto_chunk``).
CPU_CHUNK = 4

#: How the anomaly and TIP scans see the learning images: ``"exact"`` (every filter's learning
#: images, one backward pass per filter: the reference), ``"sketch"`` (random projections of them
#: from forward-mode products) and ``"pooled"`` (learning images pooled onto a fixed low-resolution
#: grid, exact, P forward-mode products for all filters: :func:`pooled_learning_images`).
SCAN_MODES = ("exact", "sketch", "pooled")


def check_scan_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`SCAN_MODES`, else ``ValueError`` naming them."""
    if mode not in SCAN_MODES:
        raise ValueError(f"Expected `mode` to be one of {list(SCAN_MODES)} but got {mode!r}.")
    return mode


@dataclass(frozen=True)
class ScanSpec:
    """How a layer's learning images are scanned, validated once and passed down whole.

    Args:
        mode: one of :data:`SCAN_MODES` — ``"exact"`` (one vector-Jacobian product per filter, the
            reference), ``"sketch"`` (``num_projections`` random projections from forward-mode
            products) or ``"pooled"`` (learning images pooled onto ``grid`` cells, one forward-mode
            product per cell: :func:`pooled_learning_images`).
        num_projections: P of sketch mode (an int >= 2).
        grid: cells per spatial side of pooled mode (an int, or one int per spatial dimension).
        rectify: scan ReLU(layer output), the thesis' conv layer.

    ``dataclasses.asdict(spec)`` is what monitors write to their reports.
    """

    mode: str = "exact"
    num_projections: int = 64
    grid: int | tuple[int, ...] = 2
    rectify: bool = True

    def __post_init__(self) -> None:
        check_scan_mode(self.mode)
        if isinstance(self.num_projections, bool) or not isinstance(self.num_projections, int) or self.num_projections < 2:
            raise ValueError(f"Expected `num_projections` to be an int >= 2 but got {self.num_projections!r}.")
        _grid_of(self.grid, 1 if isinstance(self.grid, int) else len(self.grid))
        if isinstance(self.grid, list):
            object.__setattr__(self, "grid", tuple(self.grid))
        if not isinstance(self.rectify, bool):
            raise TypeError(f"Expected `rectify` to be a bool but got {self.rectify!r}.")


def check_finite(tensor: torch.Tensor, what: str) -> torch.Tensor:
    """Raise ``FloatingPointError`` on NaN/inf in ``tensor`` (a monitor then skips that scan with a warning)."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(f"non-finite values (NaN/inf) in {what}")
    return tensor


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
    """Eval mode (:func:`~lightning_interp.layers.eval_mode`: every submodule's own mode comes back),
    gradients on (also inside ``inference_mode``/``no_grad``), autocast off; all restored on exit."""
    device_type = next((p.device.type for p in model.parameters()), "cpu")
    with (
        eval_mode(model),
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device_type=device_type, enabled=False),
    ):
        yield


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
    by_memory = max(1, scan_budget(f.device) // max(per_item, 1))
    # On the CPU the backward is compute-bound: batching more than a few VJPs only adds
    # vmap overhead (benchmarks/nns.py: chunks of 4 beat both 1 and 16+ on SimpleCNN/ResNet-18).
    return min(by_memory, CPU_CHUNK) if f.device.type == "cpu" else by_memory


def iter_filter_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    filters: Sequence[int] | torch.Tensor | None = None,
    rectify: bool = True,
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
                if f.device.type == "cuda":
                    # One plain VJP per filter: on an H100 this beats vmapped (`is_grads_batched`)
                    # VJPs at every chunk size (2.1 s vs 2.6-3.5 s for ResNet-18's 512 layer4 filters
                    # on 256 images), since the batched backward rules cost more than the launches.
                    grads = torch.stack([
                        torch.autograd.grad(f, xl, cot[i], retain_graph=not (last and i == len(chunk) - 1))[0]
                        for i in range(len(chunk))
                    ])
                else:
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
    rectify: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Filter learning images L^k(x) = x ⊙ ∇_x(½ Σ_ij f_{k,ij}(x)²) (DESIGN §1, thesis eq. 5-2).

    Args:
        model: the network; called as ``model(x)``.
        layer: module path of the layer whose channels are the filters (``list_layers``).
        x: inputs, ``B x C x H x W`` images or ``B x D`` vectors, floating point.
        filters: channel indices to scan; all channels when ``None``.
        rectify: apply ReLU to the layer output first (default: the thesis' "conv layer =
            convolution + activation"; a no-op after a ReLU). Pass False for the raw output of a
            conv, norm or output layer.
        chunk_size: filters per chunk, chosen from a memory budget when ``None``. On the CPU a
            chunk is one batched vector-Jacobian product; on a GPU each filter gets its own
            plain product (measured faster) and the chunk only bounds the memory held at once.

    Returns:
        ``B x K x <x.shape[1:]>`` tensor, K = number of selected filters, detached, on x's device.

    Examples:
        >>> model = SimpleCNN()
        >>> L = filter_learning_images(model, "conv3", torch.randn(4, 1, 32, 32))  # ReLU(conv3)
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
    rectify: bool = True,
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


def layer_learning_image(model: nn.Module, layer: str, x: torch.Tensor, *, rectify: bool = True) -> torch.Tensor:
    """Layer learning image Σ_k L^k(x) = x ⊙ ∇_x ½ Σ_k,ij f_{k,ij}(x)² in one backward pass.

    Returns:
        ``B x <x.shape[1:]>`` tensor.
    """
    check_inputs(x)
    with scan_mode(model):
        xl, f = _forward_to_layer(model, layer, _leaf_input(x), rectify)
        (grad,) = torch.autograd.grad(f, xl, f.detach())
        return xl.detach() * grad


def layer_activations(model: nn.Module, layer: str, x: torch.Tensor, *, rectify: bool = True) -> torch.Tensor:
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

    The thesis' layer value is the mean over the layer's units (all its neurons) and samples of
    these ratios: :func:`layer_knowledge_quantity`.

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



def sample_indices(n: int, max_neurons: int | None, seed: int = 0) -> torch.Tensor:
    """Flat indices in ``[0, n)`` (an ``N`` long tensor, sorted): all of them when ``max_neurons`` is
    None or ≥ n, else a uniform subsample of ``max_neurons`` drawn from a CPU generator seeded with
    ``seed`` (the same indices on every call and device).

    Examples:
        >>> sample_indices(64, 3, seed=0).shape
        torch.Size([3])
    """
    if max_neurons is not None and (not isinstance(max_neurons, int) or max_neurons < 1):
        raise ValueError(f"Expected `max_neurons` to be a positive int or None but got {max_neurons!r}.")
    if max_neurons is None or max_neurons >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_neurons].sort().values


def sample_neurons(unit_shape: Sequence[int], max_neurons: int | None, seed: int = 0) -> list[tuple[int, ...]]:
    """Neuron positions of a layer whose output is ``B x <unit_shape>`` (``(channel, i, j)`` for a
    ``B x K x H x W`` output, ``(unit,)`` for ``B x K``), as :func:`neuron_learning_images` takes them:
    all units, or the seeded subsample of :func:`sample_indices` of the flattened unit grid, in
    flat (row-major) order.
    """
    unit_shape = tuple(int(s) for s in unit_shape)
    flat = sample_indices(math.prod(unit_shape), max_neurons, seed)
    return list(zip(*(c.tolist() for c in torch.unravel_index(flat, unit_shape)), strict=True))


def layer_knowledge_quantity(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    eps: float = 0.0,
    rectify: bool = True,
    max_neurons: int | None = 256,
    seed: int = 0,
) -> dict[str, float]:
    """The thesis' knowledge quantity of a layer (3.3.1, fig. 3-8): the mean over **all neurons**
    of the layer (and over the samples) of each neuron learning image's activation count and
    intensity, relative to the input's (:func:`knowledge_quantity` of neuron learning images).

    :class:`~lightning_interp.callbacks.LearningImageLogger` logs a cheaper variant,
    :func:`filter_knowledge_quantity`: the same ratios of *filter* learning images L^k
    (activation-weighted sums of the neuron images, eq. 5-2) averaged over the scanned filters. The two differ: L^k's support is the union of its
    neurons' supports, so its activation count is ≥ any neuron's, and its intensity scales with
    the activations.

    Cost: one vector-Jacobian product per neuron. With ``max_neurons`` set and the layer larger,
    a seeded uniform subsample of ``max_neurons`` neurons (the same for every sample) stands for
    all of them; None scans every neuron.

    Returns:
        ``{"activation_count": float, "activation_intensity": float, "neurons": int}``.
    """
    f = layer_activations(model, layer, x[:1], rectify=rectify)
    neurons = sample_neurons(tuple(f.shape[1:]), max_neurons, seed)
    count = intensity = 0.0
    step = 64
    for start in range(0, len(neurons), step):
        li = neuron_learning_images(model, layer, x, neurons[start : start + step], rectify=rectify)
        kq = knowledge_quantity(li, x, eps=eps)
        count += kq.activation_count.sum().item()
        intensity += kq.activation_intensity.sum().item()
    n = x.shape[0] * len(neurons)
    return {"activation_count": count / n, "activation_intensity": intensity / n, "neurons": len(neurons)}


def filter_knowledge_quantity(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    filters: Sequence[int] | torch.Tensor | None = None,
    eps: float = 0.0,
    rectify: bool = True,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Filter-level knowledge quantity of a layer: what
    :class:`~lightning_interp.callbacks.LearningImageLogger` logs.

    The mean over the samples and the chosen ``filters`` of :func:`knowledge_quantity` of each
    filter learning image L^k (eq. 5-2)::

        count = 1/(B·K) Σ_b Σ_k #{|L^k(x_b)| > eps} / #{|x_b| > eps}
        intensity = 1/(B·K) Σ_b Σ_k Σ|L^k(x_b)| / Σ|x_b|

    This is not the thesis' definition (3.3.1), which averages over *all neurons'* learning
    images (:func:`layer_knowledge_quantity`): L^k's support is the union of its neurons'
    supports, so its count is at least each neuron's. Cost: one vector-Jacobian product per
    filter, chunked (:func:`iter_filter_learning_images`).

    Args:
        filters: channel indices to average over; all when ``None``.

    Returns:
        ``{"activation_count": float, "activation_intensity": float, "filters": int}``.

    Raises:
        FloatingPointError: NaN/inf in the learning images.

    Examples:
        >>> filter_knowledge_quantity(SimpleCNN(), "relu2", torch.randn(4, 1, 16, 16))["activation_count"]
    """
    chunks = iter_filter_learning_images(model, layer, x, filters=filters, rectify=rectify, chunk_size=chunk_size)
    return reduce_knowledge_quantity(chunks, x, eps=eps, what=f"learning images of {layer}")


def reduce_knowledge_quantity(
    chunks: Iterable[tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    *,
    eps: float = 0.0,
    what: str = "learning images",
) -> dict[str, float]:
    """:func:`filter_knowledge_quantity` of learning images given chunk by chunk: the mean over the
    samples and the filters of :func:`knowledge_quantity`, without holding all the images at once.

    A caller that also needs some of the images (a monitor drawing its most active filters) feeds
    :func:`iter_filter_learning_images` through a generator that keeps them, so they cost no second
    backward pass.

    Args:
        chunks: ``(filters, learning_images)`` pairs as :func:`iter_filter_learning_images` yields
            them: an ``n`` long tensor and ``B x n x <x.shape[1:]>`` images.
        x: the inputs, ``B x ...``.
        eps: an element is active when ``|value| > eps``.
        what: names the images in the ``FloatingPointError`` raised on NaN/inf.

    Returns:
        ``{"activation_count": float, "activation_intensity": float, "filters": int}``.

    Examples:
        >>> reduce_knowledge_quantity(iter_filter_learning_images(model, "relu2", x), x)["filters"]
    """
    count = intensity = 0.0
    scanned = 0
    for idx, li in chunks:
        kq = knowledge_quantity(check_finite(li, what), x, eps=eps)
        count += kq.activation_count.sum().item()
        intensity += kq.activation_intensity.sum().item()
        scanned += idx.numel()
    n = x.shape[0] * scanned
    return {"activation_count": count / n, "activation_intensity": intensity / n, "filters": scanned}


# ---- sketch mode (DESIGN §1): random projections of all filters' learning images at once -------------


@contextmanager
def _elementwise_eval_batchnorm(model: nn.Module) -> Iterator[None]:
    """Run eval-mode BatchNorm as the affine map it is, with elementwise ops.

    Forward-mode AD through ``F.batch_norm`` is about 100× slower than the forward on the CPU
    (measured on a 64-channel 32×32 layer); as ``(x − μ) · γ/√(σ² + ε) + β`` it costs a few
    elementwise passes. Instance attributes shadow ``forward`` and are removed on exit.
    """
    patched = []
    try:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.track_running_stats:

                def affine(inp: torch.Tensor, m=m) -> torch.Tensor:
                    shape = (1, -1) + (1,) * (inp.dim() - 2)
                    scale = torch.rsqrt(m.running_var + m.eps)
                    if m.weight is not None:
                        scale = scale * m.weight
                    shift = -m.running_mean * scale + (m.bias if m.bias is not None else 0)
                    return inp * scale.view(shape) + shift.view(shape)

                m.forward = affine
                patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def rademacher_directions(
    num_projections: int, shape: Sequence[int], *, seed: int, device=None, dtype=torch.float32
) -> torch.Tensor:
    """``num_projections x <shape>`` random ±1 directions from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    r = torch.randint(0, 2, (num_projections, *shape), generator=g).to(dtype) * 2 - 1
    return r.to(device)


def _jvp_projections(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    tangents: torch.Tensor,
    rectify: bool,
    chunk: int,
    impl: str = "vmap",
) -> torch.Tensor:
    """Σ_ij f_k,ij (J v)_k,ij for ``B x P x <x.shape[1:]>`` tangents → ``B x K x P``.

    ``impl="vmap"``: ``torch.func.jvp`` vmapped over a chunk of directions, so the primal forward
    runs once per chunk and only the tangents are batched. ``impl="dual"``: the batch is replicated
    per direction and pushed through with ``torch.autograd.forward_ad`` dual tensors (the primal is
    recomputed for every direction); kept as the benchmarks' peer and as a fallback for models whose
    ops ``vmap`` does not support.
    """
    module = get_layer(model, layer)
    b, p = tangents.shape[:2]
    out = []

    def layer_output(inp: torch.Tensor) -> torch.Tensor:
        with capture_output(module, layer) as store:
            model(inp)
        if store["output"] is None:
            raise ValueError(f"Layer {layer!r} was not called during the forward pass of {type(model).__name__}.")
        return store["output"]

    for start in range(0, p, chunk):
        t = tangents[:, start : start + chunk]  # (B, n, ...)
        n = t.shape[1]
        if impl == "vmap":
            try:
                f, jv = torch.func.vmap(lambda v: torch.func.jvp(layer_output, (x,), (v,)), out_dims=(None, 1))(
                    t.transpose(0, 1)
                )  # f (B, K, ...), jv (B, n, K, ...)
            except RuntimeError as err:
                if "vmap" not in str(err):
                    raise
                # An op without a batching rule (e.g. a channels_last clone inside the model).
                warnings.warn(
                    f"sketch mode: torch.func.vmap cannot run this model ({err}); using the slower "
                    "replicated-batch forward-mode path instead.",
                    stacklevel=2,
                )
                impl = "dual"
        if impl == "dual":
            from torch.autograd import forward_ad as fwAD

            primal = x.unsqueeze(1).expand_as(t).reshape(b * n, *x.shape[1:])
            with fwAD.dual_level():
                f, jv = fwAD.unpack_dual(layer_output(fwAD.make_dual(primal, t.reshape(b * n, *x.shape[1:]))))
            if jv is None:
                raise ValueError(
                    f"The output of layer {layer!r} does not depend on the input, so it has no learning image."
                )
            f, jv = f.reshape(b, n, *f.shape[1:])[:, 0], jv.reshape(b, n, *jv.shape[1:])
        elif impl != "vmap":
            raise ValueError(f"Expected `impl` to be one of ['vmap', 'dual'] but got {impl!r}.")
        if rectify:
            jv = jv * (f > 0).unsqueeze(1)
            f = torch.relu(f)
        proj = (f.unsqueeze(1) * jv).reshape(b, n, f.shape[1], -1).sum(-1)  # (B, n, K)
        out.append(proj.transpose(1, 2))
    return torch.cat(out, 2)


def _sketch_chunk(x: torch.Tensor, requested: int | None) -> int:
    if requested is not None:
        if int(requested) < 1:
            raise ValueError(f"Expected `chunk_size` to be a positive int or None but got {requested}.")
        return int(requested)
    # A direction costs a forward of the batch with its tangent: keep ~ `scan_budget` of inputs.
    per_direction = 64 * x.numel() * x.element_size()
    return max(1, scan_budget(x.device) // max(per_direction, 1))


def sketch_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    num_projections: int,
    seed: int = 0,
    rectify: bool = True,
    per_sample: bool = False,
    return_directions: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Random projections ⟨r_p, vec L^k(x)⟩ of every filter's learning image (DESIGN §1, sketch mode).

    For a direction r, one forward-mode product of the layer in direction v = r ⊙ x gives
    ⟨r, L^k⟩ = ⟨v, ∇_x ½Σ f_k²⟩ = Σ_ij f_k,ij (J v)_k,ij for all K filters at once, so P
    directions cost P forward-mode passes whatever K is (exact mode: K backward passes).
    Directions are Rademacher (±1), seeded; shared by all samples unless ``per_sample``.

    Returns:
        ``B x K x P`` projections, and with ``return_directions`` also the directions:
        ``P x <x.shape[1:]>`` (shared) or ``B x P x <x.shape[1:]>`` (``per_sample``). Note
        ``E[⟨r, L⟩²] = ‖L‖²``, and ``projections[b, k] = directions · vec L^k(x_b)``.
    """
    check_inputs(x)
    if not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"Expected `num_projections` to be a positive int but got {num_projections!r}.")
    shape = (x.shape[0], num_projections) if per_sample else (num_projections,)
    r = rademacher_directions(int(torch.tensor(shape).prod()), x.shape[1:], seed=seed, device=x.device, dtype=x.dtype)
    r = r.reshape(*shape, *x.shape[1:])
    tangents = (r if per_sample else r.unsqueeze(0)) * x.unsqueeze(1)
    with scan_mode(model), torch.no_grad(), _elementwise_eval_batchnorm(model):
        proj = _jvp_projections(model, layer, x.detach(), tangents, rectify, _sketch_chunk(x, chunk_size))
    return (proj, r) if return_directions else proj


def sketch_properties(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    num_projections: int = 32,
    seed: int = 0,
    rectify: bool = True,
    chunk_size: int | None = None,
    per_sample: bool = False,
) -> dict[str, torch.Tensor]:
    """TIP properties from forward-mode products (DESIGN §1, §3): ``B x K`` tensors.

    ``mean`` and ``covariance`` are exact (directions x and x², over the region: x ⊙ M, x² ⊙ M);
    ``variance`` uses Hutchinson's estimate ‖L‖² ≈ mean_p ⟨r_p ⊙ M, L⟩² with Rademacher r_p, and
    ``correlation`` follows from it. With a boolean ``mask`` (B x 1|C x H x W) the ``fg_`` and
    ``bg_`` variants are computed too. Estimates are clamped so that variance ≥ 0 and |corr| ≤ 1.
    ``per_sample``: draw independent directions for every sample (same cost), so the error of a
    mean over the B samples (T^k, eq. 5-7) shrinks as 1/√B instead of being shared by all of them.
    """
    check_inputs(x)
    regions = {"": torch.ones_like(x, dtype=torch.bool)}
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != x.dim() or mask.shape[0] != x.shape[0]:
            raise ValueError(f"Expected a boolean `mask` of shape (B, 1 or C, ...) for inputs {tuple(x.shape)} but got {tuple(mask.shape)} {mask.dtype}.")
        m = mask.expand_as(x)
        regions.update({"fg_": m, "bg_": ~m})
    b = x.shape[0]
    r = rademacher_directions(num_projections * (b if per_sample else 1), x.shape[1:], seed=seed, device=x.device,
                              dtype=x.dtype)
    r = r.view(b, num_projections, *x.shape[1:]) if per_sample else r.unsqueeze(0)
    out: dict[str, torch.Tensor] = {}
    chunk = _sketch_chunk(x, chunk_size)
    with scan_mode(model), torch.no_grad(), _elementwise_eval_batchnorm(model):
        for prefix, region in regions.items():
            w = region.to(x.dtype)
            n = w.flatten(1).sum(1).clamp_min(1)[:, None]  # (B, 1)
            mx = (x * w).flatten(1).sum(1)[:, None] / n
            var_x = (((x - mx.view(b, *[1] * (x.dim() - 1))) * w) ** 2).flatten(1).sum(1)[:, None] / n
            tangents = torch.stack([x * w, x * x * w], 1)  # exact: ⟨x⊙M, g⟩ and ⟨x²⊙M, g⟩
            tangents = torch.cat([tangents, r * (x * w).unsqueeze(1)], 1)
            proj = _jvp_projections(model, layer, x.detach(), tangents, rectify, chunk)  # (B, K, 2 + P)
            mean = proj[..., 0] / n
            cov = proj[..., 1] / n - mean * mx
            sq = (proj[..., 2:] ** 2).mean(-1) / n
            var = (sq - mean**2).clamp_min(0)
            denom = (var * var_x).sqrt()
            tiny = torch.finfo(x.dtype).tiny
            corr = torch.where(denom > tiny, cov / denom.clamp_min(tiny), torch.zeros_like(cov)).clamp(-1, 1)
            empty = (w.flatten(1).sum(1) == 0)[:, None]
            for name, v in (("mean", mean), ("variance", var), ("covariance", cov), ("correlation", corr)):
                out[prefix + name] = torch.where(empty, torch.zeros_like(v), v)
    return out


# ---- pooled mode (DESIGN §1, §4): learning images on a fixed low-resolution grid, exactly ------------


def _grid_of(grid: int | Sequence[int], dims: int) -> tuple[int, ...]:
    cells = (grid,) * dims if isinstance(grid, int) else tuple(grid)
    if len(cells) != dims or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in cells):
        raise ValueError(f"Expected `grid` to be a positive int or {dims} positive ints but got {grid!r}.")
    return cells


def _pool_matrix(size: int, cells: int, dtype: torch.dtype) -> torch.Tensor:
    """``cells x size``: row i averages the elements ⌊i·size/cells⌋ .. ⌈(i+1)·size/cells⌉ − 1
    (the cells of ``adaptive_avg_pool``; they overlap when ``cells`` does not divide ``size``)."""
    out = torch.zeros(cells, size, dtype=dtype)
    for i in range(cells):
        start, end = (i * size) // cells, -((-(i + 1) * size) // cells)
        out[i, start:end] = 1.0 / (end - start)
    return out


def pooling_basis(
    shape: Sequence[int], grid: int | Sequence[int] = 2, *, device=None, dtype=torch.float32
) -> torch.Tensor:
    """The fixed basis b_p of :func:`pooled_learning_images`: ``P x <shape>``.

    For an input of shape ``C x H x W`` and ``grid = (g_h, g_w)``, b_p (p = i·g_w + j) is 1/|cell|
    on the elements of spatial cell (i, j) of every channel and 0 elsewhere, so ⟨b_p, L⟩ is
    ``adaptive_avg_pool2d(L.sum(channels), grid)[i, j]``. ``C x L`` inputs pool L
    (``adaptive_avg_pool1d``), ``D``-vectors pool D. Cells follow ``adaptive_avg_pool``: they overlap
    where the grid does not divide the size.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        raise ValueError("Expected an input shape with at least one dimension but got ().")
    spatial = shape[1:] if len(shape) >= 2 else shape
    if len(spatial) > 2:
        raise ValueError(f"Expected inputs C x H x W, C x L or D but got per-sample shape {shape}.")
    cells = _grid_of(grid, len(spatial))
    if any(g > s for g, s in zip(cells, spatial, strict=True)):
        raise ValueError(f"Expected `grid` {cells} no finer than the input's spatial size {spatial}.")
    mats = [_pool_matrix(s, g, dtype) for s, g in zip(spatial, cells, strict=True)]
    basis = mats[0] if len(mats) == 1 else torch.einsum("ih,jw->ijhw", *mats).reshape(-1, *spatial)
    if len(shape) >= 2:
        basis = basis.unsqueeze(1).expand(basis.shape[0], shape[0], *spatial)
    return basis.contiguous().to(device)


def pooled_learning_images(
    model: nn.Module,
    layer: str,
    x: torch.Tensor,
    *,
    grid: int | Sequence[int] = 2,
    rectify: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Every filter's learning images pooled onto a fixed low-resolution grid (DESIGN §1, §4; pooled mode).

    Coordinate p of filter k on sample x is ⟨b_p, L^k(x)⟩ with b_p of :func:`pooling_basis`: the
    channel sum of the filter learning image L^k(x) = x ⊙ ∇_x ½Σ_ij f_k,ij² (eq. 5-2), averaged over
    spatial cell p of a ``grid`` (``adaptive_avg_pool2d(L^k.sum(1), grid)``, flattened). Since
    ⟨b_p, x ⊙ g⟩ = ⟨x ⊙ b_p, g⟩, coordinate p of **all K filters** is one forward-mode product of the
    layer in direction x ⊙ b_p: Σ_ij f_k,ij (J (x ⊙ b_p))_k,ij. P = g_h·g_w products whatever K is
    (exact mode: K backward passes), and the result is exact, not an estimate (unlike the random
    projections of :func:`sketch_learning_images`).

    Deviation from the thesis: the anomaly scan (thesis ch. 6) clusters each filter's full-resolution
    learning images; pooled mode clusters where on the image (which cell) a filter took its energy
    from, a P-dimensional summary. Whether that carries the same overfitting signal is measured, not
    assumed (``experiments/cheap_scan_signal.py``).

    Args:
        model: as :func:`filter_learning_images`.
        layer: as :func:`filter_learning_images`.
        x: ``B x C x H x W``, ``B x C x L`` or ``B x D``.
        rectify: as :func:`filter_learning_images`.
        grid: cells per spatial dimension, an int or one int per dimension.
        chunk_size: directions per forward-mode pass (from the memory budget when None).

    Returns:
        ``B x K x P`` tensor, detached, on x's device.

    Examples:
        >>> pooled = pooled_learning_images(SimpleCNN(), "relu3", torch.randn(8, 1, 32, 32), grid=2)
        >>> pooled.shape
        torch.Size([8, 64, 4])
    """
    check_inputs(x)
    basis = pooling_basis(x.shape[1:], grid, device=x.device, dtype=x.dtype)  # (P, ...)
    x = x.detach()
    tangents = basis.unsqueeze(0) * x.unsqueeze(1)  # (B, P, ...)
    with scan_mode(model), torch.no_grad(), _elementwise_eval_batchnorm(model):
        return _jvp_projections(model, layer, x, tangents, rectify, _sketch_chunk(x, chunk_size))
