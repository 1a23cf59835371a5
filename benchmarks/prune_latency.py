"""Why a pruned network timed slower (issue 23, item 7: vgg11_bn 64.85 -> 75.37 ms, convnext_tiny 26.52 -> 29.62 ms
on CPU), measured in one run.

At CIFAR size, as ``PruneFlaggedFilters`` times them (a batch of 2 probe images, 3 x 32 x 32), for torchvision's
``vgg11_bn`` and ``convnext_tiny`` (10 classes, random weights):

1. **Removing a few flagged filters cuts MACs by well under 1 %.** MACs before/after for 5 filters of one layer,
   5 rounded to 8 (``round_to=8``), and 90 filters.
2. **The old timing cannot resolve that.** The old way — 7 forwards of the original, then 7 of the pruned network,
   median of each (``measure_latency`` twice) — repeated ``--repeats`` times on the same pair, and on a network
   against an identical copy (A/A: the true ratio is 1.00). The spread of the A/A ratio is the noise floor.
3. **Interleaved timing** (``compare_latency``: one forward of each network per round, the order reversed every
   other round, median of 16 rounds) on the same pairs, ``--repeats`` times: drift in the machine's load hits
   both networks alike. Beside it the same interleaving with a fixed order (A then B every round), on the
   identical copy, to show the position bias the reversal cancels.
4. **Odd channel counts cost nothing on the CPU**: a 3 x 3 conv at 8 x 8 (vgg11_bn's ``features.8`` at CIFAR size)
   with 256, 251 and 248 output channels, and the next conv with as many input channels, interleaved; and
   convnext's channels-last MLP (``Linear(c, 4c)``, GELU, ``Linear(4c, c)`` on 2 x 4 x 4 tokens, stage 3 at CIFAR
   size) for c from 176 to 192: time should grow with c, with no step at counts that are not multiples of 8.

    python benchmarks/prune_latency.py                     # CPU, one thread
    python benchmarks/prune_latency.py --device cuda       # where there is a GPU (round_to=8 there by default)
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torchvision
from torch import nn

from lightning_interp.pruning import compare_latency, measure_latency, prune_filters

NETWORKS = {
    "vgg11_bn": (lambda: torchvision.models.vgg11_bn(weights=None, num_classes=10), "features.8"),
    "convnext_tiny": (lambda: torchvision.models.convnext_tiny(weights=None, num_classes=10), "features.2.1"),
}


def ratios(pairs: list[tuple[float, float]]) -> str:
    r = [b / a for a, b in pairs]
    return f"ratio after/before min {min(r):.2f} median {statistics.median(r):.2f} max {max(r):.2f}"


def fixed_order(a: nn.Module, b: nn.Module, x: torch.Tensor, rounds: int = 16, warmup: int = 3) -> tuple[float, float]:
    """Interleaved like ``compare_latency`` but always ``a`` first (CPU only: no synchronisation)."""
    ta, tb = [], []
    with torch.no_grad():
        for i in range(warmup + rounds):
            for model, store in ((a, ta), (b, tb)):
                start = time.perf_counter()
                model(x)
                if i >= warmup:
                    store.append(1000 * (time.perf_counter() - start))
    return statistics.median(ta), statistics.median(tb)


def channel_counts(device: torch.device, rounds: int) -> None:
    x = torch.rand(2, 256, 8, 8, device=device)
    counts = (256, 251, 248)
    out = {c: nn.Conv2d(256, c, 3, padding=1).to(device).eval() for c in counts}
    nxt = {c: nn.Conv2d(c, 256, 3, padding=1).to(device).eval() for c in counts}
    xs = {c: torch.rand(2, c, 8, 8, device=device) for c in counts}
    t_out = compare_latency(*out.values(), example_inputs=x, repeats=rounds)
    # The next conv takes c input channels: time each on its own input, interleaved by hand.
    times: dict[int, list[float]] = {c: [] for c in counts}
    with torch.no_grad():
        for _ in range(rounds):
            for c in counts:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                nxt[c](xs[c])
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times[c].append(1000 * (time.perf_counter() - start))
    for c, t in zip(counts, t_out):
        print(f"  conv 256->{c}: {t:.3f} ms   conv {c}->256: {statistics.median(times[c]):.3f} ms")


class _FirstChannels(nn.Module):
    """``inner`` applied to the first ``c`` channels (last dim) of a shared input, so every width takes one input."""

    def __init__(self, inner: nn.Module, c: int):
        super().__init__()
        self.inner, self.c = inner, c

    def forward(self, x):
        return self.inner(x[..., : self.c].contiguous())


def mlp_widths(device: torch.device, rounds: int) -> None:
    widths = [176, 180, 184, 186, 187, 188, 190, 192]
    mlps = [_FirstChannels(nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c)), c).to(device)
            for c in widths]
    times = compare_latency(*mlps, example_inputs=torch.rand(2, 4, 4, 192, device=device), repeats=rounds)
    print("  MLP c -> 4c -> c: " + "  ".join(f"{c}: {1000 * t:.0f} us" for c, t in zip(widths, times)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="times each comparison is repeated")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds: a narrow SimpleCNN instead of vgg11_bn/convnext_tiny, one repeat, few rounds (make test)")
    args = parser.parse_args()
    networks, rounds = NETWORKS, {"medians": 32, "channels": 60, "mlp": 300}
    if args.tiny:
        from lightning_interp.models import SimpleCNN

        networks = {"simple_cnn": (lambda: SimpleCNN(in_channels=3, num_classes=10, width=(8, 192, 16)), "conv2")}
        args.repeats, rounds = 1, {"medians": 2, "channels": 2, "mlp": 2}
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")  # Torch-Pruning's note on convnext's layer_scale; our not-faster warning
    x = torch.rand(2, 3, 32, 32, device=device)
    print(f"device {device}, {args.threads} thread(s), batch of 2 at 32x32, {args.repeats} repeats per comparison")
    for name, (build, layer) in networks.items():
        torch.manual_seed(0)
        net = build().to(device).eval()
        copy_of_net = build().to(device).eval()
        copy_of_net.load_state_dict(net.state_dict())
        cases = {"5 filters": [1, 5, 9, 20, 33], "5 rounded to 8": [1, 5, 9, 20, 33], "90 filters": list(range(0, 180, 2))}
        pruned = {}
        print(f"\n{name}, pruning {layer}:")
        for case, idx in cases.items():
            p, s = prune_filters(net, {layer: idx}, x, latency=False, round_to=8 if "rounded" in case else 1)
            pruned[case] = p
            before, after = s.channels[layer]
            print(f"  {case}: {before} -> {after} channels, MACs {s.macs_before / 1e6:.1f}M -> {s.macs_after / 1e6:.1f}M "
                  f"({100 * (1 - s.macs_after / s.macs_before):.2f}% fewer)")
        five = pruned["5 filters"]
        old_aa = [(measure_latency(net, x), measure_latency(copy_of_net, x)) for _ in range(args.repeats)]
        old = [(measure_latency(net, x), measure_latency(five, x)) for _ in range(args.repeats)]
        new_aa = [tuple(compare_latency(net, copy_of_net, example_inputs=x)) for _ in range(args.repeats)]
        fixed_aa = [fixed_order(net, copy_of_net, x) for _ in range(args.repeats)] if device.type == "cpu" else []
        new = [tuple(compare_latency(net, five, example_inputs=x)) for _ in range(args.repeats)]
        print(f"  old timing (7 then 7), A/A identical copy:  {ratios(old_aa)}  "
              f"[{min(a for a, _ in old_aa):.1f}..{max(a for a, _ in old_aa):.1f} ms]")
        print(f"  old timing (7 then 7), 5 filters pruned:    {ratios(old)}")
        if fixed_aa:
            print(f"  interleaved, fixed order, A/A identical copy:       {ratios(fixed_aa)}")
        print(f"  interleaved, order alternating, A/A identical copy: {ratios(new_aa)}")
        print(f"  interleaved, order alternating, 5 filters pruned:   {ratios(new)}")
        medians = compare_latency(net, *pruned.values(), example_inputs=x, repeats=rounds["medians"])
        print(f"  interleaved medians ({rounds['medians']} rounds): original {medians[0]:.2f} ms, "
              + ", ".join(f"{case} {m:.2f} ms ({m / medians[0]:.2f}x)" for case, m in zip(pruned, medians[1:])))
    print(f"\nodd vs aligned channel counts ({rounds['channels']} interleaved rounds, median):")
    channel_counts(device, rounds=rounds["channels"])
    mlp_widths(device, rounds=rounds["mlp"])


if __name__ == "__main__":
    main()
