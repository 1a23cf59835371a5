"""Naming the layers a scan can look at.

A *layer* is a module path in ``model.named_modules()``; its output is that module's output
(DESIGN §1). Every public function that takes a ``layer`` resolves it with
:func:`get_layer`, so a typo gives the same helpful error everywhere; :func:`filter_owner`
answers, for every scorer and for pruning alike, which conv or linear layer makes a layer's
filters. :func:`eval_mode` is the one way the package puts a model in eval mode and back.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .batch import default_batch_adapter

__all__ = [
    "get_layer",
    "list_layers",
    "capture_output",
    "eager",
    "eval_mode",
    "filter_owner",
    "is_pass_through",
    "LayerTrace",
    "trace_layers",
    "example_input",
    "layer_channels",
    "public_name",
]

_CHANNEL_ATTRS = (
    (nn.modules.conv._ConvNd, "out_channels"),
    (nn.Linear, "out_features"),
    (nn.Bilinear, "out_features"),
    (nn.modules.batchnorm._NormBase, "num_features"),
    (nn.GroupNorm, "num_channels"),
)


def layer_channels(module: nn.Module) -> int | None:
    """Output channel count a module declares (conv, linear, norm layers), else ``None``."""
    for cls, attr in _CHANNEL_ATTRS:
        if isinstance(module, cls):
            return int(getattr(module, attr))
    return None


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode inside the block; on exit give **every submodule its own**
    ``training`` flag back.

    ``model.train(was_training)`` would put a submodule the user keeps in eval mode (a frozen
    BatchNorm inside a training network, say) back into training mode; this restores each flag as
    it was, also when the block raises. Flags are restored directly, without calling the modules'
    ``train`` methods.

    Examples:
        >>> with eval_mode(model):
        ...     logits = model(x)   # running BatchNorm statistics, no dropout
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for module, training in flags:
            module.training = training


#: Activations that are not elementwise (they mix channels): never a pass-through.
_NOT_ELEMENTWISE = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.GLU, nn.MultiheadAttention)

_PASS_THROUGH_OTHER = (
    nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._LPPoolNd,
)

#: Modules whose weight rows are the filters (output channels) they make.
_MAKES_FILTERS = (nn.modules.conv._ConvNd, nn.Linear)
#: Modules that keep the channels of the layer before them one to one and declare their count.
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm)


def is_pass_through(module: nn.Module) -> bool:
    """Whether ``module`` keeps its input's channels one to one: every elementwise activation of
    ``torch.nn`` (ReLU, ReLU6, LeakyReLU, PReLU, ELU, SELU, CELU, GELU, SiLU, Mish, Hardswish, Hardsigmoid,
    Hardtanh, Sigmoid, Tanh, Softplus, ...), dropout, identity and pooling. Its filters are those of the
    conv or linear layer that feeds it."""
    if isinstance(module, _NOT_ELEMENTWISE):
        return False
    return type(module).__module__ == nn.modules.activation.__name__ or isinstance(module, _PASS_THROUGH_OTHER)


def _keeps_channels(module: nn.Module) -> bool:
    """A norm layer, a pass-through module, or a block made only of them (e.g. ``Sequential(BN, ReLU)``)."""
    leaves = [m for m in module.modules() if not list(m.children())]
    return bool(leaves) and all(isinstance(m, _NORMS) or is_pass_through(m) for m in leaves)


#: Modules whose output's channel count is declared by their settings (conv, linear, norm layers; the
#: last normalised dimension of a LayerNorm), used to tell where a traced output keeps its channels.
def _declared_channels(module: nn.Module) -> int | None:
    channels = layer_channels(module)
    if channels is None and isinstance(module, nn.LayerNorm) and len(module.normalized_shape) >= 1:
        channels = int(module.normalized_shape[-1])
    return channels


@dataclass(frozen=True)
class LayerTrace:
    """What one module output in one eval-mode forward (:func:`trace_layers`).

    Attributes:
        calls: how often the module ran in the forward (a shared module runs more than once).
        shape: the first output's shape, or None when it was not a tensor (then ``kind`` names its type).
        kind: the type name of a non-tensor output, else ``"Tensor"``.
        channels_last: the output keeps its channels on the **last** dimension (``B x H x W x C``, e.g. the
            layers between the permutes of a ConvNeXt block): the channel count declared by the conv, linear or
            norm layer that last ran (or the module itself) is ``shape[-1]``, not ``shape[1]``.
        order: position of the module's first output in the forward (0 = the first module to finish).
    """

    calls: int
    shape: torch.Size | None
    kind: str
    channels_last: bool
    order: int

    @property
    def scannable(self) -> bool:
        """One ``B x K x ...`` tensor output per forward with its channels on dim 1: what a scan reads."""
        return self.calls == 1 and self.shape is not None and len(self.shape) >= 2 and not self.channels_last

    def describe(self) -> str:
        """Why the output cannot be scanned, in words (empty when it can)."""
        if self.calls == 0:
            return "never called"
        if self.calls > 1:
            return f"called {self.calls} times"
        if self.shape is None:
            return self.kind
        if len(self.shape) < 2:
            return f"shape {tuple(self.shape)}"
        if self.channels_last:
            return (f"shape {tuple(self.shape)} with its {self.shape[-1]} channels last (B, H, W, C): dim 1 is a "
                    "spatial size, not filters")
        return ""


def trace_layers(
    model: nn.Module, example_inputs: torch.Tensor, layers: Sequence[str] | None = None,
) -> tuple[Any, dict[str, LayerTrace]]:
    """One eval-mode forward of ``example_inputs`` without gradients, recording every module's output.

    The one forward-hook tracer of the package: :func:`list_layers`, :func:`filter_owner`, the monitors'
    dry run before the first step and ``AttentionGuidance``'s layer checks all read it. Compiled code runs
    eagerly (:func:`eager`); the model's modes are restored (:func:`eval_mode`); hooks are removed also when
    the forward raises (the exception propagates).

    Args:
        layers: module paths to report (each resolved with :func:`get_layer`); None: every named module.
            All modules are hooked either way: a layer's channel layout is judged from the conv, linear or
            norm layer that ran last before it.

    Returns:
        ``(output, {layer: LayerTrace})`` in ``named_modules`` order for ``layers=None`` (names without
        ``torch.compile``'s ``_orig_mod``), else in the order of ``layers`` (a layer never called has
        ``calls == 0``).
    """
    wanted = None if layers is None else {id(get_layer(model, layer)): layer for layer in layers}
    records: dict[int, list] = {}
    state = {"declared": None, "order": 0}

    def hook(module, args, output):
        declared = _declared_channels(module)
        channels = declared if declared is not None else state["declared"]
        if declared is not None:
            state["declared"] = declared
        if id(module) in records:
            records[id(module)][0] += 1
            return
        shape = output.shape if isinstance(output, torch.Tensor) else None
        last = (shape is not None and len(shape) >= 3 and channels is not None and shape[1] != channels
                and shape[-1] == channels)
        records[id(module)] = [1, shape, type(output).__name__, last, state["order"]]
        state["order"] += 1

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = []
    try:
        seen = set()
        for _, module in named:
            if id(module) not in seen:
                seen.add(id(module))
                handles.append(module.register_forward_hook(hook))
        with eval_mode(model), torch.no_grad(), eager():
            output = model(example_inputs)
    finally:
        for h in handles:
            h.remove()

    def trace(module: nn.Module) -> LayerTrace:
        r = records.get(id(module))
        return LayerTrace(0, None, "never called", False, -1) if r is None else LayerTrace(*r)

    if wanted is not None:
        return output, {layer: trace(get_layer(model, layer)) for layer in layers}
    out: dict[str, LayerTrace] = {}
    for name, module in named:
        out.setdefault(public_name(name), trace(module))
    return output, out


def example_input(example: Any) -> torch.Tensor:
    """The input tensor of ``example``: a tensor as it is, or a batch (an ``(x, y[, mask])`` tuple, a dict
    with ``'image'``/``'input'``, a :class:`~lightning_interp.batch.Batch`) read by the default batch adapter."""
    if isinstance(example, torch.Tensor):
        return example
    try:
        return default_batch_adapter(example).x
    except Exception as err:
        raise TypeError(
            f"Expected `example_inputs` to be a tensor the model accepts or a batch holding one ((x, y[, mask]), a "
            f"dict with 'image'/'input') but got {type(example).__name__}: {err}"
        ) from None


def _trace_calls(model: nn.Module, module: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int | None] | None:
    """``(calls, channels)`` of ``module`` in one eval-mode forward of ``example_inputs`` (:func:`trace_layers`);
    ``None`` when the network does not take these inputs as they are (then nothing can be checked here)."""
    name = next(n for n, m in model.named_modules() if m is module)
    try:
        _, traced = trace_layers(model, example_input(example_inputs), [name])
    except Exception:
        return None
    t = traced[name]
    channels = None if t.shape is None or len(t.shape) < 2 else int(t.shape[-1] if t.channels_last else t.shape[1])
    return t.calls, channels


def _choices(names: list[str]) -> str:
    return ", ".join(repr(public_name(n)) for n in names)


def _valid_layers(model: nn.Module, layer: str) -> list[str]:
    """Up to six layers of ``model`` that own their filters or declare them (convs, linears, norms), ``layer`` aside."""
    return [n for n in list_layers(model) if n != public_name(layer)][:6]


def filter_owner(model: nn.Module, layer: str, example_inputs: torch.Tensor | None = None) -> str:
    """The conv or linear layer whose weights make the filters (output channels) of ``layer``.

    Every scorer that needs the filters' weights (SoU) and pruning ask this one function, so the
    conv a filter is scored by is the conv pruning cuts. The rule:

    * a conv or linear layer: itself;
    * a norm layer (BatchNorm, GroupNorm, ...), an elementwise activation, dropout or pooling
      (:func:`is_pass_through`), or a block made only of them: the nearest conv or linear layer before
      it (``named_modules`` order) with the **same channel count** — the conv of a
      conv → BN → ReLU chain. Norm layers declare their channels; for the others the count comes
      from ``example_inputs`` when given, else the nearest conv or linear layer is taken;
    * a block (a module holding a conv or linear layer, e.g. torchvision's ``BasicBlock``,
      ``InvertedResidual``, ``Conv2dNormActivation``): the last conv or linear layer inside it, which
      makes the block's output channels (in a residual block it shares them with the other branch:
      pruning removes the whole residual group). With ``example_inputs`` a block whose output
      channels are not that layer's (a concatenating block, e.g. DenseNet's ``_DenseBlock``) is
      refused.

    Args:
        example_inputs: a batch the model accepts; one eval-mode forward is traced to count the
            layer's channels and calls, so that ambiguous layers are refused.

    Returns:
        the module path of the owner (without ``torch.compile``'s ``_orig_mod`` steps).

    Raises:
        ValueError: ``layer`` has no owner (a channel-mixing or unknown module, nothing before it) or
            an ambiguous one (a module called more than once per forward, e.g. the shared ReLU of a
            torchvision ResNet block; a concatenating block). The message names the valid choices.

    Examples:
        >>> filter_owner(SimpleCNN(batch_norm=True), "relu2")
        'conv2'
    """
    module = get_layer(model, layer)
    if isinstance(module, _MAKES_FILTERS):
        return layer
    traced = _trace_calls(model, module, example_inputs) if example_inputs is not None else None
    if traced is not None and traced[0] > 1:
        parent = layer.rpartition(".")[0]
        scope = get_layer(model, parent) if parent else model
        near = [f"{parent}.{n}" if parent else n for n, m in scope.named_modules()
                if n and isinstance(m, (*_MAKES_FILTERS, *_NORMS))]
        raise ValueError(
            f"Expected layer {layer!r} ({type(module).__name__}) to be called once per forward pass but it is "
            f"called {traced[0]} times (a shared module), so the conv that makes its filters is ambiguous. "
            f"Name a conv or norm layer instead, e.g. {_choices(near[-4:])}."
        )
    channels = layer_channels(module)
    if channels is None and traced is not None:
        channels = traced[1]
    inner = [(f"{layer}.{n}", m) for n, m in module.named_modules() if n and isinstance(m, _MAKES_FILTERS)]
    if inner:
        name, owner = inner[-1]
        if channels is not None and layer_channels(owner) != channels:
            inside = [f"{layer}.{n}" for n, m in module.named_modules() if n and isinstance(m, (*_MAKES_FILTERS, *_NORMS))]
            raise ValueError(
                f"Expected the output channels of block {layer!r} ({type(module).__name__}, {channels} channels) "
                f"to be those of one conv/norm layer inside it, but its last conv, {public_name(name)!r}, has "
                f"{layer_channels(owner)} (the block concatenates or reshapes). Monitor and prune a conv or "
                f"norm layer instead, e.g. {_choices(inside[-3:])}."
            )
        return public_name(name)
    if channels is None:  # a block of norms and activations: the channels its norm layers declare
        channels = next((c for m in module.modules() if (c := layer_channels(m)) is not None), None)
    if not _keeps_channels(module):
        raise ValueError(
            f"Expected layer {layer!r} to have filters made by a conv or linear layer (a conv, linear or norm "
            f"layer, a block holding one, or an elementwise activation, dropout or pooling after one) but it is a "
            f"{type(module).__name__}, which has no channels to prune or score. Valid choices include "
            f"{_choices(_valid_layers(model, layer))}."
        )
    before = []
    for name, m in model.named_modules():
        if m is module:  # by identity: names differ under torch.compile (`_orig_mod.`)
            break
        if isinstance(m, _MAKES_FILTERS):
            before.append((name, layer_channels(m)))
    matching = [name for name, c in before if channels is None or c == channels]
    if not matching:
        got = f" with {channels} channels" if channels is not None else ""
        raise ValueError(
            f"Expected a conv or linear layer{got} before {layer!r} ({type(module).__name__}) to make its filters "
            f"but found none; name the conv directly. Valid choices include {_choices(_valid_layers(model, layer))}."
        )
    return public_name(matching[-1])


@contextmanager
def eager() -> Iterator[None]:
    """Run ``torch.compile``d code eagerly inside the block.

    Dynamo does not guard on forward hooks by default: hooks added to a compiled network after it
    was compiled are silently skipped, and a graph compiled while a scan's hooks were on keeps
    calling them. Compiled graphs (aot_autograd) also refuse double backward. So every forward a
    scan hooks runs eagerly (:func:`capture_output` enters this); training steps stay compiled.
    """
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    with set_stance("force_eager") if set_stance is not None else contextlib.nullcontext():
        yield


_COMPILED = "_orig_mod"  # where torch.compile's OptimizedModule keeps the network it wraps


def public_name(name: str) -> str:
    """A module path without the ``_orig_mod`` steps ``torch.compile`` inserts (``"model.relu3"``
    for ``"model._orig_mod.relu3"``): the name the user knows, which :func:`get_layer` accepts."""
    return ".".join(part for part in name.split(".") if part != _COMPILED)


def _through_compiled(model: nn.Module, layer: str) -> nn.Module | None:
    """Resolve ``layer`` stepping into compiled modules' ``_orig_mod`` where the path needs it."""
    module = model
    for part in layer.split("."):
        children = module._modules
        if part not in children and _COMPILED in children:
            module = children[_COMPILED]
            children = module._modules
        if part not in children or children[part] is None:
            return None
        module = children[part]
    return module


def get_layer(model: nn.Module, layer: str) -> nn.Module:
    """Return the submodule at module path ``layer``.

    Paths into a ``torch.compile``d submodule may leave out its ``_orig_mod`` step: for
    ``model.net = torch.compile(net)``, ``"net.conv1"`` and ``"net._orig_mod.conv1"`` name the same
    module (hooks on it only fire when the forward runs eagerly, see
    ``lightning_interp.callbacks.base.eager``).

    Raises:
        ValueError: when ``layer`` is not a module path of ``model``; the message lists the
            closest valid names.
    """
    if not isinstance(layer, str):
        raise TypeError(f"Expected `layer` to be a module path (str) but got {type(layer).__name__}.")
    modules = dict(model.named_modules())
    if layer in modules and layer != "":
        return modules[layer]
    module = _through_compiled(model, layer)
    if module is not None:
        return module
    names = [public_name(n) for n in modules if public_name(n)]
    close = difflib.get_close_matches(layer, names, n=5, cutoff=0.5)
    if not close:
        close = [n for n, _ in list_layers(model).items()][:8]
    raise ValueError(
        f"Expected `layer` to be a module path of {type(model).__name__} but got {layer!r}. "
        f"Closest valid choices: {', '.join(repr(c) for c in close)}. "
        "`lightning_interp.layers.list_layers(model)` lists all of them."
    )


def list_layers(model: nn.Module, example_inputs: torch.Tensor | None = None) -> dict[str, int]:
    """Module paths whose outputs can be scanned, with their output channel count.

    Without ``example_inputs`` the answer is static: modules that declare their channels
    (convolutions, linear and normalisation layers). With ``example_inputs`` (a batch the model
    accepts) one forward pass is traced and every module whose output is a tensor of rank >= 2
    is listed (activations, pools, residual blocks, ...) with ``output.shape[1]`` channels —
    except modules called more than once per forward (a ReLU shared inside a torchvision
    ResNet block, say), whose output is ambiguous: name the conv or the block instead and
    scan with ``rectify=True`` — and modules whose output keeps its channels on the last dimension
    (``B x H x W x C``, e.g. the Linear and GELU layers inside a ConvNeXt block): their dim 1 is a
    spatial size, not filters (:attr:`LayerTrace.channels_last`); name the block instead.

    ``example_inputs`` may be a batch as the dataloader yields it (``(x, y[, mask])``, a dict with
    ``'image'``/``'input'``): its inputs are taken (:func:`example_input`).

    Names inside a ``torch.compile``d submodule are given without ``_orig_mod``.

    Returns:
        ``{layer: channels}`` in ``named_modules()`` order.
    """
    if example_inputs is None:
        out = {}
        for name, module in model.named_modules():
            channels = layer_channels(module)
            if public_name(name) and channels is not None:
                out[public_name(name)] = channels
        return out
    _, traced = trace_layers(model, example_input(example_inputs))
    return {name: int(t.shape[1]) for name, t in traced.items() if t.scannable}


@contextmanager
def capture_output(module: nn.Module, layer: str) -> Iterator[dict]:
    """Record the output of ``module`` (named ``layer``) during a forward pass.

    Yields a dict whose ``"output"`` holds the module's output after the forward. A module
    called twice in one forward (shared activation modules) raises a ``ValueError``; a module
    that is never called leaves ``"output"`` as ``None``. The hook is removed on exit. Compiled code
    runs eagerly inside the block (:func:`eager`), so the hook fires.
    """
    store: dict = {"output": None, "calls": 0}

    def hook(mod, args, output):
        store["calls"] += 1
        if store["calls"] > 1:
            raise ValueError(
                f"Layer {layer!r} ({type(mod).__name__}) is called more than once in one forward pass "
                "(a shared module, e.g. the ReLU of a torchvision ResNet block), so its output is "
                "ambiguous. Name the preceding conv/bn or the whole block and pass `rectify=True`."
            )
        if not isinstance(output, torch.Tensor):
            raise ValueError(
                f"Expected layer {layer!r} to output a tensor but got {type(output).__name__}."
            )
        store["output"] = output

    handle = module.register_forward_hook(hook)
    try:
        with eager():
            yield store
    finally:
        handle.remove()
