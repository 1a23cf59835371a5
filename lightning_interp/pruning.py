"""Structural pruning of chosen filters with Torch-Pruning (DESIGN §5).

Filters are named as everywhere else: ``{layer: [filter, ...]}``, with ``layer`` a conv, a
linear, a norm layer or a parameter-free module after them (ReLU, pooling: the filters of the
conv that feeds it, as masking names them). Torch-Pruning's dependency graph removes each
filter with everything coupled to it — its BatchNorm channel, the next layer's input channels,
the other members of a residual group. Pruning a filter whose post-activation output is masked
leaves the network's outputs unchanged (the test of this module).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import get_layer, layer_channels

__all__ = ["prune_filters", "PruneSummary", "prune_target"]

_PASS_THROUGH = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout,
    nn.Dropout2d, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
)


@dataclass
class PruneSummary:
    """What :func:`prune_filters` did: parameters and MACs before/after, channels per layer."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    channels: dict[str, tuple[int, int]] = field(default_factory=dict)
    pruned: dict[str, list[int]] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {
            "params_before": self.params_before, "params_after": self.params_after,
            "macs_before": self.macs_before, "macs_after": self.macs_after,
            "channels": {k: list(v) for k, v in self.channels.items()}, "pruned": self.pruned,
        }


def prune_target(model: nn.Module, layer: str) -> str:
    """The conv/linear/norm layer whose output channels are the filters of ``layer``.

    Raises:
        ValueError: ``layer`` is neither such a layer nor a parameter-free module right after one.
    """
    module = get_layer(model, layer)
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase)):
        return layer
    if not isinstance(module, _PASS_THROUGH):
        raise ValueError(
            f"Expected layer {layer!r} to have channels to prune (a conv, linear or norm layer, or an activation "
            f"or pooling after one) but it is a {type(module).__name__}."
        )
    previous = None
    for name, m in model.named_modules():
        if m is module:  # by identity: names differ under torch.compile (`_orig_mod.`)
            break
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            previous = name
    if previous is None:
        raise ValueError(f"Expected a conv or linear layer before {layer!r} to prune but found none.")
    return previous


def _pruning_fn(module: nn.Module):
    import torch_pruning as tp

    if isinstance(module, nn.modules.conv._ConvNd):
        return tp.prune_conv_out_channels
    if isinstance(module, nn.Linear):
        return tp.prune_linear_out_channels
    return tp.prune_batchnorm_out_channels


def _count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[float, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    return float(macs), int(params)


def prune_filters(
    model: nn.Module,
    filters: Mapping[str, Sequence[int]],
    example_inputs: torch.Tensor,
    *,
    ignored_layers: Sequence[str] | None = None,
    inplace: bool = False,
) -> tuple[nn.Module, PruneSummary]:
    """Remove the given filters structurally; return the smaller model and a summary.

    Args:
        model: the network (a copy is pruned unless ``inplace``).
        filters: ``{layer: [filter, ...]}``.
        example_inputs: a batch the model accepts (traced to build the dependency graph).
        ignored_layers: layers that must not lose channels; by default the last Linear layer
            (the classifier's outputs are the classes).

    Raises:
        ValueError: unknown layer, a layer without channels, an index out of range, a group that
            would lose all its channels, or a pruned channel in an ignored layer.
    """
    import torch_pruning as tp

    net = model if inplace else copy.deepcopy(model)
    was_training = net.training
    net.eval()
    targets: dict[str, list[int]] = {}
    for layer, idx in filters.items():
        target = prune_target(net, layer)
        channels = layer_channels(get_layer(net, target))
        idx = sorted({int(i) for i in idx})
        bad = [i for i in idx if i < 0 or i >= channels]
        if bad:
            raise ValueError(f"Expected filters of layer {layer!r} in [0, {channels - 1}] but got {bad}.")
        targets.setdefault(target, [])
        targets[target] = sorted(set(targets[target]) | set(idx))
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    ignored = list(ignored_layers) if ignored_layers is not None else linears[-1:]
    for name in ignored:
        if name in targets and targets[name]:
            raise ValueError(f"Expected no filters of ignored layer {name!r} (the classifier's outputs) but got {targets[name]}.")

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
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example_inputs)
            group = graph.get_pruning_group(module, _pruning_fn(module), idxs=idx)
            if not graph.check_pruning_group(group):
                raise ValueError(f"Pruning filters {idx} of {target!r} would leave a layer without channels.")
            group.prune()
        macs_after, params_after = _count(net, example_inputs)
    net.train(was_training)
    summary = PruneSummary(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        channels={n: (channels_before[n], layer_channels(get_layer(net, n))) for n in targets},
        pruned=targets,
    )
    return net, summary
