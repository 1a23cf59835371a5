"""Thesis chapters 3-5, reproduced: tables 3-2..3-4, 4-2..4-5 and 5-1..5-6 beside the thesis' numbers.

Two small models trained here on the CPU, one thread:

* SimpleCNN on CIFAR-10 (the ImageFolder export in ``../shared/data/cifar10``) for chapter 3
  (no foreground masks needed) and tables 5-1/5-2; checkpoints at three accuracies for table 3-2;
* SimpleCNN on the package's generated shapes (``ShapesDataModule``: 4 classes, pixel masks) for
  everything that needs a foreground: chapter 4 and the filter types of tables 5-3..5-6 (three
  training phases = after epoch 1, the middle epoch, the last epoch).

The thesis used AlexNet/VGG/ResNet on ILSVRC-2013 DET, CUB-200-2011, Pascal VOC and MNIST; each
table is printed beside the row of the closest thesis model/dataset (named in the table), with
one sentence on whether the thesis' qualitative claim holds here (decided by the rule printed
with it). Layers: "layer 1..5" of tables 3-3/3-4 are ``relu1, pool1, relu2, pool2, relu3`` (the
thesis used pool1, pool2, conv3, conv4, conv5 of AlexNet); "conv1..3" of table 4-2 are
``relu1..3``; the last conv layer (tables 4-3, 4-4, 5-x) is ``relu3`` (64 filters).

    python experiments/thesis_tables.py                       # about 10 minutes, one CPU thread
    python experiments/thesis_tables.py --tiny                # tiny sizes, generated images: the smoke run of make test

Writes ``experiments/results/thesis_tables.json`` and ``.md`` (the Markdown printed at the end).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

from lightning_interp.cam import grad_cam
from lightning_interp.data import ImageFolderDataModule, ShapesDataModule, write_toy_imagefolder
from lightning_interp.metrics.aipc import aipc, evaluate
from lightning_interp.metrics.fq import (
    FQ_COMPONENTS,
    all_neuron_feature_quantity,
    combine_fq,
    fq_diversity,
)
from lightning_interp.metrics.fq import diversity_masking as fq_diversity_masking
from lightning_interp.metrics.thesis import (
    feature_map_correlation,
    filter_type_phases,
    fq_saliency_iou,
    layer_fq_ssim,
    map_iou,
    masked_loss_change,
    saliency_property_spearman,
    top2_neuron_iou,
    winning_neuron_stats,
)
from lightning_interp.metrics.tip import PROPERTIES, layer_properties, sou
from lightning_interp.models import SimpleCNN
from lightning_interp.nns import filter_learning_images, knowledge_quantity, layer_knowledge_quantity

HERE = os.path.dirname(os.path.abspath(__file__))
DEPTH_LAYERS = ["relu1", "pool1", "relu2", "pool2", "relu3"]
CONV_LAYERS = ["relu1", "relu2", "relu3"]
LAST = "relu3"
PROP_SHORT = {"mean": "T_m", "variance": "T_v", "covariance": "T_c", "correlation": "T_cor"}
TYPES = ("H-H", "H-noH", "noH-H", "L-L", "L-noL", "noL-L")

# The thesis' numbers (shared/thesis_tables.txt) for the closest model/dataset.
THESIS = {
    "3-2": {"model": "CNN on MNIST (accuracy 40/70/90 %)", "distance": [8.91, 8.52, 8.35],
            "activation_intensity": [0.427, 0.453, 0.678], "activation_count": [0.995, 0.996, 0.998]},
    "3-3": {"AlexNet (ILSVRC-2013 DET)": [0.998, 0.872, 0.641, 0.634, 0.623],
            "VGG-16 (ILSVRC-2013 DET)": [0.952, 0.923, 0.688, 0.620, 0.538]},
    "3-4": {"AlexNet (ILSVRC-2013 DET)": [0.999, 0.953, 0.761, 0.676, 0.615],
            "VGG-16 (ILSVRC-2013 DET)": [0.997, 0.990, 0.873, 0.835, 0.804]},
    "4-2": {"model": "AlexNet, ILSVRC-2013 DET, conv1-3", "ssim": [0.95, 0.52, 0.24], "fq": [0.0012, 0.02, 0.18]},
    "4-3": {"model": "AlexNet, dataset 1 (ILSVRC-2013 DET)", "top20": 108.3, "bottom20": -12.8},
    "4-4": {"model": "AlexNet (ILSVRC-2013 DET)", "l": [-32.7, 23.4], "c": [1.4, 3.5], "s": [34.1, -10.4],
            "vf": [56.8, 58.4], "nf": [56.8, 58.4]},
    "4-5": {"model": "AlexNet, dataset 1", "CAM": 0.08, "Grad-CAM": 0.17, "FQ": 0.32},
    "5-1": {"model": "AlexNet, data 1", "mean": 41.20, "variance": 41.40, "covariance": 52.40, "correlation": 24.40},
    "5-2": {"model": "AlexNet, data 1", "avou": [0.99, 0.97, -0.46, -0.50], "sou": [0.74, 0.77, -0.21, -0.26]},
    "5-3": {"model": "table 5-3 (VGG-16, CUB-200-2011, T_m)",
            "proportion": {"H-H": 0.28, "H-noH": 0.03, "noH-H": 0.03, "L-L": 0.29, "L-noL": 0.02, "noL-L": 0.02},
            "drop": {"H-H": [17.4, 22.0, 26.0], "H-noH": [0.4, 0.4, 0.8], "noH-H": [1.6, 1.4, 1.8],
                     "L-L": [0.0, 0.4, 0.0], "L-noL": [0.2, 0.2, 0.8], "noL-L": [0.0, 0.2, 0.0]}},
    "5-4": {"model": "table 5-4 (AlexNet, ILSVRC-2013 DET)",
            "mean": {"H-H": [15.8, 20.6, 22.6], "L-L": [-0.2, -0.2, -0.6]},
            "variance": {"H-H": [18.2, 20.4, 22.4], "L-L": [0.0, -0.2, 0.2]}},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(model, loader, epochs, lr, checkpoints=(), on_epoch=None):
    """Adam on cross-entropy; returns {name: state_dict} at the requested global steps
    (``checkpoints``: (name, step)) and at each epoch end via ``on_epoch(epoch, model)``."""
    opt = torch.optim.Adam(model.parameters(), lr)
    saved, step = {}, 0
    wanted = dict((s, n) for n, s in checkpoints)
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            x, y = (batch["image"], batch["label"]) if isinstance(batch, dict) else batch[:2]
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
            if step in wanted:
                saved[wanted[step]] = copy.deepcopy(model.state_dict())
        if on_epoch is not None:
            on_epoch(epoch, model)
    model.eval()
    return saved


def load(model_fn, state):
    m = model_fn()
    m.load_state_dict(state)
    return m.eval()


def fmt(v, nd=3):
    if v is None or (isinstance(v, float) and v != v):
        return "–"
    if isinstance(v, float) and 0 < abs(v) < 0.01:
        return f"{v:.1e}"
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def md_table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return "\n".join(out)


# ---- chapter 3 on CIFAR-10 ------------------------------------------------------------------------


def chapter3(cifar, cfg, results, md):
    make = lambda: SimpleCNN(in_channels=3, num_classes=10)  # noqa: E731
    torch.manual_seed(cfg["seed"])
    model = make()
    g = torch.Generator().manual_seed(cfg["seed"])  # ImageFolder is sorted by class: take seeded subsets
    train_set = Subset(cifar.train_set, torch.randperm(len(cifar.train_set), generator=g)[: cfg["cifar_train"]].tolist())
    loader = DataLoader(train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = Subset(cifar.val_set, torch.randperm(len(cifar.val_set), generator=g)[: cfg["cifar_val"]].tolist())
    val_loader = DataLoader(val, batch_size=500)
    steps = cfg["cifar_epochs"] * len(loader)
    t0 = time.time()
    saved = train(model, loader, cfg["cifar_epochs"], 1e-3,
                  checkpoints=[("low", cfg["low_step"]), ("mid", max(cfg["low_step"] + 1, steps // 3))])
    saved["high"] = copy.deepcopy(model.state_dict())
    results["cifar_train_s"] = time.time() - t0
    models = {k: load(make, v) for k, v in saved.items()}
    accs = {k: evaluate(m, val_loader)[0] for k, m in models.items()}
    log(f"CIFAR-10 SimpleCNN trained in {results['cifar_train_s']:.0f} s; val accuracy {accs}")
    results["cifar_accuracy"] = accs
    xv = torch.stack([val[i][0] for i in range(cfg["probe"])])
    yv = torch.tensor([int(val[i][1]) for i in range(cfg["probe"])])
    final = models["high"]

    # Table 3-2: the winning neuron at three accuracies.
    t0 = time.time()
    rows32 = {k: winning_neuron_stats(m, "fc2", xv, yv) for k, m in models.items()}
    results["3-2"] = {k: {n: v for n, v in r.items() if n != "class_distance"} |
                      {"class_distance": r["class_distance"].tolist()} for k, r in rows32.items()}
    order = ["low", "mid", "high"]
    th = THESIS["3-2"]
    rows = [[f"accuracy ({'/'.join(f'{100 * accs[k]:.0f}' for k in order)} % here; 40/70/90 thesis)", "", ""]]
    for name in ("distance", "activation_intensity", "activation_count", "winner_closest"):
        ours = " / ".join(fmt(rows32[k][name], 3) for k in order)
        ref = " / ".join(fmt(v, 3) for v in th[name]) if name in th else "(fig. 3-10: winner closest)"
        rows.append([name, ours, ref])
    d = [rows32[k]["distance"] for k in order]
    inten = [rows32[k]["activation_intensity"] for k in order]
    d_holds = d[0] > d[1] > d[2]
    i_holds = inten[0] < inten[1] < inten[2]
    md.append("### Table 3-2 — the winning output neuron (SimpleCNN, CIFAR-10; thesis: CNN on MNIST)\n")
    md.append(md_table(["", "here (low / mid / high accuracy)", "thesis CNN (40 / 70 / 90 %)"], rows[1:]))
    md.append(f"\n{rows[0][0]}. Distance in input units (‖I^o − I‖ over 3·32·32 values in [0, 1]; the thesis' "
              f"MNIST scale differs); {xv.shape[0]} validation images. Claims: the distance falls with accuracy: "
              f"**{'holds' if d_holds else 'does not hold'}** here ({' → '.join(f'{v:.3f}' for v in d)}); the "
              f"intensity rises with accuracy: **{'holds' if i_holds else 'does not hold'}** here "
              f"({' → '.join(f'{v:.3f}' for v in inten)}). ({time.time() - t0:.0f} s)\n")

    # Tables 3-3 and 3-4: per layer.
    t0 = time.time()
    x34 = xv[: cfg["probe_small"]]
    corr = [float(feature_map_correlation(final, layer, x34).mean()) for layer in DEPTH_LAYERS]
    t33 = time.time() - t0
    t0 = time.time()
    iou = [float(np.nanmean(top2_neuron_iou(final, layer, x34).numpy())) for layer in DEPTH_LAYERS]
    t34 = time.time() - t0
    results["3-3"], results["3-4"] = dict(zip(DEPTH_LAYERS, corr)), dict(zip(DEPTH_LAYERS, iou))
    for key, ours, title, secs in (("3-3", corr, "feature maps vs learning images, C^l (eqs. 3-17, 3-18)", t33),
                                   ("3-4", iou, "IoU of the two most activated neurons' learning images, IoU^l "
                                                "(eqs. 3-19, 3-20)", t34)):
        rows = [["SimpleCNN, CIFAR-10 (here)", *ours]] + [[n, *v] for n, v in THESIS[key].items()]
        falls = ours[0] > ours[-1] and ours[0] >= max(ours) - 1e-9
        md.append(f"### Table {key} — {title}\n")
        md.append(md_table(["", "layer 1", "layer 2", "layer 3", "layer 4", "layer 5"], rows))
        md.append(f"\nLayers here: {', '.join(DEPTH_LAYERS)}; {x34.shape[0]} validation images; a pixel is in a set "
                  f"when non-zero. Claim (highest at layer 1, lower with depth): "
                  f"**{'holds' if falls else 'does not hold'}** here. ({secs:.0f} s)\n")

    # Knowledge quantity (3.3.1, fig. 3-8; no table): the thesis' neuron mean vs the logged filter mean.
    t0 = time.time()
    xk = xv[: cfg["probe_kq"]]
    kq = {}
    for layer in CONV_LAYERS:
        thesis_kq = layer_knowledge_quantity(final, layer, xk, rectify=True, max_neurons=cfg["kq_neurons"])
        k = filter_learning_images(final, layer, xk, rectify=True)
        logged = knowledge_quantity(k, xk)
        kq[layer] = {"thesis_count": thesis_kq["activation_count"], "thesis_intensity": thesis_kq["activation_intensity"],
                     "logged_count": float(logged.activation_count.mean()),
                     "logged_intensity": float(logged.activation_intensity.mean())}
    results["knowledge_quantity"] = kq
    md.append("### Knowledge quantity (3.3.1, fig. 3-8) — thesis definition vs the logged one\n")
    md.append(md_table(["layer", "count (thesis: all neurons)", "count (logged: filters)",
                        "intensity (thesis)", "intensity (logged)"],
                       [[layer, v["thesis_count"], v["logged_count"], v["thesis_intensity"], v["logged_intensity"]]
                        for layer, v in kq.items()]))
    cnt = [kq[layer]["thesis_count"] for layer in CONV_LAYERS]
    md.append(f"\nThesis definition on {cfg['kq_neurons']} sampled neurons per layer, {xk.shape[0]} images. Claim "
              f"(CNN: activation count grows with depth): **{'holds' if cnt[0] < cnt[1] < cnt[2] else 'does not hold'}**"
              f" here. ({time.time() - t0:.0f} s)\n")
    return final, val_loader, xv, yv


def chapter5_cifar(model, val_loader, xv, yv, cfg, results, md):
    """Tables 5-1 and 5-2 need no masks: on the CIFAR-10 model too."""
    t0 = time.time()
    props = layer_properties(model, LAST, xv, y=yv)
    props["sou_per_sample"] = sou(model, LAST, xv, yv, estimate="per_sample")
    table = saliency_property_spearman(props, ("avou", "sou", "sou_per_sample"))
    fr = [i / 100 for i in range(0, 11)] + [0.2, 0.4, 0.6, 0.8, 1.0]
    areas = {p: aipc(model, LAST, props[p], val_loader, fr) for p in PROPERTIES}
    results["5-1_cifar"] = {p: {"area_top10_thesis": a.area_top10_thesis, "area": a.area, "area_top10": a.area_top10,
                                "change": a.change, "fractions": a.fractions} for p, a in areas.items()}
    results["5-2_cifar"] = table
    return table, areas, time.time() - t0


# ---- chapter 4 and 5 on shapes (masks) ---------------------------------------------------------------


def shapes_part(cfg, results, md, cifar_52=None):
    make = lambda: SimpleCNN(in_channels=3, num_classes=4)  # noqa: E731
    dm = ShapesDataModule(num_train=cfg["shapes_train"], num_val=cfg["shapes_val"], num_test=16, batch_size=64,
                          seed=cfg["seed"])
    dm.setup()
    torch.manual_seed(cfg["seed"])
    model = make()
    epochs = cfg["shapes_epochs"]
    phase_at = {0: "phase1", epochs // 2: "phase2", epochs - 1: "phase3"}
    phases = {}

    def keep(epoch, m):
        if epoch in phase_at:
            phases[phase_at[epoch]] = copy.deepcopy(m.state_dict())

    t0 = time.time()
    train(model, dm.train_dataloader(), epochs, 1e-3, on_epoch=keep)
    models = {k: load(make, v) for k, v in phases.items()}
    val_loader = DataLoader(dm.val_set, batch_size=250)
    accs = {k: evaluate(m, val_loader)[0] for k, m in models.items()}
    results["shapes_accuracy"] = accs
    results["shapes_train_s"] = time.time() - t0
    log(f"shapes SimpleCNN trained in {results['shapes_train_s']:.0f} s; val accuracy {accs}")
    final = models["phase3"]
    tv = dm.val_set.tensors
    xs, ys, ms = tv["image"][: cfg["probe"]], tv["label"][: cfg["probe"]], tv["mask"][: cfg["probe"]]
    tt = dm.train_set.tensors
    xt, yt, mt = tt["image"][: cfg["probe"]], tt["label"][: cfg["probe"]], tt["mask"][: cfg["probe"]]

    # Table 4-2: SSIM baseline vs FQ per layer.
    t0 = time.time()
    n42 = cfg["probe_small"]
    t42 = {layer: layer_fq_ssim(final, layer, xs[:n42], ms[:n42], max_neurons=cfg["fq_neurons"]) for layer in CONV_LAYERS}
    results["4-2"] = t42
    th = THESIS["4-2"]
    md.append("### Table 4-2 — SSIM baseline vs FQ per layer (SimpleCNN, shapes; thesis: AlexNet, ILSVRC-2013 DET)\n")
    md.append(md_table(["", "conv1", "conv2", "conv3"], [
        ["SSIM here", *[t42[la]["ssim"] for la in CONV_LAYERS]], ["SSIM thesis", *th["ssim"]],
        ["FQ here", *[t42[la]["fq"] for la in CONV_LAYERS]], ["FQ thesis", *th["fq"]]]))
    ssim = [t42[la]["ssim"] for la in CONV_LAYERS]
    fq = [t42[la]["fq"] for la in CONV_LAYERS]
    holds = ssim[0] == max(ssim) and fq[0] == min(fq)
    md.append(f"\nMean over {cfg['fq_neurons']} sampled neurons per layer (FQ = max over {n42} validation images of F; "
              f"SSIM = global SSIM of neuron learning image and image, mean over images). Claim (SSIM is highest at "
              f"conv1, where learning images are nearly blank, while FQ is lowest there): "
              f"**{'holds' if holds else 'does not hold'}** here. ({time.time() - t0:.0f} s)\n")

    # Tables 4-3 and 4-4: diversity of the last conv layer from all neurons' FQ, masking 20 filters.
    t0 = time.time()
    nd = cfg["probe_div"]
    comp = all_neuron_feature_quantity(final, LAST, xs[:nd], ms[:nd], max_neurons=cfg["div_neurons"], components=True)
    t_scan = time.time() - t0
    base = evaluate(final, val_loader)
    k = comp["nf"].shape[1]
    num = min(20, k // 3)

    def fq_without(drop=()):
        return combine_fq(comp, drop=drop).amax(0)  # (K, N)

    def diversity_masking(div):
        r = fq_diversity_masking(final, {LAST: div}, val_loader, num_diverse=num, base=base)[LAST]
        top, bottom = r["most"], r["least"]
        return {"top": top["loss_pct"], "bottom": bottom["loss_pct"], "top_acc": top["accuracy_change"],
                "bottom_acc": bottom["accuracy_change"], "distinct_values": sorted(set(div.tolist())),
                "diversity_mean": float(div.double().mean())}

    fq_all = fq_without()
    dead = int((fq_all.amax(1) == 0).sum())  # filters whose neurons all have F = 0 on the probe
    div43 = {}
    for scale in (1.0, 1e4):
        div43[scale] = diversity_masking(fq_diversity(fq_all, scale=scale))

    def std_scale(fq):  # not the thesis': eps = 0.3 standard deviations of the layer's neuron FQ
        sd = float(fq.double().std())
        return 1.0 / sd if sd > 0 else 1.0

    div43["std"] = diversity_masking(fq_diversity(fq_all, scale=std_scale(fq_all)))
    g = torch.Generator().manual_seed(0)
    rand = [masked_loss_change(final, LAST, torch.randperm(k, generator=g)[:num], val_loader, base=base)["loss_pct"]
            for _ in range(cfg["random_trials"])]
    results["4-3"] = {"scale_1": div43[1.0], "scale_1e4": div43[1e4], "standardised": div43["std"],
                      "fq_quantiles": torch.quantile(fq_all.flatten().double(), torch.tensor([0.0, 0.5, 0.9, 1.0],
                                                     dtype=torch.float64)).tolist(),
                      "random_loss_pct": rand, "filters_all_fq_zero": dead,
                      "num_masked": num, "neurons_per_filter": int(fq_all.shape[1]), "probe": nd,
                      "scan_s": t_scan, "base_loss": base[1], "base_accuracy": base[0]}
    th = THESIS["4-3"]
    md.append(f"### Table 4-3 — % loss change when the {num} most / least diverse filters of `{LAST}` are masked "
              f"(SimpleCNN, shapes; thesis: {th['model']})\n")
    md.append(md_table(["diversity from", "most diverse masked", "least diverse masked", "diversity values seen"], [
        ["FQ (scale 1), DBSCAN eps 0.3, min 6", f"{div43[1.0]['top']:+.1f} %", f"{div43[1.0]['bottom']:+.1f} %",
         str(div43[1.0]["distinct_values"])],
        ["FQ × 1e4 (the thesis' K)", f"{div43[1e4]['top']:+.1f} %", f"{div43[1e4]['bottom']:+.1f} %",
         str(div43[1e4]["distinct_values"])],
        ["FQ / σ(FQ) (not the thesis': eps = 0.3 σ)", f"{div43['std']['top']:+.1f} %",
         f"{div43['std']['bottom']:+.1f} %", str(div43["std"]["distinct_values"])],
        [f"random {num} (mean of {len(rand)})", f"{np.mean(rand):+.1f} %", "", ""],
        ["thesis", f"{th['top20']:+.1f} %", f"{th['bottom20']:+.1f} %", ""]]))
    def claim(r):
        return len(r["distinct_values"]) > 1 and r["top"] > r["bottom"] and r["top"] > np.mean(rand)

    holds, holds_std = claim(div43[1e4]), claim(div43["std"])
    q = results["4-3"]["fq_quantiles"]
    md.append(f"\nDiversity = DBSCAN clusters of the FQ of all {fq_all.shape[1]} neurons (8×8 positions) of each "
              f"filter, {nd} validation images; loss on {len(dm.val_set)} validation images (base "
              f"{base[1]:.3f}, accuracy {base[0]:.3f}); {dead} of {k} filters have F = 0 at every neuron and image "
              f"(silent on the probe): they form the least diverse end. Claim (masking the most diverse filters raises the loss "
              f"far more than the least diverse, and more than random ones, with more than one diversity value): "
              f"**{'holds' if holds else 'does not hold'}** here with the thesis' K, "
              f"**{'holds' if holds_std else 'does not hold'}** with eps = 0.3 σ. Neuron FQ here: min {q[0]:.1e}, "
              f"median {q[1]:.1e}, 90th percentile {q[2]:.1e}, max {q[3]:.1e}. ({time.time() - t0:.0f} s, "
              f"{t_scan:.0f} s of it the {fq_all.numel()} neuron products)\n")

    t0 = time.time()
    abl = {}
    for name in FQ_COMPONENTS:
        fq_ab = fq_without((name,))
        abl[name] = diversity_masking(fq_diversity(fq_ab, scale=std_scale(fq_ab)))
    results["4-4"] = abl
    th = THESIS["4-4"]
    md.append("### Table 4-4 — the same, with one factor of FQ left out (eps = 0.3 σ; thesis: AlexNet)\n")
    md.append(md_table(["factor left out", "most diverse masked", "least diverse masked", "thesis top 20",
                        "thesis bottom 20"],
                       [["none (full FQ)", f"{div43['std']['top']:+.1f} %", f"{div43['std']['bottom']:+.1f} %", "", ""]]
                       + [[n, f"{abl[n]['top']:+.1f} %", f"{abl[n]['bottom']:+.1f} %", f"{th[n][0]:+.1f} %",
                           f"{th[n][1]:+.1f} %"] for n in FQ_COMPONENTS]))
    keep_order = sum(abl[n]["top"] > abl[n]["bottom"] for n in FQ_COMPONENTS)
    md.append(f"\n\"Masking element x\" of FQ is read as FQ computed without x, then the same diversity masking. "
              f"The thesis' claim: leaving out a single factor changes the outcome (for l and s the top/bottom "
              f"contrast flips or vanishes there), so FQ's result is the joint effect of its factors. Here "
              f"{keep_order} of 5 ablations keep top > bottom: the claim **{'holds' if keep_order < 5 else 'does not hold'}**"
              f" here. "
              f"({time.time() - t0:.0f} s)\n")

    # Table 4-5: IoU with the foreground.
    t0 = time.time()
    n45 = cfg["probe"]
    iou_fq = fq_saliency_iou(final, "fc2", xs[:n45], ms[:n45])
    gc_maps = grad_cam(final, LAST, xs[:n45], ys[:n45])
    iou_gc = map_iou(gc_maps, ms[:n45])
    results["4-5"] = {"FQ": float(iou_fq.mean()), "Grad-CAM": float(iou_gc.mean()), "CAM": None,
                      "foreground_share": float(ms[:n45].double().mean())}
    th = THESIS["4-5"]
    md.append("### Table 4-5 — IoU of saliency maps with the foreground (shapes; thesis: AlexNet, dataset 1)\n")
    md.append(md_table(["", "CAM", "Grad-CAM", "FQ"], [
        ["SimpleCNN, shapes (here)", "n/a", results["4-5"]["Grad-CAM"], results["4-5"]["FQ"]],
        ["thesis", th["CAM"], th["Grad-CAM"], th["FQ"]]]))
    holds = results["4-5"]["FQ"] > results["4-5"]["Grad-CAM"]
    md.append(f"\n{n45} validation images; maps min-max normalised and thresholded at 0.5; FQ map = the output "
              f"neuron learning image with the highest F. CAM needs a global-average-pooling head, which SimpleCNN "
              f"lacks. Claim (FQ localises the foreground better than Grad-CAM): "
              f"**{'holds' if holds else 'does not hold'}** here. ({time.time() - t0:.0f} s)\n")

    # Tables 5-1 .. 5-6 on the shapes model: properties with foreground/background, on training images.
    t0 = time.time()
    per_phase = {}
    for name, m in models.items():
        per_phase[name] = layer_properties(m, LAST, xt, mt, y=yt)
    props = per_phase["phase3"]
    silent = int((props["avou"] == 0).sum())
    results["relu3_silent_filters"] = {n: int((v["avou"] == 0).sum()) for n, v in per_phase.items()}
    props["sou_per_sample"] = sou(final, LAST, xt, yt, estimate="per_sample")
    fr = [i / 100 for i in range(0, 11)] + [0.2, 0.4, 0.6, 0.8, 1.0]
    areas = {p: aipc(final, LAST, props[p], val_loader, fr) for p in PROPERTIES}
    table52 = saliency_property_spearman(props, ("avou", "sou", "sou_per_sample"))
    results["5-1"] = {p: {"area_top10_thesis": a.area_top10_thesis, "area": a.area, "area_top10": a.area_top10,
                          "change": a.change, "fractions": a.fractions} for p, a in areas.items()}
    results["5-2"] = table52
    th = THESIS["5-1"]
    rows = [["SimpleCNN, shapes", *[areas[p].area_top10_thesis for p in PROPERTIES]]]
    if cifar_52 is not None:
        rows.append(["SimpleCNN, CIFAR-10", *[cifar_52[1][p].area_top10_thesis for p in PROPERTIES]])
    rows.append([f"thesis ({th['model']})", *[th[p] for p in PROPERTIES]])
    md.append(f"### Table 5-1 — AIPC area over the top 10 % of `{LAST}`'s filters (pp × % of filters)\n")
    md.append(md_table(["", "T_m", "T_v", "T_c", "T_cor"], rows))
    pos = all(r > 0 for r in rows[0][1:])
    md.append(f"\nArea = ∫ (accuracy drop in percentage points) d(% of filters masked) over 0-10 % "
              f"(`AIPC.area_top10_thesis`); 1 %-steps; properties from {xt.shape[0]} training images, accuracy on "
              f"the validation set. Claim (positive areas: masking the filters a property ranks highest hurts, "
              f"differently per property): **{'holds' if pos else 'does not hold'}** here (shapes).\n")
    th = THESIS["5-2"]
    rows = [[f"{s} (shapes)", *[table52[s][p] for p in PROPERTIES]] for s in ("avou", "sou", "sou_per_sample")]
    if cifar_52 is not None:
        rows += [[f"{s} (CIFAR-10)", *[cifar_52[0][s][p] for p in PROPERTIES]] for s in ("avou", "sou", "sou_per_sample")]
    rows += [["AVoU (thesis)", *th["avou"]], ["SoU (thesis)", *th["sou"]]]
    md.append(f"### Table 5-2 — Spearman ρ of saliency with property across `{LAST}`'s filters (thesis: {th['model']})\n")
    md.append(md_table(["", "T_m", "T_v", "T_c", "T_cor"], rows))
    holds = table52["avou"]["mean"] > 0.8 and table52["avou"]["mean"] > table52["avou"]["correlation"]
    md.append(f"\n`sou` is SNIP's |w ⊙ ∂L/∂w| on the batch-mean loss, `sou_per_sample` the thesis' per-sample "
              f"average (eq. 5-10, first order). {silent} of {props['avou'].numel()} filters of the shapes "
              f"model are silent on the {xt.shape[0]} training images (AVoU = 0, every property 0): tied ranks "
              f"that pull every ρ towards 1. Claim (AVoU ranks filters like T_m and T_v, ρ ≈ 1, and unlike "
              f"T_c/T_cor; SoU likewise but weaker): **{'holds' if holds else 'does not hold'}** here for AVoU "
              f"(shapes). ({time.time() - t0:.0f} s)\n")

    t0 = time.time()
    types = {}
    for prop in ("mean", "variance"):
        ph = [(models[n], per_phase[n][f"fg_{prop}"], per_phase[n][f"bg_{prop}"]) for n in ("phase1", "phase2", "phase3")]
        types[prop] = filter_type_phases(ph, LAST, val_loader, per=0.3)
    results["5-3"] = types
    th3, th4 = THESIS["5-3"], THESIS["5-4"]
    md.append(f"### Tables 5-3..5-6 — filter types of `{LAST}` at three phases (shapes, phases after epochs 1, "
              f"{epochs // 2 + 1}, {epochs}; val accuracy {' / '.join(f'{100 * accs[p]:.0f} %' for p in ('phase1', 'phase2', 'phase3'))})\n")
    rows = []
    for prop in ("mean", "variance"):
        for t in TYPES:
            r = types[prop][t]
            drop = [-100 * c + 0.0 for c in r["accuracy_change"]]
            ref = th3["drop"][t] if prop == "mean" else th4["variance"].get(t, ["", "", ""])
            rows.append([f"{t} ({PROP_SHORT[prop]})", " / ".join(f"{p:.2f}" for p in r["proportion"]),
                         " / ".join(f"{d:.1f}" for d in drop), f"{th3['proportion'][t]:.2f}",
                         " / ".join(f"{v:.1f}" if v != "" else "–" for v in ref)])
    md.append(md_table(["type", "proportion here (phase 1/2/3)", "accuracy drop here, pp", "thesis proportion (5-3)",
                        "thesis drop, pp (5-3 T_m; 5-4 T_v)"], rows))
    verdicts = []
    for prop in ("mean", "variance"):
        hh = [-100 * c + 0.0 for c in types[prop]["H-H"]["accuracy_change"]]
        ll = [-100 * c + 0.0 for c in types[prop]["L-L"]["accuracy_change"]]
        pr = types[prop]["H-H"]["proportion"]
        big = all(pr[i] >= max(types[prop][t]["proportion"][i] for t in TYPES) for i in range(3))
        cost = all(a >= b for a, b in zip(hh, ll)) and hh[-1] > ll[-1]
        grows = hh[0] <= hh[1] <= hh[2] and hh[0] < hh[2]
        word = lambda ok: "holds" if ok else "does not hold"  # noqa: E731
        verdicts.append(f"{PROP_SHORT[prop]}: (a) **{word(big)}**, (b) **{word(cost)}** (H-H "
                        f"{' / '.join(f'{v:.1f}' for v in hh)} pp vs L-L {' / '.join(f'{v:.1f}' for v in ll)} pp), "
                        f"(c) **{word(grows)}**")
    md.append(f"\nProportions: |type| / K with per = 0.3; drops on {len(dm.val_set)} validation images; properties "
              f"from {xt.shape[0]} training images. The thesis' claims: (a) H-H is the largest type at every phase, "
              f"(b) masking H-H costs more accuracy than masking L-L, (c) the H-H cost grows with training. Here, "
              + "; ".join(verdicts) + f". Phase 1 is at chance, so nothing can drop there. ({time.time() - t0:.0f} s)\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar", default=os.path.join(HERE, "..", "..", "shared", "data", "cifar10"))
    p.add_argument("--out", default=os.path.join(HERE, "results", "thesis_tables.json"))
    p.add_argument("--tiny", action="store_true", help="every table at tiny sizes on a generated 10-class image "
                   "folder; outputs in a temporary folder (make test)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = dict(seed=args.seed, cifar_train=20000, cifar_val=2000, cifar_epochs=8, low_step=40, probe=128,
               probe_small=64, probe_kq=16, kq_neurons=256, fq_neurons=256, probe_div=32, div_neurons=None,
               random_trials=10, shapes_train=2000, shapes_val=500, shapes_epochs=24)
    with tempfile.TemporaryDirectory(prefix="thesis-tables-tiny-") as tmp:
        if args.tiny:
            args.cifar = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(8, 4))
            args.out = os.path.join(tmp, "thesis_tables.json")
            cfg.update(cifar_train=80, cifar_val=40, cifar_epochs=2, low_step=1, probe=32, probe_small=8, probe_kq=4,
                       kq_neurons=16, fq_neurons=16, probe_div=4, div_neurons=8, random_trials=2, shapes_train=128, shapes_val=64,
                       shapes_epochs=3)
        run(args, cfg)


def run(args: argparse.Namespace, cfg: dict) -> None:
    t_start = time.time()
    results: dict = {"config": cfg, "thesis": THESIS}
    md: list[str] = []
    cifar = ImageFolderDataModule(os.path.abspath(args.cifar), batch_size=128)
    t0 = time.time()
    cifar.setup()
    log(f"CIFAR-10 loaded in {time.time() - t0:.0f} s ({len(cifar.train_set)} train, {len(cifar.val_set)} val)")
    final, val_loader, xv, yv = chapter3(cifar, cfg, results, md)
    log("chapter 3 done")
    cifar_52 = chapter5_cifar(final, val_loader, xv, yv, cfg, results, md)
    log("tables 5-1/5-2 on CIFAR-10 done")
    shapes_part(cfg, results, md, cifar_52[:2])
    results["total_s"] = time.time() - t_start
    md.append(f"\nTotal {results['total_s'] / 60:.1f} min on {args.threads} CPU thread(s).\n")
    text = "\n".join(md)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=1, default=float)
    with open(os.path.splitext(args.out)[0] + ".md", "w") as fh:
        fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
