"""``FilterMasking``: remove chosen filters from a given epoch on, in training and/or evaluation."""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..layers import get_layer
from ..masking import FilterMask
from ..report import read_anomaly_report
from .anomaly import AnomalyFilterMonitor
from .base import rank_zero_decides

__all__ = ["FilterMasking"]

MODES = ("train_and_eval", "eval_only")


def _check_filters(filters: Any) -> dict[str, list[int]]:
    """``{layer: [filter, ...]}`` with int indices (a list, tuple, set or 1-D integer tensor per layer)."""
    expected = "Expected `filters` to map layer names to lists of filter indices, e.g. {'model.conv2': [3, 7]}"
    if not isinstance(filters, Mapping):
        raise TypeError(f"{expected}, but got {type(filters).__name__}.")
    out = {}
    for layer, idx in filters.items():
        if isinstance(idx, torch.Tensor):
            if idx.dim() > 1 or idx.is_floating_point() or idx.is_complex():
                raise TypeError(f"{expected}, but got a {idx.dtype} tensor of shape {tuple(idx.shape)} for {layer!r}.")
            idx = idx.flatten().tolist()
        if not isinstance(layer, str) or isinstance(idx, (str, bytes)) or not isinstance(idx, (Sequence, set)) or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in idx
        ):
            raise TypeError(f"{expected}, but got {layer!r}: {idx!r}.")
        out[layer] = sorted({int(i) for i in idx})
    return out


def _is_compiled(pl_module: pl.LightningModule) -> bool:
    """``torch.compile`` applied to a submodule, or to the LightningModule passed to ``trainer.fit``."""
    compiled = getattr(torch._dynamo, "OptimizedModule", ())
    if getattr(pl_module, "_compiler_ctx", None) is not None:
        return True
    return any(isinstance(m, compiled) for m in pl_module.modules())


class FilterMasking(Callback):
    """Mask filters (channel outputs × 0, :class:`~lightning_interp.masking.FilterMask`) from ``start_epoch``.

    The filters come from exactly one source:

    * ``filters``: ``{layer: [filter, ...]}`` (module paths of the LightningModule);
    * ``report``: the path of an anomaly report (:mod:`lightning_interp.report`);
    * ``monitor``: a running :class:`AnomalyFilterMonitor` — its latest flags, re-read at the
      start of every epoch (put the monitor before this callback).

    ``mode="train_and_eval"`` masks during training steps and evaluation; ``"eval_only"`` masks
    only during validation/test. The masks in force are logged as ``interp/masking/num_masked``,
    recorded in :attr:`history`, saved in checkpoints, and decided on rank zero and broadcast, so
    they are identical on every process.
    """

    def __init__(
        self,
        *,
        filters: Mapping[str, Sequence[int]] | None = None,
        report: str | None = None,
        monitor: AnomalyFilterMonitor | None = None,
        start_epoch: int = 0,
        mode: str = "train_and_eval",
    ):
        sources = [s for s in (filters, report, monitor) if s is not None]
        if len(sources) != 1:
            raise ValueError("Expected exactly one of `filters`, `report` or `monitor`.")
        if mode not in MODES:
            raise ValueError(f"Expected `mode` to be one of {list(MODES)} but got {mode!r}.")
        if not isinstance(start_epoch, int) or start_epoch < 0:
            raise ValueError(f"Expected `start_epoch` to be a non-negative int but got {start_epoch!r}.")
        if monitor is not None and not isinstance(monitor, AnomalyFilterMonitor):
            raise TypeError(f"Expected `monitor` to be an AnomalyFilterMonitor but got {type(monitor).__name__}.")
        self.filters = _check_filters(filters) if filters is not None else None
        self.report = report
        self.monitor = monitor
        self.start_epoch = start_epoch
        self.mode = mode
        self.in_force: dict[str, list[int]] = {}
        self.history: list[dict[str, Any]] = []
        self._mask: FilterMask | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(mode=self.mode, start_epoch=self.start_epoch)

    def _wanted(self) -> dict[str, list[int]]:
        if self.filters is not None:
            return self.filters
        if self.report is not None:
            return read_anomaly_report(self.report)
        return {layer: sorted(d["filter"] for d in items) for layer, items in self.monitor.flagged.items() if items}

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        wanted = self._wanted()
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

    def _apply(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch: int) -> None:
        self._remove()
        if epoch < self.start_epoch:
            return
        # Decided on rank zero and broadcast (every rank calls this hook): identical masks everywhere.
        self.in_force = rank_zero_decides(trainer, lambda: {k: v for k, v in self._wanted().items() if v})
        if self.in_force:
            self._mask = FilterMask(pl_module, self.in_force).apply()

    def _remove(self) -> None:
        if self._mask is not None:
            self._mask.remove()
            self._mask = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        self._apply(trainer, pl_module, epoch)
        if self.mode == "eval_only":
            self._remove()
        count = sum(len(v) for v in self.in_force.values()) if epoch >= self.start_epoch else 0
        entry = {"epoch": epoch, "num_masked": count, "filters": dict(self.in_force) if count else {}}
        self.history = [h for h in self.history if h["epoch"] != epoch] + [entry]
        if count and trainer.is_global_zero:
            rank_zero_info(f"FilterMasking: epoch {epoch}, masking {count} filters ({self.mode}): {self.in_force}")

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        count = self.history[-1]["num_masked"] if self.history else 0
        pl_module.log("interp/masking/num_masked", float(count), on_step=False, on_epoch=True)

    def _eval_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "eval_only":
            self._apply(trainer, pl_module, trainer.current_epoch)

    def _eval_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.mode == "eval_only":
            self._remove()

    @override
    def on_validation_start(self, trainer, pl_module):
        self._eval_start(trainer, pl_module)

    @override
    def on_validation_end(self, trainer, pl_module):
        self._eval_end(trainer, pl_module)

    @override
    def on_test_start(self, trainer, pl_module):
        self._eval_start(trainer, pl_module)

    @override
    def on_test_end(self, trainer, pl_module):
        self._eval_end(trainer, pl_module)

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
        return {"in_force": dict(self.in_force), "history": list(self.history)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.in_force = dict(state_dict.get("in_force", {}))
        self.history = list(state_dict.get("history", []))
