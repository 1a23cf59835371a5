"""Sketch vs exact mode: how well do P random projections stand in for the learning images?

For SimpleCNN, LeNet5 and resnet18_cifar (each trained briefly on the shapes data so that its
filters are not random), on a fixed probe, for one layer each, and P in {16, 32, 64, 128}:

* anomaly flags: fraction of filters whose flag is the same as exact mode's (thesis exp. 1
  settings, λ = 0.1 · probe), and the flag counts;
* TIP rankings: Spearman correlation between sketch and exact per-filter T_v and T_cor
  (T_m and T_c are exact in sketch mode: checked, max abs difference printed);
* relative error of T_v (median over filters);
* time of the learning-image part of a scan (exact: one backward per filter; sketch: P
  forward-mode passes) and of the whole anomaly scan.

    python experiments/sketch_agreement.py --probe-size 128 --out runs/sketch_agreement.json
"""

from __future__ import annotations

import argparse
import json
import time

import lightning.pytorch as pl
import torch

from lightning_interp.data import ShapesDataModule
from lightning_interp.metrics.anomaly import detect_anomaly_filters, project_filters_2d
from lightning_interp.metrics.tip import interpretable_properties, spearman
from lightning_interp.models import ImageClassifier, LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.nns import (
    iter_filter_learning_images,
    layer_activations,
    sketch_learning_images,
    sketch_properties,
)

MODELS = {
    "simple_cnn": (lambda: SimpleCNN(in_channels=3, num_classes=4), "model.relu3", True),
    "lenet5": (lambda: LeNet5(in_channels=3, num_classes=4), "model.relu2", True),
    "resnet18_cifar": (lambda: resnet18_cifar(num_classes=4), "model.layer2.1.bn2", True),
}


def exact_scan(module, layer, x, rectify):
    t0 = time.perf_counter()
    embeddings, tv, tcor, tm, tc = [], [], [], [], []
    for _, li in iter_filter_learning_images(module, layer, x, rectify=rectify):
        embeddings.append(project_filters_2d(li)[0])
        props = interpretable_properties(li, x)
        tv.append(props["variance"].mean(0))
        tcor.append(props["correlation"].mean(0))
        tm.append(props["mean"].mean(0))
        tc.append(props["covariance"].mean(0))
    seconds = time.perf_counter() - t0
    features = torch.cat(embeddings).transpose(0, 1)
    return features, torch.cat(tv), torch.cat(tcor), torch.cat(tm), torch.cat(tc), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--probe-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--projections", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--out", default="runs/sketch_agreement.json")
    args = parser.parse_args()
    data = ShapesDataModule(num_train=1000, num_val=200, seed=0)
    data.setup()
    probe = next(iter(torch.utils.data.DataLoader(data.val_set, batch_size=args.probe_size)))
    x = probe["image"]
    rows = []
    for name in args.models:
        make, layer, rectify = MODELS[name]
        pl.seed_everything(0)
        module = ImageClassifier(make(), lr=2e-3)
        pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False).fit(module, datamodule=data)
        module.eval()
        act = layer_activations(module, layer, x, rectify=rectify)
        activation = act.flatten(2).mean(2).mean(0)
        kw = dict(min_cluster_size=0.1, k_max=10)
        features, tv, tcor, tm, tc, t_exact_li = exact_scan(module, layer, x, rectify)
        t0 = time.perf_counter()
        exact = detect_anomaly_filters(features, activation, **kw)
        t_exact = t_exact_li + time.perf_counter() - t0
        for p in args.projections:
            t0 = time.perf_counter()
            proj = sketch_learning_images(module, layer, x, num_projections=p, rectify=rectify)
            t_sketch_li = time.perf_counter() - t0
            sketch = detect_anomaly_filters(proj, activation, **kw)
            t_sketch = time.perf_counter() - t0
            props = {k: v.mean(0) for k, v in sketch_properties(module, layer, x, num_projections=p, rectify=rectify).items()}
            row = {
                "model": name, "layer": layer, "filters": int(tv.numel()), "P": p,
                "flags_same": (sketch.anomaly == exact.anomaly).double().mean().item(),
                "flagged_exact": exact.count, "flagged_sketch": sketch.count,
                "spearman_Tv": spearman(props["variance"], tv).item(),
                "spearman_Tcor": spearman(props["correlation"], tcor).item(),
                "median_rel_err_Tv": ((props["variance"] - tv).abs() / tv.abs().clamp_min(1e-12)).median().item(),
                "max_abs_err_Tm_Tc": max((props["mean"] - tm).abs().max().item(), (props["covariance"] - tc).abs().max().item()),
                "seconds_exact_images": round(t_exact_li, 3), "seconds_sketch_images": round(t_sketch_li, 3),
                "seconds_exact_scan": round(t_exact, 3), "seconds_sketch_scan": round(t_sketch, 3),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print("\n| model (layer, filters) | P | same flags | flagged exact/sketch | Spearman T_v | Spearman T_cor | median rel. err T_v | images: exact / sketch s | scan: exact / sketch s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} ({r['layer']}, {r['filters']}) | {r['P']} | {r['flags_same']:.1%} | {r['flagged_exact']}/{r['flagged_sketch']} | "
              f"{r['spearman_Tv']:.3f} | {r['spearman_Tcor']:.3f} | {r['median_rel_err_Tv']:.3f} | "
              f"{r['seconds_exact_images']:.2f} / {r['seconds_sketch_images']:.2f} | {r['seconds_exact_scan']:.2f} / {r['seconds_sketch_scan']:.2f} |")


if __name__ == "__main__":
    main()
