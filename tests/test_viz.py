"""Pictures for the loggers and the report: shapes, layout (legends off the curves)."""

import numpy as np
import pytest
import torch

from lightning_interp.viz import _pyplot, anomaly_timeline, labelled_image_grid, legend_below, line_plot


@pytest.mark.parametrize("n,ncols,rows", [(16, 8, 2), (5, 8, 1), (9, 4, 3)])
def test_labelled_image_grid_is_wide_with_a_caption_row_under_each_thumbnail(n, ncols, rows):
    captions = [f"given: cat / pred: dog / filters 3,{i}" for i in range(n)]
    grid = labelled_image_grid(torch.rand(n, 1, 32, 32), captions, ncols=ncols, thumb=48)
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    cols = min(n, ncols)
    assert grid.shape[1] == cols * (48 + 4) + 4
    assert grid.shape[0] > rows * 48 and grid.shape[0] < rows * (48 + 60)  # thumbnails plus 3 caption lines
    if n >= 2 and 2 * rows <= cols:
        assert grid.shape[1] > grid.shape[0]
    dark = (grid.min(-1) < 100).any(1)  # caption text under the first row of thumbnails
    assert dark[48 + 6 : 48 + 30].any()


def test_labelled_image_grid_errors():
    with pytest.raises(ValueError, match=r"one caption per image \(2\) but got 1"):
        labelled_image_grid(torch.rand(2, 3, 8, 8), ["a"])
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        labelled_image_grid(torch.rand(3, 8, 8), ["a", "b", "c"])


def test_legend_below_does_not_overlap_the_plot_area():
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i in range(5):
        ax.plot([0, 1, 2], [i, i + 1, i], label=f"series {i}")
    legend = legend_below(ax)
    fig.tight_layout()
    fig.canvas.draw()
    box, area = legend.get_window_extent(), ax.get_window_extent()
    assert box.y1 <= area.y0  # entirely below the axes
    assert 0 <= box.y0 and box.x0 >= 0 and box.x1 <= fig.bbox.width  # and still inside the picture
    plt.close(fig)


def test_timeline_and_line_plot_render():
    t = anomaly_timeline([0, 1, 2], {"net.features.2": [1, 2, 4]}, {"train_loss": [(0, 2.0), (1, 1.0), (2, 0.5)]},
                         wt_epoch=1)
    p = line_plot([0, 1], {"training: train_loss": [1.0, 0.5], "validation: val_loss": [1.2, 0.9]}, "Loss", "epoch", "loss")
    assert t.ndim == p.ndim == 3 and t.dtype == p.dtype == np.uint8
    # What is drawn shows in the pixels: other counts, the WT line and the red alarm line each change them.
    args = ([0, 1, 2], {"net.features.2": [1, 2, 4]}, {"train_loss": [(0, 2.0), (1, 1.0), (2, 0.5)]})
    bare = anomaly_timeline(*args)
    assert t.shape == bare.shape and not np.array_equal(t, bare)
    other = anomaly_timeline([0, 1, 2], {"net.features.2": [4, 2, 1]}, args[2])
    assert not np.array_equal(other, bare)

    def red(img):
        return int(((img[..., 0] > 200) & (img[..., 1] < 90) & (img[..., 2] < 90)).sum())

    assert red(anomaly_timeline(*args, alarm_epoch=2)) > red(bare) + 50
    assert len(np.unique(bare.reshape(-1, 3), axis=0)) > 10  # lines and text, not a blank canvas
