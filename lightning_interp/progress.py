"""Progress bars for long analyses (AIPC sweeps, scans of many layers), never silent minutes.

The bars are tqdm's, the library behind Lightning's default ``TQDMProgressBar``; they are shown
on rank zero when the trainer shows a progress bar, and left behind (``leave=False``) once done.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

import lightning.pytorch as pl

__all__ = ["progress", "trainer_shows_progress"]

T = TypeVar("T")


def trainer_shows_progress(trainer: pl.Trainer | None) -> bool:
    """True on rank zero of a trainer with a progress bar (``enable_progress_bar=True``)."""
    return trainer is not None and trainer.is_global_zero and trainer.progress_bar_callback is not None


def progress(iterable: Iterable[T], *, desc: str, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate with a tqdm bar on stderr described by ``desc`` (plain iteration when disabled)."""
    if not enabled:
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True, file=sys.stderr) as bar:
        yield from bar
