"""Exact filter learning images for every filter of a layer: lightning_interp vs its peers.

Peers, measured in the same run on the same inputs:
* ``captum loop`` — what a Captum user writes: one ``InputXGradient`` call per filter on a model
  whose output is ½Σ f_k² (a full forward and backward each);
* ``autograd loop`` — one forward, then one ``torch.autograd.grad`` per filter (the cost of K
  backward passes, the floor of any exact method built on reverse mode).

Outputs are checked equal before timing is reported. Prints seconds per method and the ratios.

    python benchmarks/nns.py                      # the cases for this machine (GPU if present)
    python benchmarks/nns.py --case resnet --device cuda --batch 256
    python benchmarks/nns.py --tiny               # 4 filters, 2 inputs, one repeat: the smoke run of make test
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from lightning_interp.layers import capture_output, get_layer
from lightning_interp.models import SimpleCNN, resnet18_cifar
from lightning_interp.nns import filter_learning_images


class HalfSquaredFilter(nn.Module):
    def __init__(self, model: nn.Module, layer: str, k: int):
        super().__init__()
        self.model, self.layer, self.k = model, layer, k

    def forward(self, x):
        with capture_output(get_layer(self.model, self.layer), self.layer) as store:
            self.model(x)
        return (0.5 * store["output"][:, self.k] ** 2).flatten(1).sum(1, keepdim=True)


def captum_loop(model, layer, x, filters):
    from captum.attr import InputXGradient

    return torch.stack(
        [InputXGradient(HalfSquaredFilter(model, layer, k)).attribute(x, target=0) for k in filters], 1
    )


def autograd_loop(model, layer, x, filters):
    xl = x.detach().clone().requires_grad_(True)
    with capture_output(get_layer(model, layer), layer) as store:
        model(xl)
    f = store["output"]
    out = []
    for i, k in enumerate(filters):
        (g,) = torch.autograd.grad(0.5 * (f[:, k] ** 2).sum(), xl, retain_graph=i < len(filters) - 1)
        out.append(x * g)
    return torch.stack(out, 1)


def timed(fn, device, repeats):
    fn()  # warm-up (kernels, allocator)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def run_case(name, model, layer, x, filters, device, repeats, skip_captum):
    model = model.to(device).eval()
    x = x.to(device)
    print(f"\n== {name}: layer {layer}, {len(filters)} filters, inputs {tuple(x.shape)}, {device}")
    t_lib, lib = timed(lambda: filter_learning_images(model, layer, x, filters=filters, rectify=False), device, repeats)
    t_ag, ag = timed(lambda: autograd_loop(model, layer, x, filters), device, repeats)
    torch.testing.assert_close(lib, ag, rtol=1e-3, atol=1e-4 * ag.abs().max().item())
    print(f"lightning_interp        {t_lib:8.3f} s")
    print(f"autograd loop (K bwd)   {t_ag:8.3f} s   ratio {t_ag / t_lib:5.2f}x (>1: lightning_interp faster)")
    if not skip_captum:
        t_cap, cap = timed(lambda: captum_loop(model, layer, x, filters), device, max(1, repeats // 2))
        torch.testing.assert_close(lib, cap, rtol=1e-3, atol=1e-4 * cap.abs().max().item())
        print(f"captum InputXGradient   {t_cap:8.3f} s   ratio {t_cap / t_lib:5.2f}x (>1: lightning_interp faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=["all", "resnet", "simple"], default="all")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None, help="inputs (default 256 on GPU; 32 resnet / 128 simple on CPU)")
    parser.add_argument("--filters", type=int, default=None,
                        help="filters of each layer (default: resnet all 512 on GPU, 64 on CPU; SimpleCNN all 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-captum", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="4 filters of each layer, 2 inputs, one repeat (make test)")
    args = parser.parse_args()
    if args.tiny:
        args.filters, args.batch, args.repeats = 4, 2, 1
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    if args.case in ("all", "resnet"):
        batch = args.batch or (256 if gpu else 32)
        k = args.filters or (512 if gpu else 64)
        run_case("resnet18_cifar", resnet18_cifar(), "layer4.1.conv2", torch.randn(batch, 3, 32, 32),
                 list(range(k)), device, args.repeats, args.skip_captum)
    if args.case in ("all", "simple"):
        batch = args.batch or (256 if gpu else 128)
        run_case("SimpleCNN", SimpleCNN(in_channels=3), "conv3", torch.randn(batch, 3, 32, 32),
                 list(range(args.filters or 64)), device, args.repeats, args.skip_captum)


if __name__ == "__main__":
    main()
