"""One anomaly scan of a wide layer, exact vs sketch mode: time and flag agreement.

The target (issue 6): a scan of a 512-filter layer with 256 probe samples in sketch mode is at
least 10x faster than exact mode, with the same anomaly flags on at least 90 % of the filters.

The model is trained here first (Adam, bf16 autocast on a GPU, no augmentation, so it overfits as
the monitor expects), on CIFAR-10 from ``--data``: an ImageFolder root with ``train/`` and ``val/``,
or a ``.pt`` file of uint8 tensors ``train_x`` (N x 3 x 32 x 32), ``train_y``, ``val_x``, ``val_y``.
Without ``--data`` the model stays untrained and only the times mean anything. The probe is a
seeded draw of validation images. For each case (``resnet18_cifar`` ``layer4``: 512 filters;
``simple_cnn`` ``relu3``: 64 filters), each measured in this run on the same probe:

* ``images``: the per-filter features alone: exact = one VJP per filter (batched), each chunk
  projected to 2-D by PCA; sketch = P forward-mode products for all filters at once
  (``torch.func.jvp`` vmapped over directions; the ``dual`` row is the replicated-batch
  ``forward_ad`` path it replaced);
* ``scan``: ``scan_anomaly_filters`` end to end, as ``AnomalyFilterMonitor`` runs it (activations,
  features, the batched GMM sweep on the same device);
* flags: the fraction of filters whose flag equals exact mode's, the flagged counts and their
  Jaccard index. "exact, GMM seed 1" and "exact, TF32 off" give the clustering's own noise floor.

Times are medians of ``--repeats`` runs after a warm-up, synchronised. Ratios are exact / sketch.

    python benchmarks/sketch.py --data /path/to/cifar10 --out runs/sketch.json
    python benchmarks/sketch.py --cases simple_cnn --epochs 2 --device cpu     # a quick CPU look
    python benchmarks/sketch.py --tiny       # generated images, probe 16, P = 4: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch.nn import functional as F

from lightning_interp.data import write_toy_imagefolder
from lightning_interp.metrics.anomaly import anomaly_features, detect_anomaly_filters, scan_anomaly_filters
from lightning_interp.metrics.tip import avou
from lightning_interp.models import SimpleCNN, resnet18_cifar
from lightning_interp.nns import (
    _elementwise_eval_batchnorm,
    _jvp_projections,
    layer_activations,
    rademacher_directions,
    scan_mode,
)

CASES = {
    "resnet18_cifar": (lambda: resnet18_cifar(num_classes=10), "layer4"),
    "simple_cnn": (lambda: SimpleCNN(in_channels=3, num_classes=10), "relu3"),
}
CRITERIA = dict(min_cluster_size=0.1, k_max=10, alpha=0.2, beta=1.0, theta=0.1)


def load_data(path: str | None):
    if path is None:
        return None
    if path.endswith(".pt"):
        d = torch.load(path)
        return [d[k].float() / 255 if k.endswith("_x") else d[k] for k in ("train_x", "train_y", "val_x", "val_y")]
    from lightning_interp.data import ImageFolderDataModule

    data = ImageFolderDataModule(path, batch_size=256)
    data.setup()
    return [*data.train_set.tensors, *data.val_set.tensors]


def train(model, data, device, epochs: int, batch: int = 256) -> dict:
    xtr, ytr, xva, yva = data
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        for i in range(0, len(perm), batch):
            b = perm[i : i + batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(xtr[b].to(device)), ytr[b].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    @torch.no_grad()
    def acc(x, y):
        model.eval()
        return sum((model(x[i : i + 500].to(device)).argmax(1).cpu() == y[i : i + 500]).sum().item() for i in range(0, len(y), 500)) / len(y)

    return {"epochs": epochs, "train_images": len(ytr), "seconds": round(time.perf_counter() - t0, 1),
            "train_acc": round(acc(xtr[:2000], ytr[:2000]), 3), "val_acc": round(acc(xva, yva), 3)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int):
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def dual_features(model, layer, x, p):
    r = rademacher_directions(p, x.shape[1:], seed=0, device=x.device, dtype=x.dtype)
    with scan_mode(model), torch.no_grad(), _elementwise_eval_batchnorm(model):
        return _jvp_projections(model, layer, x, r.unsqueeze(0) * x.unsqueeze(1), True, 16, impl="dual")


def agreement(ref, other) -> dict:
    both = int((ref.anomaly & other.anomaly).sum())
    union = int((ref.anomaly | other.anomaly).sum())
    return {"flags_same": round((ref.anomaly == other.anomaly).double().mean().item(), 4),
            "flagged_exact": ref.count, "flagged_other": other.count, "flagged_both": both,
            "jaccard": round(both / union, 3) if union else 1.0}


def run_case(name, data, device, args) -> list[dict]:
    make, layer = CASES[name]
    torch.manual_seed(0)
    model = make().to(device)
    info = train(model, data, device, args.epochs) if data is not None else {"epochs": 0}
    model.eval()
    if data is not None:
        xva = data[2]
        idx = torch.randperm(len(xva), generator=torch.Generator().manual_seed(1234))[: args.probe_size]
        x = xva[idx].to(device)
    else:
        x = torch.rand(args.probe_size, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    k = layer_activations(model, layer, x[:2], rectify=True).shape[1]
    act = avou(layer_activations(model, layer, x, rectify=True))
    print(f"\n== {name} {layer}: {k} filters, probe {tuple(x.shape)}, {device}, trained {info}", flush=True)
    rows = []
    saved = {"activation": act.cpu()}

    def row(label, t_images, t_scan, result, ref):
        r = {"case": name, "layer": layer, "filters": k, "probe": x.shape[0], "mode": label,
             "images_s": round(t_images, 4) if t_images is not None else None,
             "scan_s": round(t_scan, 4) if t_scan is not None else None, **agreement(ref, result)}
        rows.append(r)
        saved[label] = {f: getattr(result, f).cpu() for f in ("anomaly", "num_clusters", "ch_index", "imbalanced", "high_ch")}
        return r

    t_img_exact, feats = timed(lambda: anomaly_features(model, layer, x, mode="exact"), device, args.repeats)
    t_scan_exact, exact = timed(lambda: scan_anomaly_filters(model, layer, x, mode="exact", **CRITERIA), device, args.repeats)
    t_gmm, _ = timed(lambda: detect_anomaly_filters(feats, act, **CRITERIA), device, args.repeats)
    row("exact", t_img_exact, t_scan_exact, exact, exact)
    print(f"exact: images {t_img_exact:.3f} s, scan {t_scan_exact:.3f} s (GMM sweep alone {t_gmm:.3f} s), "
          f"{exact.count} flagged", flush=True)
    row("exact, GMM seed 1", None, None, detect_anomaly_filters(feats, act, seed=1, **CRITERIA), exact)
    if device.type == "cuda":
        old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        row("exact, TF32 off", None, None, scan_anomaly_filters(model, layer, x, mode="exact", **CRITERIA), exact)
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
    for p in args.projections:
        t_img, _ = timed(lambda p=p: anomaly_features(model, layer, x, mode="sketch", num_projections=p), device, args.repeats)
        t_scan, sk = timed(
            lambda p=p: scan_anomaly_filters(model, layer, x, mode="sketch", num_projections=p, **CRITERIA), device, args.repeats
        )
        r = row(f"sketch P={p}", t_img, t_scan, sk, exact)
        print(f"sketch P={p:4d}: images {t_img:.3f} s ({t_img_exact / t_img:5.1f}x), scan {t_scan:.3f} s "
              f"({t_scan_exact / t_scan:5.1f}x), same flags {r['flags_same']:.3f}, flagged {sk.count} "
              f"(both {r['flagged_both']})", flush=True)
        if p == args.projections[0]:
            t_dual, _ = timed(lambda p=p: dual_features(model, layer, x, p), device, max(1, args.repeats // 2))
            print(f"  forward_ad dual (replicated batch) P={p}: {t_dual:.3f} s, vmap {t_img:.3f} s: "
                  f"{t_dual / t_img:.1f}x", flush=True)
            rows.append({"case": name, "mode": f"sketch P={p} dual impl", "images_s": round(t_dual, 4)})
    for r in rows:
        r["train"] = info
    if args.save_dir:
        saved["exact_features"] = feats.cpu()
        torch.save(saved, os.path.join(args.save_dir, f"{name}_flags.pt"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=None)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--projections", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    parser.add_argument("--save-dir", default=None, help="save each case's flags and exact 2-D features here")
    parser.add_argument("--tiny", action="store_true", help="simple_cnn on a generated 10-class image folder, one "
                        "epoch, probe 16, P = 4, one repeat, outputs in a temporary folder (make test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sketch-tiny-") as tmp:
        if args.tiny:
            args.data = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(4, 2))
            args.cases, args.epochs, args.probe_size, args.projections, args.repeats = ["simple_cnn"], 1, 16, [4], 1
            args.out, args.save_dir = os.path.join(tmp, "sketch.json"), tmp
        measure(args)


def measure(args) -> None:
    device = torch.device(args.device)
    data = load_data(args.data)
    rows = []
    for name in args.cases:
        rows += run_case(name, data, device, args)
    print("\n| case | mode | images s | scan s | same flags | flagged exact/other (both) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "flags_same" in r:
            print(f"| {r['case']} | {r['mode']} | {r['images_s']} | {r['scan_s']} | {r['flags_same']:.3f} | "
                  f"{r['flagged_exact']}/{r['flagged_other']} ({r['flagged_both']}) |")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__,
                "criteria": CRITERIA, "cudnn_tf32": torch.backends.cudnn.allow_tf32}
        with open(args.out, "w") as fh:
            json.dump({"meta": meta, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
