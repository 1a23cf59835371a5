"""Pictures of learning images, built only at the logging boundary.

Heatmaps follow the thesis (fig. 3-6): red high, blue low (``jet``), channels summed. The
colour scale is symmetric about zero per image so that zero is always the same colour and
signed contributions read the same in every panel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "heatmap", "display_inputs", "image_grid", "labelled_image_grid", "cluster_scatter", "line_plot", "anomaly_timeline",
]


def heatmap(images: torch.Tensor, cmap: str = "jet", symmetric: bool = True) -> torch.Tensor:
    """Colour learning images: ``N x C x H x W`` (summed over C) or ``N x H x W`` → ``N x 3 x H x W`` in [0, 1]."""
    import matplotlib

    maps = images.detach().float().cpu()
    if maps.dim() == 4:
        maps = maps.sum(1)
    if maps.dim() != 3:
        raise ValueError(f"Expected images of shape (N, C, H, W) or (N, H, W) but got {tuple(images.shape)}.")
    flat = maps.flatten(1)
    if symmetric:
        hi = flat.abs().amax(1).clamp_min(1e-12)[:, None, None]
        norm = (maps / hi + 1) / 2
    else:
        lo = flat.amin(1)[:, None, None]
        hi = flat.amax(1)[:, None, None]
        norm = (maps - lo) / (hi - lo).clamp_min(1e-12)
    rgba = matplotlib.colormaps[cmap](norm.numpy())
    return torch.from_numpy(rgba[..., :3]).permute(0, 3, 1, 2).float()


def display_inputs(x: torch.Tensor) -> torch.Tensor:
    """Inputs ``N x C x H x W`` → ``N x 3 x H x W`` in [0, 1], min-max per image (grey for C != 3)."""
    x = x.detach().float().cpu()
    if x.shape[1] != 3:
        x = x.mean(1, keepdim=True).expand(-1, 3, -1, -1)
    lo = x.flatten(1).amin(1)[:, None, None, None]
    hi = x.flatten(1).amax(1)[:, None, None, None]
    return (x - lo) / (hi - lo).clamp_min(1e-12)


def image_grid(columns: Sequence[torch.Tensor], min_side: int = 96, pad: int = 2) -> np.ndarray:
    """Lay out columns of ``N x 3 x H x W`` pictures, one row per sample, as an ``H x W x 3`` uint8 array.

    Small images are enlarged (nearest neighbour) so that each panel is at least ``min_side`` pixels.
    """
    from torchvision.utils import make_grid

    tiles = torch.stack(list(columns), 1).flatten(0, 1)  # (N * cols, 3, H, W), row-major
    scale = max(1, int(np.ceil(min_side / max(tiles.shape[-2:]))))
    if scale > 1:
        tiles = F.interpolate(tiles, scale_factor=scale, mode="nearest")
    grid = make_grid(tiles, nrow=len(columns), padding=pad, pad_value=1.0)
    return (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def labelled_image_grid(images: torch.Tensor, captions: Sequence[str], ncols: int = 8, thumb: int = 64) -> np.ndarray:
    """A wide grid of thumbnails with a short caption under each, as an ``H x W x 3`` uint8 array.

    Made for outlier samples (``"given: cat / pred: dog / filters 3,17"``): up to ``ncols`` thumbnails
    per row, rows added as needed, so 16 samples read as two rows rather than one tall column.

    Args:
        images: ``N x C x H x W`` inputs (shown with :func:`display_inputs`: min-max per image, grey
            unless C = 3) or ``N x 3 x H x W`` pictures in [0, 1].
        captions: one short caption per image (wrapped at ``" / "`` to fit under the thumbnail).
        ncols: thumbnails per row (fewer when N is smaller).
        thumb: thumbnail side in pixels.

    Returns:
        ``H x W x 3`` uint8 array, wider than tall whenever ``N >= 2``.

    Examples:
        >>> grid = labelled_image_grid(torch.rand(5, 3, 32, 32), [f"given: {i} / pred: {i}" for i in range(5)])
        >>> grid.shape[1] > grid.shape[0]
        True
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"Expected `images` of shape (N, C, H, W) but got {got}.")
    n = images.shape[0]
    if len(captions) != n:
        raise ValueError(f"Expected one caption per image ({n}) but got {len(captions)}.")
    if n == 0:
        raise ValueError("Expected at least one image but got none.")
    if not isinstance(ncols, int) or ncols < 1 or not isinstance(thumb, int) or thumb < 8:
        raise ValueError(f"Expected `ncols` >= 1 and `thumb` >= 8 (ints) but got ncols={ncols!r}, thumb={thumb!r}.")
    pics = display_inputs(images).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3) in [0, 1]
    cols = min(ncols, n)
    rows = -(-n // cols)
    lines = max(1 + str(c).count(" / ") for c in captions)
    pad, cap = 4, lines * 10 + 4  # pixels; a 9 px font is about 10 px a line
    width, height = cols * (thumb + pad) + pad, rows * (thumb + cap + pad) + pad
    # One canvas with every thumbnail pasted in (nearest-neighbour) and the captions drawn with Pillow's
    # built-in font: no matplotlib axes or text layout (they cost ~0.1 s a grid, paid at every scan).
    from PIL import Image, ImageDraw, ImageFont

    canvas = np.full((height, width, 3), 255, dtype=np.uint8)
    small = torch.nn.functional.interpolate(torch.from_numpy(pics).permute(0, 3, 1, 2), size=(thumb, thumb),
                                            mode="nearest").permute(0, 2, 3, 1).numpy()
    for i in range(n):
        r, c = divmod(i, cols)
        left, top = pad + c * (thumb + pad), pad + r * (thumb + cap + pad)
        canvas[top:top + thumb, left:left + thumb] = (small[i].clip(0, 1) * 255).round().astype(np.uint8)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=9)  # Pillow >= 10.1
    except TypeError:  # an older Pillow: its fixed bitmap font
        font = ImageFont.load_default()
    for i in range(n):
        r, c = divmod(i, cols)
        left, top = pad + c * (thumb + pad), pad + r * (thumb + cap + pad)
        draw.multiline_text((left + thumb / 2, top + thumb + 2), str(captions[i]).replace(" / ", "\n"), fill=(0, 0, 0),
                            font=font, anchor="ma", align="center", spacing=1)
    return np.asarray(image).copy()


def _pyplot():
    """``matplotlib.pyplot`` on the headless Agg backend (unless the user chose one), imported lazily."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _render(fig) -> np.ndarray:
    """A matplotlib figure as an ``H x W x 3`` uint8 array."""
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def legend_below(ax, handles: Sequence | None = None, names: Sequence[str] | None = None, fontsize: int = 7):
    """Put the legend of ``ax`` under the plot area (below the x label), never over the curves."""
    if handles is None:
        handles, names = ax.get_legend_handles_labels()
    if not handles:
        return None
    return ax.legend(handles, names, fontsize=fontsize, loc="upper center", bbox_to_anchor=(0.5, -0.2),
                     ncol=min(3, len(handles)), frameon=False)


def cluster_scatter(
    embeddings: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    outliers: Sequence[torch.Tensor],
    titles: Sequence[str],
) -> np.ndarray:
    """Scatter plots of 2-D clusterings (thesis figs. 6-1/6-2) as one ``H x W x 3`` uint8 image.

    Args:
        embeddings: per panel a ``B x 2`` tensor; labels: ``B`` cluster ids; outliers: ``B``
            bool, drawn as crosses.
    """
    plt = _pyplot()

    n = len(embeddings)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    try:
        for ax, emb, lab, out, title in zip(axes[0], embeddings, labels, outliers, titles, strict=False):
            e, lab, out = emb.detach().cpu().numpy(), lab.cpu().numpy(), out.cpu().numpy().astype(bool)
            ax.scatter(e[~out, 0], e[~out, 1], c=lab[~out], cmap="tab10", vmin=0, vmax=9, s=8)
            ax.scatter(e[out, 0], e[out, 1], c=lab[out], cmap="tab10", vmin=0, vmax=9, s=36, marker="x")
            ax.set_title(title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
        return _render(fig)
    finally:
        plt.close(fig)


def line_plot(
    xs: Sequence[float], series: dict[str, Sequence[float]], title: str, xlabel: str, ylabel: str
) -> np.ndarray:
    """A small line plot (one line per series) as an ``H x W x 3`` uint8 image."""
    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(5, 3.4))
    try:
        for name, ys in series.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            legend_below(ax)
        return _render(fig)
    finally:
        plt.close(fig)


def anomaly_timeline(
    epochs: Sequence[int],
    counts: dict[str, Sequence[float | None]],
    losses: dict[str, Sequence[tuple[int, float]]],
    wt_epoch: int | None = None,
    alarm_epoch: int | None = None,
) -> np.ndarray:
    """Anomaly filters per layer vs epoch (left axis) against loss curves (right axis), as an
    ``H x W x 3`` uint8 image (the thesis' fig. 6-3 view of overfitting).

    Args:
        epochs: scanned epochs; counts: per layer, one count per scanned epoch (None = not scanned).
        losses: per curve name (e.g. ``"train/loss"``), ``(epoch, value)`` pairs.
        wt_epoch: the best-validation epoch, drawn as a vertical line.
        alarm_epoch: the epoch the overfitting alarm fired, drawn as a red vertical line.
    """
    import matplotlib.ticker

    plt = _pyplot()

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    try:
        for layer, ys in counts.items():
            pts = [(e, y) for e, y in zip(epochs, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=4, label=f"anomaly filters: {layer}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("anomaly filters")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        if losses:
            ax2 = ax.twinx()
            for (name, pts), style in zip(losses.items(), ("--", ":", "-.", (0, (5, 1)))):
                if pts:
                    ax2.plot(*zip(*pts), linestyle=style, color="black", alpha=0.7, label=name)
            ax2.set_ylabel("loss")
            h2, n2 = ax2.get_legend_handles_labels()
            handles, names = handles + h2, names + n2
        if wt_epoch is not None:
            ax.axvline(wt_epoch, color="green", alpha=0.5, linewidth=1)
            handles.append(ax.lines[-1])
            names.append(f"best val acc (WT), epoch {wt_epoch}")
        if alarm_epoch is not None:
            ax.axvline(alarm_epoch, color="red", alpha=0.7, linewidth=1.5, linestyle="--")
            handles.append(ax.lines[-1])
            names.append(f"overfitting alarm, epoch {alarm_epoch}")
        if handles:
            legend_below(ax, handles, names)
        ax.set_title("Anomaly filters vs loss", fontsize=10)
        return _render(fig)
    finally:
        plt.close(fig)
