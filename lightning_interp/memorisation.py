"""Memorisation filters: the filters that hold the fit of suspect samples (DESIGN §7).

Suspects are training samples whose given label the model fits although it is probably wrong (the
flipped labels a noisy run memorises; in a run, the samples the sample-dynamics monitor flags).
For sample i with given label y_i, logits z_i and the output A_i of a layer (``K x ...``), the
first-order contribution of filter k to the given-label margin
``m_i = z_{i,y_i} − max_{j≠y_i} z_{i,j}`` is

    c_{ik} = Σ_positions A_{ik} · ∂m_i/∂A_{ik}

— the margin lost, to first order, when the filter's output is zeroed (masked, or pruned): exactly
that loss when the network is linear in the layer's output after it (and the runner-up class does
not change). A filter's **memorisation score** compares its contribution on the suspects S with its
contribution on as many *fitted clean* samples C (not suspect, predicted as their given label):

* ``"taylor"``: ``mean_{i∈S} c_ik − mean_{i∈C} c_ik`` — the margin of the suspects it carries
  beyond what it carries for the clean samples;
* ``"taylor_normalised"``: the same divided by ``|mean_{i∈C} c_ik| + 0.1 · mean_k |mean_{i∈C} c_ik|``
  — memorisation per unit of clean fit (a filter the clean samples do not need ranks first);
* ``"loss_taylor"``: the contribution to the loss instead of the margin,
  ``c_ik = −Σ A_ik · ∂ℓ_i/∂A_ik`` (the cross-entropy increase when it is zeroed, to first order),
  then the suspects-minus-clean difference; it weights each sample by how far it is from a perfect
  fit (1 − p_{i,y_i}), so barely fitted suspects count most;
* ``"activation"``: the mean over positions of ``A_ik`` on S minus on C (no gradient: which filters
  fire more on the suspects).

High scores = more memorisation; masking or pruning the top filters of a layer is what the benchmark
(``experiments/memorisation_filters.py``, ``docs/measurements/memorisation_filters.md``) measures.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack

import torch
from torch import nn
from torch.nn import functional as F

from .dynamics import margins
from .layers import capture_output, get_layer
from .nns import check_inputs, scan_mode
from .scores import FilterScores

__all__ = [
    "VARIANTS",
    "TARGETS",
    "filter_contributions",
    "filter_suspects",
    "fitted_clean",
    "memorisation_scores",
    "as_sample_mask",
]

#: The memorisation-score variants (see the module docstring).
VARIANTS = ("taylor", "taylor_normalised", "loss_taylor", "activation")
#: What :func:`filter_contributions` measures per sample and filter.
TARGETS = ("margin", "loss", "activation")
_TARGET_OF = {"taylor": "margin", "taylor_normalised": "margin", "loss_taylor": "loss", "activation": "activation"}
#: Relative floor of the denominator of ``"taylor_normalised"`` (share of the layer's mean |clean contribution|).
NORMALISE_FLOOR = 0.1


def _check_labels(labels: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or labels.is_floating_point() or labels.dtype == torch.bool:
        got = f"a {labels.dtype} tensor of shape {tuple(labels.shape)}" if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise TypeError(f"Expected `labels` to be a 1-D integer tensor (one given label per sample) but got {got}.")
    if labels.shape[0] != n:
        raise ValueError(f"Expected one label per sample ({n}) but got {labels.shape[0]} labels.")
    return labels.long()


def as_sample_mask(samples: torch.Tensor | Sequence[int], n: int, name: str = "suspects") -> torch.Tensor:
    """A boolean mask of length ``n`` from a boolean mask or from indices into the ``n`` samples."""
    if not isinstance(samples, torch.Tensor):
        if isinstance(samples, (str, bytes)) or not isinstance(samples, Sequence):
            raise TypeError(f"Expected `{name}` to be a boolean mask or an index tensor over the samples but got "
                            f"{type(samples).__name__}.")
        samples = torch.as_tensor(list(samples), dtype=torch.long)
    samples = samples.detach().cpu()
    if samples.dtype == torch.bool:
        if samples.shape != (n,):
            raise ValueError(f"Expected `{name}` as a boolean mask of shape ({n},) (one entry per sample) but got "
                             f"shape {tuple(samples.shape)}.")
        return samples.clone()
    if samples.is_floating_point() or samples.is_complex() or samples.dim() > 1:
        raise TypeError(f"Expected `{name}` to be a boolean mask of shape ({n},) or a 1-D tensor of sample indices "
                        f"but got a {samples.dtype} tensor of shape {tuple(samples.shape)}.")
    samples = samples.flatten().long()
    bad = samples[(samples < 0) | (samples >= n)]
    if bad.numel():
        raise ValueError(f"Expected `{name}` indices in [0, {n - 1}] but got {bad.tolist()[:10]}.")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[samples] = True
    return mask


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _logits(model: nn.Module, inputs: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = _model_device(model)
    with scan_mode(model), torch.no_grad():
        return torch.cat([model(inputs[s : s + batch_size].to(device)).float() for s in range(0, len(inputs), batch_size)])


def fitted_clean(
    logits: torch.Tensor, labels: torch.Tensor, suspects: torch.Tensor, num: int | None = None, *, seed: int = 0
) -> torch.Tensor:
    """Indices (sorted) of ``num`` samples drawn (seeded) from those not suspect and predicted as their
    given label; all of them when fewer exist or ``num`` is None.

    Args:
        logits: ``N x C``; labels: ``N``; suspects: boolean ``N``.
    """
    pool = torch.nonzero((~suspects.to(logits.device)) & (logits.argmax(1) == labels.to(logits.device))).flatten().cpu()
    if num is not None and num < len(pool):
        g = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(len(pool), generator=g)[:num]]
    return pool.sort().values


def filter_contributions(
    model: nn.Module,
    layers: Sequence[str],
    inputs: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    target: str = "margin",
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """Per sample and filter, a layer's contribution to each sample's fit (see the module docstring).

    ``target="margin"``: ``Σ_pos A·∂m/∂A`` of the given-label margin; ``"loss"``: ``−Σ_pos A·∂ℓ/∂A`` of
    the sample's cross-entropy; ``"activation"``: the mean of ``A`` over positions.
    One forward and one ``torch.autograd.grad`` per batch for all layers, in eval mode, on the model's
    device; parameter ``.grad`` is untouched, hooks are removed and every module's mode restored.

    Args:
        layers: module paths whose outputs are ``B x K x ...`` (a conv, an activation after it, a linear).
        inputs: ``N x ...``; labels: ``N`` given labels (not needed for ``"activation"``).

    Returns:
        ``{layer: N x K}`` float tensors on the CPU.

    Example:
        >>> c = filter_contributions(model, ["relu3"], x, y)   # {"relu3": N x 64}
    """
    if target not in TARGETS:
        raise ValueError(f"Expected `target` to be one of {list(TARGETS)} but got {target!r}.")
    layers = _check_layers(model, layers)
    check_inputs(inputs, "inputs")
    if target != "activation" or labels is not None:
        labels = _check_labels(labels, inputs.shape[0])
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"Expected `batch_size` to be a positive int but got {batch_size!r}.")
    device = _model_device(model)
    parts: dict[str, list[torch.Tensor]] = {layer: [] for layer in layers}
    with scan_mode(model):
        for s in range(0, inputs.shape[0], batch_size):
            x = inputs[s : s + batch_size].to(device).clone()  # a normal tensor, also for inference-mode inputs
            with ExitStack() as stack:
                stores = {layer: stack.enter_context(capture_output(get_layer(model, layer), layer)) for layer in layers}
                logits = model(x)
            acts = {}
            for layer, store in stores.items():
                a = store["output"]
                if a is None or a.dim() < 2:
                    got = "was not called" if a is None else f"output shape {tuple(a.shape)}"
                    raise ValueError(f"Expected layer {layer!r} to output B x K x ... in the forward pass but it {got}.")
                acts[layer] = a
            if target == "activation":
                for layer, a in acts.items():
                    parts[layer].append(a.detach().flatten(2).mean(2).float().cpu() if a.dim() > 2 else a.detach().float().cpu())
                continue
            y = labels[s : s + batch_size].to(device)
            if target == "margin":
                objective = margins(logits.float(), y).sum()  # samples are independent in eval mode
            else:
                objective = -F.cross_entropy(logits.float(), y, reduction="sum")
            grads = torch.autograd.grad(objective, list(acts.values()), allow_unused=True)
            for (layer, a), g in zip(acts.items(), grads):
                if g is None:
                    raise ValueError(f"The logits do not depend on the output of layer {layer!r}.")
                c = (a.detach() * g).float()
                parts[layer].append((c.flatten(2).sum(2) if c.dim() > 2 else c).cpu())
    return {layer: torch.cat(p) for layer, p in parts.items()}


def _check_layers(model: nn.Module, layers: Sequence[str]) -> list[str]:
    if isinstance(layers, str):
        layers = [layers]
    if not isinstance(layers, Sequence) or not layers or not all(isinstance(layer, str) for layer in layers):
        raise TypeError(f"Expected `layers` to be a non-empty list of module paths but got {layers!r}.")
    for layer in layers:
        get_layer(model, layer)  # raises naming the closest valid layers
    return list(dict.fromkeys(layers))


def memorisation_scores(
    model: nn.Module,
    layers: Sequence[str],
    inputs: torch.Tensor,
    labels: torch.Tensor,
    suspects: torch.Tensor | Sequence[int],
    *,
    variant: str = "taylor",
    clean: torch.Tensor | Sequence[int] | None = None,
    num_clean: int | None = None,
    amount: int | float | None = None,
    seed: int = 0,
    batch_size: int = 256,
    epoch: int | None = None,
) -> FilterScores:
    """Memorisation score of every filter of ``layers`` (module docstring): suspects against fitted clean samples.

    Args:
        model: the network, ``model(inputs) -> N x C`` logits.
        layers: module paths (a conv, the activation after it, a linear); masking/pruning by the result
            names filters the same way (:class:`~lightning_interp.masking.FilterMask`,
            :func:`~lightning_interp.pruning.prune_filters`).
        inputs: ``N x ...`` samples; labels: their ``N`` given labels (flipped ones included).
        suspects: which of the N samples are suspects: a boolean mask ``N`` or indices.
        variant: one of :data:`VARIANTS`.
        clean: the clean reference samples (mask or indices) instead of the default: ``num_clean``
            samples drawn (``seed``) from those neither suspect nor misfitted
            (:func:`fitted_clean`; ``num_clean=None``: as many as there are suspects).
        amount: flag this many (int) or this fraction (float) of each layer's highest scores
            (:meth:`FilterScores.select`); None flags none (consumers select with a ``Selection``).
        batch_size: samples per forward/backward.

    Returns:
        :class:`~lightning_interp.scores.FilterScores` with ``scorer="memorisation/<variant>"``, one
        score per filter (``K``) of each layer; ``settings`` hold the counts of suspects and clean samples.

    Raises:
        ValueError: unknown variant or layer, no suspects, no clean samples, suspects that are also clean.

    Example:
        >>> s = memorisation_scores(net, ["relu3"], x_train, y_given, flagged_mask, amount=8)
        >>> with FilterMask(net, s.flags()): ...
    """
    if variant not in VARIANTS:
        raise ValueError(f"Expected `variant` to be one of {list(VARIANTS)} but got {variant!r}.")
    layers = _check_layers(model, layers)
    check_inputs(inputs, "inputs")
    n = inputs.shape[0]
    labels = _check_labels(labels, n)
    suspect = as_sample_mask(suspects, n, "suspects")
    if not suspect.any():
        raise ValueError("Expected at least one suspect sample but `suspects` selects none.")
    if clean is None:
        if num_clean is not None and (not isinstance(num_clean, int) or isinstance(num_clean, bool) or num_clean < 1):
            raise ValueError(f"Expected `num_clean` to be a positive int or None but got {num_clean!r}.")
        rest = torch.nonzero(~suspect).flatten()
        logits = _logits(model, inputs[rest], batch_size) if len(rest) else torch.zeros(0, 2)
        picked = fitted_clean(logits, labels[rest], torch.zeros(len(rest), dtype=torch.bool),
                              num_clean if num_clean is not None else int(suspect.sum()), seed=seed)
        clean_idx = rest[picked]
    else:
        clean_mask = as_sample_mask(clean, n, "clean")
        if (clean_mask & suspect).any():
            raise ValueError(f"Expected `clean` and `suspects` to be disjoint but {int((clean_mask & suspect).sum())} "
                             "samples are in both.")
        clean_idx = torch.nonzero(clean_mask).flatten()
    if len(clean_idx) == 0:
        raise ValueError("Expected at least one clean reference sample (not suspect, fitted to its given label) "
                         "but found none; pass `clean=` explicitly.")
    suspect_idx = torch.nonzero(suspect).flatten()
    idx = torch.cat([suspect_idx, clean_idx])
    contrib = filter_contributions(model, layers, inputs[idx], labels[idx], target=_TARGET_OF[variant],
                                   batch_size=batch_size)
    ns = len(suspect_idx)
    scores = {}
    for layer, c in contrib.items():
        c = c.double()
        on_suspects, on_clean = c[:ns].mean(0), c[ns:].mean(0)
        score = on_suspects - on_clean
        if variant == "taylor_normalised":
            score = score / (on_clean.abs() + NORMALISE_FLOOR * on_clean.abs().mean() + 1e-12)
        scores[layer] = score.float()
    out = FilterScores(
        scores=scores, flagged={}, scorer=f"memorisation/{variant}",
        higher_is="more of the suspects' fit than of the clean samples'", epoch=epoch,
        settings={"variant": variant, "num_suspects": ns, "num_clean": len(clean_idx), "seed": seed},
    )
    return out.select(amount) if amount is not None else out


def filter_suspects(
    model: nn.Module,
    scores: FilterScores,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_filters: int = 3,
    num_samples: int = 4,
    batch_size: int = 256,
) -> dict[str, list[tuple[int, float, list[int]]]]:
    """For the ``num_filters`` highest memorisation scores of each layer, the suspects each filter holds most.

    Per layer of ``scores``, the filters with the highest scores (ties: the lower index), and for each the
    ``num_samples`` of the ``N`` samples (the suspects) to whose given-label margin it contributes most
    (:func:`filter_contributions`, ``target="margin"``) — what the report shows beside the filter's
    learning image.

    Args:
        scores: :func:`memorisation_scores`' answer (any :class:`~lightning_interp.scores.FilterScores`).
        inputs: ``N x ...`` suspects; labels: their ``N`` given labels.

    Returns:
        ``{layer: [(filter, score, [sample positions, most contributed first]), ...]}``, highest score first.

    Example:
        >>> held = filter_suspects(net, memorisation_scores(net, ["relu3"], x, y, flagged), x[flagged], y[flagged])
    """
    for name, value in (("num_filters", num_filters), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive int but got {value!r}.")
    layers = [layer for layer in scores.layers if len(scores.scores[layer])]
    if not layers:
        return {}
    contrib = filter_contributions(model, layers, inputs, labels, target="margin", batch_size=batch_size)
    out = {}
    for layer in layers:
        s = scores.scores[layer].double()
        order = torch.argsort(-s, stable=True)[:num_filters].tolist()
        c = contrib[layer]
        out[layer] = [(k, float(s[k]), torch.argsort(-c[:, k].double(), stable=True)[:num_samples].tolist()) for k in order]
    return out
