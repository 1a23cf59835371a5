"""Filter scores: one score per filter of each layer, and the filters flagged from them.

Every scorer returns a :class:`FilterScores` — anomaly filters (the CH index, flags from the three
criteria), each TIP property, AVoU and SoU, FQ and FQ diversity — and every consumer takes one:
:class:`~lightning_interp.callbacks.FilterMasking`, :class:`~lightning_interp.callbacks.PruneFlaggedFilters`,
``lightning-interp prune`` and the HTML report. It plays the part of Torch-Pruning's
``Importance.__call__`` (a 1-D score per channel), with the chosen channels beside the scores so
that a rule that is not a ranking (the thesis' anomaly criteria) travels the same way.

A consumer is given a *source* and resolves it with :func:`resolve_scores`:

* a :class:`FilterScores`;
* a monitor (anything with ``filter_scores(score=None) -> FilterScores`` and ``score_names``:
  ``AnomalyFilterMonitor``, ``TIPMonitor``, ``FeatureQuantityMonitor``) — its latest scan, read
  when the consumer needs it (a running monitor's flags change from scan to scan);
* the path of a saved scores file (:meth:`FilterScores.save`, format ``lightning_interp.filter_scores/1``)
  or of an anomaly report (``lightning_interp.anomaly_report/1``, which is a superset of it);
* a mapping ``{layer: [filter, ...]}`` (flags without scores);
* a callable returning any of these (evaluated lazily).

A :class:`Selection` turns scores into flags where the source has none of its own, or replaces
them: ``Selection("sou", amount=0.1, lowest=True)`` flags the 10 % of filters of each layer with
the lowest SoU — ``amount`` means what it means in ``torch.nn.utils.prune``: an int is a number of
filters, a float a fraction.

Layers are module paths of the module the scorer ran on (for the callbacks, the LightningModule:
``"model.relu3"``); :meth:`FilterScores.strip_prefix` addresses the bare network.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = [
    "ANOMALY_REPORT_FORMAT",
    "SCORES_FORMAT",
    "FilterScores",
    "Scorer",
    "ScoreSource",
    "Selection",
    "check_source",
    "resolve_if_ready",
    "resolve_scores",
]

SCORES_FORMAT = "lightning_interp.filter_scores/1"
ANOMALY_REPORT_FORMAT = "lightning_interp.anomaly_report/1"
FORMATS = (SCORES_FORMAT, ANOMALY_REPORT_FORMAT)


def _as_indices(layer: str, idx: Any) -> tuple[int, ...]:
    expected = "Expected flagged filters to map layer names to lists of filter indices, e.g. {'model.conv2': [3, 7]}"
    if isinstance(idx, torch.Tensor):
        if idx.dim() > 1 or idx.is_floating_point() or idx.is_complex():
            raise TypeError(f"{expected}, but got a {idx.dtype} tensor of shape {tuple(idx.shape)} for {layer!r}.")
        idx = idx.flatten().tolist()
    if not isinstance(layer, str) or isinstance(idx, (str, bytes)) or not isinstance(idx, (Sequence, set, frozenset)):
        raise TypeError(f"{expected}, but got {layer!r}: {idx!r}.")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx):
        raise TypeError(f"{expected}, but got {layer!r}: {idx!r}.")
    out = tuple(sorted({int(i) for i in idx}))
    if out and out[0] < 0:
        raise ValueError(f"Expected non-negative filter indices for layer {layer!r} but got {[i for i in out if i < 0]}.")
    return out


@dataclass(frozen=True)
class FilterScores:
    """Scores of every filter of some layers, and the flagged filters.

    Attributes:
        scores: ``{layer: K float tensor}`` (CPU, float32), one score per filter; may lack a layer
            whose flags came without scores (a hand-written list).
        flagged: ``{layer: sorted filter indices}``; every layer of ``scores`` has an entry (maybe empty).
        scorer: what the scores are, e.g. ``"anomaly"`` (CH index; flags = the three criteria),
            ``"tip/mean"``, ``"tip/sou"``, ``"fq/diversity"``, ``"given"`` (flags only).
        higher_is: what a high score means, in words (``"more anomalous"``, ``"more salient"``).
        epoch: the (0-based) epoch of the scan, None when unknown.
        settings: the scorer's settings (JSON-able), e.g. the anomaly criteria.
        details: ``{layer: ({...} per flagged filter, in flagged order)}`` — scorer-specific
            columns of the flagged-filter table (the anomaly clusters of each flagged filter).
    """

    scores: Mapping[str, torch.Tensor]
    flagged: Mapping[str, tuple[int, ...]]
    scorer: str
    higher_is: str = ""
    epoch: int | None = None
    settings: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, tuple[dict[str, Any], ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = {}
        for layer, s in self.scores.items():
            s = torch.as_tensor(s).detach().to("cpu", torch.float32)
            if s.dim() != 1:
                raise ValueError(f"Expected one score per filter (a 1-D tensor) for layer {layer!r} but got shape {tuple(s.shape)}.")
            scores[layer] = s
        flagged = {layer: _as_indices(layer, idx) for layer, idx in self.flagged.items()}
        for layer in scores:
            flagged.setdefault(layer, ())
        for layer, idx in flagged.items():
            k = scores[layer].numel() if layer in scores else None
            if k is not None and idx and idx[-1] >= k:
                raise ValueError(f"Expected flagged filters of layer {layer!r} in [0, {k - 1}] but got {[i for i in idx if i >= k]}.")
        details = {layer: tuple(dict(d) for d in items) for layer, items in self.details.items() if items}
        for layer, items in details.items():
            if len(items) != len(flagged.get(layer, ())):
                raise ValueError(f"Expected one detail entry per flagged filter of layer {layer!r} "
                                 f"({len(flagged.get(layer, ()))}) but got {len(items)}.")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "flagged", flagged)
        object.__setattr__(self, "details", details)
        object.__setattr__(self, "settings", dict(self.settings))

    # ---- reading ---------------------------------------------------------------------------
    @property
    def layers(self) -> list[str]:
        """Every layer with scores or flags, in insertion order."""
        return list(self.flagged)

    @property
    def count(self) -> int:
        """Flagged filters over all layers."""
        return sum(len(v) for v in self.flagged.values())

    def num_filters(self, layer: str) -> int | None:
        """K of a layer with scores, None for a flags-only layer."""
        return self.scores[layer].numel() if layer in self.scores else None

    def flags(self) -> dict[str, list[int]]:
        """``{layer: [filter, ...]}`` for the layers with at least one flagged filter (what masking and pruning take)."""
        return {layer: list(idx) for layer, idx in self.flagged.items() if idx}

    def rows(self) -> tuple[list[str], list[list[Any]]]:
        """The flagged-filter table: columns ``layer, filter, score, <details...>`` and one row per flagged filter."""
        extra: list[str] = []
        for items in self.details.values():
            for d in items:
                extra += [c for c in d if c not in extra and c != "filter"]
        rows = []
        for layer, idx in self.flagged.items():
            items = self.details.get(layer, ())
            for j, k in enumerate(idx):
                score = float(self.scores[layer][k]) if layer in self.scores else None
                d = items[j] if j < len(items) else {}
                rows.append([layer, k, score, *(d.get(c) for c in extra)])
        return ["layer", "filter", "score", *extra], rows

    # ---- deriving --------------------------------------------------------------------------
    def select(self, amount: int | float, *, lowest: bool = False) -> FilterScores:
        """The same scores with new flags: per layer, the ``amount`` highest (``lowest=True``: lowest) scores.

        ``amount``: an int is a number of filters per layer, a float in (0, 1] the fraction of each
        layer's filters (rounded, at least 1 when the fraction is positive), as in
        ``torch.nn.utils.prune``. Ties are broken by the lower filter index. Scorer details of the old
        flags are dropped.
        """
        if isinstance(amount, bool) or not isinstance(amount, (numbers.Integral, numbers.Real)):
            raise TypeError(f"Expected `amount` to be an int (filters) or a float in (0, 1] (fraction) but got {amount!r}.")
        if isinstance(amount, numbers.Integral):
            if amount < 0:
                raise ValueError(f"Expected `amount` >= 0 filters but got {amount}.")
        elif not 0 < float(amount) <= 1:
            raise ValueError(f"Expected a fractional `amount` in (0, 1] but got {amount}.")
        missing = [layer for layer in self.flagged if layer not in self.scores]
        if missing:
            raise ValueError(f"Cannot select by score: layers {missing} have flags but no scores ({self.scorer}).")
        flagged = {}
        for layer, s in self.scores.items():
            k = s.numel()
            n = int(amount) if isinstance(amount, numbers.Integral) else max(1, int(math.floor(float(amount) * k + 0.5)))
            n = min(n, k)
            key = s.double().nan_to_num(nan=-math.inf if not lowest else math.inf)
            order = torch.argsort(key if lowest else -key, stable=True)
            flagged[layer] = order[:n].tolist()
        how = f"{'lowest' if lowest else 'highest'} {amount}"
        return replace(self, flagged=flagged, details={}, settings={**self.settings, "selection": how})

    def strip_prefix(self, prefix: str) -> FilterScores:
        """The same scores with ``prefix`` (``"model."``) removed from the layer names that start with it."""
        def name(layer: str) -> str:
            return layer[len(prefix):] if prefix and layer.startswith(prefix) else layer

        return replace(
            self,
            scores={name(k): v for k, v in self.scores.items()},
            flagged={name(k): v for k, v in self.flagged.items()},
            details={name(k): v for k, v in self.details.items()},
        )

    # ---- files -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ``{"format", "scorer", "higher_is", "epoch", "settings", "layers": {layer:
        {"num_filters", "scores", "flagged": [{"filter": k, **details}, ...]}}}``."""
        layers = {}
        for layer, idx in self.flagged.items():
            items = self.details.get(layer, ())
            flagged = [{"filter": k, **(items[j] if j < len(items) else {})} for j, k in enumerate(idx)]
            entry: dict[str, Any] = {"num_filters": self.num_filters(layer)}
            if layer in self.scores:
                entry["scores"] = [float(v) if math.isfinite(float(v)) else None for v in self.scores[layer].tolist()]
            entry["flagged"] = flagged
            layers[layer] = entry
        return {"format": SCORES_FORMAT, "scorer": self.scorer, "higher_is": self.higher_is, "epoch": self.epoch,
                "settings": dict(self.settings), "layers": layers}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "the scores") -> FilterScores:
        """Read :meth:`to_dict`'s output, or an anomaly report (whose ``layers`` have the same shape;
        reports written before scores were saved give flags only)."""
        fmt = data.get("format") if isinstance(data, Mapping) else None
        if fmt not in FORMATS:
            got = fmt if isinstance(data, Mapping) else type(data).__name__
            raise ValueError(f"Expected filter scores with format {list(FORMATS)} in {where} but got {got!r}.")
        scores, flagged, details = {}, {}, {}
        for layer, entry in data.get("layers", {}).items():
            items = sorted(entry.get("flagged", []), key=lambda d: int(d["filter"]))
            flagged[layer] = [int(d["filter"]) for d in items]
            details[layer] = [{k: v for k, v in d.items() if k != "filter"} for d in items]
            if entry.get("scores") is not None:
                scores[layer] = torch.tensor([math.nan if v is None else float(v) for v in entry["scores"]])
        scorer = data.get("scorer") or ("anomaly" if fmt == ANOMALY_REPORT_FORMAT else "given")
        return cls(scores=scores, flagged=flagged, scorer=scorer, higher_is=data.get("higher_is", ""),
                   epoch=data.get("epoch"), settings=data.get("settings") or {}, details=details)

    def save(self, path: str | os.PathLike, **extra: Any) -> str:
        """Write :meth:`to_dict` (plus ``extra`` top-level keys) as JSON, atomically; returns the path."""
        return write_json(path, {**self.to_dict(), **extra})

    @classmethod
    def load(cls, path: str | os.PathLike) -> FilterScores:
        """Read a file :meth:`save` (or ``AnomalyFilterMonitor``'s report) wrote."""
        with open(path) as fh:
            data = json.load(fh)
        return cls.from_dict(data, where=str(path))


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> str:
    """Write ``data`` as JSON atomically (temp file + rename); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Selection:
    """Which score of a source to use, and how to flag filters from it.

    Args:
        score: the score of a multi-score source (``TIPMonitor``: ``"mean"``, ``"sou"``, ...; see its
            ``score_names``); None for the source's default.
        amount: flag this many filters per layer (int) or this fraction of them (float in (0, 1]);
            None keeps the source's own flags (the anomaly criteria).
        lowest: flag the lowest scores instead of the highest (pruning by saliency: ``lowest=True``).
    """

    score: str | None = None
    amount: int | float | None = None
    lowest: bool = False

    def __post_init__(self) -> None:
        if self.score is not None and not isinstance(self.score, str):
            raise TypeError(f"Expected `score` to be a score name (str) or None but got {self.score!r}.")
        if self.amount is not None:
            FilterScores({}, {}, "check").select(self.amount)  # the same checks as select()


@runtime_checkable
class Scorer(Protocol):
    """What a monitor offers to the consumers of filter scores."""

    score_names: tuple[str, ...]

    def filter_scores(self, score: str | None = None) -> FilterScores: ...


ScoreSource = FilterScores | Scorer | str | os.PathLike | Mapping[str, Sequence[int]] | Callable[[], Any]


def _describe(source: Any) -> str:
    return type(source).__name__


def check_source(source: Any, select: Selection | None = None, *, owner: str = "the consumer") -> None:
    """Refuse, before training, a source of filter scores that cannot work.

    Checks the type, a monitor's ``score_names`` against ``select.score``, a mapping's indices and
    that a flags-only source is not asked to select by score. A path is read when it exists (a
    monitor of the same run may write it later).
    """
    if select is not None and not isinstance(select, Selection):
        raise TypeError(f"Expected `select` to be a lightning_interp.scores.Selection or None but got {_describe(select)}.")
    if isinstance(source, Scorer):
        names = tuple(source.score_names)
        if select is not None and select.score is not None and select.score not in names:
            raise ValueError(f"Expected `select.score` to be one of {list(names)} (the scores of "
                             f"{type(source).__name__}) but got {select.score!r}.")
        return
    if _answers_later(source):
        return
    if isinstance(source, (FilterScores, Mapping, str, os.PathLike)):
        scores = resolve_scores(source)
        if select is not None and select.amount is not None:
            missing = [layer for layer in scores.layers if layer not in scores.scores]
            if missing:
                raise ValueError(f"{owner} cannot select by score: the source has flags but no scores for {missing}.")
        return
    raise TypeError(
        f"Expected the filter-score source of {owner} to be a FilterScores, a monitor with `filter_scores()` "
        f"(AnomalyFilterMonitor, TIPMonitor, FeatureQuantityMonitor), the path of a saved scores file or anomaly "
        f"report, a mapping to map layer names to lists of filter indices (e.g. {{'model.conv2': [3, 7]}}) or a "
        f"callable returning one of these, but got {_describe(source)}."
    )


def _answers_later(source: Any) -> bool:
    """A path not written yet (a monitor of the same run writes it), or a callable evaluated when needed."""
    if isinstance(source, (str, os.PathLike)):
        return not os.path.isfile(source)
    return callable(source) and not isinstance(source, Scorer)


def resolve_if_ready(source: ScoreSource, select: Selection | None = None) -> FilterScores | None:
    """:func:`resolve_scores` now, or None for a source that can only answer later in the run (a path
    not written yet, a callable): what consumers check at ``setup``."""
    return None if _answers_later(source) else resolve_scores(source, select)


def resolve_scores(source: ScoreSource, select: Selection | None = None) -> FilterScores:
    """The :class:`FilterScores` of any source (see the module docstring), with ``select`` applied."""
    score = select.score if select is not None else None
    if isinstance(source, FilterScores):
        scores = source
    elif isinstance(source, Scorer):
        scores = source.filter_scores(score)
    elif isinstance(source, (str, os.PathLike)):
        scores = FilterScores.load(source)
    elif isinstance(source, Mapping):
        scores = FilterScores(scores={}, flagged={k: _as_indices(k, v) for k, v in source.items()}, scorer="given")
    elif callable(source):
        return resolve_scores(source(), select)
    else:
        check_source(source)  # raises the TypeError naming the valid sources
        raise AssertionError  # pragma: no cover
    if score is not None and not isinstance(source, Scorer) and scores.scorer.split("/")[-1] != score:
        raise ValueError(f"Expected scores of {score!r} but the source holds {scores.scorer!r}.")
    if select is not None and select.amount is not None:
        scores = scores.select(select.amount, lowest=select.lowest)
    return scores
