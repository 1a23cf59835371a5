"""When to scan within a time budget: the monitors' ``max_overhead``.

A monitor given ``max_overhead=0.1`` may add at most 10 % to the training time. It measures, itself, the
wall time of every scan (of every monitor in the trainer: the budget is shared) and of the training so far
(the fit's wall time without the scans), and scans at an epoch end only when the scans' time so far plus
one more scan, costed as the last one it measured, stays within ``max_overhead`` times the training time.
A scan's cost is unknown until one has run: the first scan due is always made (it measures). So a small
data set or a large model is scanned less often, never more than the budget allows after the first scan;
``every_n_epochs`` keeps a fixed cadence for users who want one (with both, a scan needs both).

The decision is a plain function of measured seconds (:func:`scan_fits_budget`); :func:`plan_scans`
replays it for given epoch and scan times (what the tests check against hand-computed decisions, and what
a user can run to see what a budget will do before training).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_max_overhead", "plan_scans", "scan_fits_budget"]


def check_max_overhead(max_overhead: float | None) -> float | None:
    """``max_overhead`` validated: None (no budget) or a positive number."""
    if max_overhead is None:
        return None
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0:
        raise ValueError(f"Expected `max_overhead` to be a positive fraction of the training time (e.g. 0.1) or None "
                         f"but got {max_overhead!r}.")
    return float(max_overhead)


def scan_fits_budget(train_seconds: float, spent_seconds: float, next_scan_seconds: float | None,
                     max_overhead: float) -> bool:
    """Whether one more scan keeps the scans within the budget.

    Args:
        train_seconds: wall time of the training so far, the scans left out.
        spent_seconds: wall time of the scans so far (every monitor sharing the budget).
        next_scan_seconds: what the next scan will cost (the last measured scan of this monitor); None before
            any scan: then it scans, to measure.
        max_overhead: the fraction of ``train_seconds`` the scans may take.

    Returns:
        ``spent_seconds + next_scan_seconds <= max_overhead * train_seconds`` (True when the cost is unknown).
    """
    if next_scan_seconds is None:
        return True
    return spent_seconds + next_scan_seconds <= max_overhead * train_seconds


def plan_scans(epoch_seconds: Sequence[float], scan_seconds: float | Sequence[float], max_overhead: float | None,
               every_n_epochs: int = 1) -> list[int]:
    """The epochs (0-based) a monitor scans at, for these training times per epoch and scan costs.

    Args:
        epoch_seconds: training time of each epoch, the scans left out.
        scan_seconds: the cost of every scan (a number), or of the i-th scan made (a sequence).
        max_overhead: the budget (None: scan at every ``every_n_epochs``-th epoch).

    Example:
        >>> plan_scans([1.0] * 12, 3.0, 0.5)  # the first scan measures 3 s; the next once 0.5 x training >= 6 s
        [0, 11]
    """
    costs = [scan_seconds] * len(epoch_seconds) if isinstance(scan_seconds, (int, float)) else list(scan_seconds)
    scans: list[int] = []
    spent = train = 0.0
    for epoch, seconds in enumerate(epoch_seconds):
        train += seconds
        if (epoch + 1) % every_n_epochs:
            continue
        last = costs[len(scans) - 1] if scans else None
        if max_overhead is None or scan_fits_budget(train, spent, last, max_overhead):
            spent += costs[len(scans)]
            scans.append(epoch)
    return scans
