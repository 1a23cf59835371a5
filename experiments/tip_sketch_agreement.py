"""How far TIPMonitor's default (sketch, P = 4 directions per sample, probe 64) is from exact mode.

On checkpoints of the overfitting-signal benchmark (``experiments/overfitting_signals.py``; SimpleCNN
``relu3`` on CIFAR-10, training images, no masks), for each property T^k and saliency: the Spearman
rank correlation across the layer's filters between

* sketch mode and exact mode on the **same** probe of 64 training images (the sketch's own error), and
* exact mode on two **disjoint** probes of 64 (the noise ceiling: what the choice of probe samples
  alone changes),

and the same for the old default (exact, probe 128) against exact on the 64-image probe. T_m and
T_c are exact in sketch mode by construction (DESIGN §1); T_v and T_cor are Hutchinson estimates.
Nothing is tuned here: the numbers are printed as measured.

    python experiments/tip_sketch_agreement.py              # results/tip_sketch_agreement.json
    python experiments/tip_sketch_agreement.py --tiny       # on overfitting_signals.py --tiny's runs: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overfitting_signals as ofs  # noqa: E402

from lightning_interp.metrics.tip import layer_properties  # noqa: E402
from lightning_interp.overfitting import spearman  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "tip_sketch_agreement.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", default="runs/ofsig")
    p.add_argument("--cache", default="runs/cifar10_uint8.pt")
    p.add_argument("--model", default="simple_cnn", choices=list(ofs.MODELS), help="the runs' model (layer relu3)")
    p.add_argument("--runs", nargs="+", default=["simple_cnn_noise00_seed0", "simple_cnn_noise20_seed0",
                                                 "simple_cnn_noise40_seed0"])
    p.add_argument("--epochs", nargs="+", type=int, default=[2, 10, 20])
    p.add_argument("--train-size", type=int, default=5000, help="the benchmark's training split")
    p.add_argument("--probe", type=int, default=64, help="images of each probe (the big probe has twice as many)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--tiny", action="store_true", help="on the runs of `overfitting_signals.py --tiny`, made first "
                   "(probe 16); outputs in a temporary folder (make test)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="tip-sketch-tiny-") as tmp:
        if args.tiny:
            bench = ofs.use_tiny(ofs.parser().parse_args(["--stage", "train"]), tmp)
            ofs.run(bench)
            args.data, args.cache, args.out, args.train_size = bench.data, bench.cache, bench.out, bench.train_size
            args.model, args.epochs, args.probe = bench.models[0], [1, bench.max_epochs], 16
            args.runs = [ofs.run_name(args.model, noise, seed) for noise in bench.noise for seed in bench.seeds]
            args.results = os.path.join(tmp, "tip_sketch_agreement.json")
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    data = ofs.splits(ofs.load_cifar(args.data, Path(args.cache)), args.train_size)
    x, y = data["train_x"], data["train_y"]
    g = torch.Generator().manual_seed(123)
    order = torch.randperm(len(x), generator=g)
    n = args.probe
    a, b, big = order[:n], order[n : 2 * n], order[: 2 * n]
    rows = []
    for run_dir in args.runs:
        for epoch in args.epochs:
            path = Path(args.out) / run_dir
            if not (path / f"epoch_{epoch:03d}.pt").exists():
                continue
            model = ofs.load_model(path, args.model, epoch)
            exact_a = layer_properties(model, "relu3", x[a], None, y[a], mode="exact")
            exact_b = layer_properties(model, "relu3", x[b], None, y[b], mode="exact")
            exact_big = layer_properties(model, "relu3", x[big], None, y[big], mode="exact")
            sketch_a = layer_properties(model, "relu3", x[a], None, y[a], mode="sketch", num_projections=4, seed=0)
            for name in ("mean", "variance", "covariance", "correlation", "avou", "sou"):
                rows.append({
                    "run": run_dir, "epoch": epoch, "property": name,
                    "sketch_vs_exact_same_probe": spearman(sketch_a[name], exact_a[name]),
                    "exact_vs_exact_other_probe": spearman(exact_b[name], exact_a[name]),
                    "exact128_vs_exact64": spearman(exact_big[name], exact_a[name]),
                })
            print(run_dir, epoch, {r["property"]: round(r["sketch_vs_exact_same_probe"], 3) for r in rows[-6:]}, flush=True)
    summary = {}
    for name in ("mean", "variance", "covariance", "correlation", "avou", "sou"):
        sel = [r for r in rows if r["property"] == name]
        summary[name] = {k: (float(np.mean([r[k] for r in sel])), float(np.min([r[k] for r in sel])))
                         for k in ("sketch_vs_exact_same_probe", "exact_vs_exact_other_probe", "exact128_vs_exact64")}
    Path(args.results).write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows, "summary": summary},
                                             indent=2))
    print(f"\nSpearman across relu3's filters, probes of {n} and {2 * n} images, mean (min) over checkpoints:")
    print(f"| property | sketch P=4 vs exact, same {n} images | exact vs exact, another {n} images | exact {2 * n} vs exact {n} |")
    print("| --- | --- | --- | --- |")
    for name, s in summary.items():
        cells = [f"{m:+.2f} ({lo:+.2f})" for m, lo in s.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
