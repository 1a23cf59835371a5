"""Sketch vs exact mode: how well do P random projections stand in for the learning images?

Models trained on the CIFAR-10 subset (``--cifar``, ImageFolder layout), the last conv layer of
each scanned with ``rectify=True`` (the monitors' default), on a fixed probe of validation images
(a seeded random draw, so every class is in it), for P in {16, 32, 64, 128}:

* anomaly flags (thesis exp. 1 settings as in ``AnomalyFilterMonitor``: λ = 0.1 · probe,
  k_max = 10, α = 0.2, β = 1, θ = 0.1, batched backend): fraction of filters whose flag is the
  same as exact mode's, the flag counts and the Jaccard index of the flagged sets. For scale, the
  same numbers between exact mode and exact mode with another GMM seed (the clustering's own noise);
* TIP rankings: Spearman correlation between sketch and exact per-filter T_m, T_v, T_c, T_cor
  (T_m and T_c are exact in sketch mode: their max abs difference is recorded);
* relative error of T_v: median (and 90th percentile) over the filters with T_v > 0;
* time, each path as its monitor runs it: anomaly scan = activations + learning images (exact:
  one VJP per filter, projected to 2-D per chunk; sketch: P forward-mode products) + GMM sweep;
  TIP = learning images + properties (exact) or ``sketch_properties`` (sketch).

Models are trained once (plain Adam loop, no augmentation) and saved under ``--ckpt-dir``
(``runs/`` is git-ignored); later runs load them, and the exact and per-P sketch parts are cached
there too (``--stage exact`` and ``--stage sketch`` compute one side only, e.g. in two processes;
delete the cache files to time again). Threads: 1 (``torch.set_num_threads``).

    OMP_NUM_THREADS=1 python experiments/sketch_agreement.py --cifar /work/shared/data/cifar10 \\
        --models simple_cnn lenet5 --out experiments/results/sketch_agreement_small.json
    OMP_NUM_THREADS=1 python experiments/sketch_agreement.py --cifar /work/shared/data/cifar10 \\
        --models resnet18_cifar --probe-size 32 --out experiments/results/sketch_agreement_resnet.json
    python experiments/sketch_agreement.py --table experiments/results/sketch_agreement_{small,resnet}.json
    OMP_NUM_THREADS=1 python experiments/sketch_agreement.py --models simple_cnn --projection-check 16 64 128 512 2048 \
        --out experiments/results/sketch_projection_check.json
    python experiments/sketch_agreement.py --tiny     # LeNet5 on generated images, probe 16, P = 4: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch
from torch.nn import functional as F

from lightning_interp.data import write_toy_imagefolder
from lightning_interp.metrics.anomaly import detect_anomaly_filters, project_filters_2d
from lightning_interp.metrics.tip import PROPERTIES, avou, interpretable_properties, spearman
from lightning_interp.models import LeNet5, SimpleCNN, resnet18_cifar
from lightning_interp.nns import (
    iter_filter_learning_images,
    layer_activations,
    sketch_learning_images,
    sketch_properties,
)

# name: (constructor, layer, training defaults: epochs, training images (None: all), lr, batch)
MODELS = {
    "simple_cnn": (lambda: SimpleCNN(in_channels=3, num_classes=10), "relu3", dict(epochs=5, train_images=None, lr=1e-3, batch=64)),
    "lenet5": (lambda: LeNet5(in_channels=3, num_classes=10), "relu2", dict(epochs=8, train_images=None, lr=1e-3, batch=64)),
    "resnet18_cifar": (lambda: resnet18_cifar(num_classes=10), "layer4.1.conv2", dict(epochs=2, train_images=2560, lr=1e-3, batch=64)),
}
ANOMALY_KW = dict(min_cluster_size=0.1, k_max=10, alpha=0.2, beta=1.0, theta=0.1, backend="batched")


def load_cifar(root: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from lightning_interp.data import ImageFolderDataModule

    data = ImageFolderDataModule(root, batch_size=64)
    data.setup()
    return (*data.train_set.tensors, *data.val_set.tensors)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = sum((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum().item() for i in range(0, len(y), batch))
    return correct / len(y)


def train_or_load(name: str, ckpt_dir: str, data, eval_images: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    make, _, cfg = MODELS[name]
    path = os.path.join(ckpt_dir, f"{name}.pt")
    torch.manual_seed(seed)
    model = make()
    if os.path.exists(path):
        saved = torch.load(path, weights_only=False)
        model.load_state_dict(saved["state_dict"])
        print(f"{name}: loaded {path} ({saved['info']})", flush=True)
        return model.eval(), saved["info"]
    xtr, ytr, xva, yva = data
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ytr), generator=g)
    if cfg["train_images"] is not None:
        idx = idx[: cfg["train_images"]]
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    t0 = time.perf_counter()
    for epoch in range(cfg["epochs"]):
        model.train()
        perm = idx[torch.randperm(len(idx), generator=g)]
        total, n = 0.0, 0
        for i in range(0, len(perm), cfg["batch"]):
            b = perm[i : i + cfg["batch"]]
            loss = F.cross_entropy(model(xtr[b]), ytr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(b), n + len(b)
        print(f"{name}: epoch {epoch} train loss {total / n:.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - t0
    ev = torch.randperm(len(yva), generator=torch.Generator().manual_seed(seed + 1))[:eval_images]
    info = {
        "epochs": cfg["epochs"], "train_images": len(idx), "lr": cfg["lr"], "batch": cfg["batch"], "optimizer": "adam",
        "train_seconds": round(train_seconds, 1),
        "train_acc": round(accuracy(model, xtr[idx[:eval_images]], ytr[idx[:eval_images]]), 4),
        "val_acc": round(accuracy(model, xva[ev], yva[ev]), 4), "val_images": len(ev),
    }
    os.makedirs(ckpt_dir, exist_ok=True)
    torch.save({"state_dict": model.state_dict(), "info": info}, path)
    print(f"{name}: trained {info}, saved {path}", flush=True)
    return model.eval(), info


def exact_scan(model, layer, x):
    """Exact learning images once; returns 2-D embeddings, TIP properties and the timings."""
    it = iter_filter_learning_images(model, layer, x, rectify=True)
    t_images = t_embed = t_props = 0.0
    embeddings, props = [], {}
    while True:
        t0 = time.perf_counter()
        try:
            _, li = next(it)
        except StopIteration:
            t_images += time.perf_counter() - t0
            break
        t1 = time.perf_counter()
        embeddings.append(project_filters_2d(li)[0])
        t2 = time.perf_counter()
        for k, v in interpretable_properties(li, x).items():
            props.setdefault(k, []).append(v.mean(0))
        t3 = time.perf_counter()
        t_images, t_embed, t_props = t_images + t1 - t0, t_embed + t2 - t1, t_props + t3 - t2
    features = torch.cat(embeddings).transpose(0, 1)  # (B, K, 2), as AnomalyFilterMonitor's exact mode
    return features, {k: torch.cat(v) for k, v in props.items()}, t_images, t_embed, t_props


def flag_stats(a, b) -> dict:
    both = int((a.anomaly & b.anomaly).sum())
    union = int((a.anomaly | b.anomaly).sum())
    return {
        "flags_same": (a.anomaly == b.anomaly).double().mean().item(),
        "flagged_exact": a.count, "flagged_other": b.count, "flagged_both": both,
        "jaccard": both / union if union else 1.0,
        # the criteria behind the flags (informative when few filters are flagged)
        "same_num_clusters": (a.num_clusters == b.num_clusters).double().mean().item(),
        "same_imbalanced": (a.imbalanced == b.imbalanced).double().mean().item(),
        "same_high_ch": (a.high_ch == b.high_ch).double().mean().item(),
        "imbalanced_exact_other": [int(a.imbalanced.sum()), int(b.imbalanced.sum())],
        "spearman_ch": spearman(a.ch_index, b.ch_index).item(),
    }


def _cached(path: str, compute):
    if os.path.exists(path):
        return torch.load(path, weights_only=False)
    out = compute()
    torch.save(out, path)
    return out


def exact_part(name, model, x, cache: str) -> dict:
    """Activations, exact learning images → 2-D embeddings and T^k, with timings (cached)."""
    layer = MODELS[name][1]

    def compute():
        t0 = time.perf_counter()
        activation = avou(layer_activations(model, layer, x, rectify=True))
        t_act = time.perf_counter() - t0
        features, props, t_images, t_embed, t_props = exact_scan(model, layer, x)
        print(f"{name}: exact scan {t_images:.0f} s", flush=True)
        return {"activation": activation, "features": features, "props": props, "t_act": t_act,
                "t_images": t_images, "t_embed": t_embed, "t_props": t_props, "loadavg": os.getloadavg()[1]}

    return _cached(os.path.join(cache, f"{name}_B{x.shape[0]}_exact.pt"), compute)


def sketch_part(name, model, x, p: int, cache: str) -> dict:
    """Sketch projections (anomaly path) and sketch T^k (TIP path) for P directions, timed (cached)."""
    layer = MODELS[name][1]

    def compute():
        t0 = time.perf_counter()
        proj = sketch_learning_images(model, layer, x, num_projections=p, rectify=True)
        t_images = time.perf_counter() - t0
        t0 = time.perf_counter()
        props = {k: v.mean(0) for k, v in sketch_properties(model, layer, x, num_projections=p, rectify=True).items()}
        t_tip = time.perf_counter() - t0
        print(f"{name}: sketch P={p}: images {t_images:.0f} s, TIP {t_tip:.0f} s", flush=True)
        return {"proj": proj, "props": props, "t_images": t_images, "t_tip": t_tip, "loadavg": os.getloadavg()[1]}

    return _cached(os.path.join(cache, f"{name}_B{x.shape[0]}_P{p}.pt"), compute)


def compare(name, info, x, ex: dict, sketches: dict[int, dict]) -> list[dict]:
    layer = MODELS[name][1]
    activation, features, exact_props = ex["activation"], ex["features"], ex["props"]
    k = features.shape[1]
    t0 = time.perf_counter()
    exact = detect_anomaly_filters(features, activation, seed=0, **ANOMALY_KW)
    t_gmm = time.perf_counter() - t0
    reseeded = detect_anomaly_filters(features, activation, seed=1, **ANOMALY_KW)
    base = {"model": name, "layer": layer, "filters": k, "probe": x.shape[0], "train": info}
    t_exact_scan = ex["t_act"] + ex["t_images"] + ex["t_embed"] + t_gmm
    t_exact_tip = ex["t_images"] + ex["t_props"]
    rows = [{**base, "P": "exact, GMM seed 1", **flag_stats(exact, reseeded),
             "seconds_exact_images": round(ex["t_images"], 2), "seconds_exact_scan": round(t_exact_scan, 2),
             "seconds_exact_tip": round(t_exact_tip, 2), "seconds_gmm": round(t_gmm, 2),
             "loadavg_5min_exact": round(ex["loadavg"], 2)}]
    tv = exact_props["variance"]
    alive = tv > 0
    for p, sk in sketches.items():
        t0 = time.perf_counter()
        sketch = detect_anomaly_filters(sk["proj"], activation, seed=0, **ANOMALY_KW)
        t_sk_gmm = time.perf_counter() - t0
        props = sk["props"]
        rel = ((props["variance"] - tv).abs() / tv.clamp_min(torch.finfo(tv.dtype).tiny))[alive]
        t_sk_scan = ex["t_act"] + sk["t_images"] + t_sk_gmm
        rows.append({
            **base, "P": p, **flag_stats(exact, sketch),
            **{f"spearman_{prop}": spearman(props[prop], exact_props[prop]).item() for prop in PROPERTIES},
            "median_rel_err_Tv": rel.median().item() if rel.numel() else float("nan"),
            "p90_rel_err_Tv": rel.quantile(0.9).item() if rel.numel() else float("nan"),
            "dead_filters": int((~alive).sum()),
            "max_abs_err_Tm_Tc": max((props[q] - exact_props[q]).abs().max().item() for q in ("mean", "covariance")),
            "seconds_exact_images": round(ex["t_images"], 2), "seconds_sketch_images": round(sk["t_images"], 2),
            "seconds_exact_scan": round(t_exact_scan, 2), "seconds_sketch_scan": round(t_sk_scan, 2),
            "speed_ratio_scan": round(t_exact_scan / t_sk_scan, 2),
            "speed_ratio_images": round(ex["t_images"] / sk["t_images"], 2),
            "seconds_exact_tip": round(t_exact_tip, 2), "seconds_sketch_tip": round(sk["t_tip"], 2),
            "speed_ratio_tip": round(t_exact_tip / sk["t_tip"], 2),
            "loadavg_5min_exact": round(ex["loadavg"], 2), "loadavg_5min_sketch": round(sk["loadavg"], 2),
        })
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def projection_check(name, model, x, projections, seeds=(0, 1)) -> list[dict]:
    """Is the flag disagreement the sketch's approximation or a bug? From the exact learning images L:

    * flags of the full L (B x K x C·H·W) must equal exact mode's (2-D embeddings per chunk);
    * ``sketch_learning_images`` must equal L · r (checked on 16 samples);
    * flags of L projected on P Rademacher directions (what sketch mode computes, any P, cheaply
      here) vs exact, for several direction seeds; and on a random orthogonal basis (must agree).
    """
    from lightning_interp.nns import filter_learning_images, rademacher_directions

    layer = MODELS[name][1]
    activation = avou(layer_activations(model, layer, x, rectify=True))
    li = filter_learning_images(model, layer, x, rectify=True)
    exact = detect_anomaly_filters(project_filters_2d(li)[0].transpose(0, 1), activation, seed=0, **ANOMALY_KW)
    full = detect_anomaly_filters(li, activation, seed=0, **ANOMALY_KW)
    n = min(16, x.shape[0])
    sk = sketch_learning_images(model, layer, x[:n], num_projections=8, rectify=True)
    r = rademacher_directions(8, x.shape[1:], seed=0)
    ref = torch.einsum("bkd,pd->bkp", li[:n].flatten(2), r.flatten(1))
    base = {"model": name, "layer": layer, "probe": x.shape[0]}
    rows = [{**base, "P": "full learning images", **flag_stats(exact, full),
             "sketch_vs_projected_exact_max_rel_diff": ((sk - ref).abs().max() / ref.abs().max()).item()}]
    lf = li.flatten(2)
    for p in projections:
        for seed in seeds:
            r = rademacher_directions(p, x.shape[1:], seed=seed).flatten(1)
            rows.append({**base, "P": p, "direction_seed": seed,
                         **flag_stats(exact, detect_anomaly_filters(lf @ r.T, activation, seed=0, **ANOMALY_KW))})
    d = lf.shape[2]
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)))
    rows.append({**base, "P": f"random orthogonal basis ({d})",
                 **flag_stats(exact, detect_anomaly_filters(lf @ q, activation, seed=0, **ANOMALY_KW))})
    for row in rows:
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| model (val acc) | layer | filters | probe | P | same flags | #flagged exact/sketch (both) | "
        "Spearman T_m / T_v / T_c / T_cor | T_v rel. err (median) | anomaly scan: exact s | sketch s | "
        "speed ratio | TIP: exact s | sketch s | speed ratio |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        head = f"| {r['model']} ({r['train']['val_acc']:.0%}) | `{r['layer']}` | {r['filters']} | {r['probe']} | {r['P']} | "
        flags = f"{r['flags_same']:.1%} | {r['flagged_exact']}/{r['flagged_other']} ({r['flagged_both']}) | "
        if isinstance(r["P"], str):
            lines.append(head + flags + f"— | — | {r['seconds_exact_scan']:.1f} | — | — | {r['seconds_exact_tip']:.1f} | — | — |")
            continue
        sp = " / ".join(f"{r[f'spearman_{p}']:.3f}" for p in PROPERTIES)
        lines.append(
            head + flags + f"{sp} | {r['median_rel_err_Tv']:.3f} | {r['seconds_exact_scan']:.1f} | "
            f"{r['seconds_sketch_scan']:.1f} | {r['speed_ratio_scan']:.1f}× | {r['seconds_exact_tip']:.1f} | "
            f"{r['seconds_sketch_tip']:.1f} | {r['speed_ratio_tip']:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default="/work/shared/data/cifar10", help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--projections", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--ckpt-dir", default="runs/sketch_agreement")
    parser.add_argument("--eval-images", type=int, default=2000, help="validation images for the reported accuracy")
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--stage", choices=["all", "exact", "sketch"], default="all",
                        help="exact/sketch: only compute (and cache) that part, e.g. in two processes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="experiments/results/sketch_agreement.json")
    parser.add_argument("--projection-check", type=int, nargs="+", metavar="P",
                        help="only run projection_check with these P (from the exact learning images)")
    parser.add_argument("--table", nargs="+", metavar="JSON", help="only print the table of these result files")
    parser.add_argument("--tiny", action="store_true", help="lenet5 on a generated 10-class image folder, probe 16, "
                        "P = 4, then --projection-check 4 and --table; outputs in a temporary folder (make test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sketch-agreement-tiny-") as tmp:
        if not args.tiny:
            return run(args)
        args.cifar = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(4, 2))
        args.models, args.probe_size, args.projections, args.eval_images = ["lenet5"], 16, [4], 16
        args.ckpt_dir, args.out = tmp, os.path.join(tmp, "sketch_agreement.json")
        run(args)
        run(argparse.Namespace(**{**vars(args), "projection_check": [4], "out": os.path.join(tmp, "check.json")}))
        run(argparse.Namespace(**{**vars(args), "table": [args.out]}))


def run(args: argparse.Namespace) -> None:
    if args.table:
        rows = [r for path in args.table for r in json.load(open(path))["rows"]]
        print(table(rows))
        return
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    data = load_cifar(args.cifar)
    print(f"loaded CIFAR-10 subset in {time.perf_counter() - t0:.0f} s", flush=True)
    xva = data[2]
    probe_idx = torch.randperm(len(xva), generator=torch.Generator().manual_seed(1234))[: args.probe_size]
    x = xva[probe_idx]
    rows = []
    for name in args.models:
        model, info = train_or_load(name, args.ckpt_dir, data, args.eval_images)
        if args.train_only:
            continue
        if args.projection_check:
            rows += projection_check(name, model, x, args.projection_check)
            continue
        ex = exact_part(name, model, x, args.ckpt_dir) if args.stage in ("all", "exact") else None
        sketches = {p: sketch_part(name, model, x, p, args.ckpt_dir) for p in args.projections} if args.stage in (
            "all", "sketch") else None
        if ex is not None and sketches is not None:
            rows += compare(name, info, x, ex, sketches)
    if args.train_only or args.stage != "all":
        return
    if args.projection_check:
        with open(args.out, "w") as fh:
            json.dump({"anomaly": ANOMALY_KW, "probe": "CIFAR-10 val images, randperm seed 1234", "rows": rows}, fh, indent=1)
        return
    meta = {"threads": args.threads, "device": "cpu", "platform": platform.processor() or platform.machine(),
            "torch": torch.__version__, "probe": "CIFAR-10 val images, randperm seed 1234", "anomaly": ANOMALY_KW}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
