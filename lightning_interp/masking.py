"""Masking filters: the network behaves as if the chosen channels were removed.

:class:`FilterMask` zeroes channels of a layer's output through forward hooks. Masking the
channel after the activation of a conv → BatchNorm → activation chain is what pruning the
conv's filter does (DESIGN §5): the next layer sees a zero channel either way.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .layers import get_layer, layer_channels

__all__ = ["FilterMask"]


class FilterMask:
    """Zero the output channels ``filters[layer]`` of each named layer while applied.

    Use as a context manager (``with FilterMask(model, {"conv2": [3, 7]}): ...``) or call
    :meth:`apply` and keep the object as a removable handle (:meth:`remove`). The mask is
    a multiplication by a 0/1 tensor on dim 1, so gradients flow through the kept channels.

    Raises:
        ValueError: unknown layer (with close valid names), or a filter index outside the
            layer's channels (checked statically for conv/linear/norm layers, otherwise at the
            first forward pass).
    """

    def __init__(self, model: nn.Module, filters: Mapping[str, Sequence[int] | torch.Tensor]):
        if not isinstance(filters, Mapping):
            raise TypeError(f"Expected `filters` to be a mapping {{layer: [filter, ...]}} but got {type(filters).__name__}.")
        self.model = model
        self.filters: dict[str, list[int]] = {}
        for layer, idx in filters.items():
            module = get_layer(model, layer)
            idx = sorted({int(i) for i in torch.as_tensor(idx, dtype=torch.long).flatten().tolist()})
            channels = layer_channels(module)
            self._check(layer, idx, channels)
            self.filters[layer] = idx
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @staticmethod
    def _check(layer: str, idx: list[int], channels: int | None) -> None:
        bad = [i for i in idx if i < 0 or (channels is not None and i >= channels)]
        if bad:
            valid = f"[0, {channels - 1}]" if channels is not None else "non-negative"
            raise ValueError(f"Expected filters of layer {layer!r} to be {valid} but got {bad}.")

    def _hook(self, layer: str):
        idx = self.filters[layer]

        def hook(module, args, output):
            if not isinstance(output, torch.Tensor) or output.dim() < 2:
                raise ValueError(f"Expected layer {layer!r} to output (B, K, ...) to mask filters.")
            self._check(layer, idx, output.shape[1])
            keep = torch.ones(output.shape[1], dtype=output.dtype, device=output.device)
            keep[idx] = 0
            return output * keep.view(1, -1, *([1] * (output.dim() - 2)))

        return hook

    @property
    def applied(self) -> bool:
        return bool(self._handles)

    def apply(self) -> FilterMask:
        """Register the hooks (idempotent)."""
        if not self._handles:
            for layer in self.filters:
                self._handles.append(get_layer(self.model, layer).register_forward_hook(self._hook(layer)))
        return self

    def remove(self) -> None:
        """Remove the hooks (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> FilterMask:
        return self.apply()

    def __exit__(self, *exc) -> None:
        self.remove()
