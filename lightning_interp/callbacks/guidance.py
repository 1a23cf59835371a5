"""``AttentionGuidance``: add CAM/attention losses to a LightningModule's training loss, no edits needed."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ..batch import Batch
from ..cam import cam_iou, grad_cam
from ..layers import eager
from ..losses import LOSSES, guidance_terms
from .base import InterpCallback

__all__ = ["AttentionGuidance"]

MASK_LOSSES = ("attention_supervision", "rrr", "cam_background", "cam_background_raw")


class AttentionGuidance(InterpCallback):
    """Add attention losses to the module's training loss by wrapping its ``training_step``.

    At ``setup`` the module's ``training_step`` is wrapped: the wrapper calls the original, then
    adds ``Σ weights[name] · term`` computed on the same batch (Grad-CAM of ``layer`` with
    ``create_graph=True``), logs each term as ``interp/guidance/<name>``, and returns the
    output with the loss replaced. ``teardown`` restores the original method.

    Terms (see :mod:`lightning_interp.losses`): ``attention_mining`` (GAIN), ``attention_supervision``
    (GAIN with pixel masks), ``rrr`` (Right for the Right Reasons, background = outside the
    mask) and ``cam_background``/``cam_background_raw`` (every class's signed evidence map of
    ``layer`` kept off the background). Mask terms need batches with foreground masks.

    Works with automatic optimisation, gradient accumulation (Lightning scales the returned loss)
    and mixed precision (the terms run under the same autocast as the step). Not supported, refused
    at setup: manual optimisation (``automatic_optimization = False``) — add the terms yourself
    with :func:`lightning_interp.losses.guidance_terms`; a ``training_step`` that returns None.

    Every ``every_n_epochs`` epochs it logs the CAM/mask IoU on the probe (``interp/guidance/cam_iou``).
    """

    def __init__(
        self,
        layer: str,
        weights: Mapping[str, float],
        *,
        sigma: float = 10.0,
        omega: float = 0.5,
        probe_size: int = 64,
        every_n_epochs: int = 1,
        **kwargs,
    ):
        super().__init__([layer], probe_size=probe_size, every_n_epochs=every_n_epochs, **kwargs)
        if not isinstance(weights, Mapping) or not weights:
            raise ValueError(f"Expected `weights` to map loss names {list(LOSSES)} to weights but got {weights!r}.")
        unknown = [n for n in weights if n not in LOSSES]
        if unknown:
            raise ValueError(f"Expected loss names in {list(LOSSES)} but got {unknown}.")
        negative = {n: w for n, w in weights.items() if not float(w) >= 0}
        if negative:
            raise ValueError(f"Expected non-negative loss weights but got {negative}.")
        self.layer = layer
        self.weights = {n: float(w) for n, w in weights.items()}
        self.sigma, self.omega = sigma, omega
        self._original = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self._original is not None:
            return
        if not pl_module.automatic_optimization:
            raise ValueError(
                "AttentionGuidance supports automatic optimisation only; with manual optimisation add "
                "`lightning_interp.losses.guidance_terms(...)` to your loss in training_step."
            )
        original = pl_module.training_step
        callback = self

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any):
            out = original(*args, **kwargs)
            batch = args[0] if args else kwargs["batch"]
            return callback._add_terms(pl_module, batch, out)

        self._original = original
        pl_module.training_step = training_step

    def _add_terms(self, pl_module: pl.LightningModule, raw_batch: Any, out: Any) -> Any:
        if out is None:
            raise ValueError("AttentionGuidance needs training_step to return a loss (or a dict with 'loss').")
        batch = self.batch_adapter(raw_batch)
        if batch.mask is None and any(n in self.weights for n in MASK_LOSSES):
            raise ValueError(f"Expected batches with foreground masks for {'/'.join(MASK_LOSSES)} but got none.")
        with eager():  # double backward (RRR) and hooks (CAM) through a compiled forward: run it eagerly
            terms = guidance_terms(pl_module, self.layer, batch, self.weights, sigma=self.sigma, omega=self.omega)
        extra = sum(self.weights[n] * t for n, t in terms.items())
        for name, term in terms.items():
            pl_module.log(f"{self.log_prefix}/guidance/{name}", term.detach(), on_step=True, on_epoch=True,
                          batch_size=len(batch))
        if isinstance(out, torch.Tensor):
            return out + extra
        if isinstance(out, Mapping) and "loss" in out:
            return {**out, "loss": out["loss"] + extra}
        raise ValueError(f"Expected training_step to return a tensor or a dict with 'loss' but got {type(out).__name__}.")

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._original is not None:
            # The wrapper is an instance attribute; deleting it uncovers the class's method again.
            if "training_step" in vars(pl_module):
                del pl_module.training_step
            self._original = None

    @override
    def scan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, probe: Batch) -> dict[str, float]:
        if probe.mask is None or probe.y is None:
            return {}
        was_training = pl_module.training
        pl_module.eval()
        try:
            cam = grad_cam(pl_module, self.layer, probe.x, probe.y)
        finally:
            pl_module.train(was_training)
        return {f"{self.log_prefix}/guidance/cam_iou": cam_iou(cam, probe.mask).item()}

