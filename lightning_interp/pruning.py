"""Structural pruning of chosen filters with Torch-Pruning (DESIGN §5).

Filters are named as everywhere else: ``{layer: [filter, ...]}``, with ``layer`` a conv, a
linear, a norm layer or a parameter-free module after them (ReLU, pooling: the filters of the
conv that feeds it, as masking names them). The conv that is cut is
:func:`lightning_interp.layers.filter_owner` of the layer, the same conv SoU scores.
Torch-Pruning's dependency graph removes each filter with everything coupled to it — its BatchNorm channel, the next layer's input channels,
the other members of a residual group. Pruning a filter whose post-activation output is masked
leaves the network's outputs unchanged (the test of this module).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import eval_mode, filter_owner, get_layer, is_pass_through, layer_channels, public_name

__all__ = ["prune_filters", "PruneSummary", "prune_target", "check_prunable", "is_pass_through", "measure_latency"]

@dataclass
class PruneSummary:
    """What :func:`prune_filters` did: parameters, MACs and forward latency (median, ms, on
    ``latency_device`` for a batch of ``latency_batch``) before/after, channels per layer."""

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

    def as_dict(self) -> dict:
        out = {
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "channels": {k: list(v) for k, v in self.channels.items()}, "pruned": self.pruned,
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
    inputs' device (CUDA is synchronised around each forward)."""
    import time

    cuda = example_inputs.device.type == "cuda"
    times = []
    with eval_mode(model), torch.no_grad():
        for i in range(warmup + repeats):
            if cuda:
                torch.cuda.synchronize(example_inputs.device)
            start = time.perf_counter()
            model(example_inputs)
            if cuda:
                torch.cuda.synchronize(example_inputs.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    times.sort()
    return 1000 * times[len(times) // 2]


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
) -> tuple[nn.Module, PruneSummary]:
    """Remove the given filters structurally; return the smaller model and a summary.

    Args:
        model: the network (a copy is pruned unless ``inplace``).
        filters: ``{layer: [filter, ...]}``.
        example_inputs: a batch the model accepts (traced to build the dependency graph).
        ignored_layers: layers that must not lose channels; by default the last Linear layer
            (the classifier's outputs are the classes).
        latency: time forwards of ``example_inputs`` before and after (:func:`measure_latency`,
            on the device of ``example_inputs``; measured in the same run so the two compare).

    Raises:
        ValueError: unknown layer, a layer without channels, an index out of range, a group that
            would lose all its channels, or a pruned channel in an ignored layer.
    """

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

        latency_before = measure_latency(net, example_inputs) if latency else None
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            macs_before, params_before = _count(net, example_inputs)
            channels_before = {n: layer_channels(get_layer(net, n)) for n in targets}
            for target, idx in targets.items():
                module = get_layer(net, target)
                if layer_channels(module) != channels_before[target]:
                    raise ValueError(
                        f"Filters of {target!r} are coupled with another layer in `filters` (a residual group) that "
                        "was pruned already; name one layer of the group."
                    )
                # A fresh graph per target: indices always refer to the layer as it is now.
                graph = dependency_graph(net, example_inputs)
                group = graph.get_pruning_group(module, _pruning_fn(module), idxs=idx)
                if not graph.check_pruning_group(group):
                    raise ValueError(f"Pruning filters {idx} of {target!r} would leave a layer without channels.")
                group.prune()
            macs_after, params_after = _count(net, example_inputs)
        latency_after = measure_latency(net, example_inputs) if latency else None
    summary = PruneSummary(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        channels={n: (channels_before[n], layer_channels(get_layer(net, n))) for n in targets},
        pruned=targets, latency_ms_before=latency_before, latency_ms_after=latency_after,
        latency_device=str(example_inputs.device) if latency else None,
        latency_batch=int(example_inputs.shape[0]) if latency else None,
    )
    return net, summary
