"""SampleDynamicsMonitor: which training samples the model is memorising, and since when.

The callback gathers logits of tracked training samples and logs; the running statistics, scores and
flags are :mod:`lightning_interp.dynamics`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch.utils.data import IterableDataset
from torch.utils.data.dataloader import default_collate
from typing_extensions import override

from ..batch import Batch, BatchAdapter, default_batch_adapter
from ..dynamics import DEFAULT_SCORE, SCORES, SampleDynamics, SampleScores, _check_rule, label_wave_alarm
from ..layers import eval_mode, get_layer
from ..memorisation import VARIANTS, memorisation_scores
from ..overfitting import AlarmRule, rise_alarm
from ..scores import FilterScores
from ..viz import labelled_image_grid
from .base import (
    _first_loader,
    class_names,
    guarded,
    log_root,
    rank_zero_decides,
    select_probe,
    send_image,
    send_metrics,
    warn_missing_keys,
)

__all__ = ["ALARM_RULES", "MemorisationScorer", "SOURCES", "SampleDynamicsMonitor"]

#: Where the logits come from: ``"batches"`` — the training forward passes (free; batches must carry
#: dataset indices, :func:`lightning_interp.data.with_index`); ``"subset"`` — an eval-mode pass over a
#: fixed, seeded subset of the training set (no change to the user's data or module).
SOURCES = ("batches", "subset")
#: Overfitting alarms (``alarm=``): ``"val_loss"`` — the validation loss (``val_loss_key``) rose 1 % over its
#: best for 2 consecutive validations, not before epoch 3 (:class:`~lightning_interp.overfitting.AlarmRule`, the
#: anomaly monitor's default; pass an ``AlarmRule("val_loss", ...)`` to change it) — the alarm to use; and two
#: label-free ones: ``"flagged_fit"`` — the flagged samples' fit rate on their given labels rose 0.05 over its
#: running minimum for 2 consecutive epochs; ``"label_wave"`` — Label Wave's first minimum of prediction flips,
#: passed for 2 epochs. None (default) — no alarm. Measured on 15 CIFAR-10 runs
#: (docs/measurements/sample_dynamics.md), neither label-free alarm is on time as often as the validation loss,
#: and both fire early and on runs that do not overfit: they are for experiments.
ALARM_RULES = ("val_loss", "flagged_fit", "label_wave")


def _score_caption(scores: SampleScores, p: int) -> str:
    """The score as users read it: AUM and confidence as themselves (not negated), others as suspect scores."""
    raw = {"aum": ("AUM", "aum"), "confidence": ("conf", "confidence")}.get(scores.score)
    if raw is not None and raw[1] in scores.columns:
        return f"{raw[0]} {float(scores.columns[raw[1]][p]):.2f}"
    return f"{scores.score} {float(scores.scores[p]):.2f}"


class SampleDynamicsMonitor(Callback):
    """Track per-sample training dynamics, flag the samples the model memorises, and say since when.

    Every epoch it updates, for each tracked training sample, the running statistics of
    :class:`~lightning_interp.dynamics.SampleDynamics` (AUM, epochs misclassified, forgetting events,
    cartography confidence/variability, prediction flips, ``fit_since``), scores every sample
    (higher = more suspect) and flags the suspects. Logged each epoch (``<log_prefix>/samples/...``):
    ``flagged_fraction``, ``flagged_fit`` (the flagged samples' fit rate on their given labels: it
    rises when the model starts memorising them), ``flips`` (Label Wave's prediction-change rate),
    ``fit``, and ``overfit_alarm`` when an ``alarm`` rule is set (usable by ``EarlyStopping``); a
    captioned grid of the top suspects (given label, predicted class, score, fitted since). At fit end:
    a W&B table (CSV elsewhere) of the tracked samples, ``label_issues.csv`` (dataset indices,
    cleanlab's column names) and ``pred_probs.npy``/``labels.npy`` — the averaged predicted
    probabilities in the shape ``cleanlab.filter.find_label_issues(labels, pred_probs)`` takes — under
    ``<log dir>/sample_dynamics/``. A datamodule exposing ``flipped`` (``N`` bool, e.g.
    :class:`~lightning_interp.data.DigitsDataModule`) gets the flags' precision and recall logged.

    Args:
        source: ``"subset"`` (default) — an eval-mode forward pass over ``track_size`` fixed, seeded
            training samples every ``every_n_epochs`` epochs: no change to the user's code; an eval
            forward costs about 0.7 of a training step's forward and backward per sample on the CPU
            (SimpleCNN), so the pass costs about ``0.7 · track_size / samples per epoch`` of an epoch;
            ``"batches"`` — the logits of
            the training forward passes, for every training sample at no extra forward pass; the
            training dataset must carry indices (wrap it with :func:`lightning_interp.data.with_index`;
            ``training_step`` then receives ``(x, y, index)``).
        track_size: samples tracked with ``source="subset"``: ``"auto"`` (default) — a sixteenth of the
            training set, at least 128 and at most 1,024 (about 5 % of an epoch's time; the statistics of a
            sample do not depend on how many others are tracked); ``"all"``; or a number.
        every_n_epochs: cadence of the subset pass and of the pictures (statistics of ``"batches"``
            are updated every epoch).
        score: the suspect score flags and pictures use (one of ``lightning_interp.dynamics.SCORES``).
        flag_rule: ``"gmm"`` (a two-component mixture on the score), a count, or a fraction.
        alarm: one of :data:`ALARM_RULES`, an :class:`~lightning_interp.overfitting.AlarmRule` with rule
            ``"val_loss"``, or None. The ``"val_loss"`` alarm is decided and logged at validation end (before
            ``ModelCheckpoint`` saves), so ``FilterMasking(start_on="interp/samples/overfit_alarm")`` resumes exactly;
            under DDP at training-epoch end (every rank runs it; a rank without validation batches does not run
            the validation hooks).
        val_loss_key: the ``trainer.callback_metrics`` key of the validation loss (``alarm="val_loss"``); a key
            the module never logs is named in a warning after the first validation.
        num_images: suspects in the grid (0: none).
        logits_module: with ``source="batches"``, the module path (of the LightningModule) whose
            output is the logits; by default the LightningModule's own forward, else the last of its
            direct children called with a ``B x C`` output (``self.net`` / ``self.model``).
        batch_adapter: callable turning a collated batch into a :class:`~lightning_interp.batch.Batch`.
        seed: seed of the tracked subset and of the mixture.
        strict: re-raise failures instead of warning (the run is never lost by default).
        log_prefix: prefix of the logged keys.

    Examples:
        >>> from lightning_interp.callbacks import SampleDynamicsMonitor
        >>> monitor = SampleDynamicsMonitor(track_size=512)
    """

    def __init__(
        self,
        *,
        source: str = "subset",
        track_size: int | str = "auto",
        every_n_epochs: int = 1,
        score: str = DEFAULT_SCORE,
        flag_rule: str | int | float = "gmm",
        alarm: str | AlarmRule | None = None,
        val_loss_key: str = "val/loss",
        num_images: int = 16,
        logits_module: str | None = None,
        batch_adapter: BatchAdapter | None = None,
        seed: int = 0,
        strict: bool = False,
        log_prefix: str = "interp",
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"Expected `source` to be one of {list(SOURCES)} but got {source!r}.")
        if track_size not in ("auto", "all") and (isinstance(track_size, bool) or not isinstance(track_size, int)
                                                  or track_size < 1):
            raise ValueError(f"Expected `track_size` to be 'auto', 'all' or a positive int but got {track_size!r}.")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"Expected `every_n_epochs` to be a positive int but got {every_n_epochs!r}.")
        if score not in SCORES:
            raise ValueError(f"Expected `score` to be one of {list(SCORES)} but got {score!r}.")
        _check_rule(flag_rule)
        if isinstance(alarm, AlarmRule):
            if alarm.rule != "val_loss":
                raise ValueError(f"Expected an `alarm` AlarmRule with rule 'val_loss' but got rule {alarm.rule!r}.")
        elif alarm is not None and alarm not in ALARM_RULES:
            raise ValueError(f"Expected `alarm` to be one of {list(ALARM_RULES)}, an AlarmRule or None but got {alarm!r}.")
        if not isinstance(val_loss_key, str) or not val_loss_key:
            raise ValueError(f"Expected `val_loss_key` to be a non-empty str but got {val_loss_key!r}.")
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 0:
            raise ValueError(f"Expected `num_images` to be an int >= 0 but got {num_images!r}.")
        if logits_module is not None and (source != "batches" or not isinstance(logits_module, str)):
            raise ValueError(f"Expected `logits_module` (a module path) only with source='batches' but got "
                             f"{logits_module!r} with source={source!r}.")
        if batch_adapter is not None and not callable(batch_adapter):
            raise TypeError(f"Expected `batch_adapter` to be callable but got {type(batch_adapter).__name__}.")
        if not isinstance(log_prefix, str) or not log_prefix.strip("/"):
            raise ValueError(f"Expected `log_prefix` to be a non-empty str but got {log_prefix!r}.")
        self.source = source
        self.track_size = track_size
        self.every_n_epochs = every_n_epochs
        self.score = score
        self.flag_rule = flag_rule
        #: the validation-loss rule (``alarm="val_loss"``), None for the label-free alarms.
        self.alarm_rule: AlarmRule | None = (alarm if isinstance(alarm, AlarmRule)
                                             else AlarmRule("val_loss") if alarm == "val_loss" else None)
        self.alarm = self.alarm_rule.rule if self.alarm_rule is not None else alarm
        self.val_loss_key = val_loss_key
        #: ``[{"epoch", "val_loss"}]``, one entry per validation (``alarm="val_loss"``).
        self.val_history: list[dict[str, float]] = []
        self.num_images = num_images
        self.logits_module = logits_module
        self.batch_adapter = batch_adapter or default_batch_adapter
        self.seed = seed
        self.strict = strict
        self.log_prefix = log_prefix.strip("/")
        self.dynamics: SampleDynamics | None = None
        #: dataset indices of the tracked samples (position -> index); None: every sample, position = index.
        self.tracked: list[int] | None = None
        self.subset: Batch | None = None
        self.history: list[dict[str, float]] = []
        self.latest: SampleScores | None = None
        self.figures: dict[str, tuple[np.ndarray, str, int]] = {}
        self.alarm_epoch: int | None = None
        self.outputs: dict[str, str] = {}
        self._pending_epoch: int | None = None
        self._state: dict[str, Any] | None = None
        self._hooks: list[Any] = []
        self._captured: dict[str, torch.Tensor] = {}
        self._armed = False
        self._warned: set[str] = set()
        self._first_epoch = 0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(source=self.source, log_prefix=self.log_prefix)

    @property
    def key(self) -> str:
        return f"{self.log_prefix}/samples"

    @property
    def alarm_key(self) -> str | None:
        """The logged key of the overfitting alarm (``FilterMasking(start_on=...)``), None without ``alarm``."""
        return None if self.alarm is None else f"{self.key}/overfit_alarm"

    # ---- set-up, before the first step -----------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.log_root = log_root(trainer)
        if self.logits_module is not None:
            get_layer(pl_module, self.logits_module)  # names the valid paths when it does not exist

    def _dataset(self, trainer: pl.Trainer):
        loader = _first_loader(trainer.train_dataloader)
        dataset = getattr(loader, "dataset", None)
        if dataset is None or isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
            raise ValueError(
                f"Expected a map-style training dataset (with __len__ and __getitem__) for SampleDynamicsMonitor but "
                f"got {type(dataset).__name__}: samples of an iterable dataset cannot be followed across epochs."
            )
        return loader, dataset

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_epoch = trainer.current_epoch  # a resumed fit has no validation metrics at its first epoch start
        loader, dataset = self._dataset(trainer)
        self._items = (dataset, loader.collate_fn or default_collate)
        n = len(dataset)
        if self.source == "batches":
            collate = loader.collate_fn or default_collate
            first = self.batch_adapter(collate([dataset[0]]))
            if first.index is None:
                raise ValueError(
                    "Expected the training batches to carry each sample's dataset index for "
                    "SampleDynamicsMonitor(source='batches') but they do not. Wrap the training dataset: "
                    "`from lightning_interp.data import with_index; DataLoader(with_index(train_set), ...)` "
                    "(training_step then receives `x, y, index = batch`), or use source='subset', which needs "
                    "no change to the data."
                )
            if self.dynamics is None or self.dynamics.num_samples != n:
                self.dynamics = SampleDynamics(n)
            self._register_hooks(pl_module)
        else:
            size = {"all": n, "auto": min(n, max(128, min(1024, n // 16)))}.get(self.track_size, self.track_size)
            size = min(size, n)
            self.subset, self.tracked = rank_zero_decides(
                trainer, lambda: select_probe(dataset, size, self.seed, self.batch_adapter, indices=self.tracked))
            if self.dynamics is None or self.dynamics.num_samples != size:
                self.dynamics = SampleDynamics(size)
        if self._state is not None:
            self.dynamics.load_state_dict(self._state["dynamics"])
            if self._state.get("buffers") is not None:
                self.dynamics.set_buffers(**self._state["buffers"])
            self._state = None
        # A checkpoint written after the epoch's training batches but before this callback's epoch end
        # (ModelCheckpoint saves at validation end): finish that epoch now, with the restored weights —
        # the same weights the uninterrupted run used — so the state continues exactly.
        last = -1 if self.dynamics.last_epoch is None else self.dynamics.last_epoch
        epoch = trainer.current_epoch - 1
        unfinished = (self._pending_epoch == epoch if self.source == "batches"
                      else (epoch + 1) % self.every_n_epochs == 0)
        if epoch > last and unfinished:
            guarded(type(self).__name__, self.strict, "could not finish the checkpoint's last epoch",
                    lambda: self._finish_epoch(trainer, pl_module, epoch, log=False))
        elif self.latest is None and self.dynamics.last_epoch is not None:
            # Resumed after a finished epoch: its scores and flags again (a function of the restored state),
            # so a consumer (MemorisationScorer, masking) reads the same flags at the next epoch's start.
            self.latest = guarded(type(self).__name__, self.strict, "could not restore the last scores",
                                  lambda: SampleScores.from_dynamics(self.dynamics, self.tracked, self.score,
                                                                     self.flag_rule, seed=self.seed))

    # ---- the validation-loss alarm ------------------------------------------------------------------
    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # One process: decided here, where this epoch's validation loss is known and before ModelCheckpoint
        # saves (at validation end), so the checkpoint holds the alarm. Under DDP the decision is a broadcast,
        # and a rank without validation batches skips the validation hooks: it is made at training-epoch end,
        # which every rank runs (as the anomaly monitor does).
        if self.alarm_rule is None or trainer.sanity_checking:
            return
        warn_missing_keys(trainer, {"val_loss_key": self.val_loss_key}, self)
        epoch = trainer.current_epoch
        value = trainer.callback_metrics.get(self.val_loss_key)
        if value is not None:
            entry = {"epoch": epoch, "val_loss": float(value)}
            self.val_history = [e for e in self.val_history if e["epoch"] != epoch] + [entry]
        if trainer.world_size == 1:
            self._decide_alarm(trainer, pl_module)

    def _decide_alarm(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Validation losses logged without `sync_dist` differ between ranks: rank zero's decide.
        self.val_history, self.alarm_epoch = rank_zero_decides(trainer, self._val_loss_alarm)
        pl_module.log(self.alarm_key, float(self.alarm_epoch is not None), on_step=False, on_epoch=True)

    def _val_loss_alarm(self) -> tuple[list[dict[str, float]], int | None]:
        if self.alarm_epoch is not None or not self.val_history:
            return list(self.val_history), self.alarm_epoch
        epochs = [e["epoch"] for e in self.val_history]
        fired = self.alarm_rule.fired(epochs, [0.0] * len(epochs), [e["val_loss"] for e in self.val_history])
        return list(self.val_history), epochs[-1] if fired else None

    # ---- way (a): the training forward passes ------------------------------------------------------
    def _register_hooks(self, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.logits_module is not None:
            targets = {self.logits_module: get_layer(pl_module, self.logits_module)}
        else:
            targets = {"": pl_module, **{name: m for name, m in pl_module.named_children()}}

        def make(name: str):
            def hook(module, args, output):
                if self._armed and isinstance(output, torch.Tensor) and output.dim() == 2:
                    self._captured[name] = output.detach()

            return hook

        self._hooks = [m.register_forward_hook(make(name)) for name, m in targets.items()]

    def _remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.source == "batches":
            self._captured = {}
            self._armed = True

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.source != "batches" or not self._armed:
            return
        self._armed = False
        captured, self._captured = self._captured, {}
        guarded(type(self).__name__, self.strict, "skipped a training batch",
                lambda: self._observe_batch(trainer, batch, captured))

    def _observe_batch(self, trainer: pl.Trainer, batch: Any, captured: dict[str, torch.Tensor]) -> None:
        b = self.batch_adapter(batch)
        if b.index is None or b.y is None:
            raise ValueError("a training batch without dataset indices or labels")
        n = len(b.index)
        # The LightningModule's own forward, else the child called last (a `head` after a `backbone`).
        order = [self.logits_module] if self.logits_module else ["", *reversed(list(captured))]
        key = next((k for k in order if k in captured and captured[k].shape[0] == n), None)
        if key is None:
            if "logits" not in self._warned:
                self._warned.add("logits")
                rank_zero_warn(
                    f"SampleDynamicsMonitor found no (B, classes) logits of the {n} samples among the outputs of the "
                    f"LightningModule and its direct children ({sorted(captured) or 'none called'}); pass "
                    "`logits_module=` (the path of the module whose output is the logits) or use source='subset'. "
                    "Training goes on."
                )
            return
        self.dynamics.observe(b.index, captured[key].float(), b.y)
        self._pending_epoch = trainer.current_epoch

    # ---- way (b): the tracked subset ---------------------------------------------------------------
    @torch.no_grad()
    def _observe_subset(self, pl_module: pl.LightningModule, chunk: int = 256) -> None:
        x, y = self.subset.x, self.subset.y
        if y is None:
            raise ValueError("the training data carries no labels")
        with eval_mode(pl_module), torch.inference_mode(False):
            for i in range(0, len(x), chunk):
                out = pl_module(x[i : i + chunk].to(pl_module.device))
                if not isinstance(out, torch.Tensor) or out.dim() != 2:
                    raise ValueError(f"Expected {type(pl_module).__name__}.forward to return (B, classes) logits but got "
                                     f"{type(out).__name__}{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}")
                self.dynamics.observe(torch.arange(i, i + len(out)), out.float(), y[i : i + chunk])

    # ---- the epoch ----------------------------------------------------------------------------------
    def _scan_epoch(self, trainer: pl.Trainer) -> bool:
        return (trainer.current_epoch + 1) % self.every_n_epochs == 0

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.alarm_rule is not None and trainer.world_size > 1:  # every rank runs this hook: the broadcast is safe
            self._decide_alarm(trainer, pl_module)
        if self.dynamics is None:
            return
        if self.source == "subset" and not self._scan_epoch(trainer):
            return
        outcome = guarded(type(self).__name__, self.strict,
                          f"skipped epoch {trainer.current_epoch} (training goes on; `strict=True` raises)",
                          lambda: self._finish_epoch(trainer, pl_module, trainer.current_epoch, log=True))
        if outcome is not None:
            for name, value in outcome.items():
                pl_module.log(name, value, on_step=False, on_epoch=True)

    def _reduce(self, trainer: pl.Trainer) -> None:
        """Sum this epoch's observations over the processes (every rank sees its share of the batches)."""
        if trainer.world_size < 2 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        dist = torch.distributed
        device = trainer.strategy.root_device
        buf = self.dynamics.buffers()
        out = {}
        for name, op in (("logit_sum", dist.ReduceOp.SUM), ("count", dist.ReduceOp.SUM), ("labels", dist.ReduceOp.MAX)):
            t = buf[name].to(device)
            dist.all_reduce(t, op=op)
            out[name] = t.cpu()
        self.dynamics.set_buffers(**out)

    def _finish_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int, log: bool) -> dict[str, float]:
        if self.source == "subset":
            # Rank zero's pass decides (house rule 6): every rank holds the same observations.
            def run():
                self._observe_subset(pl_module)
                return self.dynamics.buffers()

            self.dynamics.set_buffers(**rank_zero_decides(trainer, run))
        else:
            if not self.dynamics.has_observations:  # no batch observed yet (e.g. no logits found): nothing to apply
                return {}
            self._reduce(trainer)
        stats = self.dynamics.end_epoch(epoch)
        self._pending_epoch = None
        scores = SampleScores.from_dynamics(self.dynamics, self.tracked, self.score, self.flag_rule, seed=self.seed)
        self.latest = scores
        observed = scores.labels >= 0
        scalars = {
            f"{self.key}/flagged_fraction": float(scores.flagged.sum()) / max(int(observed.sum()), 1),
            f"{self.key}/flagged_fit": scores.fit_rate(),
            f"{self.key}/flips": stats["flips"],
            f"{self.key}/fit": stats["fit"],
        }
        self.history.append({"epoch": epoch, **scalars})
        if self.alarm_rule is not None:  # decided and logged at validation end (DDP: at this hook's start)
            self.history[-1][self.alarm_key] = float(self.alarm_epoch is not None)
        elif self.alarm is not None:
            fired = self._alarm_fired()
            if fired and self.alarm_epoch is None:
                self.alarm_epoch = epoch
            scalars[self.alarm_key] = float(self.alarm_epoch is not None)
            self.history[-1][self.alarm_key] = scalars[self.alarm_key]
        if log and self.num_images and trainer.is_global_zero and self._scan_epoch(trainer):
            guarded(type(self).__name__, self.strict, "could not draw its suspects",
                    lambda: self._log_suspects(trainer, scores))
        # Lightning's logger refuses NaN-free guarantees on no scalar: drop the undefined ones (e.g. flips at epoch 0).
        return {k: v for k, v in scalars.items() if math.isfinite(v)}

    def _alarm_fired(self) -> bool:
        epochs = [h["epoch"] for h in self.history]
        first = next((i for i, e in enumerate(epochs) if e + 1 >= 3), len(epochs))
        if self.alarm == "flagged_fit":
            values = [h[f"{self.key}/flagged_fit"] for h in self.history]
            return rise_alarm(values, rel=0.0, margin=0.05, patience=2, min_index=first) is not None
        flips = [h[f"{self.key}/flips"] for h in self.history]
        return label_wave_alarm(flips, patience=2, min_index=first) is not None

    # ---- pictures, tables, files --------------------------------------------------------------------
    def _inputs(self, positions: Sequence[int]) -> torch.Tensor:
        """Inputs of tracked samples by position: the subset's, or the training dataset's items (way (a))."""
        if self.subset is not None:
            return self.subset.x[list(positions)]
        dataset, collate = self._items
        return self.batch_adapter(collate([dataset[int(p)] for p in positions])).x

    def flagged_samples(self, max_suspects: int = 512, seed: int = 0, *, fitted: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``(inputs, given labels, suspects)`` for the memorisation score: the ``max_suspects`` most suspect
        flagged samples (``fitted=True``: only those predicted as their given label at the last epoch — the
        memorised ones) and up to twice as many other observed ones (seeded), None before any such flag."""
        chosen = self.flagged_positions(max_suspects, seed, fitted=fitted)
        if chosen is None:
            return None
        positions, mask = chosen
        return self._inputs(positions.tolist()), self.latest.labels[positions], mask

    def flagged_positions(self, max_suspects: int = 512, seed: int = 0, *, fitted: bool = False
                          ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The positions (into :attr:`latest`) :meth:`flagged_samples` takes, suspects first, and its suspect mask."""
        latest = self.latest
        if latest is None:
            return None
        flagged = latest.flagged & (latest.predicted == latest.labels) if fitted else latest.flagged
        if not flagged.any():
            return None
        suspects = latest.top(len(latest))
        suspects = suspects[flagged[suspects]][:max_suspects]
        others = ((latest.labels >= 0) & ~latest.flagged).nonzero().squeeze(1)
        g = torch.Generator().manual_seed(seed)
        others = others[torch.randperm(len(others), generator=g)[: 2 * len(suspects)]]
        positions = torch.cat([suspects, others])
        mask = torch.zeros(len(positions), dtype=torch.bool)
        mask[: len(suspects)] = True
        return positions, mask

    def _log_suspects(self, trainer: pl.Trainer, scores: SampleScores) -> None:
        top = scores.top(self.num_images).tolist()
        if not top:
            return
        name = class_names(trainer)
        since = scores.columns["fit_since_epoch"]
        truth = self.truth(trainer)  # a datamodule that knows which labels it flipped (the demo)
        captions = []
        for p in top:
            fit = int(since[p])
            captions.append(f"#{int(scores.indices[p])} given: {name(int(scores.labels[p]))} / pred: "
                            f"{name(int(scores.predicted[p]))} / {_score_caption(scores, p)}"
                            + (f" / fit since ep {fit}" if fit >= 0 else "")
                            + ("" if truth is None else " / FLIPPED" if truth[p] else " / label ok"))
        grid = labelled_image_grid(self._inputs(top).float().cpu(), captions, thumb=96)
        key = f"{self.key}/suspects"
        caption = (f"epoch {trainer.current_epoch}: the {len(top)} most suspect training samples by {scores.score} "
                   f"({int(scores.flagged.sum())} flagged; flagged fit rate {scores.fit_rate():.2f})")
        self.figures[key] = (grid, caption, trainer.current_epoch)
        if not send_image(trainer, key, grid, caption):
            path = os.path.join(self.log_root, "interp_images", key.replace("/", "_"), f"epoch={trainer.current_epoch}.png")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            import matplotlib.image

            matplotlib.image.imsave(path, grid)

    def truth(self, trainer: pl.Trainer) -> torch.Tensor | None:
        """The datamodule's ``flipped`` (``N`` bool) for the tracked samples, when it exposes one."""
        flipped = getattr(getattr(trainer, "datamodule", None), "flipped", None)
        if not isinstance(flipped, torch.Tensor) or self.latest is None:
            return None
        if int(self.latest.indices.max()) >= len(flipped):
            return None
        return flipped.bool().cpu()[self.latest.indices]

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()
        if self.latest is None:
            return
        truth = self.truth(trainer)
        if truth is not None and trainer.is_global_zero:
            precision, recall = self.latest.precision_recall(truth)  # logged as 0.0 where undefined
            metrics = {f"{self.key}/flipped_precision": 0.0 if math.isnan(precision) else precision,
                       f"{self.key}/flipped_recall": 0.0 if math.isnan(recall) else recall}
            send_metrics(trainer, metrics)
            self.history.append({"epoch": trainer.current_epoch, "fit_end": 1.0, **metrics})
        if trainer.is_global_zero:
            guarded(type(self).__name__, self.strict, "could not write its fit-end files",
                    lambda: self._write_outputs(trainer, truth))

    @rank_zero_only
    def _write_outputs(self, trainer: pl.Trainer, truth: torch.Tensor | None) -> None:
        folder = os.path.join(self.log_root, "sample_dynamics")
        os.makedirs(folder, exist_ok=True)
        self.outputs["label_issues"] = self.latest.save_csv(os.path.join(folder, "label_issues.csv"))
        probs = self.dynamics.mean_probs()
        if probs is not None:
            seen = self.latest.labels >= 0
            np.save(os.path.join(folder, "pred_probs.npy"), probs[seen].float().numpy())
            np.save(os.path.join(folder, "labels.npy"), self.latest.labels[seen].numpy())
            np.save(os.path.join(folder, "indices.npy"), self.latest.indices[seen].numpy())
            self.outputs["pred_probs"] = os.path.join(folder, "pred_probs.npy")
        columns, rows = self.latest.rows()
        if truth is not None:
            pos = {int(i): k for k, i in enumerate(self.latest.indices.tolist())}
            columns = [*columns, "truly_flipped"]
            rows = [[*row, bool(truth[pos[row[0]]])] for row in rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=f"{self.key}/tracked", columns=columns, data=rows[:2000], step=trainer.global_step)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def summary(self) -> dict[str, Any]:
        """What the report prints: flagged count, fit rate, alarm epoch, output files."""
        if self.latest is None:
            return {}
        return {"tracked": len(self.latest), "flagged": int(self.latest.flagged.sum()), "score": self.score,
                "flagged_fit": self.latest.fit_rate(), "alarm_epoch": self.alarm_epoch, **self.outputs}

    # ---- state ---------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"history": list(self.history), "tracked": self.tracked, "alarm_epoch": self.alarm_epoch,
                                 "pending_epoch": self._pending_epoch, "val_history": list(self.val_history)}
        if self.dynamics is not None:
            state["dynamics"] = self.dynamics.state_dict()
            pending = self.dynamics._logit_sum is not None and bool(self.dynamics._count.any())
            state["buffers"] = {k: v.clone() for k, v in self.dynamics.buffers().items()} if pending else None
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.tracked = state_dict.get("tracked", self.tracked)
        self.alarm_epoch = state_dict.get("alarm_epoch")
        self.val_history = list(state_dict.get("val_history", []))
        self._pending_epoch = state_dict.get("pending_epoch")
        if "dynamics" in state_dict:
            # Applied in on_train_start, once the number of tracked samples is known.
            self._state = {"dynamics": state_dict["dynamics"], "buffers": state_dict.get("buffers")}


class MemorisationScorer:
    """The filters that hold what the model memorised, scored on the samples a
    :class:`SampleDynamicsMonitor` flags: a live filter-score source (``Scorer``) for
    :class:`~lightning_interp.callbacks.FilterMasking`, :class:`~lightning_interp.callbacks.PruneFlaggedFilters`
    and :class:`~lightning_interp.callbacks.InterpReport`.

    Each :meth:`filter_scores` call takes the monitor's latest flags as the suspects — by default only the
    flagged samples the model fits to their given label at the last epoch (``fitted_only``): what it has
    memorised, the suspects the memorisation score is defined on and the benchmark measured (the most suspect
    flagged samples by AUM have the lowest given-label margins, often not fitted yet) — and scores every filter of ``layers``
    with :func:`lightning_interp.memorisation.memorisation_scores` (suspects against as many fitted clean
    samples). Before the monitor has flagged (a fitted) anything it answers with no flags, so a masking
    callback masks nothing until then.

    Args:
        monitor: the sample-dynamics monitor whose flagged samples are the suspects.
        model: the module the consumers act on (for callbacks the LightningModule: layers ``"net.layer3"``).
        layers: module paths to score.
        variant: the default variant (:data:`lightning_interp.memorisation.VARIANTS`); ``Selection(score=...)``
            picks another.
        max_suspects: at most this many suspects (the most suspect first) and twice as many others per call.
        fitted_only: suspects are the flagged samples predicted as their given label (True, default), or every
            flagged sample (False: their fit is mostly not there yet, so the score then ranks the filters that
            push towards the given labels).

    Examples:
        >>> samples = SampleDynamicsMonitor(track_size=1024)
        >>> held = MemorisationScorer(samples, module, ["net.layer3"])
        >>> masking = FilterMasking(held, select=Selection("taylor", amount=0.125), start_epoch=10)
    """

    score_names = VARIANTS

    def __init__(self, monitor: SampleDynamicsMonitor, model: torch.nn.Module, layers: str | Sequence[str], *,
                 variant: str = "taylor", max_suspects: int = 512, fitted_only: bool = True, seed: int = 0,
                 batch_size: int = 256):
        if not isinstance(monitor, SampleDynamicsMonitor):
            raise TypeError(f"Expected `monitor` to be a SampleDynamicsMonitor but got {type(monitor).__name__}.")
        if variant not in VARIANTS:
            raise ValueError(f"Expected `variant` to be one of {list(VARIANTS)} but got {variant!r}.")
        layers = [layers] if isinstance(layers, str) else list(layers)
        for layer in layers:
            get_layer(model, layer)
        self.monitor, self.model, self.layers = monitor, model, layers
        if not isinstance(fitted_only, bool):
            raise TypeError(f"Expected `fitted_only` to be a bool but got {type(fitted_only).__name__}.")
        self.variant, self.max_suspects, self.seed, self.batch_size = variant, max_suspects, seed, batch_size
        self.fitted_only = fitted_only

    def filter_scores(self, score: str | None = None) -> FilterScores:
        variant = score or self.variant
        samples = self.monitor.flagged_samples(self.max_suspects, self.seed, fitted=self.fitted_only)
        if samples is None:
            return FilterScores({}, {}, scorer=f"memorisation/{variant}",
                                higher_is="more memorisation", settings={"suspects": 0})
        x, y, suspects = samples
        return memorisation_scores(self.model, self.layers, x, y, suspects, variant=variant, seed=self.seed,
                                   batch_size=self.batch_size, epoch=self.monitor.latest.epoch)
