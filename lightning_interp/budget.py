"""When to scan within a time budget: the monitors' ``max_overhead``.

A monitor given ``max_overhead=0.1`` may add at most 10 % to the training time. It measures, itself, the
wall time of every scan (of every monitor in the trainer: the budget is shared) and of the training so far
(the fit's wall time without the scans), and scans at an epoch end only when the scans' time so far plus
one more scan stays within ``max_overhead`` times the training time.

One more scan is costed as the last one the monitor measured; before its first scan, by a **pilot**: at the
first epoch end a scan is due, the monitor runs its real scan on a slice of its probe (1/8, at least 8
samples; nothing logged, its state and the random generators restored) and extrapolates linearly to the
whole probe (:func:`pilot_estimate`: an over-estimate where part of a scan does not grow with the probe,
which only delays the first scan). The pilot's seconds count as spent, and the pilots of the other monitors
sharing the budget are budgeted too, costed as the costliest pilot so far (:func:`pilot_fits_budget`): only
the first pilot of a fit runs unforeseen, at the first epoch end a scan is due. So the budget holds from the
first scan, give or take that pilot and a pilot costlier than the ones before it: a small data set or a
large model is scanned later, less often, or not at all — and then each budgeted monitor says so at train
end, with the ``max_overhead`` that would have allowed one scan (:func:`overhead_for_one_scan`). Only when the pilot itself fails is the first scan made unbudgeted (to
measure). ``every_n_epochs`` keeps a fixed cadence for users who want one (with both, a scan needs both).

Scans are made as soon as they fit (greedy), not saved for the last epoch: a fit may stop early
(``EarlyStopping``, ``max_time``) and the alarms need scans during training.

The decision is a plain function of measured seconds (:func:`scan_fits_budget`); :func:`plan_scans`
replays it for given epoch, pilot and scan times (what the tests check against hand-computed decisions,
and what a user can run to see what a budget will do before training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["check_max_overhead", "overhead_for_one_scan", "pilot_estimate", "pilot_fits_budget", "pilot_size",
           "plan_scans", "scan_fits_budget"]

#: The pilot scans 1/PILOT_FRACTION of the probe, at least PILOT_MIN_SAMPLES samples.
PILOT_FRACTION = 8
PILOT_MIN_SAMPLES = 8


def check_max_overhead(max_overhead: float | None) -> float | None:
    """``max_overhead`` validated: None (no budget) or a positive number."""
    if max_overhead is None:
        return None
    if isinstance(max_overhead, bool) or not isinstance(max_overhead, (int, float)) or not max_overhead > 0:
        raise ValueError(f"Expected `max_overhead` to be a positive fraction of the training time (e.g. 0.1) or None "
                         f"but got {max_overhead!r}.")
    return float(max_overhead)


def pilot_size(probe_size: int, min_samples: int = PILOT_MIN_SAMPLES) -> int:
    """Samples the pilot scans: ``ceil(probe_size / 8)``, at least ``min_samples``, at most the probe.

    Example:
        >>> pilot_size(128), pilot_size(32), pilot_size(5)
        (16, 8, 5)
    """
    return min(probe_size, max(math.ceil(probe_size / PILOT_FRACTION), min_samples))


def pilot_estimate(pilot_seconds: float, pilot_samples: int, probe_samples: int) -> float:
    """A scan of ``probe_samples`` costed from a pilot scan of ``pilot_samples`` that took ``pilot_seconds``:
    linear in the probe size. A scan costs ``a + b n`` (a: what does not grow with the probe, pictures, the
    GMM sweep over filters), so ``(a + b m) n / m >= a + b n``: an over-estimate by at most ``n / m``, never
    an under-estimate (the warm-up of a first call lands in the pilot too)."""
    return pilot_seconds * probe_samples / max(pilot_samples, 1)


def scan_fits_budget(train_seconds: float, spent_seconds: float, next_scan_seconds: float | None,
                     max_overhead: float) -> bool:
    """Whether one more scan keeps the scans within the budget.

    Args:
        train_seconds: wall time of the training so far, the scans and pilots left out.
        spent_seconds: wall time of the scans and pilots so far (every monitor sharing the budget).
        next_scan_seconds: what the next scan will cost: the last measured scan of this monitor, before its
            first the pilot's estimate; None when neither exists (the pilot failed): then it scans, to measure.
        max_overhead: the fraction of ``train_seconds`` the scans may take.

    Returns:
        ``spent_seconds + next_scan_seconds <= max_overhead * train_seconds`` (True when the cost is unknown).
    """
    if next_scan_seconds is None:
        return True
    return spent_seconds + next_scan_seconds <= max_overhead * train_seconds


def pilot_fits_budget(train_seconds: float, spent_seconds: float, pilot_seconds: float | None,
                      max_overhead: float) -> bool:
    """Whether a monitor may run its pilot now.

    Args:
        train_seconds: wall time of the training so far (as for :func:`scan_fits_budget`).
        spent_seconds: wall time of the scans and pilots so far.
        pilot_seconds: what the pilot is costed at: the costliest pilot of the monitors sharing the budget so
            far in this fit; None for the first pilot of a fit (nothing to go by: it runs, the one pilot the
            budget cannot foresee).
        max_overhead: the fraction of ``train_seconds`` the scans may take.

    Returns:
        ``spent_seconds + pilot_seconds <= max_overhead * train_seconds`` (True for the first pilot).
    """
    return pilot_seconds is None or spent_seconds + pilot_seconds <= max_overhead * train_seconds


def overhead_for_one_scan(train_seconds: float, spent_seconds: float, next_scan_seconds: float) -> float:
    """The smallest ``max_overhead`` under which one more scan would have fitted after ``train_seconds`` of
    training with ``spent_seconds`` already spent: ``(spent + next) / train`` (what the train-end warning names)."""
    return (spent_seconds + next_scan_seconds) / max(train_seconds, 1e-9)


def plan_scans(epoch_seconds: Sequence[float], scan_seconds: float | Sequence[float], max_overhead: float | None,
               every_n_epochs: int = 1, pilot_seconds: float = 0.0, first_estimate: float | None = None) -> list[int]:
    """The epochs (0-based) a monitor scans at, for these training times per epoch, pilot and scan costs.

    Args:
        epoch_seconds: training time of each epoch, the scans left out.
        scan_seconds: the cost of every scan (a number), or of the i-th scan made (a sequence).
        max_overhead: the budget (None: scan at every ``every_n_epochs``-th epoch, no pilot).
        every_n_epochs: the cadence that makes an epoch due.
        pilot_seconds: what the pilot costs (spent at the first due epoch, before that epoch's decision).
        first_estimate: the pilot's estimate of the first scan (None: exact, the first scan's cost).

    Example:
        >>> plan_scans([1.0] * 12, 3.0, 0.5)  # a 3 s scan fits 50 % after 6 s of training; the next after 12 s
        [5, 11]
        >>> plan_scans([1.0] * 12, 3.0, 0.5, pilot_seconds=1.0, first_estimate=4.0)  # 1 + 4 <= 0.5 x 10
        [9]
    """
    costs = [scan_seconds] * len(epoch_seconds) if isinstance(scan_seconds, (int, float)) else list(scan_seconds)
    scans: list[int] = []
    spent = train = 0.0
    estimate: float | None = None
    for epoch, seconds in enumerate(epoch_seconds):
        train += seconds
        if (epoch + 1) % every_n_epochs:
            continue
        if max_overhead is None:
            scans.append(epoch)
            continue
        if not scans and estimate is None:  # the first due epoch: the pilot (one monitor: the budget has room)
            spent += pilot_seconds
            estimate = costs[0] if first_estimate is None else first_estimate
        if scan_fits_budget(train, spent, costs[len(scans) - 1] if scans else estimate, max_overhead):
            spent += costs[len(scans)]
            scans.append(epoch)
    return scans
