"""The base class every lightning_interp callback builds on.

It owns what all monitors share: the watched ``layers`` (checked at ``setup``, before the first
step), the fixed, seeded ``probe`` (selected from the train or val data, or given), batch
adapters, the cadence (``every_n_epochs``), logging (scalars through ``pl_module.log`` so
``EarlyStopping``/``ModelCheckpoint`` can monitor them, images to W&B/TensorBoard or to PNG
files, rank zero only), fault isolation (a failing scan warns and training goes on unless
``strict=True``) and the history kept in ``state_dict``. A subclass implements :meth:`scan`.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data.dataloader import default_collate
from typing_extensions import override

from ..batch import Batch, BatchAdapter, default_batch_adapter
from ..budget import (
    check_max_overhead,
    overhead_for_one_scan,
    pilot_estimate,
    pilot_fits_budget,
    pilot_size,
    scan_fits_budget,
)
from ..layers import eager, get_layer, list_layers, public_name, trace_layers
from ..nns import check_finite, check_inputs
from ..progress import trainer_shows_progress
from ..viz import line_plot

__all__ = [
    "InterpCallback", "check_finite", "check_probe", "class_names", "dry_forward", "guarded", "log_root", "nearest_layers",
    "rank_zero_decides",
    "select_probe", "warn_missing_keys",
]

ProbeSource = Dataset | DataLoader | Batch | tuple | None


def _first_loader(loaders: Any) -> Any:
    """The first dataloader of what ``trainer.train_dataloader`` returns (a loader, list or dict)."""
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)) and loaders and not isinstance(loaders[0], torch.Tensor):
        return loaders[0]
    return loaders


def select_probe(
    source: Dataset | DataLoader,
    probe_size: int,
    seed: int = 0,
    batch_adapter: BatchAdapter = default_batch_adapter,
    indices: Sequence[int] | None = None,
) -> tuple[Batch, list[int] | None]:
    """Pick a fixed, seeded probe of ``probe_size`` samples from a dataset or dataloader.

    Map-style datasets give a seeded random subset (identical on every process), or exactly the
    given ``indices`` (a resumed run reuses the probe its checkpoint recorded, whatever the seed
    logic); iterable ones give their first ``probe_size`` samples. Items are collated with the
    loader's ``collate_fn``.

    Returns:
        ``(probe, indices)`` — the probe on the CPU and the dataset indices (None when iterable).
    """
    loader = source if isinstance(source, DataLoader) else None
    dataset = loader.dataset if loader is not None else source
    collate = loader.collate_fn if loader is not None and loader.collate_fn is not None else default_collate
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        n = len(dataset)
        if n == 0:
            raise ValueError("Expected the probe data to hold samples but the dataset is empty.")
        if probe_size > n:
            raise ValueError(
                f"Expected `probe_size` <= the dataset size ({n}) but got {probe_size}; lower `probe_size`."
            )
        if indices is not None and len(indices) == probe_size and all(0 <= int(i) < n for i in indices):
            indices = sorted(int(i) for i in indices)
        else:
            g = torch.Generator().manual_seed(seed)
            indices = sorted(torch.randperm(n, generator=g)[:probe_size].tolist())
        batch = batch_adapter(collate([dataset[i] for i in indices]))
    else:
        if loader is None:
            loader = DataLoader(dataset, batch_size=probe_size)
        parts: list[Batch] = []
        count = 0
        for raw in loader:
            b = batch_adapter(raw)
            parts.append(b)
            count += len(b)
            if count >= probe_size:
                break
        if count == 0:
            raise ValueError("Expected the probe data to hold samples but the dataloader yielded none.")
        if count < probe_size:
            raise ValueError(
                f"Expected `probe_size` <= the number of samples the dataloader yields ({count}) but got {probe_size}."
            )
        batch = _concat(parts, probe_size)
        indices = None
    check_inputs(batch.x, "probe inputs")
    return batch, indices


def _concat(parts: list[Batch], n: int) -> Batch:
    def cat(items):
        return None if any(t is None for t in items) else torch.cat(items)[:n]

    return Batch(cat([p.x for p in parts]), cat([p.y for p in parts]), cat([p.mask for p in parts]))


def check_probe(probe: Batch) -> Batch:
    """Validate a probe before the first step: floating inputs ``B x ...``, ``B`` labels, and a boolean
    foreground mask ``B x 1|C x H x W`` matching the inputs."""
    check_inputs(probe.x, "probe inputs")
    x, y, mask = probe.x, probe.y, probe.mask
    if y is not None and (not isinstance(y, torch.Tensor) or y.shape[:1] != x.shape[:1]):
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"Expected probe labels of shape ({x.shape[0]},) but got {got}.")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise TypeError(f"Expected the probe's foreground `mask` to be a boolean tensor (foreground = True) but got {got}.")
        if mask.dim() != x.dim() or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:] or (
            mask.shape[1] not in (1, x.shape[1])
        ):
            raise ValueError(
                f"Expected the probe's foreground `mask` of shape (B, 1 or C, H, W) matching the inputs "
                f"{tuple(x.shape)} but got {tuple(mask.shape)}."
            )
    return probe


def rank_zero_decides(trainer: pl.Trainer, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on every rank and return rank zero's result on all of them (house rule 6).

    Flags, masks, probes and the scalars a monitor keeps are decided once, on rank zero, and
    broadcast with ``trainer.strategy.broadcast``, so every rank agrees even when ranks see different
    data. The broadcast is a collective: call this on **every** rank, never inside rank-zero-only
    code. ``fn`` runs inside ``try`` so that no rank skips the broadcast: a rank whose own ``fn``
    failed adopts rank zero's result, and when rank zero's ``fn`` failed every rank raises (rank
    zero its own exception, the others a ``RuntimeError`` naming it) instead of waiting forever.
    """
    try:
        result, error = fn(), None
    except Exception as err:
        result, error = None, err
    if trainer.world_size > 1:
        message = None if error is None or not trainer.is_global_zero else f"{type(error).__name__}: {error}"
        result, message = trainer.strategy.broadcast((result, message), src=0)
        if message is None:
            error = None  # rank zero's result wins over a failure of this rank
        elif not trainer.is_global_zero:
            error = RuntimeError(f"rank 0 failed: {message}")
    if error is not None:
        raise error
    return result


def guarded(owner: str, strict: bool, failure: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; on an exception warn ``"<owner> <failure>: <error>"`` and return None, or re-raise
    when ``strict``. Every monitor hook that could otherwise lose the user's run goes through here.
    Compiled code runs eagerly inside (:func:`lightning_interp.layers.eager`): analyses hook the model."""
    try:
        with eager():
            return fn()
    except Exception as err:  # a monitor must never lose the user's run
        if strict:
            raise
        rank_zero_warn(f"{owner} {failure}: {type(err).__name__}: {err}.")
        return None


def _copied(value: Any) -> Any:
    """A deep copy of ``value``, or a shallow one where it holds what cannot be deep-copied (a tensor inside
    an autograd graph)."""
    try:
        return copy.deepcopy(value)
    except Exception:
        return copy.copy(value)


def log_root(trainer: pl.Trainer) -> str:
    """The run's log directory (collective under DDP: call it on every rank)."""
    return trainer.log_dir or trainer.default_root_dir


def warn_missing_keys(trainer: pl.Trainer, keys: dict[str, str], owner: Any) -> list[str]:
    """Warn, once per ``owner``, about metric keys a callback reads that the module never logged.

    Call it after a real validation epoch (it does nothing while Lightning sanity-checks): the keys
    in ``keys`` (``{argument: key}``, e.g. ``{"val_acc_key": "val/acc"}``) that are missing from
    ``trainer.callback_metrics`` are named with the argument that sets them, the closest logged
    key and every key that was logged, so a module logging ``val_acc`` sees at once that
    ``val_acc_key="val_acc"`` is the fix.

    Args:
        owner: the callback (or a name); the warning names ``type(owner).__name__`` for objects.

    Returns:
        the arguments whose keys are missing (empty when all are there or when already checked).
    """
    if trainer.sanity_checking or getattr(owner, "_checked_metric_keys", False):
        return []
    # The module's own keys; the monitors' (interp/...) too when a key read is one of theirs.
    ours = any(key.startswith("interp/") for key in keys.values())
    logged = sorted(k for k in trainer.callback_metrics if ours or not k.startswith("interp/"))
    missing = {arg: key for arg, key in keys.items() if key not in trainer.callback_metrics}
    try:
        owner._checked_metric_keys = True
    except AttributeError:  # a str owner: no memory of having warned
        pass
    if not missing:
        return []
    name = owner if isinstance(owner, str) else type(owner).__name__
    fixes = []
    for arg, key in missing.items():
        close = difflib.get_close_matches(key, logged, n=1, cutoff=0.3)
        fixes.append(f"`{arg}={key!r}`" + (f" (did you mean `{arg}={close[0]!r}`?)" if close else ""))
    rank_zero_warn(
        f"{name} reads metrics the module did not log: {', '.join(fixes)}. Logged after validation: "
        f"{logged}. Pass the key your `validation_step` logs with `self.log(...)`; until then the values that "
        "depend on it (best-validation epoch, alarms) stay empty."
    )
    return list(missing)


def dry_forward(model: torch.nn.Module, x: torch.Tensor, layers: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """One forward of ``x`` in eval mode without gradients, recording what ``layers`` output
    (:func:`lightning_interp.layers.trace_layers`).

    Returns:
        ``(output, layer_outputs)``: the model's output and, per layer, the shape of its tensor output
        (a ``torch.Size``) when a scan can read it, ``None`` when the layer was not called, else why not
        in words (the type name of a non-tensor output, ``"called N times"``, channels last).
    """
    output, traced = trace_layers(model, x, layers)
    return output, {layer: t.shape if t.scannable else None if t.calls == 0 else t.describe()
                    for layer, t in traced.items()}


def nearest_layers(layer: str, valid: Sequence[str], n: int = 6) -> list[str]:
    """Up to ``n`` of ``valid`` nearest ``layer`` in the module tree (longest shared path first, then in
    their order): what a refusal suggests instead of ``layer``."""
    parts = public_name(layer).split(".")

    def shared(name: str) -> int:
        common = 0
        for a, b in zip(parts, name.split(".")):
            if a != b:
                break
            common += 1
        return common

    ranked = sorted(enumerate(valid), key=lambda iv: (-shared(iv[1]), iv[0]))
    return [name for _, name in ranked if name != public_name(layer)][:n]


def class_names(trainer: pl.Trainer | None) -> Callable[[int], str]:
    """``class index -> name`` for captions: the datamodule's ``classes`` (or ``class_names``), else the
    ``classes`` of the dataset behind the train or val dataloader (torchvision's datasets have them; a
    ``Subset``'s dataset is looked through), else the index itself."""
    classes = None
    dm = getattr(trainer, "datamodule", None) if trainer is not None else None
    for source in (dm, *_loader_datasets(trainer)):
        while source is not None and classes is None:
            classes = getattr(source, "classes", None) or getattr(source, "class_names", None)
            source = getattr(source, "dataset", None)
        if classes is not None:
            break
    if classes is not None and not isinstance(classes, (list, tuple)):
        classes = list(classes) if not isinstance(classes, (str, dict)) else None

    def name(c: int) -> str:
        return str(classes[c]) if classes is not None and 0 <= c < len(classes) else str(c)

    return name


def _loader_datasets(trainer: pl.Trainer | None) -> list[Any]:
    if trainer is None:
        return []
    out = []
    for attr in ("train_dataloader", "val_dataloaders"):
        try:
            loader = _first_loader(getattr(trainer, attr, None))
        except Exception:  # a trainer without a fit loop
            loader = None
        if loader is not None:
            out.append(getattr(loader, "dataset", None))
    return out


def eval_dataloader(trainer: pl.Trainer) -> Any:
    """The validation dataloader for post-fit analyses: the datamodule's, else the first one given to
    ``trainer.fit`` (None when there is none)."""
    if trainer.datamodule is not None and hasattr(trainer.datamodule, "val_dataloader"):
        try:
            return trainer.datamodule.val_dataloader()
        except Exception:  # a datamodule without validation data
            pass
    return _first_loader(trainer.val_dataloaders)


def send_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Scalars to every logger at the current step, outside ``pl_module.log`` (fit end; call on rank zero)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def send_image(trainer: pl.Trainer, key: str, image: np.ndarray, caption: str = "") -> bool:
    """Send one ``H x W x 3`` uint8 picture to every W&B/TensorBoard logger; False when none takes images."""
    shown = False
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[image], caption=[caption], step=trainer.global_step)
            shown = True
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, image, global_step=trainer.global_step, dataformats="HWC")
            shown = True
    return shown


class InterpCallback(Callback):
    """Base class of the monitors: probe, cadence, layers, logging, fault isolation, state.

    Args:
        layers: module paths of ``pl_module`` to watch (``lightning_interp.layers.list_layers``).
        probe_size: samples in the fixed probe.
        probe_split: ``"train"`` or ``"val"``: where the probe is drawn from when ``probe`` is None.
        probe: explicit probe data (a Dataset, a DataLoader, a :class:`Batch` or an ``(x, y[, mask])``
            tuple); overrides ``probe_split``.
        every_n_epochs: scan after every n-th training epoch.
        seed: seed of the probe selection.
        batch_adapter: callable turning a collated batch into a :class:`Batch`.
        strict: re-raise exceptions from a scan instead of warning (never loses the run by default).
        max_overhead: a time budget instead of a cadence: the fraction of the training time the scans (of every
            monitor with a budget in the trainer) may add, e.g. ``0.1``. Scans are skipped while one more would
            exceed it, from the measured scan and training times (:mod:`lightning_interp.budget`); before the
            first scan its cost is estimated by a pilot scan of 1/8 of the probe (nothing logged, its seconds
            counted as spent). When no scan fits, train end warns with the ``max_overhead`` that would allow one.
            None (default): scan every ``every_n_epochs`` epochs, no pilot.
        log_prefix: prefix of every key this instance logs. When None: ``"interp"``, or, when the
            trainer holds several callbacks of this class, ``"interp/<layers>"`` (decided at setup), so
            two instances never log the same keys nor write the same files.
    """

    #: Prefix of every scalar this callback logs (``interp/<what>/<layer>/<name>``).
    log_prefix = "interp"
    #: The ``<what>`` of the keys this class logs (``interp/<what>/...``), e.g. ``"anomaly"``; None: unchecked.
    key_group: str | None = None
    #: File name of the report the class writes under the log dir (None: it writes none); an instance writes
    #: ``report_path`` when given, else ``<log dir>/<report_name>`` (:meth:`resolve_report_path`).
    report_name: str | None = None
    #: What the monitor skips when the probe has no foreground masks (None: it needs none); warned once
    #: (:meth:`warn_no_mask`) and said in the HTML report (:meth:`report_notes`).
    skipped_without_masks: str | None = None
    #: The monitor draws learning images as pictures and needs image inputs ``B x C x H x W``.
    needs_image_inputs = True
    #: The monitor computes losses or accuracies from ``pl_module(x)``, which must return logits.
    needs_logits = True
    #: True while a pilot scan runs (:meth:`run_pilot`): the logging methods do nothing.
    _piloting = False

    def __init__(
        self,
        layers: str | Sequence[str],
        *,
        probe_size: int = 64,
        probe_split: str = "train",
        probe: ProbeSource = None,
        every_n_epochs: int = 1,
        seed: int = 0,
        batch_adapter: BatchAdapter | None = None,
        strict: bool = False,
        log_prefix: str | None = None,
        max_overhead: float | None = None,
    ):
        super().__init__()
        layers = [layers] if isinstance(layers, str) else list(layers)
        if not layers or not all(isinstance(n, str) and n for n in layers):
            raise ValueError(f"Expected `layers` to be one or more module paths but got {layers!r}.")
        if len(set(layers)) != len(layers):
            raise ValueError(f"Expected `layers` without duplicates but got {layers!r}.")
        if not isinstance(probe_size, int) or probe_size < 1:
            raise ValueError(f"Expected `probe_size` to be a positive int but got {probe_size!r}.")
        if probe_split not in ("train", "val"):
            raise ValueError(f"Expected `probe_split` to be one of ['train', 'val'] but got {probe_split!r}.")
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"Expected `every_n_epochs` to be a positive int but got {every_n_epochs!r}.")
        if batch_adapter is not None and not callable(batch_adapter):
            raise TypeError(f"Expected `batch_adapter` to be callable but got {type(batch_adapter).__name__}.")
        self.layers = layers
        self.probe_size = probe_size
        self.probe_split = probe_split
        self.probe_source = probe
        self.every_n_epochs = every_n_epochs
        self.max_overhead = check_max_overhead(max_overhead)
        self.seed = seed
        if log_prefix is not None and (not isinstance(log_prefix, str) or not log_prefix.strip("/")):
            raise ValueError(f"Expected `log_prefix` to be a non-empty str or None but got {log_prefix!r}.")
        self.batch_adapter = batch_adapter or default_batch_adapter
        self.strict = strict
        self._explicit_prefix = log_prefix is not None
        if log_prefix is not None:
            self.log_prefix = log_prefix.strip("/")
        self.report_path: str | None = None
        self.log_root: str | None = None
        #: Whether the monitor has warned that the probe has no foreground masks (run progress, in the state).
        self.warned_no_mask = False
        self._fit_started: float | None = None
        self.probe: Batch | None = None
        self.probe_indices: list[int] | None = None
        self.history: list[dict[str, float]] = []
        #: Epochs whose scan failed and was skipped (a warning said why); wall seconds of each scan.
        self.skipped_scans: list[int] = []
        self.scan_seconds: list[float] = []
        #: With ``max_overhead``: the pilot's wall seconds this fit and its estimate of one scan (None before it).
        self.pilot_seconds: float | None = None
        self.scan_estimate: float | None = None
        self._piloting = False
        #: The latest picture logged under each key: ``{key: (H x W x 3 uint8, caption, epoch)}``
        #: (rank zero; what :class:`~lightning_interp.callbacks.InterpReport` puts in the HTML report).
        self.figures: dict[str, tuple[np.ndarray, str, int]] = {}

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(**self.state_key_fields())

    def state_key_fields(self) -> dict[str, Any]:
        """What identifies this instance among callbacks of its class (subclasses add settings): its layers,
        and its ``log_prefix`` when one was given (so two monitors of one layer can coexist; without one the
        key stays what earlier releases wrote, and their checkpoints still resume)."""
        fields: dict[str, Any] = {"layers": tuple(self.layers)}
        if self._explicit_prefix:
            fields["log_prefix"] = self.log_prefix
        return fields

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning restores a callback's state only under its exact state key and skips it silently
        # otherwise: say so when the checkpoint holds this class's state under another key (a setting
        # that names the state differs, e.g. a `mode` whose default changed), so the history does not
        # start over unnoticed.
        saved = checkpoint.get("callbacks", {}) if isinstance(checkpoint, dict) else {}
        if self.state_key in saved:
            return
        prefix = f"{type(self).__qualname__}{{"
        others = [k for k in saved if isinstance(k, str) and k.startswith(prefix)]
        if others:
            rank_zero_warn(
                f"{type(self).__name__}: the checkpoint holds this monitor's state under {others} but this "
                f"instance's key is {self.state_key!r}; its history, flags and probe start over. To continue "
                f"them, pass the settings the checkpoint was written with (e.g. `mode=` — AnomalyFilterMonitor's "
                f"default changed from 'exact' to 'pooled', TIPMonitor's to 'sketch')."
            )

    # ---- configuration, before the first step ---------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # `trainer.log_dir` broadcasts under DDP: resolve it here, where every rank calls it,
        # never later inside rank-zero-only code (that would deadlock).
        self.log_root = log_root(trainer)
        for layer in self.layers:
            get_layer(pl_module, layer)
        self.check_layers(pl_module)
        self._separate_from_peers(trainer)

    def _own_prefix(self, peers: Sequence[InterpCallback]) -> str:
        """The log prefix this instance uses among ``peers`` (instances of its class in one trainer):
        explicit, else the class's, suffixed by its layers when it has peers without a prefix of their own — and by the rest of its
        ``state_key_fields`` (e.g. ``mode``) when a peer watches the same layers."""
        if self._explicit_prefix:
            return self.log_prefix
        base = type(self).log_prefix
        # Peers with a prefix of their own leave the class's prefix free: `log_prefix="second"` on one of two
        # monitors keeps the other on the plain keys (`interp/anomaly/...`).
        others = [cb for cb in peers if cb is not self and not (cb._explicit_prefix and cb.log_prefix != base)]
        if not others:
            return base
        tag = "+".join(public_name(layer) for layer in self.layers)
        if any(list(cb.layers) == list(self.layers) for cb in others):
            extra = [str(v) for k, v in self.state_key_fields().items() if k not in ("layers", "log_prefix")]
            tag = "+".join([tag, *extra])
        return f"{base}/{tag}"

    def _separate_from_peers(self, trainer: pl.Trainer) -> None:
        """Several instances of this class in one trainer: give each its own log prefix (and report file), or
        refuse naming the fix when two would still log the same keys."""
        peers = [cb for cb in trainer.callbacks if type(cb) is type(self)]
        if len(peers) < 2:
            return
        mine = self._own_prefix(peers)
        twins = [cb for cb in peers if cb is not self and cb._own_prefix(peers) == mine]
        if twins:
            raise ValueError(
                f"Expected the {len(peers)} {type(self).__name__} callbacks to log under different prefixes but two "
                f"would log {mine!r} (layers {self.layers}); pass `log_prefix=` to one of them, e.g. "
                f"`{type(self).__name__}(..., log_prefix='interp/{type(self).__name__.lower()}2')`."
            )
        self.log_prefix = mine
        self._check_monitored_keys(trainer, peers)
        if self.report_name is not None and self.report_path is None:
            base, ext = os.path.splitext(self.resolve_report_path(trainer))
            self.report_path = f"{base}_{re.sub(r'[^A-Za-z0-9_.+-]+', '_', mine)}{ext}"
        paths = [cb.report_path for cb in peers]
        if self.report_path is not None and paths.count(self.report_path) > 1:
            raise ValueError(
                f"Expected the {type(self).__name__} callbacks to write different reports but two write "
                f"{self.report_path!r}; give each its own `report_path=` (or leave it None for one per instance)."
            )

    def _check_monitored_keys(self, trainer: pl.Trainer, peers: Sequence[InterpCallback]) -> None:
        """Refuse, at setup, an ``EarlyStopping``/``ModelCheckpoint`` that monitors this class's single-instance
        key (``interp/anomaly/overfit_alarm``) when several instances log under their own prefixes: no callback
        would log it and the run would stop at its first check. The message names the keys to use."""
        group = type(self).key_group
        if group is None:
            return
        prefixes = {cb._own_prefix(peers): cb for cb in peers}
        base = f"{type(self).log_prefix}/{group}/"
        for other in trainer.callbacks:
            key = getattr(other, "monitor", None)
            if not isinstance(key, str) or not key.startswith(base) or type(self).log_prefix in prefixes:
                continue
            rest = key[len(type(self).log_prefix):]
            keys = " or ".join(f"{prefix + rest!r} (layers {cb.layers})" for prefix, cb in prefixes.items())
            raise ValueError(
                f"Expected {type(other).__name__}(monitor={key!r}) to monitor a key a callback logs, but with "
                f"{len(peers)} {type(self).__name__} callbacks each logs under its own prefix. Pass monitor={keys}, "
                f"or give the one that should decide `log_prefix={type(self).log_prefix!r}`."
            )

    def check_layers(self, pl_module: pl.LightningModule) -> None:
        """Subclass hook: refuse layers the monitor cannot use (raise ``ValueError``)."""

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None:
            # Decided on rank zero: a val split or an iterable dataset may differ between ranks.
            self.probe, self.probe_indices = rank_zero_decides(trainer, lambda: self._build_probe(trainer))
        # An explicit `probe=` sets the size: reports and settings state what was scanned.
        self.probe_size = len(self.probe)
        self.check_layer_outputs(pl_module, self.probe)
        self.scan_seconds = []
        self.pilot_seconds = self.scan_estimate = None
        self._fit_started = time.perf_counter()

    def check_layer_outputs(self, pl_module: pl.LightningModule, probe: Batch) -> None:
        """Refuse, before the first step, what the scans could not use, from one forward of two probe
        samples (:func:`dry_forward`): inputs that are not images (``needs_image_inputs``), a model that
        does not return logits (``needs_logits``), layers without a single ``B x K x ...`` tensor output."""
        x = probe.x[:2].to(pl_module.device)
        name = type(self).__name__
        if self.needs_image_inputs and x.dim() != 4:
            raise ValueError(
                f"Expected image inputs (B, C, H, W) for {name} but the probe holds inputs of shape "
                f"{tuple(probe.x.shape)}: its learning images are drawn as pictures. For vector inputs call "
                "`lightning_interp.nns.filter_learning_images` / `layer_activations` yourself; if your batches hold "
                "the image elsewhere, pass `batch_adapter=`."
            )
        try:
            output, outputs = dry_forward(pl_module, x, self.layers)
        except Exception as err:
            hint = (
                f"{name}: a forward pass of two probe samples (inputs {tuple(x.shape)}) failed before training: "
                f"{type(err).__name__}: {err}. If the batches are not `(x, y[, mask])` or dicts with "
                "'image'/'input', pass `batch_adapter=` (a callable returning lightning_interp.batch.Batch)."
            )
            if self.strict:
                err.add_note(hint)
                raise
            # A probe the model rejects costs this monitor its scans, never the user's run (house rule 3).
            rank_zero_warn(f"{hint} Its scans will be skipped; training goes on (`strict=True` raises).")
            return
        if self.needs_logits and not isinstance(output, torch.Tensor):
            what = f"a dict with keys {sorted(map(str, output))}" if isinstance(output, dict) else type(output).__name__
            raise ValueError(
                f"Expected {type(pl_module).__name__}.forward to return logits (a Tensor of shape (B, classes)) for "
                f"{name}, which computes losses and accuracies from `pl_module(x)`, but got {what}. Return the logits "
                "from `forward` (build dicts in `training_step`), or give the monitors a module whose forward does, "
                "e.g. a LightningModule subclass with `def forward(self, x): return super().forward(x)['logits']`."
            )
        bad = {layer: out for layer, out in outputs.items()
               if not (isinstance(out, torch.Size) and len(out) >= 2)}
        if bad:
            try:
                valid = list_layers(pl_module, x)
            except Exception:
                valid = list_layers(pl_module)
            got = ", ".join(
                f"{layer!r}: {'never called' if out is None else out if isinstance(out, str) else 'shape ' + str(tuple(out))}"
                for layer, out in bad.items()
            )
            near = nearest_layers(next(iter(bad)), list(valid), 12)
            raise ValueError(
                f"Expected `layers` to output one (B, K, ...) tensor per forward pass with the K filters on dim 1 "
                f"but {list(bad)} do not ({got}). "
                f"Layers that do, nearest first: {', '.join(repr(n) for n in near)}"
                f"{', ...' if len(valid) > len(near) else ''}; `lightning_interp.layers.list_layers(model, "
                "example_inputs)` lists them all."
            )
        self.check_dry_run(pl_module, probe, outputs)

    def check_dry_run(self, pl_module: pl.LightningModule, probe: Batch, outputs: dict[str, torch.Size]) -> None:
        """Subclass hook after the dry forward: refuse what this monitor cannot use (``outputs``: layer shapes)."""

    def metric_keys(self) -> dict[str, str]:
        """Subclass hook: the ``trainer.callback_metrics`` keys the monitor reads, ``{argument: key}`` (e.g.
        ``{"val_acc_key": "val/acc"}``); after the first validation a missing one is warned about by name."""
        return {}

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        keys = self.metric_keys()
        if keys:
            warn_missing_keys(trainer, keys, self)

    def resolve_report_path(self, trainer: pl.Trainer) -> str | None:
        """Where this instance writes its report: ``report_path``, else ``<log dir>/<report_name>``; None when
        the class writes none."""
        if self.report_path is not None or self.report_name is None:
            return self.report_path
        return os.path.join(self.log_root or trainer.default_root_dir, self.report_name)

    def warn_no_mask(self) -> None:
        """Warn, once per run, that the probe has no foreground masks and what is skipped for it."""
        if not self.warned_no_mask:
            rank_zero_warn(f"{type(self).__name__}: the probe has no foreground masks; skipped: "
                           f"{self.skipped_without_masks}.")
            self.warned_no_mask = True

    def report_notes(self) -> list[str]:
        """Why the monitor has less to show, as sentences for the HTML report (empty when nothing was skipped)."""
        if not self.warned_no_mask or self.skipped_without_masks is None:
            return []
        return [f"Skipped because the probe has no foreground masks: {self.skipped_without_masks}. Give masks as `(x, y, mask)` batches, dicts with a 'mask' entry, or with `batch_adapter=` "
                "(docs/guide/own_module.md)."]

    def _build_probe(self, trainer: pl.Trainer) -> tuple[Batch, list[int] | None]:
        probe, indices = self._select_probe(trainer)
        return check_probe(probe), indices

    def _select_probe(self, trainer: pl.Trainer) -> tuple[Batch, list[int] | None]:
        src = self.probe_source
        if isinstance(src, Batch):
            return src, None
        if isinstance(src, tuple) and src and isinstance(src[0], torch.Tensor):
            return self.batch_adapter(src), None
        if src is None:
            if self.probe_split == "train":
                src = _first_loader(trainer.train_dataloader)
            else:
                src = _first_loader(trainer.val_dataloaders)
                if src is None and trainer.datamodule is not None:
                    src = trainer.datamodule.val_dataloader()
            if src is None:
                raise ValueError(
                    f"Expected a {self.probe_split} dataloader to draw the probe from but the trainer has none; "
                    "pass `probe=` or use `probe_split='train'`."
                )
        if not isinstance(src, (Dataset, DataLoader)):
            raise TypeError(
                "Expected `probe` to be a Dataset, a DataLoader, a Batch or an (x, y[, mask]) tuple but got "
                f"{type(src).__name__}."
            )
        # `probe_indices` is set when resuming: the checkpoint's probe, sample for sample.
        return select_probe(src, self.probe_size, self.seed, self.batch_adapter, indices=self.probe_indices)

    # ---- cadence and fault isolation -------------------------------------------------------
    def should_scan(self, trainer: pl.Trainer) -> bool:
        """Scan at this epoch end: every ``every_n_epochs`` epochs, and, with ``max_overhead``, when one more scan
        fits the time budget (decided on rank zero: the ranks' clocks differ, their scans must not)."""
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return False
        return self.max_overhead is None or rank_zero_decides(trainer, lambda: self.within_budget(trainer))

    def within_budget(self, trainer: pl.Trainer) -> bool:
        """Whether one more scan, costed as this monitor's last (before the first: by the pilot, run here at the
        first call), keeps every budgeted monitor's scans within ``max_overhead`` of the training time so far
        (:func:`~lightning_interp.budget.scan_fits_budget`)."""
        if not self.scan_seconds and self.pilot_seconds is None:
            spent, train = self.budget_seconds(trainer)
            pilots = [cb.pilot_seconds for cb in self.budget_peers(trainer) if cb.pilot_seconds is not None]
            if not pilot_fits_budget(train, spent, max(pilots, default=None), self.max_overhead):
                return False  # no room for a pilot costed as the costliest of the other monitors': pilot later
            self.run_pilot(trainer, trainer.lightning_module)
        spent, train = self.budget_seconds(trainer)
        return scan_fits_budget(train, spent, self.next_scan_seconds(), self.max_overhead)

    def next_scan_seconds(self) -> float | None:
        """What the next scan is costed at: the last one measured, else the pilot's estimate (None: neither)."""
        return self.scan_seconds[-1] if self.scan_seconds else self.scan_estimate

    def pilot_size(self) -> int:
        """Probe samples the pilot scans (:func:`~lightning_interp.budget.pilot_size`); a subclass whose scan
        needs more samples raises it."""
        return pilot_size(len(self.probe))

    def run_pilot(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Time the real :meth:`scan` on the first :meth:`pilot_size` probe samples and set ``scan_estimate``,
        extrapolated linearly to the whole probe (:func:`~lightning_interp.budget.pilot_estimate`). Nothing is
        logged and everything the scan could change is put back (:meth:`_restored`): the monitor's attributes
        (history, flags, pictures: all ``state_dict`` holds) and the random generators, so the pilot changes
        neither the monitor nor the user's training. Its seconds count as spent (``pilot_seconds``). A failing
        pilot warns (``strict=True`` raises) and leaves the cost unknown: the first scan then runs, to measure."""
        probe = self.probe
        m = self.pilot_size()
        piece = Batch(probe.x[:m], *(None if t is None else t[:m] for t in (probe.y, probe.mask, probe.index)))
        start = time.perf_counter()
        with self._restored():
            done = guarded(type(self).__name__, self.strict,
                           f"could not estimate a scan's cost (its pilot scan of {m} probe samples failed; the first "
                           "scan runs unbudgeted, to measure)",
                           lambda: self.scan(trainer, pl_module, piece.to(pl_module.device)) is not None)
        self.pilot_seconds = time.perf_counter() - start
        if done:
            self.scan_estimate = pilot_estimate(self.pilot_seconds, m, len(probe))
        if not trainer_shows_progress(trainer) and trainer.is_global_zero:
            rank_zero_info(f"{type(self).__name__} ({', '.join(self.layers)}): pilot scan of {m}/{len(probe)} probe "
                           f"samples in {self.pilot_seconds:.2f} s; one scan estimated at "
                           f"{'?' if self.scan_estimate is None else f'{self.scan_estimate:.1f}'} s")

    @contextlib.contextmanager
    def _restored(self):
        """Run the block with logging off (``log_image``/``log_table``/``log_curve`` do nothing) and put back,
        afterwards, every attribute of this monitor (containers restored in place, their contents as before)
        and the torch, NumPy and ``random`` generators."""
        attrs = dict(vars(self))
        contents = {k: _copied(v) for k, v in attrs.items() if isinstance(v, (list, dict, set))}
        states = random.getstate(), np.random.get_state()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
        self._piloting = True
        try:
            with torch.random.fork_rng(devices=devices):
                yield
        finally:
            warned = getattr(self, "warned_no_mask", False)  # a once-per-run warning the pilot gave stays given
            random.setstate(states[0])
            np.random.set_state(states[1])
            for k in [k for k in vars(self) if k not in attrs]:
                delattr(self, k)
            for k, v in attrs.items():
                setattr(self, k, v)
                if k in contents:
                    v.clear()
                    if isinstance(v, list):
                        v.extend(contents[k])
                    else:
                        v.update(contents[k])
            if warned:
                self.warned_no_mask = True
            self._piloting = False

    def budget_peers(self, trainer: pl.Trainer) -> list[InterpCallback]:
        """The monitors sharing the budget: every one with ``max_overhead`` in the trainer (this one included)."""
        return [cb for cb in trainer.callbacks if isinstance(cb, InterpCallback) and cb.max_overhead is not None]

    def budget_seconds(self, trainer: pl.Trainer) -> tuple[float, float]:
        """``(scans, training)``: wall seconds of this fit's scans and pilots by every monitor with a budget, and
        of the fit so far without them."""
        spent = sum(sum(cb.scan_seconds) + (cb.pilot_seconds or 0.0) for cb in self.budget_peers(trainer))
        started = self._fit_started if self._fit_started is not None else time.perf_counter()
        return spent, time.perf_counter() - started - spent

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_overhead is None or not trainer.is_global_zero:
            return
        spent, train = self.budget_seconds(trainer)
        name = f"{type(self).__name__} ({', '.join(self.layers)})"
        if self.scan_seconds:
            rank_zero_info(
                f"{name}: {len(self.scan_seconds)} scans in {trainer.current_epoch} epochs within max_overhead="
                f"{self.max_overhead:g} (the budgeted monitors' scans and pilots took {spent:.1f} s, "
                f"{spent / max(train, 1e-9):.0%} of the {train:.1f} s of training)"
            )
            return
        one = self.next_scan_seconds()
        if one is None and trainer.current_epoch < self.every_n_epochs:  # never due: the budget did not decide
            rank_zero_info(f"{name}: no scan in this fit, no epoch end was due (every_n_epochs="
                           f"{self.every_n_epochs}, {trainer.current_epoch} epochs)")
            return
        if one is None:
            rank_zero_warn(
                f"{name} made no scan in this fit: the budgeted monitors' pilots and scans ({spent:.1f} s) used up "
                f"max_overhead={self.max_overhead:g} of the {train:.1f} s of training before this monitor could "
                f"estimate its scan. A max_overhead well above {spent / max(train, 1e-9):.2g} would leave it room; "
                f"or drop max_overhead and pass every_n_epochs={max(trainer.current_epoch, 1)} for one scan at the "
                "last epoch."
            )
            return
        needed = overhead_for_one_scan(train, spent, one)
        rank_zero_warn(
            f"{name} made no scan in this fit: one scan is estimated at {one:.1f} s (a pilot of {self.pilot_size()} "
            f"of {len(self.probe)} probe samples took {self.pilot_seconds or 0.0:.2f} s), the training took "
            f"{train:.1f} s and the budgeted monitors spent {spent:.1f} s, so max_overhead={self.max_overhead:g} "
            f"allowed none. max_overhead={math.ceil(needed * 100) / 100:g} would allow one scan at the end of a fit "
            f"this long; or drop max_overhead and pass every_n_epochs={max(trainer.current_epoch, 1)} for one scan "
            f"at the last epoch (about {one:.1f} s)."
        )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe is None or not self.should_scan(trainer):
            return

        def run() -> tuple[dict[str, float], Any]:
            scalars = self.scan(trainer, pl_module, self.probe.to(pl_module.device))
            bad = [k for k, v in scalars.items() if not math.isfinite(float(v))]
            if bad:
                raise FloatingPointError(f"non-finite values (NaN/inf in activations or learning images?) for {bad}")
            return {k: float(v) for k, v in scalars.items()}, self.decisions()

        start = time.perf_counter()
        outcome = guarded(
            type(self).__name__, self.strict,
            f"skipped its scan at epoch {trainer.current_epoch} (training goes on; `strict=True` raises)",
            lambda: rank_zero_decides(trainer, run),
        )
        seconds = time.perf_counter() - start
        self.scan_seconds.append(seconds)
        if outcome is not None:
            scalars, decisions = outcome
            self.adopt_decisions(decisions)
            self.log_scalars(trainer, pl_module, scalars)
        else:
            self.skipped_scans.append(trainer.current_epoch)
        if not trainer_shows_progress(trainer) and trainer.is_global_zero:
            # No progress bar: one line per scan, so a long run is never silent for minutes.
            rank_zero_info(f"{type(self).__name__} ({', '.join(self.layers)}): scan at epoch {trainer.current_epoch} "
                           f"{'done' if outcome is not None else 'skipped'} in {seconds:.1f} s")

    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        """Run the monitor on the probe; log pictures; return the scalars to log and keep."""
        raise NotImplementedError

    def decisions(self) -> Any:
        """What the last scan decided that every rank must share (e.g. flags); picklable. None here."""
        return None

    def adopt_decisions(self, decisions: Any) -> None:
        """Take rank zero's :meth:`decisions` (called on every rank after each scan)."""

    # ---- logging -----------------------------------------------------------------------------
    def log_scalars(self, trainer: pl.Trainer, pl_module: pl.LightningModule, scalars: dict[str, float]) -> None:
        """Log through ``pl_module.log`` (every logger, callback_metrics) and append to the history."""
        if not scalars:
            return
        for name, value in scalars.items():
            pl_module.log(name, float(value), on_step=False, on_epoch=True)
        self.history.append({"epoch": trainer.current_epoch, **{k: float(v) for k, v in scalars.items()}})

    def log_fit_end(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Fit-end results: to every logger (rank zero; ``pl_module.log`` is not allowed there) and the history.

        Compute ``metrics`` inside :func:`rank_zero_decides` (see :meth:`fit_end_analysis`), so that
        every rank records rank zero's values, as for the scans."""
        if trainer.is_global_zero:
            send_metrics(trainer, metrics)
        self.history.append({"epoch": trainer.current_epoch, "fit_end": 1.0, **metrics})

    def fit_end_analysis(self, trainer: pl.Trainer, what: str, fn: Callable[[], dict[str, float] | None]) -> None:
        """Run a fit-end analysis ``fn`` (returns the scalars to log, or None) on every rank, keep rank zero's
        scalars everywhere and log them. Fit-end evaluations may see a different share of the validation
        data on each rank; a failure warns (``strict=True`` raises) and never loses the run, and no rank is
        left waiting in the broadcast (:func:`rank_zero_decides` catches before it broadcasts)."""
        metrics = guarded(type(self).__name__, self.strict, f"skipped {what}",
                          lambda: rank_zero_decides(trainer, fn))
        if metrics:
            self.log_fit_end(trainer, metrics)

    @rank_zero_only
    def log_image(self, trainer: pl.Trainer, key: str, image: np.ndarray, caption: str = "") -> None:
        """One ``H x W x 3`` uint8 picture to W&B/TensorBoard, or a PNG under the log dir for other loggers."""
        if self._piloting:
            return
        self.figures[key] = (image, caption, trainer.current_epoch)
        if not send_image(trainer, key, image, caption):
            self.save_png(trainer, key, image)

    @rank_zero_only
    def log_table(self, trainer: pl.Trainer, key: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A table to W&B (``wandb.Table``), or a CSV file under the log dir for other loggers."""
        if self._piloting:
            return
        shown = False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key=key, columns=columns, data=rows, step=trainer.global_step)
                shown = True
        if not shown:
            import csv

            path = self._artifact_path(trainer, "interp_tables", key, "csv")
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w", newline="") as fh:
                    csv.writer(fh).writerows([columns, *rows])
            except OSError as err:
                rank_zero_warn(f"{type(self).__name__} could not write {path}: {err}. Training goes on.")

    @rank_zero_only
    def log_curve(
        self, trainer: pl.Trainer, key: str, xs: Sequence[float], series: dict[str, Sequence[float]],
        title: str, xlabel: str, ylabel: str,
    ) -> None:
        """Line plot: a W&B line-series plot with ``WandbLogger``, and the same figure as an image."""
        if self._piloting:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                plot = wandb.plot.line_series(
                    xs=list(xs), ys=[list(v) for v in series.values()], keys=list(series), title=title, xname=xlabel
                )
                logger.experiment.log({f"{key}_plot": plot, "trainer/global_step": trainer.global_step})
        self.log_image(trainer, key, line_plot(xs, series, title, xlabel, ylabel), title)

    def eval_dataloader(self, trainer: pl.Trainer) -> Any:
        """The validation dataloader for post-fit analyses (:func:`eval_dataloader`)."""
        return eval_dataloader(trainer)

    def _artifact_path(self, trainer: pl.Trainer, folder: str, key: str, ext: str) -> str:
        root = self.log_root or trainer.default_root_dir
        return os.path.join(root, folder, key.replace("/", "_"), f"epoch={trainer.current_epoch}.{ext}")

    def save_png(self, trainer: pl.Trainer, key: str, image: np.ndarray) -> str | None:
        import matplotlib.image

        path = self._artifact_path(trainer, "interp_images", key, "png")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            matplotlib.image.imsave(path, image)
        except OSError as err:
            rank_zero_warn(f"{type(self).__name__} could not write {path}: {err}. Training goes on.")
            return None
        return path

    # ---- state -------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state = {"history": list(self.history), "probe_indices": self.probe_indices,
                 "skipped_scans": list(self.skipped_scans)}
        if self.skipped_without_masks is not None:
            state["warned_no_mask"] = self.warned_no_mask
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.probe_indices = state_dict.get("probe_indices", self.probe_indices)
        self.skipped_scans = list(state_dict.get("skipped_scans", []))
        self.warned_no_mask = bool(state_dict.get("warned_no_mask", False))
