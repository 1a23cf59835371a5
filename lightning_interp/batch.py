"""Batch adapters: turn whatever a dataloader yields into inputs, labels and optional masks.

Accepted without configuration (DESIGN §6): ``(x, y)``, ``(x, y, mask)`` (lists too), and
dicts with the input under ``image``/``input``/``x``, labels under ``label``/``target``/``y``
and an optional foreground mask under ``mask``. Anything else needs a user callable that
returns a :class:`Batch`.

Batches from a dataset wrapped by :func:`lightning_interp.data.with_index` carry each sample's
dataset index last — ``(x, y, index)``, ``(x, y, mask, index)``, or a dict with ``index`` — and
the adapter returns it as :attr:`Batch.index` (a 1-D integer tensor is never taken for a mask).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Batch", "BatchAdapter", "default_batch_adapter"]

_X_KEYS = ("image", "input", "x")
_Y_KEYS = ("label", "target", "y")


@dataclass
class Batch:
    """Inputs ``x`` (B x ...), labels ``y`` (B,) or None, foreground ``mask`` (B x 1|C x H x W, bool) or None,
    and the samples' dataset indices ``index`` (B,) or None."""

    x: torch.Tensor
    y: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    index: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            self.x.to(device),
            None if self.y is None else self.y.to(device),
            None if self.mask is None else self.mask.to(device),
            self.index,
        )

    def __len__(self) -> int:
        return self.x.shape[0]


BatchAdapter = Callable[[Any], Batch]


def default_batch_adapter(batch: Any) -> Batch:
    """Split a batch in the formats above into a :class:`Batch`."""
    if isinstance(batch, Batch):
        return batch
    if isinstance(batch, torch.Tensor):
        return Batch(batch)
    if isinstance(batch, Mapping):
        x = next((batch[k] for k in _X_KEYS if k in batch), None)
        if x is None:
            raise ValueError(
                f"Expected a dict batch to hold the input under one of {list(_X_KEYS)} but got keys "
                f"{sorted(map(str, batch))}; pass `batch_adapter=` to the callback for other layouts."
            )
        y = next((batch[k] for k in _Y_KEYS if k in batch), None)
        return Batch(x, y, _as_mask(batch.get("mask")), _as_index(batch.get("index")))
    index = None
    if isinstance(batch, (tuple, list)) and 3 <= len(batch) <= 4 and _is_index(batch[-1], batch[0]):
        batch, index = batch[:-1], batch[-1]
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= 3 and isinstance(batch[0], torch.Tensor):
        shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in batch]
        if batch[0].dim() < 2 and any(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in batch[1:]):
            # e.g. `[y, mask, x]`: the first element looks like labels, a later one like the inputs.
            raise ValueError(
                f"Expected a batch `(x, y)` or `(x, y, mask)` with the inputs first but got elements of shapes "
                f"{shapes}: the first looks like labels. Pass `batch_adapter=` to the callback, e.g. "
                "`batch_adapter=lambda b: Batch(x=b[2], y=b[0], mask=b[1] > 0.5)` "
                "(from lightning_interp.batch import Batch)."
            )
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        mask = _as_mask(batch[2]) if len(batch) > 2 else None
        return Batch(x, y, mask, index)
    raise ValueError(
        "Expected a batch `(x, y)`, `(x, y, mask)` or a dict with 'image'/'input' and 'label'/'target' "
        f"but got {type(batch).__name__}; pass `batch_adapter=` (a callable returning "
        "lightning_interp.batch.Batch) to the callback."
    )


def _is_index(t: Any, x: Any) -> bool:
    """A 1-D integer tensor with one entry per input: dataset indices (never a mask, which is >= 2-D)."""
    return (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and t.dtype != torch.bool
            and isinstance(x, torch.Tensor) and x.dim() >= 2 and len(t) == len(x))


def _as_index(index: Any) -> torch.Tensor | None:
    if index is None:
        return None
    index = torch.as_tensor(index)
    if index.dim() != 1 or index.is_floating_point():
        raise TypeError(f"Expected the batch's `index` to be a 1-D integer tensor but got {index.dtype} of shape "
                        f"{tuple(index.shape)}.")
    return index


def _as_mask(mask: Any) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"Expected the foreground `mask` to be a tensor but got {type(mask).__name__}.")
    return mask if mask.dtype == torch.bool else mask > 0.5
