"""Structural pruning of chosen filters with Torch-Pruning (DESIGN §5).

Filters are named as everywhere else: ``{layer: [filter, ...]}``, with ``layer`` a conv, a
linear, a norm layer or a parameter-free module after them (ReLU, pooling: the filters of the
conv that feeds it, as masking names them). The conv that is cut is
:func:`lightning_interp.layers.filter_owner` of the layer, the same conv SoU scores.
Torch-Pruning's dependency graph removes each filter with everything coupled to it — its BatchNorm channel, the next layer's input channels,
the other members of a residual group. Pruning a filter whose post-activation output is masked
leaves the network's outputs unchanged (the test of this module).

Channel counts are rounded the way Torch-Pruning's ``round_to`` rounds them (:func:`rounded_prune_count`,
default from the device: :func:`default_round_to`), and latency is timed before/after in one interleaved
loop on the inputs' device (:func:`compare_latency`), with a warning when the pruned network is not faster.

A pruned network is saved as tensors and plain data (:func:`save_pruned`: its ``state_dict``, the pruning
plan and the summary; ``torch.load(path, weights_only=True)`` reads it) and rebuilt by applying the plan to a
fresh copy of the user's architecture through the pruning step :func:`prune_filters` uses (:func:`load_pruned`): no pickle.
"""

from __future__ import annotations

import copy
import os
import pickle
import statistics
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .layers import eval_mode, filter_owner, get_layer, is_pass_through, layer_channels, public_name

__all__ = [
    "prune_filters", "PruneSummary", "prune_target", "check_prunable", "is_pass_through", "measure_latency",
    "compare_latency", "default_round_to", "rounded_prune_count", "save_pruned", "load_pruned", "PRUNED_FORMAT",
]

#: The ``format`` field of a file :func:`save_pruned` writes.
PRUNED_FORMAT = "lightning_interp.pruned/1"

@dataclass
class PruneSummary:
    """What :func:`prune_filters` did: parameters, MACs and forward latency (median, ms, on
    ``latency_device`` for a batch of ``latency_batch``) before/after, channels per layer.

    ``pruned`` holds the filters removed from each cut layer (the pruning plan, in the names of the
    network passed in), ``rounded`` the ones among them that were not asked for but removed to reach a
    multiple of ``round_to`` channels, and ``input_shape`` the shape of the traced example (what
    :func:`load_pruned` traces again)."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    pruned: dict[str, list[int]] = field(default_factory=dict)
    latency_ms_before: float | None = None
    latency_ms_after: float | None = None
    latency_device: str | None = None
    latency_batch: int | None = None
    round_to: int = 1
    rounded: dict[str, list[int]] = field(default_factory=dict)
    input_shape: list[int] | None = None

    def as_dict(self) -> dict:
        out = {
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "channels": {k: list(v) for k, v in self.channels.items()}, "pruned": self.pruned,
            "round_to": self.round_to, "rounded": self.rounded, "input_shape": self.input_shape,
        }
        if self.latency_ms_before is not None:
            out.update(latency_ms_before=self.latency_ms_before, latency_ms_after=self.latency_ms_after,
                       latency_device=self.latency_device, latency_batch=self.latency_batch)
        return out


def prune_target(model: nn.Module, layer: str, example_inputs: torch.Tensor | None = None) -> str:
    """The conv or linear layer :func:`prune_filters` cuts for the filters of ``layer``:
    :func:`lightning_interp.layers.filter_owner` (the conv that makes them, which SoU scores too).
    Torch-Pruning removes its coupled norm channels, the next layer's inputs and, in a residual block,
    the whole residual group with it. With ``example_inputs`` shared modules and concatenating blocks
    are refused.

    Raises:
        ValueError: ``layer`` has no channels to prune; the message names the layers to use instead.
    """
    return filter_owner(model, layer, example_inputs)


def check_prunable(
    model: nn.Module, layers: Sequence[str], example_inputs: torch.Tensor | None = None
) -> dict[str, str]:
    """``{layer: prune target}`` for each layer, or a ``ValueError`` naming every layer that cannot be
    pruned and what to use instead (:func:`prune_target`; run it before training, not after)."""
    targets, problems = {}, []
    for layer in layers:
        try:
            targets[layer] = prune_target(model, layer, example_inputs)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise ValueError(" ".join(problems))
    if targets and example_inputs is not None:
        with eval_mode(model), torch.enable_grad():
            dependency_graph(model, example_inputs)
    return targets


def dependency_graph(model: nn.Module, example_inputs: torch.Tensor):
    """Torch-Pruning's dependency graph of ``model`` traced on ``example_inputs``.

    Raises:
        ValueError: Torch-Pruning cannot trace the network (it fails inside, e.g. a ``ZeroDivisionError`` on
            ShuffleNet's channel shuffle, a ``view`` that moves channels across groups): no layer of it can be
            pruned; the monitors still work on it.
    """
    import torch_pruning as tp

    try:
        return tp.DependencyGraph().build_dependency(model, example_inputs=example_inputs)
    except Exception as err:
        raise ValueError(
            f"Torch-Pruning cannot trace the channel dependencies of {type(model).__name__} ({type(err).__name__}: "
            f"{err} inside torch_pruning), e.g. because of a channel shuffle or another view/reshape that mixes the "
            "channel dimension (ShuffleNet): none of its layers can be pruned. The monitors work on it; drop the "
            "pruning."
        ) from err


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` eval-mode forwards of ``example_inputs``, in milliseconds, on the
    inputs' device (CUDA is synchronised around each forward). To compare two networks use
    :func:`compare_latency`: timed one after the other, the load of a shared machine moves the two
    medians apart by more than a small pruning saves."""
    return compare_latency(model, example_inputs=example_inputs, repeats=repeats, warmup=warmup)[0]


def compare_latency(
    *models: nn.Module, example_inputs: torch.Tensor, repeats: int = 16, warmup: int = 3
) -> list[float]:
    """Median forward time of each model, in milliseconds, from ``repeats`` rounds that time every model
    once in turn, the order reversed every other round (eval mode, no grad, CUDA synchronised around each
    forward).

    Interleaving makes the comparison fair on a busy machine: drift in the load (other processes,
    clock changes) hits every model in the same round instead of whichever was timed second. Reversing
    the order cancels a position bias: with a fixed order, an identical copy timed second read 0.94x-1.05x
    the first (``benchmarks/results/prune_latency_cpu.log``, a loaded CPU).
    """
    device = example_inputs.device
    cuda = device.type == "cuda"
    times: list[list[float]] = [[] for _ in models]
    with torch.no_grad(), ExitStack() as modes:
        for model in models:
            modes.enter_context(eval_mode(model))
        for i in range(warmup + repeats):
            order = list(enumerate(models))
            for k, model in order if (i - warmup) % 2 == 0 else order[::-1]:
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                model(example_inputs)
                if cuda:
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times[k].append(1000 * (time.perf_counter() - start))
    return [statistics.median(t) for t in times]


def default_round_to(device: torch.device | str) -> int:
    """The ``round_to`` :func:`prune_filters` uses on ``device`` when none is given: 8 on CUDA (tensor-core
    kernels for half, bfloat16 and TF32 tile channels by 8), 1 (no
    rounding) on CPU, where ``benchmarks/prune_latency.py`` measures no cost of odd channel counts
    (a 3x3 conv with 251 and with 248 output channels take the same time)."""
    return 8 if torch.device(device).type == "cuda" else 1


def rounded_prune_count(n_pruned: int, channels: int, round_to: int) -> int:
    """How many of ``channels`` to remove when ``n_pruned`` are asked for, so that the channels left are a
    multiple of ``round_to``: Torch-Pruning's rule (``BasePruner._round_to``, the kept count rounded
    down, so a few more channels go), except that a layer is never emptied: when rounding down would
    leave no channel, ``n_pruned`` stays as asked."""
    if round_to < 1:
        raise ValueError(f"Expected `round_to` >= 1 but got {round_to}.")
    kept = channels - n_pruned
    if n_pruned == 0 or kept < round_to:
        return n_pruned
    return channels - (kept - kept % round_to)


def _pruning_fn(module: nn.Module):
    import torch_pruning as tp

    if isinstance(module, nn.modules.conv._ConvNd):
        return tp.prune_conv_out_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_batchnorm_out_channels


def _count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return int(round(float(macs))), int(params)  # Torch-Pruning counts halves for some ops: whole MACs


def prune_filters(
    model: nn.Module,
    filters: Mapping[str, Sequence[int]],
    example_inputs: torch.Tensor,
    *,
    ignored_layers: Sequence[str] | None = None,
    inplace: bool = False,
    latency: bool = True,
    round_to: int | None = None,
) -> tuple[nn.Module, PruneSummary]:
    """Remove the given filters structurally; return the smaller model and a summary.

    Args:
        model: the network (a copy is pruned unless ``inplace``).
        filters: ``{layer: [filter, ...]}``.
        example_inputs: a batch the model accepts (traced to build the dependency graph).
        ignored_layers: layers that must not lose channels; by default the last Linear layer
            (the classifier's outputs are the classes).
        latency: time forwards of ``example_inputs`` before and after (:func:`compare_latency`: the
            two networks interleaved, on the device of ``example_inputs``, the device the user trains
            on); warn when the pruned network is not faster.
        round_to: leave a multiple of ``round_to`` channels in each cut layer, removing the
            lowest-magnitude other filters of its group (Torch-Pruning's group L2 norm) to get there,
            as Torch-Pruning's ``round_to`` does; ``None``: :func:`default_round_to` of the inputs'
            device (8 on CUDA, 1 on CPU); ``1``: exactly the given filters. The ones added are in
            ``summary.rounded``.

    Raises:
        ValueError: unknown layer, a layer without channels, an index out of range, a group that
            would lose all its channels, or a pruned channel in an ignored layer.
    """
    round_to = default_round_to(example_inputs.device) if round_to is None else int(round_to)
    rounded_prune_count(0, 1, round_to)  # refuses round_to < 1 before any work
    net = model if inplace else copy.deepcopy(model)
    with eval_mode(net):  # every submodule's own mode comes back, also when pruning is refused
        targets: dict[str, list[int]] = {}
        for layer, idx in filters.items():
            target = prune_target(net, layer, example_inputs)
            channels = layer_channels(get_layer(net, target))
            idx = sorted({int(i) for i in idx})
            bad = [i for i in idx if i < 0 or i >= channels]
            if bad:
                raise ValueError(f"Expected filters of layer {layer!r} in [0, {channels - 1}] but got {bad}.")
            targets.setdefault(target, [])
            targets[target] = sorted(set(targets[target]) | set(idx))
        linears = [public_name(n) for n, m in net.named_modules() if isinstance(m, nn.Linear)]
        ignored = list(ignored_layers) if ignored_layers is not None else linears[-1:]
        for name in ignored:
            if name in targets and targets[name]:
                raise ValueError(f"Expected no filters of ignored layer {name!r} (the classifier's outputs) but got {targets[name]}.")

        reference = (copy.deepcopy(net) if inplace else model) if latency else None
        channels_before = {n: layer_channels(get_layer(net, n)) for n in targets}
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            macs_before, params_before = _count(net, example_inputs)
        rounded = _cut(net, targets, example_inputs, round_to)
        with torch.enable_grad():
            macs_after, params_after = _count(net, example_inputs)
    latency_before, latency_after = compare_latency(reference, net, example_inputs=example_inputs) if latency else (None, None)
    summary = PruneSummary(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        channels={n: (channels_before[n], layer_channels(get_layer(net, n))) for n in targets},
        pruned=targets, latency_ms_before=latency_before, latency_ms_after=latency_after,
        latency_device=str(example_inputs.device) if latency else None,
        latency_batch=int(example_inputs.shape[0]) if latency else None,
        round_to=round_to, rounded=rounded, input_shape=list(example_inputs.shape),
    )
    if latency:
        _warn_if_not_faster(summary)
    return net, summary


def _cut(net: nn.Module, targets: dict[str, list[int]], example_inputs: torch.Tensor, round_to: int) -> dict[str, list[int]]:
    """Remove ``targets`` (``{conv or linear: [filter, ...]}``, in order, indices of the layers as they are
    now) from ``net`` in place, each with its dependency group; widen each to a multiple of ``round_to``
    channels first. Adds the rounding's filters to ``targets`` and returns them. The one pruning step of
    :func:`prune_filters` and :func:`load_pruned`."""

    rounded: dict[str, list[int]] = {}
    channels_before = {n: layer_channels(get_layer(net, n)) for n in targets}
    with eval_mode(net), torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        for target, idx in targets.items():
            module = get_layer(net, target)
            if layer_channels(module) != channels_before[target]:
                raise ValueError(
                    f"Filters of {target!r} are coupled with another layer in `filters` (a residual group) that "
                    "was pruned already; name one layer of the group."
                )
            # A fresh graph per target: indices always refer to the layer as it is now.
            graph = dependency_graph(net, example_inputs)
            extra = _rounding_extra(graph, module, idx, channels_before[target], round_to)
            if extra:
                rounded[target] = extra
                idx = targets[target] = sorted(idx + extra)
            group = graph.get_pruning_group(module, _pruning_fn(module), idxs=idx)
            if not graph.check_pruning_group(group):
                raise ValueError(f"Pruning filters {idx} of {target!r} would leave a layer without channels.")
            group.prune()
    return rounded


def _rounding_extra(graph, module: nn.Module, idx: list[int], channels: int, round_to: int) -> list[int]:
    """The filters to remove besides ``idx`` so that a multiple of ``round_to`` channels stays: the
    lowest by Torch-Pruning's group magnitude importance (what its pruners rank by, ``round_to`` set)."""
    import torch_pruning as tp

    n = rounded_prune_count(len(idx), channels, round_to)
    if n == len(idx):
        return []
    whole = graph.get_pruning_group(module, _pruning_fn(module), idxs=list(range(channels)))
    importance = tp.importance.GroupMagnitudeImportance(p=2)(whole)
    asked = set(idx)
    ranked = [i for i in torch.argsort(importance, stable=True).tolist() if i not in asked]
    return sorted(ranked[: n - len(idx)])


def _warn_if_not_faster(summary: PruneSummary) -> None:
    before, after = summary.latency_ms_before, summary.latency_ms_after
    if before is None or after is None or after < before:
        return
    cut = 1 - summary.macs_after / summary.macs_before if summary.macs_before else 0.0
    warnings.warn(
        f"The pruned network is not faster on {summary.latency_device}: {before:.2f} ms -> {after:.2f} ms "
        f"(median of interleaved forwards of a batch of {summary.latency_batch}). Pruning removed "
        f"{sum(len(v) for v in summary.pruned.values())} filters and {100 * cut:.1f}% of the MACs"
        + (", less than timing resolves: prune more filters for a speed-up" if cut < 0.05 else
           "; a forward of this size is dominated by per-layer costs that removing channels leaves")
        + (f"; channel counts are rounded to multiples of {summary.round_to}" if summary.round_to > 1 else
           "; pass round_to=8 so channel counts stay multiples of 8" if "cuda" in str(summary.latency_device) else "")
        + ".",
        stacklevel=3,
    )



# ---- files: weights and the pruning plan, no pickle ------------------------------------------------------


def save_pruned(
    path: str | os.PathLike,
    model: nn.Module,
    summary: PruneSummary | Mapping[str, Any],
    *,
    model_attr: str | None = None,
    input_shape: Sequence[int] | None = None,
    **extra: Any,
) -> str:
    """Save a pruned network as tensors and plain data; :func:`load_pruned` rebuilds it.

    The file (``torch.save``) holds ``{"format", "architecture", "model_attr", "state_dict", "plan",
    "summary", **extra}``: the pruned network's ``state_dict`` (on the CPU), the pruning plan (``{"layers":
    {layer: {"channels": before, "kept": [filter, ...]}}, "input_shape"}``, in the names of
    the network that was pruned, in the order they were cut) and the summary. No class is pickled:
    ``torch.load(path, weights_only=True)`` reads it, so a downloaded file cannot run code.

    Args:
        path: the file to write (folders are created).
        model: the pruned network :func:`prune_filters` returned (fine-tuned or not: same structure).
        summary: its :class:`PruneSummary`, or ``summary.as_dict()`` with numbers of your own added
            (validation accuracy); plain data only (numbers, strings, lists, dicts, tensors).
        model_attr: the attribute of a LightningModule that holds the network (``"net"``), so that
            :func:`load_pruned` also takes the whole LightningModule.
        input_shape: the shape of an input the network takes (traced again on loading); by default the
            summary's ``input_shape``. Give it to re-save a file of an earlier version, whose summary lacks it.
        extra: more plain data to store beside (e.g. ``scores=FilterScores.to_dict()``).

    Returns:
        ``path`` as a string.

    Raises:
        ValueError: ``model`` does not have the channel counts the summary records (not the pruned network).
        TypeError: a value in ``summary`` or ``extra`` is not plain data.
    """
    info = summary.as_dict() if isinstance(summary, PruneSummary) else dict(summary)
    if input_shape is not None:
        info["input_shape"] = list(input_shape)
    if "pruned" not in info or "channels" not in info or not info.get("input_shape"):
        raise ValueError("Expected `summary` from prune_filters (its PruneSummary or `.as_dict()`, with 'pruned', "
                         f"'channels' and 'input_shape'; pass `input_shape=` if it lacks that) but got the keys {sorted(info)}.")
    layers = {}
    for layer, (before, after) in info["channels"].items():
        cut = set(info["pruned"].get(layer, ()))
        layers[layer] = {"channels": int(before), "kept": [i for i in range(int(before)) if i not in cut]}
        found = layer_channels(get_layer(model, layer))
        if found != after or len(layers[layer]["kept"]) != after:
            raise ValueError(f"Expected `model` to be the pruned network ({layer!r} with {after} channels) but it has {found}.")
    payload = {
        "format": PRUNED_FORMAT,
        "architecture": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_attr": model_attr,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "plan": {"layers": layers, "input_shape": [int(s) for s in info["input_shape"]]},
        "summary": _plain(info, "summary"),
        **{k: _plain(v, k) for k, v in extra.items()},
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(payload, path)
    return path


def load_pruned(
    path: str | os.PathLike,
    model: nn.Module | None = None,
    *,
    map_location: str | torch.device = "cpu",
    trust_pickle: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the network :func:`save_pruned` saved: apply its pruning plan to ``model``, a fresh copy of
    the original (un-pruned) architecture, through the pruning step :func:`prune_filters` uses, then load the weights.

    Examples:
        >>> net, summary = load_pruned("pruned.pt", torchvision.models.resnet18(num_classes=10))

    Args:
        path: the file.
        model: a fresh instance of the network the run pruned, built as for training (same class and
            arguments, e.g. ``num_classes``), or the LightningModule that holds it at the saved
            ``model_attr``. It is pruned in place, on its device, and returned.
        map_location: where the file's tensors are read to before they are copied into ``model``.
        trust_pickle: read a file written before this format (the whole network pickled, which
            ``torch.load`` can only read with ``weights_only=False``: **loading it runs whatever code the
            file holds**). Only for files you wrote yourself; ``model`` is then ignored. Re-save the result
            with :func:`save_pruned` to be rid of pickle.

    Returns:
        ``(model, summary)``: ``model`` pruned with the saved weights, and the summary dict.

    Raises:
        ValueError: no ``model`` given, a network whose layers or shapes do not match the plan, or a
            pickled file without ``trust_pickle=True``.
    """
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds a pickled network (written before lightning_interp saved pruned networks as "
                "weights and a plan). Unpickling runs any code the file contains, so it is refused by default. "
                f"If you wrote the file yourself, load it with load_pruned({path!r}, trust_pickle=True) and "
                "re-save it with save_pruned(path, net, summary, input_shape=<an input's shape>); otherwise prune again."
            ) from err
        warnings.warn(
            f"Loading {path} with pickle (trust_pickle=True): unpickling can run arbitrary code from the file. "
            "Do this only for files you wrote yourself; re-save with lightning_interp.pruning.save_pruned to "
            "load it without pickle next time.",
            stacklevel=2,
        )
        payload = torch.load(path, map_location=map_location, weights_only=False)
        return payload["model"], payload.get("summary", {})
    if not isinstance(payload, dict) or payload.get("format") != PRUNED_FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"Expected a file written by save_pruned (format {PRUNED_FORMAT!r}) but {path} has {found!r}.")
    if model is None:
        raise ValueError(
            f"Expected `model`, a fresh instance of the network that was pruned ({payload['architecture']}, built "
            f"with the arguments used for training): {path} holds its weights and pruning plan, not code."
        )
    net = _planned_network(model, payload)
    plan = payload["plan"]
    filters = {layer: sorted(set(range(entry["channels"])) - set(entry["kept"])) for layer, entry in plan["layers"].items()}
    weight = next((p for p in net.parameters() if p.is_floating_point()), torch.empty(0))
    example = torch.zeros(plan["input_shape"], dtype=weight.dtype, device=weight.device)
    try:
        for layer, entry in plan["layers"].items():
            if layer_channels(get_layer(net, layer)) != entry["channels"]:
                raise ValueError(f"{layer!r} has {layer_channels(get_layer(net, layer))} channels, the plan {entry['channels']}.")
        _cut(net, filters, example, round_to=1)
        net.load_state_dict(payload["state_dict"])
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"Cannot rebuild the pruned network of {path} from the given {type(net).__name__}: build the model "
            f"exactly as for the run that pruned it ({payload['architecture']}, same arguments). {err}"
        ) from err
    return model, payload["summary"]


def _planned_network(model: nn.Module, payload: Mapping[str, Any]) -> nn.Module:
    """``model``, or its ``model_attr`` attribute when the plan's layers live there."""
    layers = list(payload["plan"]["layers"])
    names = {public_name(n) for n, _ in model.named_modules()}
    if all(layer in names for layer in layers):
        return model
    attr = payload.get("model_attr")
    inner = getattr(model, attr, None) if attr else None
    if isinstance(inner, nn.Module):
        return _planned_network(inner, {**payload, "model_attr": None})
    raise ValueError(
        f"Expected a {payload['architecture']} (or a LightningModule holding it"
        + (f" at `{attr}`" if attr else "") + f") with the layers {layers}, but {type(model).__name__} lacks "
        f"{[layer for layer in layers if layer not in names]}."
    )


_PLAIN = (str, int, float, bool, type(None))


def _plain(value: Any, where: str) -> Any:
    """``value`` as what ``torch.load(weights_only=True)`` reads: dicts, lists, numbers, strings, tensors."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # NumPy scalars
        return value.item()
    if hasattr(value, "tolist"):  # NumPy arrays
        return value.tolist()
    raise TypeError(f"Expected plain data (numbers, strings, lists, dicts, tensors) in `{where}` but got {type(value).__name__}.")
