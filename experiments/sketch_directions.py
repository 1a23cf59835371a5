"""Would other sketch directions give exact mode's anomaly flags? Offline, on exact learning images.

Sketch mode sees each filter's learning images only through P shared directions: its features
are ``L_k · Ω`` (``sketch_learning_images`` equals that to 1e-6, tests/test_sketch.py). So any
choice of directions can be tried without forward-mode passes, by projecting the exact images.
On the SimpleCNN trained by ``experiments/sketch_agreement.py`` (``relu3``, 64 filters, the same
256-image CIFAR-10 validation probe), for P in {16, 32, 64, 128}, the share of filters whose
anomaly flag equals exact mode's, for:

* ``rademacher``: ±1 directions, two seeds (what sketch mode uses);
* ``lowpass-R``: Gaussian noise at R x R per channel, upsampled bilinearly (smooth directions);
* ``pilot-m``: the top-P eigenvectors of the pooled covariance of m random filters' exact images
  (an exact pass over m filters first, then P directions for all);
* ``oracle``: the top-P eigenvectors of the pooled covariance of *all* filters' exact images —
  the best shared subspace, which no sketch can know (an upper bound for shared directions).

    python experiments/sketch_directions.py --cifar ../shared/data/cifar10 \\
        --checkpoint runs/sketch_agreement/simple_cnn.pt --out experiments/results/sketch_directions.json
    python experiments/sketch_directions.py --tiny    # an untrained SimpleCNN, 16 x 16 generated images: make test's smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch
from torch.nn import functional as F

from lightning_interp.data import write_toy_imagefolder
from lightning_interp.metrics.anomaly import detect_anomaly_filters
from lightning_interp.metrics.tip import avou
from lightning_interp.models import SimpleCNN
from lightning_interp.nns import filter_learning_images, layer_activations

CRITERIA = dict(min_cluster_size=0.1, k_max=10, alpha=0.2, beta=1.0, theta=0.1, backend="batched")


def probe(root: str, size: int) -> torch.Tensor:
    from torchvision import datasets, transforms

    ds = datasets.ImageFolder(f"{root}/val", transform=transforms.ToTensor())
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1234))[:size]  # as sketch_agreement.py
    return torch.stack([ds[int(i)][0] for i in idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=None, help="CIFAR-10 in ImageFolder layout (required unless --tiny)")
    parser.add_argument("--checkpoint", default="runs/sketch_agreement/simple_cnn.pt")
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--projections", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tiny", action="store_true", help="an untrained seeded SimpleCNN saved as the checkpoint, "
                        "16 x 16 generated images, probe 16, P = 4; outputs in a temporary folder (make test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sketch-directions-tiny-") as tmp:
        if args.tiny:
            args.cifar = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(2, 2), size=16)
            args.checkpoint, args.out = os.path.join(tmp, "simple_cnn.pt"), os.path.join(tmp, "sketch_directions.json")
            torch.manual_seed(0)
            torch.save({"state_dict": SimpleCNN(in_channels=3, num_classes=10).state_dict()}, args.checkpoint)
            args.probe_size, args.projections = 16, [4]
        if args.cifar is None:
            parser.error("--cifar DIR is required (CIFAR-10 in ImageFolder layout)")
        run(args)


def run(args: argparse.Namespace) -> None:
    model = SimpleCNN(in_channels=3, num_classes=10)
    model.load_state_dict(torch.load(args.checkpoint, weights_only=False)["state_dict"])
    model.eval()
    x = probe(args.cifar, args.probe_size)
    images = filter_learning_images(model, "relu3", x, rectify=True).double()
    act = avou(layer_activations(model, "relu3", x, rectify=True))
    b, k = images.shape[:2]
    flat = images.reshape(b, k, -1)
    d = flat.shape[2]
    exact = detect_anomaly_filters(flat, act, **CRITERIA)

    def same(directions: torch.Tensor) -> float:  # directions (P, D)
        res = detect_anomaly_filters(torch.einsum("bkd,pd->bkp", flat, directions), act, **CRITERIA)
        return round((res.anomaly == exact.anomaly).double().mean().item(), 4)

    def rademacher(p: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 2, (p, d), generator=g) * 2 - 1).double()

    def lowpass(p: int, res: int) -> torch.Tensor:
        z = torch.randn(p, x.shape[1], res, res, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        return F.interpolate(z, size=x.shape[2:], mode="bilinear", align_corners=False).reshape(p, -1)

    centred = flat - flat.mean(0, keepdim=True)
    eigenvectors: dict[tuple[int, ...], torch.Tensor] = {}  # one D x D eigh per filter set, whatever P

    def top_eigenvectors(filters: torch.Tensor, p: int) -> torch.Tensor:
        key = tuple(filters.tolist())
        if key not in eigenvectors:
            cov = torch.einsum("bkd,bke->de", centred[:, filters], centred[:, filters])
            eigenvectors[key] = torch.linalg.eigh(cov)[1]
        return eigenvectors[key][:, -p:].T.contiguous()

    floor = detect_anomaly_filters(flat, act, seed=1, **CRITERIA)
    rows = {"exact, GMM seed 1": round((floor.anomaly == exact.anomaly).double().mean().item(), 4)}
    for p in args.projections:
        rows[f"P={p}"] = {
            "rademacher seed 0": same(rademacher(p, 0)),
            "rademacher seed 1": same(rademacher(p, 1)),
            **{f"lowpass-{r}": same(lowpass(p, r)) for r in (4, 8, 16)},
            **{f"pilot-{m}": same(top_eigenvectors(torch.randperm(k, generator=torch.Generator().manual_seed(0))[:m], p))
               for m in (8, 16)},
            "oracle": same(top_eigenvectors(torch.arange(k), p)),
        }
        print(f"P={p}: {rows[f'P={p}']}", flush=True)
    print(f"exact vs exact with GMM seed 1: {rows['exact, GMM seed 1']}; {exact.count} of {k} flagged by exact mode")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"model": "simple_cnn", "layer": "relu3", "probe": b, "flagged_exact": exact.count,
                       "criteria": CRITERIA, "same_flags": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
