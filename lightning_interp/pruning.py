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

__all__ = ["prune_filters", "PruneSummary", "prune_target", "check_prunable", "is_pass_through", "measure_latency"]

#: Activations that are not elementwise (they mix channels): never a pass-through.
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)

_PASS_THROUGH_OTHER = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._LPPoolNd,
)

_OWNS_CHANNELS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm)


def is_pass_through(module: nn.Module) -> bool:
    """Whether ``module`` keeps its input's channels one to one: every elementwise activation of
    ``torch.nn`` (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Hardswish, Hardsigmoid,
    Hardtanh, Sigmoid, Tanh, Softplus, ...), dropout, identity and pooling. Its filters are those of the
    conv or linear layer that feeds it."""
    if isinstance(module, _NOT_ELEMENTWISE):
        return False
    return type(module).__module__ == nn.modules.activation.__name__ or isinstance(module, _PASS_THROUGH_OTHER)


@dataclass
class PruneSummary:
    """What :func:`prune_filters` did: parameters, MACs and forward latency (median, ms, on
    ``latency_device`` for a batch of ``latency_batch``) before/after, channels per layer."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
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
    """The conv/linear/norm layer whose output channels are the filters of ``layer``.

    * a conv, linear or norm layer: itself;
    * an elementwise activation, dropout or pooling (:func:`is_pass_through`): the last conv or linear
      layer before it;
    * a block (a module with children, e.g. torchvision's ``InvertedResidual``, ``BasicBlock``,
      ``Conv2dNormActivation``): the last conv/linear/norm layer inside it, which owns the block's
      output channels (with a residual connection Torch-Pruning removes the whole residual group).
      With ``example_inputs`` the block's output is traced and a block whose channels are not that
      layer's (e.g. DenseNet's concatenating ``_DenseBlock``) is refused, naming the layers to use.

    Raises:
        ValueError: ``layer`` has no channels to prune; the message names the layer to use instead.
    """
    module = get_layer(model, layer)
    if isinstance(module, _OWNS_CHANNELS):
        return layer
    if list(module.children()):
        inner = [(f"{layer}.{name}", m) for name, m in module.named_modules() if name and isinstance(m, _OWNS_CHANNELS)]
        if not inner:
            raise ValueError(f"Expected block {layer!r} ({type(module).__name__}) to hold a conv, linear or norm layer "
                             "to prune but it holds none.")
        target, owner = inner[-1]
        if example_inputs is not None:
            channels = _output_channels(model, module, example_inputs)
            if channels is not None and channels != layer_channels(owner):
                raise ValueError(
                    f"Expected the output channels of block {layer!r} ({type(module).__name__}, {channels} channels) "
                    f"to be those of one conv/norm layer inside it, but its last one, {target!r}, has "
                    f"{layer_channels(owner)} (the block concatenates or reshapes). Monitor and prune a conv or "
                    f"norm layer instead, e.g. {', '.join(repr(n) for n, _ in inner[-3:])}."
                )
        return target
    if not is_pass_through(module):
        raise ValueError(
            f"Expected layer {layer!r} to have channels to prune (a conv, linear or norm layer, a block holding one, or an "
            f"elementwise activation or pooling after one) but it is a {type(module).__name__}."
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


def _output_channels(model: nn.Module, module: nn.Module, example_inputs: torch.Tensor) -> int | None:
    store: list = []
    handle = module.register_forward_hook(lambda m, a, out: store.append(out))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example_inputs)
    except Exception:  # the network does not take these inputs as they are: the check cannot be made here
        return None
    finally:
        handle.remove()
        model.train(was_training)
    if len(store) != 1 or not isinstance(store[0], torch.Tensor) or store[0].dim() < 2:
        return None
    return int(store[0].shape[1])


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
    return targets


def measure_latency(model: nn.Module, example_inputs: torch.Tensor, *, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``repeats`` eval-mode forwards of ``example_inputs``, in milliseconds, on the
    inputs' device (CUDA is synchronised around each forward)."""
    import time

    was_training = model.training
    cuda = example_inputs.device.type == "cuda"
    times = []
    try:
        model.eval()
        with torch.no_grad():
            for i in range(warmup + repeats):
                if cuda:
                    torch.cuda.synchronize(example_inputs.device)
                start = time.perf_counter()
                model(example_inputs)
                if cuda:
                    torch.cuda.synchronize(example_inputs.device)
                if i >= warmup:
                    times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
    times.sort()
    return 1000 * times[len(times) // 2]


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
    import torch_pruning as tp

    net = model if inplace else copy.deepcopy(model)
    was_training = net.training
    net.eval()
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
    linears = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
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
            graph = tp.DependencyGraph().build_dependency(net, example_inputs=example_inputs)
            group = graph.get_pruning_group(module, _pruning_fn(module), idxs=idx)
            if not graph.check_pruning_group(group):
                raise ValueError(f"Pruning filters {idx} of {target!r} would leave a layer without channels.")
            group.prune()
        macs_after, params_after = _count(net, example_inputs)
    latency_after = measure_latency(net, example_inputs) if latency else None
    net.train(was_training)
    summary = PruneSummary(
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        channels={n: (channels_before[n], layer_channels(get_layer(net, n))) for n in targets},
        pruned=targets, latency_ms_before=latency_before, latency_ms_after=latency_after,
        latency_device=str(example_inputs.device) if latency else None,
        latency_batch=int(example_inputs.shape[0]) if latency else None,
    )
    return net, summary
