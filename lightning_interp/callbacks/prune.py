"""``PruneFlaggedFilters``: at fit end, prune the flagged filters of any filter-score source and save the smaller model."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from ..batch import default_batch_adapter
from ..finetune import fine_tune, loader_without
from ..layers import public_name
from ..metrics.aipc import accuracy
from ..pruning import check_prunable, load_pruned, prune_filters, save_pruned
from ..scores import Scorer, ScoreSource, Selection, check_source, resolve_if_ready, resolve_scores
from .base import _first_loader, eval_dataloader, guarded, log_root, send_metrics

__all__ = ["PruneFlaggedFilters", "network_at", "save_pruned", "load_pruned"]  # the file functions live in ..pruning


def network_at(module: torch.nn.Module, model_attr: str) -> torch.nn.Module:
    """The network to prune, ``module.<model_attr>``: the one check the callback and ``lightning-interp prune``
    share.

    Raises:
        ValueError: ``model_attr`` is not an ``nn.Module`` attribute; the message names the module's.
    """
    net = getattr(module, model_attr, None)
    if not isinstance(net, torch.nn.Module):
        choices = [name for name, _ in module.named_children()]
        hint = f"; pass `model_attr={choices[0]!r}`" if len(choices) == 1 else ""
        raise ValueError(
            f"Expected `model_attr={model_attr!r}` (`--model_attr` of `lightning-interp prune`) to name the network "
            f"to prune, an nn.Module attribute of {type(module).__name__}, but `{type(module).__name__}.{model_attr}` "
            f"is {type(net).__name__ if net is not None else 'missing'}. Its nn.Module attributes: {choices}{hint}."
        )
    return net


class PruneFlaggedFilters(Callback):
    """At fit end, prune the flagged filters from the network and save its weights and pruning plan.

    Args:
        source: where the flags come from (:func:`~lightning_interp.scores.resolve_scores`): a
            monitor of the same run (``AnomalyFilterMonitor``, ``TIPMonitor``, ``FeatureQuantityMonitor``;
            its last scan), a :class:`~lightning_interp.scores.FilterScores`, the path of a saved
            scores file or anomaly report, or ``{layer: [filter, ...]}``. ``monitor=`` and ``report=``
            name the same sources by kind.
        select: a :class:`~lightning_interp.scores.Selection` — prune the ``amount`` lowest (or
            highest) filters of each layer by a score instead of the source's own flags:
            ``PruneFlaggedFilters(tip, select=Selection("sou", amount=0.25, lowest=True))``.
        model_attr: attribute of the LightningModule holding the network to prune (``"model"``
            for :class:`~lightning_interp.models.ImageClassifier`); report layers are stripped of
            the ``"<model_attr>."`` prefix.
        out_path: where to save (``<log dir>/pruned.pt`` when None): the pruned network's weights, the
            pruning plan and the summary, no pickle. Load it with
            ``load_pruned(path, MyNet())`` (a fresh copy of the network, or the LightningModule holding it;
            :func:`~lightning_interp.pruning.load_pruned`).
        round_to: leave a multiple of ``round_to`` channels in each cut layer (Torch-Pruning's ``round_to``:
            the lowest-magnitude other filters of the group go too); ``None``: 8 when training on CUDA, 1
            (exactly the flagged filters) on CPU (:func:`~lightning_interp.pruning.default_round_to`).
        evaluate: measure validation accuracy before/after (``interp/prune/val_acc_before``/``_after``) on the
            datamodule's validation loader, else the first one given to ``trainer.fit``.
        finetune_epochs: after pruning, fine-tune the pruned network for this many epochs
            (:func:`~lightning_interp.finetune.fine_tune`, Adam at ``finetune_lr``) on the training
            dataset without the ``finetune_exclude`` samples, on the Trainer's device, before it is saved;
            0 (default) saves it as pruned. ``val_acc_pruned`` is then the accuracy before the fine-tune.
        finetune_exclude: the training samples not to fine-tune on (the flagged, suspect samples): indices
            into the training dataset, a boolean mask over it, or a callable returning either at fit end
            (a monitor's latest flags).

    Logs ``interp/prune/params_before``/``_after``, ``macs_before``/``_after`` and
    ``latency_ms_before``/``_after`` (median of interleaved forwards of two probe samples on the model's
    device, the one it trains on; a warning when the pruned network is not faster). Runs on rank zero only; a failure warns (unless ``strict=True``) and never loses the
    trained model.

    Checked before the first training step: ``model_attr`` names an ``nn.Module`` attribute of the
    LightningModule, and every layer the monitor watches is inside it and can be pruned (a conv,
    linear or norm layer, a block that owns its output channels, or an elementwise activation or
    pooling after one; :func:`~lightning_interp.pruning.prune_target`).
    """

    def __init__(
        self,
        source: ScoreSource | None = None,
        *,
        select: Selection | None = None,
        monitor: Any = None,
        report: str | None = None,
        model_attr: str = "model",
        out_path: str | None = None,
        evaluate: bool = True,
        strict: bool = False,
        round_to: int | None = None,
        finetune_epochs: int = 0,
        finetune_exclude: Any = None,
        finetune_lr: float = 1e-4,
    ):
        sources = [s for s in (source, monitor, report) if s is not None]
        if len(sources) != 1:
            raise ValueError("Expected exactly one filter source: `source`, `monitor` or `report`.")
        self.source = sources[0]
        self.select = select
        check_source(self.source, select, owner="PruneFlaggedFilters")
        # The monitor whose probe gives the example input and whose layers are checked at setup.
        self.monitor = self.source if isinstance(self.source, Scorer) else None
        self.model_attr = model_attr
        self.out_path = out_path
        self.evaluate = evaluate
        self.strict = strict
        if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"Expected `round_to` to be None or an integer >= 1 but got {round_to!r}.")
        self.round_to = round_to
        if not isinstance(finetune_epochs, int) or isinstance(finetune_epochs, bool) or finetune_epochs < 0:
            raise ValueError(f"Expected `finetune_epochs` to be a non-negative int but got {finetune_epochs!r}.")
        self.finetune_epochs = finetune_epochs
        if not (finetune_exclude is None or callable(finetune_exclude) or isinstance(finetune_exclude, torch.Tensor)
                or isinstance(finetune_exclude, (list, tuple, range))):
            raise TypeError("Expected `finetune_exclude` to be indices into the training dataset, a boolean mask over "
                            f"it, a callable returning either, or None but got {type(finetune_exclude).__name__}.")
        self.finetune_exclude = finetune_exclude
        self.finetune_lr = finetune_lr
        self.summary: dict[str, Any] | None = None
        self.saved_to: str | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.log_root = log_root(trainer)  # collective under DDP: every rank resolves it here
        if stage == "fit":
            self.check_targets(pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Traced now that an example batch exists: blocks whose output channels no inner layer owns.
        self.check_targets(pl_module, self._example(trainer, pl_module))

    def network(self, pl_module: pl.LightningModule) -> torch.nn.Module:
        """The network to prune, ``pl_module.<model_attr>`` (:func:`network_at`)."""
        return network_at(pl_module, self.model_attr)

    def _watched_layers(self) -> list[str]:
        if self.monitor is not None:
            return list(getattr(self.monitor, "layers", ()))
        scores = resolve_if_ready(self.source, self.select)  # None: answers later in the run (checked at fit end)
        return scores.layers if scores is not None else []

    def check_targets(self, pl_module: pl.LightningModule, example: torch.Tensor | None = None) -> None:
        """Refuse, before training, a missing network or watched layers that cannot be pruned."""
        net = self.network(pl_module)
        prefix = f"{self.model_attr}."
        layers = [public_name(layer) for layer in self._watched_layers()]
        outside = [layer for layer in layers if not layer.startswith(prefix)]
        if outside:
            raise ValueError(
                f"Expected the layers to prune to be inside `pl_module.{self.model_attr}` (names starting with "
                f"{prefix!r}) but got {outside}; pass the `model_attr=` that holds them."
            )
        try:
            check_prunable(net, [layer[len(prefix):] for layer in layers], example)
        except ValueError as err:
            raise ValueError(f"PruneFlaggedFilters cannot prune the watched layers (names inside "
                             f"`pl_module.{self.model_attr}`): {err}") from err

    def _example(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        probe = getattr(self.monitor, "probe", None)
        if probe is not None:
            return probe.x[:2].to(pl_module.device)
        adapter = getattr(self.monitor, "batch_adapter", None) or default_batch_adapter
        return adapter(next(iter(_first_loader(trainer.train_dataloader)))).x[:2].to(pl_module.device)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        guarded("PruneFlaggedFilters", self.strict, "did not prune (the trained model is untouched)",
                lambda: self._prune(trainer, pl_module))

    def _fine_tune(self, trainer: pl.Trainer, pruned: torch.nn.Module, device: torch.device) -> dict[str, Any]:
        exclude = self.finetune_exclude() if callable(self.finetune_exclude) else self.finetune_exclude
        train = loader_without(_first_loader(trainer.train_dataloader), exclude)
        # Rank zero alone runs this (at fit end): no gradient averaging with ranks that do not take part.
        losses = fine_tune(pruned, train, epochs=self.finetune_epochs, lr=self.finetune_lr, device=device, sync=False)
        return {"finetune_epochs": self.finetune_epochs, "finetune_samples": len(train.dataset),
                "finetune_loss_first": losses[0], "finetune_loss_last": losses[-1]}

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        net = self.network(pl_module)
        scores = resolve_scores(self.source, self.select)
        filters = scores.strip_prefix(f"{self.model_attr}.").flags()
        if not filters:
            rank_zero_info(f"PruneFlaggedFilters: the {scores.scorer} scores flag no filters; nothing to prune.")
            return
        example = self._example(trainer, pl_module)
        pruned, summary = prune_filters(net, filters, example, round_to=self.round_to)
        result = summary.as_dict()
        loader = eval_dataloader(trainer) if self.evaluate else None
        if loader is not None:
            result["val_acc_before"] = accuracy(net, loader)
            result["val_acc_after"] = accuracy(pruned, loader)
        if self.finetune_epochs:
            result.update(self._fine_tune(trainer, pruned, pl_module.device))
            if loader is not None:
                result["val_acc_pruned"] = result["val_acc_after"]
                result["val_acc_after"] = accuracy(pruned, loader)
        out = self.out_path or os.path.join(self.log_root, "pruned.pt")
        self.saved_to = save_pruned(out, pruned, result, model_attr=self.model_attr, scores=scores.to_dict())
        self.summary = result
        metrics = {f"interp/prune/{k}": float(v) for k, v in result.items() if isinstance(v, (int, float))}
        send_metrics(trainer, metrics)
        rank_zero_info(
            f"PruneFlaggedFilters: {sum(len(v) for v in summary.pruned.values())} filters removed"
            + (f" ({sum(len(v) for v in summary.rounded.values())} of them to leave multiples of {summary.round_to} "
               "channels)" if summary.rounded else "")
            + f", parameters {summary.params_before} -> {summary.params_after}; saved {out}"
        )
