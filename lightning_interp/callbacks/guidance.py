"""``AttentionGuidance``: add CAM/attention losses to a LightningModule's training loss, no edits needed."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from ..batch import Batch
from ..cam import cam_iou, grad_cam
from ..layers import eager, eval_mode, get_layer, public_name
from ..losses import DEPRECATED_LOSSES, LOSSES, MASK_LOSSES, canonical_weights, guidance_terms
from .base import InterpCallback

__all__ = ["AttentionGuidance"]

#: How to give foreground masks, quoted by every message about missing masks.
HOW_TO_GIVE_MASKS = (
    "Give foreground masks in the batches: `(x, y, mask)` tuples, dicts with a 'mask' entry, or any layout with "
    "`batch_adapter=` returning lightning_interp.batch.Batch(x, y, mask) (mask: B x 1 x H x W, True = foreground); "
    "your `training_step` receives the batch unchanged, so unpack the third element there too"
)


class AttentionGuidance(InterpCallback):
    """Add attention losses to the module's training loss by wrapping its ``training_step``.

    At ``setup`` the module's ``training_step`` is wrapped: the wrapper calls the original, then
    adds ``Σ weights[name] · term`` computed on the same batch (Grad-CAM of ``layer`` with
    ``create_graph=True``), logs each term as ``interp/guidance/<name>``, and returns the
    output with the loss replaced. ``teardown`` restores the original method.

    Terms (see :mod:`lightning_interp.losses`; key ``k`` is the function ``k_loss``): ``attention_mining``
    (GAIN), ``attention_supervision`` (GAIN with pixel masks), ``rrr`` (Right for the Right Reasons,
    background = outside the mask), ``cam_background`` (every class's signed evidence map of ``layer``
    kept off the background; the recommended mask term) and ``cam_background_share`` (its share of
    all the evidence, weaker). Mask terms need batches with foreground masks. The old key
    ``cam_background_raw`` still works for one release (a ``FutureWarning``); it is ``cam_background`` now.

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
        unknown = [n for n in weights if n not in LOSSES and n not in DEPRECATED_LOSSES]
        if unknown:
            raise ValueError(f"Expected loss names in {list(LOSSES)} but got {unknown}.")
        weights = canonical_weights(weights)
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
            raise ValueError(
                f"Expected batches with foreground masks for {'/'.join(MASK_LOSSES)} but got none. {HOW_TO_GIVE_MASKS}."
            )
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
    def check_dry_run(self, pl_module: pl.LightningModule, probe: Batch, outputs: dict) -> None:
        """Before the first step: a spatial map at ``layer``, masks and labels where the terms need them,
        and one dry run of the terms' double backward on two probe samples."""
        shape = outputs[self.layer]
        x = probe.x[:2].to(pl_module.device)
        if len(shape) != 4 or shape[2] * shape[3] < 2:
            candidates = _spatial_layers(pl_module, x)
            raise ValueError(
                f"Expected `layer` {self.layer!r} to output a spatial map (B, K, H, W) with H x W >= 2 but it outputs "
                f"{tuple(shape)} for inputs {tuple(x.shape)}: a 1x1 (or flat) map makes the CAM constant, so every "
                f"attention term and the CAM IoU would be 0. Choose an earlier layer, e.g. "
                f"{', '.join(repr(n) for n in candidates[-4:])}, or use larger inputs."
            )
        needs_mask = [n for n in self.weights if n in MASK_LOSSES]
        if needs_mask and probe.mask is None:
            raise ValueError(f"Expected training batches with foreground masks for {needs_mask} but found none. "
                             f"{HOW_TO_GIVE_MASKS}.")
        if probe.y is None and any(n in self.weights for n in ("attention_mining", "attention_supervision")):
            raise ValueError("Expected labelled training batches for the CAM terms but found no labels; pass "
                             "`batch_adapter=` if your batches hold them in another place.")
        sample = Batch(x, None if probe.y is None else probe.y[:2].to(pl_module.device),
                       None if probe.mask is None else probe.mask[:2].to(pl_module.device))
        try:  # in eval mode: the dry run must not move BatchNorm running statistics
            with eval_mode(pl_module), torch.enable_grad(), eager():
                terms = guidance_terms(pl_module, self.layer, sample, self.weights, sigma=self.sigma, omega=self.omega)
                params = [p for p in pl_module.parameters() if p.requires_grad]
                total = sum(terms.values())
                if isinstance(total, torch.Tensor) and total.requires_grad and params:
                    torch.autograd.grad(total, params, allow_unused=True)
        except RuntimeError as err:
            raise ValueError(_double_backward_message(pl_module, self.layer, self.weights, err)) from err

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
        with eval_mode(pl_module):
            cam = grad_cam(pl_module, self.layer, probe.x, probe.y)
        return {f"{self.log_prefix}/guidance/cam_iou": cam_iou(cam, probe.mask).item()}



def _spatial_layers(model: torch.nn.Module, x: torch.Tensor) -> list[str]:
    """Module paths (forward order) whose single output is a ``B x K x H x W`` map with H x W >= 2."""
    shapes: dict[str, list] = {}
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_hook(
                lambda m, a, out, name=name: shapes.setdefault(name, []).append(
                    out.shape if isinstance(out, torch.Tensor) else None)))
    try:
        with eval_mode(model), torch.no_grad(), eager():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [public_name(n) for n, s in shapes.items()
            if len(s) == 1 and s[0] is not None and len(s[0]) == 4 and s[0][2] * s[0][3] >= 2]


def _double_backward_message(model: torch.nn.Module, layer: str, weights: Mapping[str, float], err: Exception) -> str:
    """Explain a failed double backward: which module type lacks a second derivative, and what to do."""
    text = str(err)
    found = re.search(r"derivative for (?:aten::)?(\w+) is not implemented", text)
    if not found:
        return (f"AttentionGuidance: a dry run of its loss terms on two probe samples failed before training: "
                f"{type(err).__name__}: {text}")
    op = found.group(1)
    stem = re.sub(r"(_backward)+$", "", op).replace("_", "").lower()
    names = [n for n, m in model.named_modules() if n and stem and stem in type(m).__name__.lower()]
    kinds = sorted({type(get_layer(model, n)).__name__ for n in names}) or [op]
    if "rrr" in weights:
        where = ("the `rrr` term differentiates twice through the whole network: drop it, or replace those "
                 "modules with twice-differentiable ones (e.g. nn.Sigmoid / nn.SiLU)")
    else:
        where = (f"the CAM terms differentiate twice through every module after `layer` ({layer!r}): choose a layer "
                 f"after the last of them ({public_name(names[-1]) if names else op}), or replace them with "
                 "twice-differentiable modules (e.g. nn.Hardsigmoid -> nn.Sigmoid)")
    return (f"AttentionGuidance cannot train through {'/'.join(kinds)} modules "
            f"({', '.join(repr(public_name(n)) for n in names[:4])}{', ...' if len(names) > 4 else ''}): PyTorch has no "
            f"second derivative for {op}, which the attention terms need; {where}.")
