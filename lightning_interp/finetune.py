"""A short fine-tune of a network on a dataloader: what follows pruning (or masking) filters.

:func:`fine_tune` is a plain training loop (cross-entropy, Adam by default) that callbacks and scripts
share: ``PruneFlaggedFilters(finetune_epochs=...)`` runs it on the pruned network over the training
samples that are not flagged, and ``experiments/memorisation_filters.py`` runs it after masking.
:func:`without_samples` builds that loader: a dataset's samples minus the flagged indices.

Under ``torch.distributed`` (``sync=True``, the default when a process group is initialised) every
rank averages its gradients with the others before each step (what DDP does), so ranks that start
from the same weights and take the same number of steps end with identical weights; give each rank
its share of the data (a ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from .batch import BatchAdapter, default_batch_adapter

__all__ = ["fine_tune", "without_samples", "loader_without"]


def without_samples(dataset: Dataset, exclude: torch.Tensor | Sequence[int] | None) -> Dataset:
    """``dataset`` without the samples ``exclude`` names (indices into it, or a boolean mask over it)."""
    n = len(dataset)
    if exclude is None:
        return dataset
    exclude = torch.as_tensor(exclude).flatten().cpu()
    if exclude.dtype == torch.bool:
        if exclude.numel() != n:
            raise ValueError(f"Expected the excluded samples as a boolean mask of {n} entries (one per sample) "
                             f"but got {exclude.numel()}.")
        drop = exclude
    else:
        if exclude.is_floating_point():
            raise TypeError(f"Expected the excluded samples as indices or a boolean mask but got {exclude.dtype} values.")
        bad = exclude[(exclude < 0) | (exclude >= n)]
        if bad.numel():
            raise ValueError(f"Expected excluded sample indices in [0, {n - 1}] but got {bad.tolist()[:10]}.")
        drop = torch.zeros(n, dtype=torch.bool)
        drop[exclude.long()] = True
    keep = torch.nonzero(~drop).flatten().tolist()
    if not keep:
        raise ValueError("Every sample is excluded; nothing is left to fine-tune on.")
    return Subset(dataset, keep)


def loader_without(loader: DataLoader, exclude: torch.Tensor | Sequence[int] | None, *, seed: int = 0) -> DataLoader:
    """A shuffled (seeded) loader over ``loader``'s dataset without the ``exclude`` samples, with its batch
    size and collate function, in this process (no distributed sampler)."""
    if not isinstance(loader, DataLoader):
        raise TypeError(f"Expected a torch DataLoader (whose dataset the fine-tune reads) but got {type(loader).__name__}.")
    return DataLoader(without_samples(loader.dataset, exclude), batch_size=loader.batch_size or 1, shuffle=True,
                      collate_fn=loader.collate_fn, generator=torch.Generator().manual_seed(seed))


def _synced() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def fine_tune(
    model: nn.Module,
    dataloader: Iterable | DataLoader,
    *,
    epochs: int = 1,
    lr: float = 1e-4,
    optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer] | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    device: torch.device | str | None = None,
    batch_adapter: BatchAdapter = default_batch_adapter,
    sync: bool | None = None,
) -> list[float]:
    """Train ``model`` in place for ``epochs`` passes over ``dataloader``; return each epoch's mean loss.

    Args:
        model: the network (training mode inside, every submodule's own mode restored after).
        dataloader: batches ``batch_adapter`` reads (``(x, y)``, ``(x, y, mask)``, dicts).
        epochs: passes (>= 1).
        lr: Adam's learning rate (used when ``optimizer`` is None).
        optimizer: ``params -> Optimizer`` to use another one, e.g. ``lambda p: torch.optim.SGD(p, lr=0.01)``.
        device: where to train (the model's device when None; the model is moved there).
        sync: average gradients over the ``torch.distributed`` process group before each step (default:
            whenever one is initialised). Every rank must take the same number of steps.

    Returns:
        ``epochs`` floats: mean training loss of each epoch (over this rank's batches).

    Example:
        >>> pruned, _ = prune_filters(net, flags, x[:2])
        >>> fine_tune(pruned, DataLoader(without_samples(train_set, flagged), batch_size=128), epochs=2)
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise ValueError(f"Expected `epochs` to be a positive int but got {epochs!r}.")
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    model.to(device)
    sync = _synced() if sync is None else sync
    if sync and not _synced():
        raise RuntimeError("Expected an initialised torch.distributed process group for `sync=True`.")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer(params) if optimizer is not None else torch.optim.Adam(params, lr=lr)
    flags = [(m, m.training) for m in model.modules()]
    losses = []
    try:
        model.train()
        with torch.inference_mode(False), torch.enable_grad():
            for _ in range(epochs):
                total, count = 0.0, 0
                for raw in dataloader:
                    batch = batch_adapter(raw)
                    x, y = batch.x.to(device), batch.y.to(device)
                    loss = loss_fn(model(x), y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if sync:
                        world = torch.distributed.get_world_size()
                        for p in params:
                            if p.grad is not None:
                                torch.distributed.all_reduce(p.grad)
                                p.grad /= world
                    opt.step()
                    total += float(loss.detach()) * len(y)
                    count += len(y)
                if count == 0:
                    raise ValueError("Expected the fine-tune dataloader to yield at least one batch but it is empty.")
                losses.append(total / count)
    finally:
        opt.zero_grad(set_to_none=True)
        for m, training in flags:
            m.training = training
    return losses
