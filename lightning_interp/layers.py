"""Naming the layers a scan can look at.

A *layer* is a module path in ``model.named_modules()``; its output is that module's output
(DESIGN §1). Every public function that takes a ``layer`` resolves it with
:func:`get_layer`, so a typo gives the same helpful error everywhere.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["get_layer", "list_layers", "capture_output", "eager", "layer_channels", "public_name"]

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
    scan with ``rectify=True``.

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

    calls: dict[str, int] = {}
    channels: dict[str, int] = {}
    handles = []

    def make_hook(name: str):
        def hook(module, args, output):
            calls[name] = calls.get(name, 0) + 1
            if isinstance(output, torch.Tensor) and output.dim() >= 2:
                channels[name] = int(output.shape[1])

        return hook

    was_training = model.training
    try:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        model.eval()
        with torch.no_grad(), eager():
            model(example_inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, int] = {}
    for name, _ in model.named_modules():
        if name in channels and calls.get(name) == 1:
            out.setdefault(public_name(name) or name, channels[name])
    return out


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
