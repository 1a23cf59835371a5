"""``FilterMasking``: remove chosen filters from a given epoch on, in training and/or evaluation."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from ..layers import get_layer
from ..masking import FilterMask
from ..scores import ScoreSource, Selection, check_source, resolve_if_ready, resolve_scores
from .base import guarded, rank_zero_decides, warn_missing_keys

__all__ = ["FilterMasking"]

#: When :class:`FilterMasking` masks (``when=``).
WHEN = ("train_and_eval", "eval_only")


def _is_compiled(pl_module: pl.LightningModule) -> bool:
    """``torch.compile`` applied to a submodule, or to the LightningModule passed to ``trainer.fit``."""
    compiled = getattr(torch._dynamo, "OptimizedModule", ())
    if getattr(pl_module, "_compiler_ctx", None) is not None:
        return True
    return any(isinstance(m, compiled) for m in pl_module.modules())


def alarm_keys(callbacks: Sequence[Callback]) -> list[str]:
    """The overfitting-alarm keys the monitors among ``callbacks`` log (their ``alarm_key``, when they have one)."""
    return [key for key in (getattr(cb, "alarm_key", None) for cb in callbacks) if isinstance(key, str)]


class FilterMasking(Callback):
    """Mask filters (channel outputs × 0, :class:`~lightning_interp.masking.FilterMask`) from ``start_epoch``,
    or from the epoch after an overfitting alarm (``start_on``).

    The filters are the flags of a filter-score ``source`` (:func:`~lightning_interp.scores.resolve_scores`):

    * a monitor (``AnomalyFilterMonitor``, ``TIPMonitor``, ``FeatureQuantityMonitor``) — its latest
      scan, re-read at the start of every epoch (put the monitor before this callback);
    * a :class:`~lightning_interp.scores.FilterScores`, the path of a saved scores file or anomaly
      report, or ``{layer: [filter, ...]}`` (module paths of the LightningModule).

    ``select`` (a :class:`~lightning_interp.scores.Selection`) picks the score of a multi-score
    source and flags the ``amount`` highest or lowest filters of each layer instead of the source's
    own flags: ``FilterMasking(tip, select=Selection("sou", amount=0.1, lowest=True))``.
    ``filters=``, ``report=`` and ``monitor=`` name the same sources by kind (``filters={...}``).

    ``when="train_and_eval"`` masks during training steps and evaluation; ``"eval_only"`` masks
    only during validation/test.

    ``start_on`` (a logged metric key, e.g. ``"interp/samples/overfit_alarm"`` of
    ``SampleDynamicsMonitor(alarm="val_loss")``) holds the masks off until the key is first > 0 at the end
    of an epoch (read at validation end and at training-epoch end); masking starts the next epoch (and not
    before ``start_epoch``). The epoch the key fired is :attr:`alarm_epoch`, decided on rank zero and kept in
    checkpoints, so a resumed run masks from the same epoch: a key logged at validation (the sample-dynamics
    ``"val_loss"`` alarm) is in every checkpoint written after that validation; a key logged at training-epoch
    end (the anomaly monitor's alarm) in those written at training-epoch end (``ModelCheckpoint``'s default
    when validation runs once an epoch). An alarm key of a monitor that is not in the
    Trainer (or has no ``alarm``) is refused at train start, before the first step, with the keys that are; any other key the module
    never logs is named in a warning after the first epoch. The masks in force are logged as ``interp/masking/num_masked``
    (``interp/masking/<name>/num_masked`` with ``name=``: give each of several ``FilterMasking`` with the same
    ``when``, ``start_epoch`` and ``start_on`` its own ``name``, which also tells their checkpoint states apart),
    recorded in :attr:`history`, saved in checkpoints, and decided on rank zero and broadcast, so
    they are identical on every process. Unknown layers, indices out of range and a ``select`` that
    the source cannot serve are refused at ``setup``, before the first step.
    """

    def __init__(
        self,
        source: ScoreSource | None = None,
        *,
        select: Selection | None = None,
        filters: Mapping[str, Sequence[int]] | None = None,
        report: str | None = None,
        monitor: Any = None,
        start_epoch: int = 0,
        start_on: str | None = None,
        when: str = "train_and_eval",
        name: str | None = None,
        mode: str | None = None,
    ):
        sources = [s for s in (source, filters, report, monitor) if s is not None]
        if len(sources) != 1:
            raise ValueError("Expected exactly one filter source: `source`, `filters`, `report` or `monitor`.")
        if mode is not None:  # the name before `when` (``mode`` means exact/sketch everywhere else)
            warnings.warn("FilterMasking(mode=...) is deprecated; use `when=`.", FutureWarning, stacklevel=2)
            when = mode
        if when not in WHEN:
            raise ValueError(f"Expected `when` to be one of {list(WHEN)} but got {when!r}.")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"Expected `start_epoch` to be a non-negative int but got {start_epoch!r}.")
        if start_on is not None and (not isinstance(start_on, str) or not start_on):
            raise ValueError(f"Expected `start_on` to be a logged metric key (a non-empty str) or None but got {start_on!r}.")
        if name is not None and (not isinstance(name, str) or not name.strip("/") or "/" in name.strip("/")):
            raise ValueError(f"Expected `name` to be a non-empty str without '/' (e.g. 'live') or None but got {name!r}.")
        self.source = sources[0]
        self.select = select
        self.name = None if name is None else name.strip("/")
        check_source(self.source, select, owner="FilterMasking")
        self.start_epoch = start_epoch
        self.start_on = start_on
        #: the epoch at whose end ``start_on`` was first > 0 (masking starts the epoch after); None before.
        self.alarm_epoch: int | None = None
        self.when = when
        self.in_force: dict[str, list[int]] = {}
        self.history: list[dict[str, Any]] = []
        self._mask: FilterMask | None = None
        self._first_epoch = 0

    @property
    @override
    def state_key(self) -> str:
        fields: dict[str, Any] = {"mode": self.when, "start_epoch": self.start_epoch}
        if self.start_on is not None:  # without these, the key of checkpoints written before they existed
            fields["start_on"] = self.start_on
        if self.name is not None:
            fields["name"] = self.name
        return self._generate_state_key(**fields)

    @property
    def key(self) -> str:
        """The logged key of the number of masked filters: ``interp/masking/num_masked``, with ``name``
        ``interp/masking/<name>/num_masked``."""
        return "interp/masking/num_masked" if self.name is None else f"interp/masking/{self.name}/num_masked"

    def started(self, epoch: int) -> bool:
        """Whether masks are in force at ``epoch`` (``start_epoch`` reached and, with ``start_on``, the alarm fired before)."""
        if epoch < self.start_epoch:
            return False
        return self.start_on is None or (self.alarm_epoch is not None and epoch > self.alarm_epoch)

    def _wanted(self) -> dict[str, list[int]]:
        return resolve_scores(self.source, self.select).flags()

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        same_key = [cb for cb in getattr(trainer, "callbacks", None) or [] if isinstance(cb, FilterMasking) and cb.key == self.key]
        if len(same_key) > 1 and same_key[0] is self:  # once per trainer
            rank_zero_warn(f"{len(same_key)} FilterMasking callbacks log {self.key!r}: the logged value mixes them. "
                           "Give each its own `name=` (e.g. FilterMasking(..., name='live')) to log them apart.")
        # A report written later in the run, or a callable, is checked when the masks are applied.
        scores = resolve_if_ready(self.source, self.select)
        wanted = scores.flags() if scores is not None else {}
        for layer in wanted:
            get_layer(pl_module, layer)
        FilterMask(pl_module, wanted)  # validates indices before the first step
        if _is_compiled(pl_module) and torch._dynamo.config.skip_nnmodule_hook_guards:
            # Dynamo skips forward hooks added after compilation unless it guards on them: the
            # masks would silently not apply to the compiled training steps. Guarding costs one
            # recompilation whenever the masks change. Restored at teardown.
            self._saved_hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
            torch._dynamo.config.skip_nnmodule_hook_guards = False
            rank_zero_info("FilterMasking: compiled model; set torch._dynamo.config.skip_nnmodule_hook_guards "
                           "= False so that the masks apply to compiled code (it recompiles when they change).")

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After every callback's setup (a monitor's alarm key can depend on its peers), before the first step.
        if self.start_on is not None and self.start_on.endswith("overfit_alarm"):
            valid = alarm_keys(trainer.callbacks)
            if self.start_on not in valid:
                raise ValueError(
                    f"Expected `start_on` to be an alarm key a monitor in the Trainer logs, one of {valid}, but got "
                    f"{self.start_on!r} (a SampleDynamicsMonitor logs its key only with `alarm=`, e.g. alarm='val_loss').")
        self._first_epoch = trainer.current_epoch  # a resumed fit has logged nothing yet at its first epoch start

    def _alarm_monitor(self, trainer: pl.Trainer) -> Any:
        """The monitor whose alarm key ``start_on`` is (None for any other key)."""
        return next((cb for cb in trainer.callbacks if cb is not self and getattr(cb, "alarm_key", None) == self.start_on),
                    None)

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        self._remove()
        if not self.started(epoch):
            return
        # Decided on rank zero and broadcast (every rank calls this hook): identical masks everywhere. A
        # source that cannot answer now (e.g. `fg_` scores of a probe without masks) masks nothing and
        # warns; it never loses the run.
        wanted = guarded("FilterMasking", False, f"masks nothing at epoch {epoch}",
                         lambda: rank_zero_decides(trainer, lambda: {k: v for k, v in self._wanted().items() if v}))
        self.in_force = wanted or {}
        if self.in_force:
            self._mask = FilterMask(pl_module, self.in_force).apply()

    def remove_masks(self) -> None:
        """Take the masks off now (training is over; they go back on at the next epoch start, if any)."""
        self._remove()

    def _remove(self) -> None:
        if self._mask is not None:
            self._mask.remove()
            self._mask = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self.start_on is not None and epoch > self._first_epoch and self._alarm_monitor(trainer) is None:
            warn_missing_keys(trainer, {"start_on": self.start_on}, self)  # a whole epoch later the module has logged
        self._watch(trainer, read_metrics=False)  # a monitor's alarm decided after this callback's epoch-end hook
        self._apply(trainer, pl_module, epoch)
        if self.when == "eval_only":
            self._remove()
        count = sum(len(v) for v in self.in_force.values()) if self.started(epoch) else 0
        entry = {"epoch": epoch, "num_masked": count, "filters": dict(self.in_force) if count else {}}
        self.history = [h for h in self.history if h["epoch"] != epoch] + [entry]
        if count and trainer.is_global_zero:
            rank_zero_info(f"FilterMasking: epoch {epoch}, masking {count} filters ({self.when}): {self.in_force}")

    def _watch(self, trainer: pl.Trainer, read_metrics: bool) -> None:
        """Record the epoch at whose end ``start_on`` first fired. A monitor's alarm key: the monitor's own
        ``alarm_epoch`` (decided on rank zero, identical on every rank, whatever the callbacks' order). Any other
        key: the logged value, rank zero's reading broadcast — only where every rank runs the hook
        (``read_metrics``: training-epoch end, or validation end with one process)."""
        if self.start_on is None or self.alarm_epoch is not None or trainer.sanity_checking:
            return
        monitor = self._alarm_monitor(trainer)
        if monitor is not None:
            self.alarm_epoch = monitor.alarm_epoch
        elif read_metrics:
            def read() -> int | None:
                value = trainer.callback_metrics.get(self.start_on)
                return trainer.current_epoch if value is not None and float(value) > 0 else None

            self.alarm_epoch = rank_zero_decides(trainer, read)
        if self.alarm_epoch is not None:
            rank_zero_info(f"FilterMasking: {self.start_on} fired at epoch {self.alarm_epoch}; masking from epoch "
                           f"{max(self.alarm_epoch + 1, self.start_epoch)} on.")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._watch(trainer, read_metrics=True)
        count = self.history[-1]["num_masked"] if self.history else 0
        pl_module.log(self.key, float(count), on_step=False, on_epoch=True)

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "eval_only":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.when == "eval_only":
            self._remove()

    @override
    def on_validation_start(self, trainer, pl_module):
        self._eval_start(trainer, pl_module)

    @override
    def on_validation_end(self, trainer, pl_module):
        self._eval_end(trainer, pl_module)
        # Before ModelCheckpoint saves (checkpoint callbacks run last); under DDP a rank without validation
        # batches skips this hook, so a logged key is read (a broadcast) only with one process.
        self._watch(trainer, read_metrics=trainer.world_size == 1)

    @override
    def on_test_start(self, trainer, pl_module):
        self._eval_start(trainer, pl_module)

    @override
    def on_test_end(self, trainer, pl_module):
        self._eval_end(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training is over: fit-end work (the exact anomaly rescan, pruning) sees the network unmasked.
        self._remove()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Training is over: fit-end work (pruning copies the network, hooks included) sees it unmasked.
        self._remove()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove()
        saved = getattr(self, "_saved_hook_guards", None)
        if saved is not None:  # the global dynamo setting changed at setup goes back as it was
            torch._dynamo.config.skip_nnmodule_hook_guards = saved
            self._saved_hook_guards = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove()

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"in_force": dict(self.in_force), "history": list(self.history), "alarm_epoch": self.alarm_epoch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.in_force = dict(state_dict.get("in_force", {}))
        self.history = list(state_dict.get("history", []))
        self.alarm_epoch = state_dict.get("alarm_epoch")
