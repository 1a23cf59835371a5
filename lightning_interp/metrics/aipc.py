"""Masking analyses (thesis 5.4): the accuracy-interpretable-property curve and filter types.

Any per-filter score (a TIP property, a saliency, an anomaly score: one value per channel)
ranks the filters; :class:`~lightning_interp.masking.FilterMask` removes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..batch import BatchAdapter, default_batch_adapter
from ..layers import eval_mode
from ..masking import FilterMask

__all__ = [
    "accuracy", "evaluate", "aipc", "AIPC", "DEFAULT_FRACTIONS", "filter_types", "FILTER_TYPES", "type_masking",
    "masked_loss_change",
]

DEFAULT_FRACTIONS = (0.0, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
FILTER_TYPES = ("H-H", "H-noH", "noH-H", "L-L", "L-noL", "noL-L")


@torch.no_grad()
def accuracy(
    model: nn.Module,
    dataloader: Iterable,
    *,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
) -> float:
    """Top-1 accuracy of ``model`` (eval mode, restored after) on a dataloader (:func:`evaluate`'s first value)."""
    return evaluate(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches)[0]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataloader: Iterable,
    *,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """Top-1 accuracy and mean per-sample loss (``loss_fn`` with ``reduction="sum"``, divided by the
    number of samples) of ``model`` in eval mode (restored after): ``(accuracy, loss)``.

    The loss is what table 4-3 reports the % change of when filters are masked."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = total = 0
    loss_sum = 0.0
    with eval_mode(model):
        for i, raw in enumerate(dataloader):
            if max_batches is not None and i >= max_batches:
                break
            b = batch_adapter(raw)
            if b.y is None:
                raise ValueError("Expected labelled batches to measure accuracy and loss but a batch has no labels.")
            y = b.y.to(device)
            logits = model(b.x.to(device))
            correct += (logits.argmax(1) == y).sum().item()
            loss_sum += float(loss_fn(logits, y, reduction="sum"))
            total += len(y)
    if total == 0:
        raise ValueError("Expected the dataloader to yield at least one sample but it yielded none.")
    return correct / total, loss_sum / total


@dataclass(frozen=True)
class AIPC:
    """Accuracy as the top-ranked fraction of filters is masked.

    Attributes:
        fractions: masked fractions r; accuracy: accuracy at each r; change: accuracy − accuracy(0);
        area: ∫ change dr over all fractions (trapezoid); area_top10: the same over r ≤ 0.1.
            Both in accuracy (fraction) × fraction of filters, negative when masking hurts.
        area_top10_thesis: the quantity of the thesis' table 5-1 (positive, 4-66 there): the area
            over the top 10 % with the accuracy *drop* in percentage points and the masked share
            in percent of filters, ``-1e4 · area_top10``; i.e. 10 × the mean drop (pp) over the
            first 10 % of filters. The thesis gives no formula; this reading is the one its
            numbers allow: each table-5-1 value is an integer multiple of one validation sample's
            accuracy step (0.2 pp for data 1, 100/130 pp for data 3), as a sum of pp drops over
            1 %-steps is, and 4-66 exceeds what pp × fraction (at most 10) can reach.
    """

    fractions: list[float]
    accuracy: list[float]
    change: list[float]
    area: float
    area_top10: float
    area_top10_thesis: float = 0.0


def _trapezoid(xs: Sequence[float], ys: Sequence[float]) -> float:
    return float(sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(xs, xs[1:], ys, ys[1:])))


def aipc(
    model: nn.Module,
    layer: str,
    ranking: torch.Tensor,
    dataloader: Iterable,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    *,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    base_accuracy: float | None = None,
) -> AIPC:
    """Mask the filters of ``layer`` with the highest ``ranking`` scores, fraction by fraction.

    Args:
        ranking: ``K`` scores, one per filter (higher = masked first).
        fractions: masked fractions in [0, 1], increasing; 0 is added if missing.
        progress: called as ``progress(done, total)`` after each fraction.
        base_accuracy: accuracy of the unmasked model if already measured (:func:`accuracy` with the
            same dataloader and ``max_batches``); it then stands for every fraction that masks no filter.
    """
    ranking = torch.as_tensor(ranking).flatten()
    fr = sorted({0.0, *(float(f) for f in fractions)})
    if fr[0] < 0 or fr[-1] > 1:
        raise ValueError(f"Expected `fractions` in [0, 1] but got {list(fractions)}.")
    order = ranking.argsort(descending=True).tolist()
    accs = []
    for i, r in enumerate(fr):
        n = int(round(r * len(order)))
        if n == 0:
            accs.append(base_accuracy if base_accuracy is not None
                        else accuracy(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches))
        else:
            with FilterMask(model, {layer: order[:n]}):
                accs.append(accuracy(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches))
        if progress is not None:
            progress(i + 1, len(fr))
    change = [a - accs[0] for a in accs]
    top = [(r, c) for r, c in zip(fr, change) if r <= 0.1 + 1e-12]
    top10 = _trapezoid([t[0] for t in top], [t[1] for t in top])
    return AIPC(fr, accs, change, _trapezoid(fr, change), top10, -1e4 * top10)


def filter_types(fg_scores: torch.Tensor, bg_scores: torch.Tensor, per: float = 0.3) -> dict[str, torch.Tensor]:
    """Filter types from foreground/background rankings (thesis 5.4.3).

    With H_f / L_f the top / bottom ``per`` of filters by foreground score (H_b / L_b likewise for
    background): H-H = H_f ∩ H_b, H-noH = H_f \\ H_b, noH-H = H_b \\ H_f, L-L = L_f ∩ L_b,
    L-noL = L_f \\ L_b, noL-L = L_b \\ L_f.

    Returns:
        dict of ``K`` bool tensors keyed by :data:`FILTER_TYPES`.
    """
    fg, bg = torch.as_tensor(fg_scores).flatten(), torch.as_tensor(bg_scores).flatten()
    if fg.shape != bg.shape:
        raise ValueError(f"Expected foreground and background scores of the same shape but got {tuple(fg.shape)} and {tuple(bg.shape)}.")
    if not 0 < per <= 0.5:
        raise ValueError(f"Expected `per` in (0, 0.5] but got {per}.")
    k = fg.numel()
    n = max(1, int(round(per * k)))

    def top(s):
        m = torch.zeros(k, dtype=torch.bool)
        m[s.argsort(descending=True)[:n].cpu()] = True
        return m

    def bottom(s):
        m = torch.zeros(k, dtype=torch.bool)
        m[s.argsort()[:n].cpu()] = True
        return m

    hf, hb, lf, lb = top(fg), top(bg), bottom(fg), bottom(bg)
    return {"H-H": hf & hb, "H-noH": hf & ~hb, "noH-H": hb & ~hf, "L-L": lf & lb, "L-noL": lf & ~lb, "noL-L": lb & ~lf}


def type_masking(
    model: nn.Module,
    layer: str,
    types: dict[str, torch.Tensor],
    dataloader: Iterable,
    *,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
    base: float | None = None,
) -> dict[str, float]:
    """Accuracy change when all filters of each type are masked (0.0 for an empty type).

    Args:
        base: accuracy of the unmasked model if already measured (:func:`accuracy` with the same
            dataloader and ``max_batches``).
    """
    if base is None:
        base = accuracy(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches)
    out = {}
    for name, members in types.items():
        idx = members.nonzero().flatten().tolist()
        if not idx:
            out[name] = 0.0
            continue
        with FilterMask(model, {layer: idx}):
            out[name] = accuracy(model, dataloader, batch_adapter=batch_adapter, max_batches=max_batches) - base
    return out


def masked_loss_change(
    model: nn.Module,
    layer: str,
    filters: Sequence[int] | torch.Tensor,
    dataloader: Iterable,
    *,
    loss_fn: Callable[..., torch.Tensor] = F.cross_entropy,
    batch_adapter: BatchAdapter = default_batch_adapter,
    max_batches: int | None = None,
    base: tuple[float, float] | None = None,
) -> dict[str, float]:
    """The % change in loss (tables 4-3, 4-4) and the accuracy change when ``filters`` of ``layer``
    are masked (outputs set to 0 through :class:`~lightning_interp.masking.FilterMask`).

    Args:
        base: ``(accuracy, loss)`` of the unmasked model if already measured.

    Returns:
        ``{"loss_pct": 100·(L_masked − L)/L, "accuracy_change": acc_masked − acc (fraction),
        "loss": L_masked, "base_loss": L}``.
    """
    kw = {"loss_fn": loss_fn, "batch_adapter": batch_adapter, "max_batches": max_batches}
    acc0, loss0 = base if base is not None else evaluate(model, dataloader, **kw)
    idx = torch.as_tensor(filters, dtype=torch.long).flatten().tolist()
    if idx:
        with FilterMask(model, {layer: idx}):
            acc, loss = evaluate(model, dataloader, **kw)
    else:
        acc, loss = acc0, loss0
    pct = 100.0 * (loss - loss0) / loss0 if loss0 > 0 else float("nan")
    return {"loss_pct": pct, "accuracy_change": acc - acc0, "loss": loss, "base_loss": loss0}
