"""Per-sample training dynamics: which training samples the model is memorising, and since when.

DESIGN §7. For each tracked training sample ``i`` with given label ``y_i`` and logits ``z_i(t)`` at
epoch ``t``, :class:`SampleDynamics` keeps running state — never a per-epoch list over the samples:

* the margin ``M_i(t) = z_{i,y_i}(t) - max_{k != y_i} z_{i,k}(t)``, summed: **AUM** = mean over epochs
  (Pleiss et al., NeurIPS 2020; the ``aum`` package is the test oracle);
* epochs misclassified, and **forgetting events** (correct at the sample's previous observation,
  wrong now; Toneva et al., ICLR 2019);
* mean and standard deviation of the given-label probability (**cartography** confidence and
  variability; Swayamdipta et al., EMNLP 2020);
* the predicted class at the previous observation, for **prediction flips** (Label Wave, Yuan et al.,
  ICLR 2024);
* ``fit_since``: the epoch since which the sample has been predicted as its given label without a
  break (-1 while it is not) — for a flagged sample, *since when* it has been memorised;
* the summed softmax vectors, so that the averaged predicted probabilities can be handed to
  ``cleanlab.filter.find_label_issues``.

Observations of an epoch are buffered (:meth:`SampleDynamics.observe`, any number of calls, any
order) as summed logits and counts, which add up across processes (:meth:`SampleDynamics.buffers`),
and applied once by :meth:`SampleDynamics.end_epoch`: a sample seen more than once in an epoch counts
with its mean logits, a sample not seen is left as it was.

:func:`suspect_scores` orients every statistic so that higher means "more likely memorised / wrongly
labelled" and :func:`flag_samples` turns one into flags; :class:`SampleScores` is the one shape
per-sample answers travel in (cleanlab's two plain shapes: a score per sample and a boolean mask),
as :class:`~lightning_interp.scores.FilterScores` is for filters.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

__all__ = [
    "DEFAULT_SCORE",
    "FLAG_RULES",
    "SCORES",
    "SampleDynamics",
    "SampleScores",
    "flag_samples",
    "label_wave_alarm",
    "margins",
    "suspect_scores",
]

#: Per-sample suspect scores, each oriented so that higher = more suspect: ``{name: what it is}``.
SCORES: dict[str, str] = {
    "aum": "minus the area under the margin (mean given-label margin over epochs)",
    "confidence": "minus the mean given-label probability over epochs (cartography)",
    "variability": "the standard deviation of the given-label probability over epochs (cartography)",
    "misclassified": "the fraction of observed epochs in which the sample was misclassified",
    "forgetting": "the number of forgetting events (correct, then wrong at the next observation)",
    "fit_since": "the epoch since which the given label has been fitted without a break (the next epoch when not fitted now)",
    "margin": "minus the given-label margin at the last observation",
    "loss": "the cross-entropy on the given label at the last observation",
}
#: The score the monitor flags by unless told otherwise (chosen on ``experiments/sample_dynamics.py``).
DEFAULT_SCORE = "aum"
#: Flag rules: ``"gmm"`` — a two-component Gaussian mixture on the score, flagging the samples more
#: probably in the higher component; an int ``n`` — the ``n`` highest; a float ``f`` — the fraction ``f``.
FLAG_RULES = ("gmm",)

# Past this many summed probabilities (samples x classes) the averaged predicted probabilities are not kept.
MAX_PROB_ELEMENTS = 50_000_000


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Given-label margin ``z_y - max_{k != y} z_k`` of every row (``B x C`` logits, ``B`` labels) -> ``B``."""
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"Expected `logits` of shape (B, C) and `labels` of shape (B,) but got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}."
        )
    given = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return given - other


def _check_score(score: str) -> None:
    if score not in SCORES:
        raise ValueError(f"Expected `score` to be one of {list(SCORES)} but got {score!r}.")


def _check_rule(rule: Any) -> None:
    ok = rule in FLAG_RULES or (isinstance(rule, int) and not isinstance(rule, bool) and rule >= 0) or (
        isinstance(rule, float) and 0.0 <= rule <= 1.0
    )
    if not ok:
        raise ValueError(
            f"Expected `flag_rule` to be one of {list(FLAG_RULES)}, a number of samples (int >= 0) or a fraction "
            f"(float in [0, 1]) but got {rule!r}."
        )


class SampleDynamics:
    """Running training dynamics of ``num_samples`` tracked samples (all state on the CPU).

    Args:
        num_samples: how many samples are tracked; observations address them by position ``0..N-1``
            (the callback maps dataset indices to positions).
        num_classes: classes of the logits; inferred from the first observation when None.
        keep_probs: keep the summed softmax vectors (``N x C``) for :meth:`mean_probs`; refused
            silently (set False) past 50 M elements.

    Examples:
        >>> dyn = SampleDynamics(4)
        >>> dyn.observe(torch.arange(4), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
        >>> stats = dyn.end_epoch(0)
        >>> dyn.aum.shape
        torch.Size([4])
    """

    def __init__(self, num_samples: int, num_classes: int | None = None, *, keep_probs: bool = True):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"Expected `num_samples` to be a positive int but got {num_samples!r}.")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"Expected `num_classes` to be an int >= 2 or None but got {num_classes!r}.")
        n = num_samples
        self.num_samples = n
        self.num_classes = num_classes
        self.keep_probs = keep_probs
        self.labels = torch.full((n,), -1, dtype=torch.long)
        self.epochs = torch.zeros(n, dtype=torch.long)
        self.margin_sum = torch.zeros(n, dtype=torch.float64)
        self.prob_sum = torch.zeros(n, dtype=torch.float64)
        self.prob_sq_sum = torch.zeros(n, dtype=torch.float64)
        self.misclassified = torch.zeros(n, dtype=torch.long)
        self.forgetting = torch.zeros(n, dtype=torch.long)
        self.last_pred = torch.full((n,), -1, dtype=torch.long)
        self.last_margin = torch.full((n,), float("nan"), dtype=torch.float64)
        self.last_loss = torch.full((n,), float("nan"), dtype=torch.float64)
        self.fit_since = torch.full((n,), -1, dtype=torch.long)
        self.probs_sum: torch.Tensor | None = None
        self.last_epoch: int | None = None
        self._logit_sum: torch.Tensor | None = None
        self._count = torch.zeros(n, dtype=torch.long)
        self._pending_labels = torch.full((n,), -1, dtype=torch.long)

    # ---- observing -------------------------------------------------------------------------------
    def _classes(self, c: int) -> None:
        if self.num_classes is None:
            self.num_classes = c
        elif c != self.num_classes:
            raise ValueError(f"Expected logits with {self.num_classes} classes but got {c}.")
        if self._logit_sum is None:
            self._logit_sum = torch.zeros(self.num_samples, c, dtype=torch.float64)
        if self.keep_probs and self.probs_sum is None:
            if self.num_samples * c > MAX_PROB_ELEMENTS:
                self.keep_probs = False
            else:
                self.probs_sum = torch.zeros(self.num_samples, c, dtype=torch.float64)

    @torch.no_grad()
    def observe(self, positions: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Buffer one batch of this epoch: ``B`` positions in ``0..N-1``, ``B x C`` logits, ``B`` given labels."""
        positions = torch.as_tensor(positions).detach().to("cpu", torch.long).flatten()
        labels = torch.as_tensor(labels).detach().to("cpu", torch.long).flatten()
        logits = logits.detach().to("cpu", torch.float64)
        if logits.dim() != 2 or len(positions) != len(logits) or len(labels) != len(logits):
            raise ValueError(
                f"Expected (B,) positions, (B, C) logits and (B,) labels but got {tuple(positions.shape)}, "
                f"{tuple(logits.shape)} and {tuple(labels.shape)}."
            )
        if len(positions) == 0:
            return
        self._classes(logits.shape[1])
        if positions.min() < 0 or positions.max() >= self.num_samples:
            raise IndexError(f"Expected positions in [0, {self.num_samples - 1}] but got {positions.min().item()}"
                             f"..{positions.max().item()}.")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"Expected labels in [0, {self.num_classes - 1}] but got {labels.min().item()}"
                             f"..{labels.max().item()}.")
        self._logit_sum.index_add_(0, positions, logits)
        self._count.index_add_(0, positions, torch.ones_like(positions))
        self._pending_labels[positions] = labels

    @property
    def has_observations(self) -> bool:
        """Whether any logits have been observed (the number of classes, and so the buffers, exist)."""
        return self._logit_sum is not None

    def buffers(self) -> dict[str, torch.Tensor]:
        """This epoch's buffered observations: ``logit_sum`` and ``count`` add across processes, ``labels``
        (-1 where unseen) combine by maximum. Replace them with :meth:`set_buffers` after reducing."""
        if self._logit_sum is None:
            raise RuntimeError("no observation yet: the number of classes is unknown")
        return {"logit_sum": self._logit_sum, "count": self._count, "labels": self._pending_labels}

    def set_buffers(self, logit_sum: torch.Tensor, count: torch.Tensor, labels: torch.Tensor) -> None:
        self._logit_sum = logit_sum.to("cpu", torch.float64)
        self._count = count.to("cpu", torch.long)
        self._pending_labels = labels.to("cpu", torch.long)

    @torch.no_grad()
    def end_epoch(self, epoch: int) -> dict[str, float]:
        """Apply the buffered observations as epoch ``epoch`` and clear the buffer.

        Returns:
            ``seen`` (samples observed this epoch), ``flips`` (of those seen before, the fraction whose
            predicted class changed; NaN when none was), ``fit`` (fraction of the seen predicted as their
            given label), ``forgotten`` (fraction of the seen that were forgotten this epoch).
        """
        seen = self._count > 0
        k = int(seen.sum())
        out = {"seen": float(k), "flips": float("nan"), "fit": float("nan"), "forgotten": float("nan")}
        if k == 0:
            return out
        idx = seen.nonzero().squeeze(1)
        labels = self._pending_labels[idx]
        known = self.labels[idx]
        if ((known >= 0) & (known != labels)).any():
            raise ValueError("Expected each tracked sample to keep its given label across epochs but some changed; "
                             "were the dataset indices reused for other samples?")
        self.labels[idx] = labels
        z = self._logit_sum[idx] / self._count[idx, None]
        p = z.softmax(1)
        p_given = p.gather(1, labels[:, None]).squeeze(1)
        pred = z.argmax(1)
        correct = pred == labels
        before = self.last_pred[idx]
        was_seen = before >= 0
        was_correct = was_seen & (before == labels)
        m = margins(z, labels)
        self.margin_sum[idx] += m
        self.prob_sum[idx] += p_given
        self.prob_sq_sum[idx] += p_given**2
        self.epochs[idx] += 1
        self.misclassified[idx] += (~correct).long()
        forgotten = was_correct & ~correct
        self.forgetting[idx] += forgotten.long()
        since = self.fit_since[idx]
        self.fit_since[idx] = torch.where(correct, torch.where(was_correct & (since >= 0), since, epoch), -1)
        self.last_margin[idx] = m
        self.last_loss[idx] = F.cross_entropy(z, labels, reduction="none")
        if self.probs_sum is not None:
            self.probs_sum[idx] += p
        flipped = was_seen & (pred != before)
        self.last_pred[idx] = pred
        self.last_epoch = epoch
        n_before = int(was_seen.sum())
        out["flips"] = float(flipped.sum()) / n_before if n_before else float("nan")
        out["fit"] = float(correct.double().mean())
        out["forgotten"] = float(forgotten.double().mean())
        self._logit_sum.zero_()
        self._count.zero_()
        self._pending_labels.fill_(-1)
        return out

    # ---- statistics --------------------------------------------------------------------------------
    @property
    def observed(self) -> torch.Tensor:
        """``N`` bool: samples observed in at least one applied epoch."""
        return self.epochs > 0

    def _mean(self, total: torch.Tensor) -> torch.Tensor:
        out = total / self.epochs.clamp(min=1)
        return out.masked_fill(~self.observed, float("nan"))

    @property
    def aum(self) -> torch.Tensor:
        """Area under the margin: mean given-label margin over the observed epochs (NaN if never observed)."""
        return self._mean(self.margin_sum)

    @property
    def confidence(self) -> torch.Tensor:
        """Mean given-label probability over the observed epochs."""
        return self._mean(self.prob_sum)

    @property
    def variability(self) -> torch.Tensor:
        """Population standard deviation of the given-label probability over the observed epochs."""
        mean = self.confidence
        return (self._mean(self.prob_sq_sum) - mean**2).clamp(min=0).sqrt()

    @property
    def fitted(self) -> torch.Tensor:
        """``N`` bool: predicted as the given label at the last observation."""
        return self.observed & (self.last_pred == self.labels)

    def mean_probs(self) -> torch.Tensor | None:
        """``N x C`` predicted probabilities averaged over the observed epochs (rows of unobserved samples
        are NaN), the ``pred_probs`` ``cleanlab.filter.find_label_issues`` takes; None when not kept."""
        if self.probs_sum is None:
            return None
        out = self.probs_sum / self.epochs.clamp(min=1)[:, None]
        return out.masked_fill(~self.observed[:, None], float("nan"))

    # ---- state ---------------------------------------------------------------------------------------
    _STATE = ("labels", "epochs", "margin_sum", "prob_sum", "prob_sq_sum", "misclassified", "forgetting",
              "last_pred", "last_margin", "last_loss", "fit_since", "probs_sum")

    def state_dict(self) -> dict[str, Any]:
        state = {name: getattr(self, name) for name in self._STATE}
        state.update(num_samples=self.num_samples, num_classes=self.num_classes, last_epoch=self.last_epoch)
        return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(f"Expected a state of {self.num_samples} tracked samples but got {state.get('num_samples')}.")
        for name in self._STATE:
            if name in state:
                value = state[name]
                setattr(self, name, None if value is None else torch.as_tensor(value).clone().cpu())
        self.num_classes = state.get("num_classes", self.num_classes)
        self.last_epoch = state.get("last_epoch", self.last_epoch)
        self.keep_probs = self.probs_sum is not None or self.num_classes is None


def suspect_scores(dyn: SampleDynamics) -> dict[str, torch.Tensor]:
    """Every score of :data:`SCORES` for the tracked samples, ``{name: N float64}``, higher = more suspect;
    NaN for samples never observed."""
    epochs = dyn.epochs.clamp(min=1).double()
    now = (dyn.last_epoch if dyn.last_epoch is not None else -1) + 1
    nan = ~dyn.observed
    out = {
        "aum": -dyn.aum,
        "confidence": -dyn.confidence,
        "variability": dyn.variability,
        "misclassified": dyn.misclassified.double() / epochs,
        "forgetting": dyn.forgetting.double(),
        "fit_since": torch.where(dyn.fit_since >= 0, dyn.fit_since, now).double(),
        "margin": -dyn.last_margin,
        "loss": dyn.last_loss.clone(),
    }
    return {k: v.masked_fill(nan, float("nan")) for k, v in out.items()}


def flag_samples(scores: torch.Tensor, rule: str | int | float = "gmm", *, seed: int = 0) -> torch.Tensor:
    """Flags from one score per sample (higher = more suspect); NaN scores are never flagged.

    Args:
        scores: ``N`` scores.
        rule: ``"gmm"`` — fit a two-component Gaussian mixture to the scores (scikit-learn's
            ``GaussianMixture``, seeded) and flag the samples whose posterior for the component with
            the higher mean exceeds 1/2: the number flagged adapts to the data (no threshold to pick),
            and nothing is flagged when the scores do not split (fewer than 8 distinct values);
            an ``int`` — the ``rule`` highest scores; a ``float`` — that fraction of the scored samples.

    Returns:
        ``N`` bool.
    """
    _check_rule(rule)
    scores = torch.as_tensor(scores, dtype=torch.float64).cpu()
    ok = torch.isfinite(scores)
    flags = torch.zeros(len(scores), dtype=torch.bool)
    values = scores[ok]
    if len(values) == 0:
        return flags
    if rule == "gmm":
        if torch.unique(values).numel() < 8:
            return flags
        from sklearn.mixture import GaussianMixture

        v = values.numpy()[:, None]
        gm = GaussianMixture(2, random_state=seed, reg_covar=1e-6 * max(float(np.var(v)), 1e-12)).fit(v)
        high = int(np.argmax(gm.means_[:, 0]))
        chosen = torch.from_numpy(gm.predict_proba(v)[:, high] > 0.5)
    else:
        n = rule if isinstance(rule, int) else int(round(rule * len(values)))
        n = min(n, len(values))
        chosen = torch.zeros(len(values), dtype=torch.bool)
        if n:
            # Stable: among equal scores the lower position wins (NumPy's argsort(kind="stable") of -scores).
            order = np.argsort(-values.numpy(), kind="stable")[:n]
            chosen[torch.from_numpy(order)] = True
    flags[ok] = chosen
    return flags


def label_wave_alarm(flips: Sequence[float], *, patience: int = 2, min_index: int = 1) -> int | None:
    """Label Wave's stopping rule (Yuan et al., ICLR 2024): the index at which the prediction flips have
    stayed above their first minimum for ``patience`` consecutive epochs (the minimum itself is the
    epoch to restore); None while they have not. NaN entries are skipped."""
    if patience < 1:
        raise ValueError(f"Expected `patience` >= 1 but got {patience}.")
    low, run = math.inf, 0
    for i, f in enumerate(flips):
        if f is None or not math.isfinite(f):
            continue
        if f < low:
            low, run = f, 0
        else:
            run += 1
            if run >= patience and i >= min_index:
                return i
    return None


@dataclass(frozen=True)
class SampleScores:
    """Suspect scores of tracked training samples and the flagged ones — the per-sample counterpart of
    :class:`~lightning_interp.scores.FilterScores`.

    Attributes:
        indices: ``N`` long, the samples' indices in the user's training dataset.
        scores: ``N`` float, higher = more suspect (NaN: never observed).
        flagged: ``N`` bool.
        labels: ``N`` long given labels (-1: never observed); predicted: ``N`` long, the predicted
            class at the last observation (-1: never observed).
        score: which of :data:`SCORES` ``scores`` is; rule: the flag rule (``"gmm"``, a count or a fraction).
        epoch: the (0-based) epoch of the last observation, None before any.
        columns: ``{name: N tensor}`` — every running statistic (``aum``, ``confidence``, ...).
    """

    indices: torch.Tensor
    scores: torch.Tensor
    flagged: torch.Tensor
    labels: torch.Tensor
    predicted: torch.Tensor
    score: str = DEFAULT_SCORE
    rule: str | int | float = "gmm"
    epoch: int | None = None
    columns: Mapping[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.indices)
        for name in ("scores", "flagged", "labels", "predicted"):
            value = getattr(self, name)
            if value.shape != (n,):
                raise ValueError(f"Expected `{name}` of shape ({n},) but got {tuple(value.shape)}.")

    @classmethod
    def from_dynamics(cls, dyn: SampleDynamics, indices: torch.Tensor | Sequence[int] | None = None,
                      score: str = DEFAULT_SCORE, rule: str | int | float = "gmm", *, seed: int = 0) -> SampleScores:
        """Score and flag the samples tracked by ``dyn``; ``indices`` are their dataset indices (default ``0..N-1``)."""
        _check_score(score)
        _check_rule(rule)
        every = suspect_scores(dyn)
        indices = torch.arange(dyn.num_samples) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        columns = {
            "aum": dyn.aum, "confidence": dyn.confidence, "variability": dyn.variability,
            "misclassified_epochs": dyn.misclassified.double(), "forgetting_events": dyn.forgetting.double(),
            "fit_since_epoch": dyn.fit_since.double(), "observed_epochs": dyn.epochs.double(),
        }
        return cls(indices=indices, scores=every[score].float(), flagged=flag_samples(every[score], rule, seed=seed),
                   labels=dyn.labels.clone(), predicted=dyn.last_pred.clone(), score=score, rule=rule,
                   epoch=dyn.last_epoch, columns={k: v.float() for k, v in columns.items()})

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def flagged_indices(self) -> torch.Tensor:
        """Dataset indices of the flagged samples, most suspect first."""
        pos = self.flagged.nonzero().squeeze(1)
        return self.indices[pos[torch.argsort(self.scores[pos], descending=True, stable=True)]]

    def top(self, k: int) -> torch.Tensor:
        """Positions (``0..N-1``) of the ``k`` most suspect observed samples, most suspect first."""
        s = self.scores.double().nan_to_num(float("-inf"))
        order = torch.argsort(s, descending=True, stable=True)
        return order[: min(k, int(torch.isfinite(self.scores).sum()))]

    def fit_rate(self, which: torch.Tensor | None = None) -> float:
        """Fraction of the flagged samples (or of ``which``, ``N`` bool) predicted as their given label; NaN if none."""
        which = self.flagged if which is None else which
        sel = which & (self.labels >= 0)
        if not sel.any():
            return float("nan")
        return float((self.predicted[sel] == self.labels[sel]).double().mean())

    def precision_recall(self, truth: torch.Tensor) -> tuple[float, float]:
        """Precision and recall of the flags against ``truth`` (``N`` bool, e.g. the truly flipped labels);
        NaN where undefined (nothing flagged, nothing true)."""
        truth = torch.as_tensor(truth, dtype=torch.bool).cpu()
        flags = self.flagged
        precision = float(truth[flags].double().mean()) if flags.any() else float("nan")
        recall = float(flags[truth].double().mean()) if truth.any() else float("nan")
        return precision, recall

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """cleanlab's column names where they exist (``is_label_issue``, ``label_score`` — lower = more
        likely an issue, here minus the suspect score —, ``given_label``, ``predicted_label``), then the
        running statistics; one row per observed sample, most suspect first."""
        columns = ["index", "is_label_issue", "label_score", "given_label", "predicted_label", f"suspect_{self.score}",
                   *self.columns]
        rows = []
        for p in self.top(len(self)).tolist():
            rows.append([int(self.indices[p]), bool(self.flagged[p]), -float(self.scores[p]), int(self.labels[p]),
                         int(self.predicted[p]), float(self.scores[p]),
                         *[_plain(v[p]) for v in self.columns.values()]])
        return columns, rows

    def save_csv(self, path: str | os.PathLike) -> str:
        """Write :meth:`rows` as CSV (e.g. ``label_issues.csv``); returns the path."""
        columns, rows = self.rows()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(columns)
            writer.writerows(rows)
        return str(path)


def _plain(value: torch.Tensor) -> float | int:
    v = float(value)
    return int(v) if v.is_integer() else v
