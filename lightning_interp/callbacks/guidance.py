"""``AttentionGuidance``: add CAM/attention losses to a LightningModule's training loss, no edits needed."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch.nn import functional as F
from typing_extensions import override

from ..batch import Batch
from ..cam import cam_iou, grad_cam
from ..layers import eager, eval_mode, get_layer, is_pass_through, public_name, trace_layers
from ..losses import DEPRECATED_LOSSES, LOSSES, MASK_LOSSES, canonical_weights, guidance_terms
from .base import InterpCallback

__all__ = ["AttentionGuidance", "guidable_layers"]

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

    key_group = "guidance"

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
        """Before the first step: ``layer`` passes every check of :func:`guidable_layers` (a spatial map, no
        module without a second derivative after it, masks that leave the terms something to penalise at its
        resolution), masks and labels where the terms need them, and one dry run of the terms' double
        backward on two probe samples. A refusal suggests only layers that pass every check."""
        x = probe.x[:2].to(pl_module.device)
        needs_mask = [n for n in self.weights if n in MASK_LOSSES]
        if needs_mask and probe.mask is None:
            raise ValueError(f"Expected training batches with foreground masks for {needs_mask} but found none. "
                             f"{HOW_TO_GIVE_MASKS}.")
        if probe.y is None and any(n in self.weights for n in ("attention_mining", "attention_supervision")):
            raise ValueError("Expected labelled training batches for the CAM terms but found no labels; pass "
                             "`batch_adapter=` if your batches hold them in another place.")
        reasons, grids = guidable_layers(pl_module, x, self.weights, probe.mask)
        layer = public_name(self.layer)
        if reasons.get(layer):
            raise ValueError(f"AttentionGuidance cannot guide `layer` {self.layer!r} for inputs {tuple(x.shape)}: "
                             f"{reasons[layer]}. {_alternatives(pl_module, reasons, grids)}")
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
            raise ValueError(f"AttentionGuidance: a dry run of its loss terms on two probe samples failed before "
                             f"training: {type(err).__name__}: {err}") from err

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



#: Terms that differentiate twice through every module after ``layer`` (Grad-CAM with ``create_graph``).
_CAM_TERMS = ("attention_mining", "attention_supervision", "cam_background", "cam_background_share")
#: Terms that penalise the class evidence on the background cells of ``layer``'s grid.
_BACKGROUND_TERMS = ("cam_background", "cam_background_share")


@functools.cache
def _lacks_second_derivative(kind: type) -> bool:
    """Whether an elementwise activation type has no double backward in PyTorch (e.g. ``nn.Hardsigmoid``)."""
    try:
        module = kind()
    except Exception:
        return False
    x = torch.linspace(-4, 4, 9, requires_grad=True)
    try:
        with torch.enable_grad():
            (g,) = torch.autograd.grad(module(x).sum(), x, create_graph=True)
            if g.requires_grad:
                torch.autograd.grad(g.sum(), x, allow_unused=True)
    except Exception as err:
        return "not implemented" in str(err)
    return False


def guidable_layers(
    model: torch.nn.Module, x: torch.Tensor, weights: Mapping[str, float], mask: torch.Tensor | None = None,
) -> tuple[dict[str, str], dict[str, tuple[int, int]]]:
    """Every layer of ``model`` checked for ``AttentionGuidance`` with these ``weights`` on inputs ``x``, from one
    traced forward (:func:`~lightning_interp.layers.trace_layers`).

    A layer passes when (1) it outputs one channels-first spatial map ``B x K x H x W`` with ``H x W >= 2``
    (a 1x1 map makes the CAM constant); (2) for the CAM terms, no module without a second derivative
    (``nn.Hardsigmoid``) runs after it — the terms differentiate twice through every module after the layer; for
    ``rrr``, none runs anywhere (it differentiates twice through the whole network); (3) for ``cam_background``
    and ``cam_background_share``, the foreground ``mask`` (``B x 1 x H x W``, the probe's) leaves at least one
    background cell at the layer's ``H x W`` (a cell is background where it holds no foreground pixel: on a
    coarse grid a centred object covers every cell and the term is 0 at every step); for ``rrr``, the masks
    leave a background pixel.

    Returns:
        ``({layer: why it fails, "" when it passes}, {layer: (H, W)})`` in forward order.
    """
    _, traced = trace_layers(model, x)
    order = sorted(traced, key=lambda n: traced[n].order)
    hard = [n for n in order if traced[n].calls and is_pass_through(get_layer(model, n))
            and _lacks_second_derivative(type(get_layer(model, n)))]
    last_hard = max((traced[n].order for n in hard), default=-1)
    kinds = "/".join(sorted({type(get_layer(model, n)).__name__ for n in hard}))
    cam_terms = any(n in weights for n in _CAM_TERMS)
    background = [n for n in weights if n in _BACKGROUND_TERMS]
    m = None if mask is None else (mask if mask.dim() == 4 else mask[:, None]).float().cpu()
    reasons: dict[str, str] = {}
    grids: dict[str, tuple[int, int]] = {}
    for name in order:
        t = traced[name]
        if not t.scannable or len(t.shape) != 4 or t.shape[2] * t.shape[3] < 2:
            shape = "" if not t.scannable else f" {tuple(t.shape)}"
            why = t.describe() if not t.scannable and t.calls else f"it outputs{shape}"
            if t.calls:
                reasons[name] = (f"{why}, not a spatial map (B, K, H, W) with H x W >= 2: a 1x1 (or flat) map makes the "
                                 "CAM constant, so every attention term and the CAM IoU would be 0")
            continue
        grids[name] = (int(t.shape[2]), int(t.shape[3]))
        if "rrr" in weights and hard:
            reasons[name] = (f"the `rrr` term differentiates twice through the whole network and PyTorch has no "
                             f"second derivative for its {kinds} modules ({_names(hard)})")
        elif cam_terms and t.order < last_hard:
            reasons[name] = (f"the CAM terms differentiate twice through every module after the layer and PyTorch has "
                             f"no second derivative for the {kinds} modules after it ({_names([h for h in hard if traced[h].order > t.order])})")
        elif background and m is not None and not (F.adaptive_max_pool2d(m, grids[name]) == 0).any():
            reasons[name] = (f"at its {grids[name][0]}x{grids[name][1]} grid the probe's foreground masks leave no "
                             f"background cell in any of its {len(m)} samples, so {'/'.join(background)} would be 0 "
                             "at every step")
        elif "rrr" in weights and m is not None and not (m == 0).any():
            reasons[name] = "the probe's foreground masks cover every pixel, so `rrr` (background = outside the mask) would be 0"
        else:
            reasons[name] = ""
    return reasons, grids


def _names(names: list[str]) -> str:
    return ", ".join(repr(public_name(n)) for n in names[-3:]) + (", ..." if len(names) > 3 else "")


def _alternatives(model: torch.nn.Module, reasons: dict[str, str], grids: dict[str, tuple[int, int]]) -> str:
    """The layers that pass every check (the deepest four, with their grids), or what to change when none does."""
    ok = [n for n, why in reasons.items() if not why]
    if ok:
        return ("Layers that pass every check: " + ", ".join(f"{n!r} ({grids[n][0]}x{grids[n][1]})" for n in ok[-4:])
                + (f" (and {len(ok) - 4} earlier ones)" if len(ok) > 4 else "") + ".")
    spatial = [n for n in grids]
    why = sorted({r.split(" (")[0] for n, r in reasons.items() if n in grids and r})
    return (f"No layer of {type(model).__name__} passes every check for these inputs "
            f"({len(spatial)} output a spatial map; they fail because {'; '.join(why) or 'their maps are 1x1'}). "
            "Replace the modules without a second derivative by twice-differentiable ones (e.g. nn.Hardsigmoid -> "
            "nn.Sigmoid), use larger inputs (finer maps), or drop the terms that cannot work here.")
