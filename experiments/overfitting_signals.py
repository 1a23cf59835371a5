"""Benchmark of live overfitting signals on CIFAR-10, and thesis chapter 6 at the thesis' protocol.

A matrix of real training runs (model × label noise × seed) on ``../shared/data/cifar10``, trained
well past their best epoch, a checkpoint every epoch. Signals are computed offline on the
checkpoints and stored per epoch, so a new detector variant is re-scored without retraining.

Splits (fixed, seed 0, never changed by a flag): the first ``--train-size`` images of a seeded
permutation of ``train/`` are the training set (the first ``--probe`` of them the training probe);
the shared ``val/`` folder is split once into a *val* half (model selection, early stopping, the
validation-loss signal, the unlabelled held-out probe) and a *test* half that no training, monitor
or selection touches — every signal is scored against the test loss.

Stages (each resumable; ``--stage all`` runs them in order):

* ``train``   — Adam 1e-3, batch 128, no augmentation; labels of ``noise`` of the training images
  flipped to another class (seeded); stops ``--past-best`` epochs after the best val loss (or at
  ``--max-epochs``). Per epoch: train loss/acc on the given and on the true labels, val and test
  loss/acc. ``<out>/<run>/metrics.json``, ``epoch_XXX.pt``.
* ``signals`` — per checkpoint, on the last conv layer: the exact anomaly scan's clustering for
  ``--gmm-seeds`` (stored per filter, so every criteria variant is re-scored offline), filter
  activations on the training probe and on held-out images, the probe's per-sample loss,
  confidence and gradient magnitude, WeightWatcher's mean α. ``<out>/<run>/signals/epoch_XXX.npz``.
* ``tables``  — thesis tables 6-2..6-5 at WT (best val accuracy) and OF (last epoch), every conv
  layer, table 6-1's settings. ``<out>/<run>/thesis.json``.
* ``score``   — Spearman of every signal with the test loss, alarm epochs vs the onset, false
  alarms, precision@k of outlier samples for the flipped labels vs per-sample loss, the count's
  noise; alarm rules tuned on seed 0 and evaluated on the other seeds.
  ``experiments/results/overfitting_signals.json`` and Markdown tables on stdout.

    python experiments/overfitting_signals.py --data ../shared/data/cifar10 --out runs/ofsig
    python experiments/overfitting_signals.py --data ../shared/data/cifar10 --out runs/ofsig --stage score
    python experiments/overfitting_signals.py --tiny      # seconds, generated images: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lightning_interp.gradients import per_sample_gradient_magnitude
from lightning_interp.masking import FilterMask
from lightning_interp.metrics.anomaly import FilterClusters, anomaly_features, apply_criteria, cluster_filters
from lightning_interp.models import LeNet5, SimpleCNN
from lightning_interp.nns import layer_activations
from lightning_interp.overfitting import (
    activation_divergence,
    hard_sample_loss,
    onset_epoch,
    precision_at_k,
    rise_alarm,
    spearman,
)

MODELS = {
    # name: (constructor, conv layers for the thesis tables, layer of the live signal)
    "simple_cnn": (lambda: SimpleCNN(in_channels=3), ["relu1", "relu2", "relu3"], "relu3"),
    "lenet5": (lambda: LeNet5(in_channels=3), ["relu1", "relu2"], "relu2"),
    # SimpleCNN at 8-16-16 filters: the --tiny runs (one exact scan is 16 VJPs, not 64)
    "tiny_cnn": (lambda: SimpleCNN(in_channels=3, width=(8, 16, 16)), ["relu1", "relu2", "relu3"], "relu3"),
}
BENCHMARK_MODELS = ["simple_cnn", "lenet5"]  # what the benchmark trains unless --models says otherwise
MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
K_MAX = 10
RESULTS = Path(__file__).resolve().parent / "results" / "overfitting_signals.json"


# ---- data ------------------------------------------------------------------------------------
def load_cifar(root: str, cache: Path) -> dict[str, torch.Tensor]:
    """All of ``root/train`` and ``root/val`` as uint8 tensors (decoded once, cached)."""
    if cache.exists():
        return torch.load(cache)
    from PIL import Image

    out = {}
    classes = sorted(os.listdir(os.path.join(root, "train")))
    for split in ("train", "val"):
        xs, ys = [], []
        for c, name in enumerate(classes):
            folder = os.path.join(root, split, name)
            for f in sorted(os.listdir(folder)):
                img = Image.open(os.path.join(folder, f)).convert("RGB").resize((32, 32))
                xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1))
                ys.append(c)
        out[f"{split}_x"] = torch.stack(xs)
        out[f"{split}_y"] = torch.tensor(ys)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def splits(raw: dict[str, torch.Tensor], train_size: int) -> dict[str, torch.Tensor]:
    """The fixed splits (seed 0): training subset, val half, test half; inputs standardised."""
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(raw["train_y"]), generator=g)[:train_size]
    va = torch.randperm(len(raw["val_y"]), generator=g)
    half = len(va) // 2

    def norm(x):
        return (x.float() / 255 - MEAN) / STD

    return {
        "train_x": norm(raw["train_x"][tr]), "train_y": raw["train_y"][tr].clone(),
        "val_x": norm(raw["val_x"][va[:half]]), "val_y": raw["val_y"][va[:half]].clone(),
        "test_x": norm(raw["val_x"][va[half:]]), "test_y": raw["val_y"][va[half:]].clone(),
    }


def noisy_labels(y: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """Flip exactly round(noise·N) labels, each to one of the 9 other classes (seeded)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    n = len(y)
    idx = torch.randperm(n, generator=g)[: int(round(noise * n))]
    out = y.clone()
    out[idx] = (y[idx] + torch.randint(1, 10, (len(idx),), generator=g)) % 10
    return out


# ---- training --------------------------------------------------------------------------------
@torch.no_grad()
def logits_of(model, x, batch=1000) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def loss_acc(logits: torch.Tensor, y: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    per = F.cross_entropy(logits, y, reduction="none")
    return per.mean().item(), (logits.argmax(1) == y).double().mean().item(), per


def evaluate(model, x, y) -> tuple[float, float, torch.Tensor]:
    return loss_acc(logits_of(model, x), y)


def run_name(model: str, noise: float, seed: int) -> str:
    return f"{model}_noise{int(round(noise * 100)):02d}_seed{seed}"


def train(args, data, model_name: str, noise: float, seed: int) -> None:
    run = Path(args.out) / run_name(model_name, noise, seed)
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.json"
    log = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"epochs": [], "done": False}
    if log["done"]:
        return
    torch.manual_seed(seed)
    model = MODELS[model_name][0]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if log["epochs"] and (run / "last.pt").exists():
        state = torch.load(run / "last.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
    y_given = noisy_labels(data["train_y"], noise, seed)
    x = data["train_x"]
    n = len(y_given)
    start = len(log["epochs"]) + 1
    for epoch in range(start, args.max_epochs + 1):
        t0 = time.time()
        model.train()
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            loss = F.cross_entropy(model(x[idx]), y_given[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_time = time.time() - t0
        train_logits = logits_of(model, x)
        tl_g, ta_g, _ = loss_acc(train_logits, y_given)
        tl_t, ta_t, _ = loss_acc(train_logits, data["train_y"])
        vl, va, _ = evaluate(model, data["val_x"], data["val_y"])
        sl, sa, _ = evaluate(model, data["test_x"], data["test_y"])
        log["epochs"].append({
            "epoch": epoch, "train_loss_given": tl_g, "train_acc_given": ta_g, "train_loss_true": tl_t,
            "train_acc_true": ta_t, "val_loss": vl, "val_acc": va, "test_loss": sl, "test_acc": sa,
            "train_seconds": train_time,
        })
        torch.save(model.state_dict(), run / f"epoch_{epoch:03d}.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, run / "last.pt")
        vls = [e["val_loss"] for e in log["epochs"]]
        best = int(np.argmin(vls)) + 1
        log["done"] = epoch - best >= args.past_best or epoch == args.max_epochs
        metrics_path.write_text(json.dumps(log, indent=1))
        print(f"[{run.name}] epoch {epoch}: train(given) {tl_g:.3f}/{ta_g:.3f} val {vl:.3f}/{va:.3f} "
              f"test {sl:.3f}/{sa:.3f} ({train_time:.1f}s)", flush=True)
        if log["done"]:
            break


def load_model(run: Path, model_name: str, epoch: int):
    model = MODELS[model_name][0]()
    model.load_state_dict(torch.load(run / f"epoch_{epoch:03d}.pt"))
    return model.eval()


# ---- signals ---------------------------------------------------------------------------------
def ww_alpha(model) -> float:
    """Mean power-law α over the layers WeightWatcher analyses (nan when it is not installed)."""
    try:
        import weightwatcher as ww
    except ImportError:
        return float("nan")
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    details = ww.WeightWatcher(model=model).analyze(randomize=False, mp_fit=False)
    alphas = details["alpha"].to_numpy(dtype=float)
    alphas = alphas[np.isfinite(alphas) & (alphas > 0)]
    return float(alphas.mean()) if len(alphas) else float("nan")


def signals(args, data, model_name: str, noise: float, seed: int) -> None:
    run = Path(args.out) / run_name(model_name, noise, seed)
    log = json.loads((run / "metrics.json").read_text())
    out = run / "signals"
    out.mkdir(exist_ok=True)
    layer = MODELS[model_name][2]
    y_given = noisy_labels(data["train_y"], noise, seed)
    px, py = data["train_x"][: args.probe], y_given[: args.probe]
    hx = data["val_x"][: args.probe]
    for entry in log["epochs"]:
        epoch = entry["epoch"]
        path = out / f"epoch_{epoch:03d}.npz"
        if path.exists() or (epoch - 1) % args.scan_every:
            continue
        t0 = time.time()
        model = load_model(run, model_name, epoch)
        act_tr = layer_activations(model, layer, px, rectify=True)
        act_ho = layer_activations(model, layer, hx, rectify=True)
        t_feat = time.time()
        feats = anomaly_features(model, layer, px)
        t_feat = time.time() - t_feat
        rec = {"seconds_features": t_feat}
        t_gmm = time.time()
        for s in args.gmm_seeds:
            cl = cluster_filters(feats, k_max=K_MAX, seed=s)
            rec[f"labels_s{s}"] = cl.labels.numpy().astype(np.int8)
            rec[f"num_clusters_s{s}"] = cl.num_clusters.numpy()
            rec[f"ch_s{s}"] = cl.ch_index.numpy()
        rec["seconds_gmm_per_seed"] = (time.time() - t_gmm) / len(args.gmm_seeds)
        with torch.no_grad():
            logits = model(px)
            held_logits = model(hx)
        rec["avou"] = act_tr.mean((0, 2, 3)).numpy()
        rec["filter_act_train"] = act_tr.mean((2, 3)).numpy()
        rec["filter_act_heldout"] = act_ho.mean((2, 3)).numpy()
        rec["divergence"] = activation_divergence(act_tr, act_ho).numpy()
        rec["probe_loss"] = F.cross_entropy(logits, py, reduction="none").numpy()
        rec["probe_pred"] = logits.argmax(1).numpy()
        rec["probe_conf"] = logits.softmax(1).max(1).values.numpy()
        rec["heldout_conf"] = held_logits.softmax(1).max(1).values.numpy()
        rec["probe_grad"] = per_sample_gradient_magnitude(model, px, py).numpy()
        t_ww = time.time()
        rec["ww_alpha"] = ww_alpha(model)
        rec["seconds_ww"] = time.time() - t_ww
        rec["seconds_total"] = time.time() - t0
        np.savez_compressed(path, **rec)
        print(f"[{run.name}] signals epoch {epoch}: features {t_feat:.1f}s, total {rec['seconds_total']:.1f}s", flush=True)


# ---- thesis chapter 6 tables -----------------------------------------------------------------
EXP1 = {"min_cluster_size": 50, "alpha": 0.2, "beta": 1.0, "theta": 0.1}  # table 6-1, exp. 1 (1)
EXP2_LAMBDA = 5  # exp. 2: outlier samples, no α/β/θ
EXP3 = {"min_cluster_size": 20, "alpha": 0.2, "beta": 1.0, "theta": 0.5}  # exp. 3 (1)


def tables(args, data, model_name: str, noise: float, seed: int) -> None:
    run = Path(args.out) / run_name(model_name, noise, seed)
    path = run / "thesis.json"
    if path.exists():
        return
    log = json.loads((run / "metrics.json").read_text())
    epochs = [e["epoch"] for e in log["epochs"]]
    wt = epochs[int(np.argmax([e["val_acc"] for e in log["epochs"]]))]
    of = epochs[-1]
    y_given = noisy_labels(data["train_y"], noise, seed)
    px, py = data["train_x"][: args.probe], y_given[: args.probe]
    rng = np.random.default_rng(seed)
    result = {"wt_epoch": wt, "of_epoch": of}
    for tag, epoch in (("wt", wt), ("of", of)):
        model = load_model(run, model_name, epoch)
        count, outlier = 0, torch.zeros(len(py), dtype=torch.bool)
        flagged3: list[tuple[str, int]] = []
        sizes = {}
        for layer in MODELS[model_name][1]:
            act = layer_activations(model, layer, px, rectify=True).mean((0, 2, 3))
            cl = cluster_filters(anomaly_features(model, layer, px), k_max=K_MAX, seed=0)
            count += apply_criteria(cl, act, **EXP1).count
            small = (cl.cluster_sizes > 0) & (cl.cluster_sizes <= EXP2_LAMBDA)
            outlier |= torch.gather(small, 1, cl.labels).any(0)
            flagged3 += [(layer, k) for k in apply_criteria(cl, act, **EXP3).flagged]
            sizes[layer] = int(act.numel())
        grads = per_sample_gradient_magnitude(model, px, py)
        result[tag] = {
            "anomaly_count": count,
            "outlier_samples": int(outlier.sum()),
            "grad_outlier": grads[outlier].mean().item() if outlier.any() else None,
            "grad_normal": grads[~outlier].mean().item() if (~outlier).any() else None,
        }
        if tag != "of":
            continue
        # Exp. 3 (tables 6-4, 6-5): mask one anomaly filter at a time vs one random filter.
        n_eval = min(len(y_given), 2000)
        base_tr = evaluate(model, data["train_x"][:n_eval], y_given[:n_eval])[1]
        base_te = evaluate(model, data["test_x"], data["test_y"])[1]

        def masked(layer, k, model=model, base_tr=base_tr, base_te=base_te, n_eval=n_eval):
            with FilterMask(model, {layer: [k]}):
                tr = evaluate(model, data["train_x"][:n_eval], y_given[:n_eval])[1]
                te = evaluate(model, data["test_x"], data["test_y"])[1]
            return tr - base_tr, te - base_te

        # Up to `mask_trials` anomaly filters drawn at random (seeded), each paired with a random filter
        # of the same layer, so both sets span the same depths (masking an early filter costs more).
        anomalous = [flagged3[i] for i in rng.permutation(len(flagged3))[: args.mask_trials]]
        random_filters = [(layer, int(rng.integers(sizes[layer]))) for layer, _ in anomalous]
        result["masking"] = {
            "num_anomaly_filters": len(flagged3),
            "anomaly": [masked(layer, k) for layer, k in anomalous],
            "random": [masked(layer, k) for layer, k in random_filters],
        }
    path.write_text(json.dumps(result, indent=1))
    print(f"[{run.name}] thesis tables: WT {wt} OF {of}", flush=True)


# ---- scoring ---------------------------------------------------------------------------------
def load_run(run: Path) -> dict:
    log = json.loads((run / "metrics.json").read_text())
    scans = {}
    for f in sorted((run / "signals").glob("epoch_*.npz")):
        scans[int(f.stem.split("_")[1])] = dict(np.load(f))
    thesis = json.loads((run / "thesis.json").read_text()) if (run / "thesis.json").exists() else None
    return {"log": log, "scans": scans, "thesis": thesis}


def clusters_of(scan: dict, seed: int) -> FilterClusters:
    return FilterClusters(
        labels=torch.from_numpy(scan[f"labels_s{seed}"].astype(np.int64)),
        num_clusters=torch.from_numpy(scan[f"num_clusters_s{seed}"]),
        ch_index=torch.from_numpy(scan[f"ch_s{seed}"]),
        embedding=torch.zeros(0),
        k_max=K_MAX,
    )


#: Criteria variants re-scored from the stored clusterings: (λ, α, β, θ, CH reference).
VARIANTS = {
    "count_thesis": dict(min_cluster_size=0.1, alpha=0.2, beta=1.0, theta=0.1, ch_reference="mean"),
    "count_thesis_l50": dict(min_cluster_size=50, alpha=0.2, beta=1.0, theta=0.1, ch_reference="mean"),
    "count_median": dict(min_cluster_size=0.1, alpha=0.2, beta=1.0, theta=0.1, ch_reference="median"),
}


def signal_series(run: dict, gmm_seeds: list[int]) -> tuple[list[int], dict[str, list[float]], dict[str, list]]:
    """Per scanned epoch: every signal (``series``) and each count variant's count for every GMM seed
    (``per_seed``, for the count's noise)."""
    epochs = sorted(run["scans"])
    per_seed: dict[str, list[list[int]]] = {name: [] for name in VARIANTS}
    by_epoch = {e["epoch"]: e for e in run["log"]["epochs"]}
    out: dict[str, list[float]] = {name: [] for name in [
        "val_loss", "test_loss", *VARIANTS, *(f"{v}_avg" for v in VARIANTS), "outlier_share", "mean_log_ch",
        "divergence", "confidence_gap", "probe_grad", "probe_loss", "hard_loss", "ww_alpha",
    ]}
    for e in epochs:
        scan = run["scans"][e]
        act = torch.from_numpy(scan["avou"])
        out["val_loss"].append(by_epoch[e]["val_loss"])
        out["test_loss"].append(by_epoch[e]["test_loss"])
        for name, crit in VARIANTS.items():
            counts = [apply_criteria(clusters_of(scan, s), act, **crit).count for s in gmm_seeds]
            per_seed[name].append(counts)
            out[name].append(counts[0])
            out[f"{name}_avg"].append(float(np.mean(counts)))
        cl = clusters_of(scan, gmm_seeds[0])
        lam = max(1, round(0.1 * cl.labels.shape[1]))
        small = (cl.cluster_sizes > 0) & (cl.cluster_sizes <= lam)
        out["outlier_share"].append(float(torch.gather(small, 1, cl.labels).double().mean()))
        out["mean_log_ch"].append(float(np.log(np.clip(scan[f"ch_s{gmm_seeds[0]}"], 1e-12, None)).mean()))
        out["divergence"].append(float(scan["divergence"].mean()))
        out["confidence_gap"].append(float(scan["probe_conf"].mean() - scan["heldout_conf"].mean()))
        out["probe_grad"].append(float(scan["probe_grad"].mean()))
        out["probe_loss"].append(float(scan["probe_loss"].mean()))
        out["hard_loss"].append(hard_sample_loss(torch.from_numpy(scan["probe_loss"]), HARD_FRACTION))
        out["ww_alpha"].append(float(scan["ww_alpha"]))
    return epochs, out, per_seed


#: The direction in which each signal is expected to move as the model overfits, fixed before the
#: benchmark (the alarm watches ``sign · signal`` rise): the thesis' counts rise; clusters grow more
#: balanced (DESIGN §4); WeightWatcher's α falls with over-training; the hardest probe samples' loss
#: falls once the model memorises their (often wrong) labels.
SIGNS = {"outlier_share": -1.0, "probe_loss": -1.0, "hard_loss": -1.0, "ww_alpha": -1.0}
HARD_FRACTION = 0.2

#: What each signal needs beyond the training probe.
NEEDS = {
    "val_loss": "val labels", "divergence": "held-out images", "confidence_gap": "held-out images",
    "ww_alpha": "weights only",
}
ALARM_GRID = [(rel, margin, patience) for rel in (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5) for margin in (0.0, 1.0, 2.0)
              for patience in (1, 2, 3, 4, 5)]


def alarm_epoch(epochs: list[int], values: list[float], sign: float, rule: tuple) -> int | None:
    rel, margin, patience = rule
    i = rise_alarm([sign * v for v in values], rel=rel, margin=margin, patience=patience,
                   min_index=next((j for j, e in enumerate(epochs) if e >= 3), len(epochs)))
    return None if i is None else epochs[i]


def alarm_quality(runs: list[dict], name: str, sign: float, rule: tuple) -> dict:
    on_time = fired_noisy = early = false = clean = 0
    lags = []
    for r in runs:
        fire = alarm_epoch(r["epochs"], r["series"][name], sign, rule)
        if r["onset"] is None:
            clean += 1
            false += fire is not None
            continue
        if fire is not None:
            lags.append(fire - r["onset"])
            on_time += abs(fire - r["onset"]) <= 2
            early += fire < r["onset"] - 2
            fired_noisy += 1
    n = len(runs) - clean
    return {"on_time": on_time, "overfitting_runs": n, "fired": fired_noisy, "early": early,
            "false_alarms": false, "clean_runs": clean, "lags": lags,
            "score": (on_time - 2 * early - 3 * false) / max(n, 1)}


def score(args) -> dict:
    root = Path(args.out)
    runs = []
    for model_name in args.models:
        for noise in args.noise:
            for seed in args.seeds:
                path = root / run_name(model_name, noise, seed)
                if not (path / "metrics.json").exists():
                    continue
                run = load_run(path)
                if not run["scans"]:
                    continue
                epochs, series, per_seed = signal_series(run, args.gmm_seeds)
                onset = onset_epoch(epochs, series["test_loss"], min_rise=0.05)
                runs.append({"model": model_name, "noise": noise, "seed": seed, "epochs": epochs, "series": series,
                             "per_seed": per_seed, "onset": onset, "run": run})
    names = [n for n in runs[0]["series"] if n != "test_loss"] if runs else []
    summary = {"runs": [], "spearman": {}, "alarms": {}, "outliers": {}, "noise": {}, "thesis": {}}
    for r in runs:
        row = {"model": r["model"], "noise": r["noise"], "seed": r["seed"], "epochs": r["epochs"],
               "onset": r["onset"], "series": r["series"],
               "spearman": {n: spearman(r["series"][n], r["series"]["test_loss"]) for n in names},
               "train_log": r["run"]["log"]["epochs"]}
        summary["runs"].append(row)
    # Spearman per model, mean ± sd over runs.
    for model_name in args.models:
        rows = [r for r in summary["runs"] if r["model"] == model_name]
        summary["spearman"][model_name] = {
            n: {"mean": float(np.nanmean([r["spearman"][n] for r in rows])),
                "sd": float(np.nanstd([r["spearman"][n] for r in rows])),
                "n": int(np.isfinite([r["spearman"][n] for r in rows]).sum())}  # NaN: a constant series
            for n in names
        } if rows else {}
    # Alarms: the rule is chosen on the first seed's runs and scored on the others (held out by training
    # seed; the test images are the same). Orientations are fixed in SIGNS.
    tune = [r for r in runs if r["seed"] == args.seeds[0]]
    evaluate_on = [r for r in runs if r["seed"] != args.seeds[0]] or runs
    for n in names:
        sign = SIGNS.get(n, 1.0)
        best = max(ALARM_GRID, key=lambda rule: alarm_quality(tune, n, sign, rule)["score"])
        summary["alarms"][n] = {
            "sign": sign, "rule": list(best), "tuned": alarm_quality(tune, n, sign, best),
            "held_out": alarm_quality(evaluate_on, n, sign, best),
            "all": alarm_quality(runs, n, sign, best),
        }
        # Rules fixed before the benchmark: 5 % over the best validation loss for 1 or 2 scans, and
        # EarlyStopping's "no new best for 2 / 3 epochs".
        for fixed in [(0.05, 0.0, 1), (0.05, 0.0, 2), (0.0, 0.0, 2), (0.0, 0.0, 3)] if n == "val_loss" else []:
            name = f"val_loss_{int(fixed[0] * 100)}pct_p{fixed[2]}" if fixed[0] else f"val_loss_no_new_best_p{fixed[2]}"
            summary["alarms"][name] = {
                "sign": 1.0, "rule": list(fixed), "tuned": alarm_quality(tune, n, 1.0, fixed),
                "held_out": alarm_quality(evaluate_on, n, 1.0, fixed), "all": alarm_quality(runs, n, 1.0, fixed),
            }
    # Outlier samples vs per-sample loss for the flipped labels, at WT and OF, on the noisy runs.
    data_y = None
    for r in runs:
        if r["noise"] == 0:
            continue
        if data_y is None:
            data_y = SPLITS["train_y"][: args.probe]
        flipped = (noisy_labels(SPLITS["train_y"], r["noise"], r["seed"])[: args.probe] != data_y).numpy()
        k = int(flipped.sum())
        log = r["run"]["log"]["epochs"]
        wt = r["epochs"][int(np.argmax([next(e["val_acc"] for e in log if e["epoch"] == ep) for ep in r["epochs"]]))]
        res = {}
        for tag, ep in (("wt", wt), ("of", r["epochs"][-1]), ("onset", r["onset"] or r["epochs"][-1])):
            scan = r["run"]["scans"][ep]
            cl = clusters_of(scan, args.gmm_seeds[0])
            small = (cl.cluster_sizes > 0) & (cl.cluster_sizes <= EXP2_LAMBDA)
            exp2 = torch.gather(small, 1, cl.labels).sum(0).numpy().astype(float)  # filters calling it outlier
            af = apply_criteria(cl, torch.from_numpy(scan["avou"]), **VARIANTS["count_thesis"])
            monitor = af.outlier_samples.sum(0).numpy().astype(float)
            res[tag] = {
                "epoch": ep, "k": k,
                "outlier_exp2": precision_at_k(exp2, flipped, k),
                "outlier_monitor": precision_at_k(monitor, flipped, k),
                "per_sample_loss": precision_at_k(scan["probe_loss"], flipped, k),
                "per_sample_grad": precision_at_k(scan["probe_grad"], flipped, k),
                "chance": float(flipped.mean()),
            }
        summary["outliers"][f"{r['model']}/{r['noise']}/{r['seed']}"] = res
    # Noise of the count: CV over GMM seeds at fixed weights; epoch-to-epoch jitter before the onset.
    for n in VARIANTS:
        cvs, jitter = [], []
        for r in runs:
            for counts in r["per_seed"][n]:
                if np.mean(counts) > 0:
                    cvs.append(float(np.std(counts) / np.mean(counts)))
            if r["onset"] is not None:
                pre = [v for e, v in zip(r["epochs"], r["series"][n]) if e <= r["onset"]]
                if len(pre) >= 2 and np.mean(pre) > 0:
                    jitter.append(float(np.mean(np.abs(np.diff(pre))) / np.mean(pre)))
        summary["noise"][n] = {"cv_over_gmm_seeds": float(np.mean(cvs)) if cvs else None,
                               "jitter_before_onset": float(np.mean(jitter)) if jitter else None}
    # Thesis tables per model and noise level (mean over seeds).
    for model_name in args.models:
        for noise in args.noise:
            rows = [r["run"]["thesis"] for r in runs if r["model"] == model_name and r["noise"] == noise and r["run"]["thesis"]]
            if not rows:
                continue

            def mean(values):
                values = [v for v in values if v is not None]
                return float(np.mean(values)) if values else None

            masks = [m for t in rows for m in t["masking"]["anomaly"]]
            rand = [m for t in rows for m in t["masking"]["random"]]
            summary["thesis"][f"{model_name}/{noise}"] = {
                "runs": len(rows),
                "wt_epoch": mean([t["wt_epoch"] for t in rows]), "of_epoch": mean([t["of_epoch"] for t in rows]),
                "6-2": {"wt": mean([t["wt"]["anomaly_count"] for t in rows]), "of": mean([t["of"]["anomaly_count"] for t in rows])},
                "6-3": {f"{tag}_{kind}": mean([t[tag][f"grad_{kind}"] for t in rows])
                        for tag in ("wt", "of") for kind in ("outlier", "normal")},
                "6-4": {"masked": len(masks), "train_down": sum(m[0] < 0 for m in masks),
                        "val_up": sum(m[1] > 0 for m in masks),
                        "random_masked": len(rand), "random_train_down": sum(m[0] < 0 for m in rand),
                        "random_val_up": sum(m[1] > 0 for m in rand)},
                "6-5": {"anomaly": mean([m[1] for m in masks]), "random": mean([m[1] for m in rand]),
                        "anomaly_sd": float(np.std([m[1] for m in masks])) if masks else None,
                        "random_sd": float(np.std([m[1] for m in rand])) if rand else None},
            }
    for r in summary["runs"]:
        r.pop("run", None)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("stage", "results", "threads", "tiny")}
    return summary


#: Thesis tables 6-2..6-5, CIFAR-10 columns (``../shared/thesis_tables.txt``).
THESIS = {
    "lenet5": {"6-2": (2, 12), "6-3": (0.461, 0.052, 2.811, 0.201), "6-4": ("3/3", "1/3"), "6-5": (-1.21, -3.94)},
    "simple_cnn": {"6-2": (5, 12), "6-3": (0.079, 0.024, 0.281, 0.066), "6-4": ("3/3", "1/3"), "6-5": (0.10, -1.51)},
}


def _fmt(v, spec=".3f"):
    return "–" if v is None or (isinstance(v, float) and np.isnan(v)) else format(v, spec)


def print_tables(summary: dict) -> None:
    print("\n### Spearman with test loss across epochs (mean ± sd over runs)\n")
    models = [m for m, rows in summary["spearman"].items() if rows]
    names = list(summary["spearman"][models[0]]) if models else []
    print("| signal | needs | " + " | ".join(models) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in models) + " |")
    for n in names:
        cells = [f"{_fmt(summary['spearman'][m][n]['mean'], '+.2f')} ± {_fmt(summary['spearman'][m][n]['sd'], '.2f')}"
                 f" (n={summary['spearman'][m][n]['n']})" for m in models]
        print(f"| {n} | {NEEDS.get(n, 'training probe')} | " + " | ".join(cells) + " |")
    print("\n### Alarms: fire epoch − onset (rule tuned on the first seed's runs, scored on the others)\n")
    print("| signal | rule (rel, margin, patience) | held-out runs on time (±2) | fired > 2 epochs early | "
          "never fired | runs without onset: false alarms | lags (held-out) | all runs on time |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, a in summary["alarms"].items():
        h, al = a["held_out"], a["all"]
        print(f"| {n} | {tuple(a['rule'])}{' on −signal' if a['sign'] < 0 else ''} | {h['on_time']}/{h['overfitting_runs']} | "
              f"{h['early']} | {h['overfitting_runs'] - h['fired']} | {h['false_alarms']}/{h['clean_runs']} | {h['lags']} | "
              f"{al['on_time']}/{al['overfitting_runs']} (lags {al['lags']}) |")
    print("\n### Outlier samples vs per-sample loss: precision@k for the flipped labels in the probe (k = their number;"
          " ties in expectation; – = no sample flagged)\n")
    print("| run | epoch | outlier samples (exp. 2, λ = 5) | outlier samples (monitor) | per-sample loss | "
          "per-sample gradient | chance |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for key, res in summary["outliers"].items():
        for tag, v in res.items():
            print(f"| {key} | {tag} ({v['epoch']}) | {_fmt(v['outlier_exp2'], '.2f')} | {_fmt(v['outlier_monitor'], '.2f')} | "
                  f"{_fmt(v['per_sample_loss'], '.2f')} | {_fmt(v['per_sample_grad'], '.2f')} | {v['chance']:.2f} |")
    print("\n### Count noise\n")
    print("| variant | CV over 3 GMM seeds at fixed weights | mean |Δ| / mean, epoch to epoch before the onset |")
    print("| --- | --- | --- |")
    for n, v in summary["noise"].items():
        print(f"| {n} | {_fmt(v['cv_over_gmm_seeds'], '.2f')} | {_fmt(v['jitter_before_onset'], '.2f')} |")
    print("\n### Thesis chapter 6 at table 6-1's settings, beside the thesis (CIFAR-10 column)\n")
    print("| model / noise | WT / OF epoch | 6-2 anomaly WT / OF | thesis | 6-3 grad outlier / normal WT | OF | "
          "thesis WT | thesis OF | 6-4 train↓ / test↑ of masked | thesis | 6-5 Δtest anomaly / random (pts) | thesis |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, t in summary["thesis"].items():
        model = key.split("/")[0]
        # tiny_cnn: a model the thesis did not train, no thesis numbers beside it
        th = THESIS.get(model, {"6-2": ("–",) * 2, "6-3": ("–",) * 4, "6-4": ("–",) * 2, "6-5": (float("nan"),) * 2})
        g = t["6-3"]
        m4 = t["6-4"]
        m5 = t["6-5"]
        print(
            f"| {key} | {_fmt(t['wt_epoch'], '.1f')} / {_fmt(t['of_epoch'], '.1f')} | {_fmt(t['6-2']['wt'], '.1f')} / "
            f"{_fmt(t['6-2']['of'], '.1f')} | {th['6-2'][0]} / {th['6-2'][1]} | {_fmt(g['wt_outlier'])} / {_fmt(g['wt_normal'])} | "
            f"{_fmt(g['of_outlier'])} / {_fmt(g['of_normal'])} | {th['6-3'][0]} / {th['6-3'][1]} | {th['6-3'][2]} / {th['6-3'][3]} | "
            f"{m4['train_down']}/{m4['masked']} / {m4['val_up']}/{m4['masked']} (random {m4['random_train_down']}/"
            f"{m4['random_masked']} / {m4['random_val_up']}/{m4['random_masked']}) | {th['6-4'][0]} / {th['6-4'][1]} | "
            f"{_fmt(None if m5['anomaly'] is None else 100 * m5['anomaly'], '+.2f')} / "
            f"{_fmt(None if m5['random'] is None else 100 * m5['random'], '+.2f')} | {th['6-5'][0]:+.2f} / {th['6-5'][1]:+.2f} |"
        )
    print("\n### Runs\n")
    print("| run | epochs | onset (test) | best val acc | test acc at onset / last | test loss min / last |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in summary["runs"]:
        log = {e["epoch"]: e for e in r["train_log"]}
        tl = [log[e]["test_loss"] for e in r["epochs"]]
        on = r["onset"]
        print(f"| {r['model']} / {r['noise']} / seed {r['seed']} | {r['epochs'][-1]} | {on} | "
              f"{max(e['val_acc'] for e in r['train_log']):.3f} | "
              f"{_fmt(log[on]['test_acc'] if on else None)} / {log[r['epochs'][-1]]['test_acc']:.3f} | "
              f"{min(tl):.3f} / {tl[-1]:.3f} |")


SPLITS: dict[str, torch.Tensor] = {}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", default="runs/ofsig")
    p.add_argument("--stage", choices=["train", "signals", "tables", "score", "all"], default="all")
    p.add_argument("--models", nargs="+", default=BENCHMARK_MODELS, choices=list(MODELS))
    p.add_argument("--noise", nargs="+", type=float, default=[0.0, 0.2, 0.4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--probe", type=int, default=256)
    p.add_argument("--max-epochs", type=int, default=40)
    p.add_argument("--past-best", type=int, default=12)
    p.add_argument("--scan-every", type=int, default=1)
    p.add_argument("--gmm-seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--mask-trials", type=int, default=20)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--cache", default="runs/cifar10_uint8.pt", help="decoded images (written on the first run)")
    p.add_argument("--tiny", action="store_true", help="two 3-epoch runs of a narrow SimpleCNN on a generated 10-class image "
                   "folder, probe 64, every stage, outputs in a temporary folder (make test)")
    return p


def use_tiny(args: argparse.Namespace, tmp: str) -> argparse.Namespace:
    """``--tiny``: the benchmark at the smallest size that runs every stage (two runs, clean and 40 % noise;
    the runs, the decoded images and the results JSON under ``tmp``). Also the tiny checkpoints that
    ``cheap_scan_signal.py --tiny`` and ``tip_sketch_agreement.py --tiny`` read."""
    from lightning_interp.data import write_toy_imagefolder

    args.data = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(8, 4))
    args.out, args.cache, args.results = (os.path.join(tmp, name) for name in ("ofsig", "cifar10_uint8.pt", "ofsig.json"))
    args.models, args.noise, args.seeds = ["tiny_cnn"], [0.0, 0.4], [0]
    # probe 64: table 6-1's exp. 1 takes λ = 50 probe samples
    args.train_size, args.probe, args.max_epochs, args.past_best, args.scan_every, args.mask_trials = 80, 64, 3, 1, 2, 2
    return args


def run(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = load_cifar(args.data, Path(args.cache))
    SPLITS.update(splits(raw, args.train_size))
    if args.stage != "score":
        for model_name in args.models:
            for noise in args.noise:
                for seed in args.seeds:
                    if args.stage in ("train", "all"):
                        train(args, SPLITS, model_name, noise, seed)
                    if args.stage in ("signals", "all"):
                        signals(args, SPLITS, model_name, noise, seed)
                    if args.stage in ("tables", "all"):
                        tables(args, SPLITS, model_name, noise, seed)
    if args.stage in ("score", "all"):
        summary = score(args)
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(json.dumps(summary, indent=1, default=float))
        print_tables(summary)
        print(f"\n(raw numbers: {os.path.relpath(args.results)})")


def main() -> None:
    args = parser().parse_args()
    with tempfile.TemporaryDirectory(prefix="ofsig-tiny-") as tmp:
        run(use_tiny(args, tmp) if args.tiny else args)


if __name__ == "__main__":
    main()
