"""Overfitting signals and alarms: the bookkeeping behind ``AnomalyFilterMonitor``'s alarm and the
overfitting-signal benchmark (``experiments/overfitting_signals.py``).

Plain functions over per-epoch series (lists or 1-D arrays, one value per scanned epoch):

* :func:`onset_epoch` — the epoch after which a held-out loss stays above its minimum;
* :func:`rise_alarm` — the first epoch a signal rises a margin over its running minimum and stays
  there (the alarm rule the monitor uses, for the validation loss or the anomaly count);
* :func:`spearman` — Spearman rank correlation with average ranks for ties (SciPy's definition);
* :func:`precision_at_k` — share of true positives among the k highest scores;
* :func:`per_sample_loss` — each sample's cross-entropy on its given label, and the predicted class;
* :func:`hard_sample_loss` — the mean loss of the hardest fraction of a training probe, which
  falls once the model starts memorising labels it could not learn (noisy ones);
* :func:`activation_divergence` — per-filter standardised difference between a filter's mean
  activation on training samples and on held-out samples (no labels needed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .gradients import per_sample_gradient_magnitude

__all__ = [
    "ALARMS",
    "AlarmRule",
    "best_epoch",
    "grouped_gradient_magnitude",
    "overfit_alarm",
    "activation_divergence", "hard_sample_loss", "onset_epoch", "per_sample_loss", "precision_at_k", "rise_alarm",
    "spearman",
]


def _as_array(values: Sequence[float] | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray([np.nan if v is None else v for v in values], dtype=np.float64)


def onset_epoch(epochs: Sequence[int], loss: Sequence[float], *, min_rise: float = 0.0) -> int | None:
    """The overfitting onset: the epoch of the held-out loss' minimum, after which it stays above it.

    Args:
        epochs: ``E`` epoch numbers, increasing.
        loss: ``E`` held-out losses at those epochs.
        min_rise: the run counts as overfitting only when its last loss exceeds the minimum by this
            relative margin (e.g. 0.05); otherwise None.

    Returns:
        The epoch of the last minimum (every later loss is above it), or None when the minimum is
        the last epoch (the loss never rose) or the final rise is below ``min_rise``.
    """
    v = _as_array(loss)
    if len(v) != len(epochs):
        raise ValueError(f"Expected as many losses as epochs but got {len(v)} and {len(epochs)}.")
    if len(v) == 0 or np.isnan(v).all():
        return None
    best = np.nanmin(v)
    last_min = int(np.flatnonzero(v == best)[-1])
    last = v[np.flatnonzero(~np.isnan(v))[-1]]  # the last finite loss
    if last_min == len(v) - 1 or last <= best * (1 + min_rise):
        return None
    return int(epochs[last_min])


def rise_alarm(
    values: Sequence[float],
    *,
    rel: float = 0.05,
    margin: float = 0.0,
    patience: int = 1,
    min_index: int = 0,
) -> int | None:
    """Index of the first scan at which the alarm fires, or None.

    The alarm fires at scan ``i >= min_index`` once ``values`` has been above its running minimum
    ``m`` (over scans ``0..i``) by more than ``max(rel·|m|, margin)`` for ``patience`` consecutive
    scans ending at ``i``. ``rel=0.05, patience=1`` on the validation loss is the usual "5 % over
    its best" rule. For a signal that falls as the model overfits, pass its negation.

    Args:
        values: ``E`` signal values, one per scan (None/NaN scans never count as above).
        rel: relative margin over the running minimum.
        margin: absolute margin (for signals whose minimum can be 0, such as a count).
        patience: consecutive scans above the margin.
        min_index: earliest scan at which the alarm may fire.
    """
    if patience < 1:
        raise ValueError(f"Expected `patience` >= 1 but got {patience}.")
    if rel < 0 or margin < 0:
        raise ValueError(f"Expected `rel` and `margin` >= 0 but got {rel} and {margin}.")
    v = _as_array(values)
    run = 0
    low = np.inf
    for i, x in enumerate(v):
        if np.isnan(x):
            run = 0
            continue
        low = min(low, x)
        run = run + 1 if x - low > max(rel * abs(low), margin) else 0
        if run >= patience and i >= min_index:
            return i
    return None


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two series (average ranks for ties; pairs with a NaN dropped).

    NaN when fewer than 3 pairs remain or either series is constant.
    """
    # SciPy's ranks (a dependency of scikit-learn); the same Pearson correlation of them as
    # `scipy.stats.spearmanr`, without its p-value.
    from scipy.stats import rankdata

    x, y = _as_array(a), _as_array(b)
    if len(x) != len(y):
        raise ValueError(f"Expected series of equal length but got {len(x)} and {len(y)}.")
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    return float(np.corrcoef(rankdata(x), rankdata(y))[0, 1])


def precision_at_k(scores: Sequence[float], positives: Sequence[bool], k: int) -> float:
    """Share of ``positives`` among the ``k`` highest ``scores``, in expectation over random tie-breaking.

    The samples scoring above the k-th score all count; the ``m`` places left among the ``t`` samples
    tied at the k-th score count ``m · (positives among them) / t`` — so a score with many ties (vote
    counts) is not credited with whatever order the samples happen to be in. NaN when every score is
    equal (the scores rank nothing).
    """
    s, pos = _as_array(scores), np.asarray(positives, dtype=bool)
    if len(s) != len(pos):
        raise ValueError(f"Expected as many scores as labels but got {len(s)} and {len(pos)}.")
    if not 1 <= k <= len(s):
        raise ValueError(f"Expected `k` in [1, {len(s)}] but got {k}.")
    if np.all(s == s[0]):
        return float("nan")
    kth = np.sort(s)[::-1][k - 1]
    above, tied = s > kth, s == kth
    left = k - int(above.sum())
    return float((pos[above].sum() + left * pos[tied].sum() / tied.sum()) / k)


def activation_divergence(train_activations: torch.Tensor, heldout_activations: torch.Tensor) -> torch.Tensor:
    """Per-filter divergence between training and held-out samples, ``K``.

    |μ_train − μ_heldout| / σ_pooled of each filter's spatially averaged activation, a
    standardised mean difference (Cohen's d). A filter that responds differently to the samples
    the model was trained on than to unseen samples of the same distribution is memorising; the
    held-out samples need no labels. A constant filter has divergence 0.

    Args:
        train_activations: ``B1 x K x ...`` layer outputs on training samples.
        heldout_activations: ``B2 x K x ...`` layer outputs on held-out samples.
    """
    a = train_activations.flatten(2).mean(2).double() if train_activations.dim() > 2 else train_activations.double()
    b = heldout_activations.flatten(2).mean(2).double() if heldout_activations.dim() > 2 else heldout_activations.double()
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"Expected the same filters in both sets but got {a.shape[1]} and {b.shape[1]}.")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError("Expected at least 2 samples in each set.")
    pooled = ((a.var(0) * (a.shape[0] - 1) + b.var(0) * (b.shape[0] - 1)) / (a.shape[0] + b.shape[0] - 2)).sqrt()
    d = (a.mean(0) - b.mean(0)).abs()
    return torch.where(pooled > 0, d / pooled.clamp_min(1e-300), torch.zeros_like(d))


def hard_sample_loss(per_sample_loss: torch.Tensor, fraction: float = 0.2) -> float:
    """Mean of the ``fraction`` highest per-sample losses (given labels) of a training probe.

    Under label noise the wrongly labelled samples are the hardest: their loss first rises while
    the model learns the true classes, then falls once it memorises them — the memorisation that
    makes the held-out loss rise. Training labels only; no held-out data.

    Args:
        per_sample_loss: ``B`` losses.
        fraction: share of the probe in (0, 1]; at least one sample.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"Expected `fraction` in (0, 1] but got {fraction}.")
    loss = torch.as_tensor(per_sample_loss).detach().flatten().double()
    if loss.numel() == 0:
        raise ValueError("Expected at least one per-sample loss.")
    k = max(1, int(fraction * loss.numel()))
    return float(loss.topk(k).values.mean())


def per_sample_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(loss B, predicted class B)`` on the CPU: each sample's cross-entropy on its given label
    ``y``, in eval mode without gradients (mode restored). None when ``model(x)`` is not ``B x C``
    logits or ``y`` are not class indices of them.
    """
    from .nns import scan_mode

    device = next((p.device for p in model.parameters()), x.device)
    with scan_mode(model), torch.no_grad():
        out = model(x.to(device))
    if not (isinstance(out, torch.Tensor) and out.dim() == 2):
        return None
    try:
        loss = torch.nn.functional.cross_entropy(out.float(), y.to(out.device).long(), reduction="none")
    except (RuntimeError, IndexError, ValueError):
        return None
    return loss.cpu(), out.argmax(1).cpu()


#: Rules of :class:`AlarmRule` (``AnomalyFilterMonitor(alarm=...)``).
ALARMS = ("val_loss", "count", "count_and_val_loss")


def overfit_alarm(counts: Sequence[float], val_losses: Sequence[float | None], patience: int = 2) -> bool:
    """The ``"count_and_val_loss"`` rule at the last scan: True when, over the last ``patience + 1``
    scans, the anomaly count never fell and rose overall while the validation loss rose overall."""
    if len(counts) < patience + 1:
        return False
    c = list(counts[-(patience + 1) :])
    v = list(val_losses[-(patience + 1) :])
    if any(x is None for x in v):
        return False
    rising = all(b >= a for a, b in zip(c, c[1:], strict=False)) and c[-1] > c[0]
    return rising and v[-1] > v[0]


@dataclass(frozen=True)
class AlarmRule:
    """An overfitting alarm over a run's scans, validated once.

    Args:
        rule: ``"val_loss"`` — the validation loss rose more than ``rel`` over its best for
            ``patience`` consecutive scans (:func:`rise_alarm`); ``"count"`` — the anomaly count rose
            more than ``max(rel · its running minimum, margin)`` for ``patience`` scans;
            ``"count_and_val_loss"`` — :func:`overfit_alarm`.
        rel: the rise over the running minimum that counts, relative to it.
        margin: the rise over the running minimum that counts, absolute.
        patience: consecutive scans the rise must last.
        min_epoch: the alarm never fires before this many epochs have been trained.
    """

    rule: str = "val_loss"
    rel: float = 0.01
    margin: float = 0.0
    patience: int = 2
    min_epoch: int = 3

    def __post_init__(self) -> None:
        if self.rule not in ALARMS:
            raise ValueError(f"Expected `alarm` to be one of {list(ALARMS)} but got {self.rule!r}.")
        if isinstance(self.patience, bool) or not isinstance(self.patience, int) or self.patience < 1:
            raise ValueError(f"Expected `alarm_patience` to be a positive int but got {self.patience!r}.")
        for name in ("rel", "margin", "min_epoch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value) >= 0:
                raise ValueError(f"Expected `alarm_{name}` >= 0 but got {value!r}.")

    def fired(self, epochs: Sequence[int], counts: Sequence[float], val_losses: Sequence[float | None]) -> bool:
        """Whether the rule has fired by the last of these scans (0-based ``epochs``, one count and
        validation loss per scan; None where a scan had no validation)."""
        if self.rule == "count_and_val_loss":
            return any(
                overfit_alarm(counts[: i + 1], val_losses[: i + 1], self.patience)
                for i, e in enumerate(epochs) if e + 1 >= self.min_epoch
            )
        pairs = list(zip(epochs, val_losses if self.rule == "val_loss" else counts, strict=True))
        # Scans without a value (no validation that epoch, e.g. `check_val_every_n_epoch=2`) are left
        # out rather than breaking the run of consecutive scans the rule counts.
        pairs = [(e, v) for e, v in pairs if v is not None]
        first = next((i for i, (e, _) in enumerate(pairs) if e + 1 >= self.min_epoch), len(pairs))
        return rise_alarm([v for _, v in pairs], rel=self.rel, margin=self.margin,
                          patience=self.patience, min_index=first) is not None


def best_epoch(history: Sequence[Mapping[str, float]], key: str, *, mode: str = "max") -> int | None:
    """The ``"epoch"`` of the entry of ``history`` with the best ``key`` (``mode`` ``"max"`` or ``"min"``;
    the first on ties), None when no entry has it. The thesis' WT epoch is ``best_epoch(h, "val_acc")``."""
    if mode not in ("max", "min"):
        raise ValueError(f"Expected `mode` to be one of ['max', 'min'] but got {mode!r}.")
    scored = [e for e in history if e.get(key) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return int(pick(scored, key=lambda e: e[key])["epoch"])


def grouped_gradient_magnitude(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor
) -> tuple[float, float] | None:
    """Mean per-sample parameter-gradient magnitude of the samples in ``groups`` and of the others
    (thesis table 6-3: outlier vs normal samples); None when either group is empty.

    Args:
        x: ``B`` inputs.
        y: ``B`` labels.
        groups: ``B`` bool.
    """
    groups = torch.as_tensor(groups, dtype=torch.bool).cpu()
    if groups.numel() != len(x):
        raise ValueError(f"Expected one group flag per sample ({len(x)}) but got {groups.numel()}.")
    if not groups.any() or groups.all():
        return None
    grads = per_sample_gradient_magnitude(model, x, y).cpu()
    return grads[groups].mean().item(), grads[~groups].mean().item()
