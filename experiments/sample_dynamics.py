"""Which training samples is the model memorising, and since when? Per-sample training dynamics on
CIFAR-10 with flipped labels, beside AUM (the ``aum`` package), cleanlab (in-sample and 4-fold
cross-validated) and the validation loss — the benchmark behind ``SampleDynamicsMonitor``.

Splits: ``experiments/overfitting_signals.py``'s fixed ones (seed 0): the first ``--train-size`` images
of a seeded permutation of ``train/``; ``val/`` split once into a *val* half (model selection, the
validation-loss alarm) and a *test* half that nothing here tunes on (the onset is the test loss'
last minimum, as there; test accuracy judges the retraining).

Stages (each resumable, ``--stage all`` runs them in order):

* ``train`` — Adam 1e-3, batch 128. Noisy runs (``--noise``): no augmentation, a fraction of labels
  flipped (``overfitting_signals.noisy_labels``). Clean runs (``--clean``): no flipped label, random
  crop + flip augmentation and weight decay 5e-4, which do not overfit — they count false alarms.
  Per epoch: the logits of every training sample from the training forward passes (the monitor's
  way (a)) and from an eval-mode pass after the epoch (way (b)); val/test loss and accuracy; gradient
  disparity (Forouzesh & Thiran 2021: mean pairwise L2 distance of the gradients of 5 mini-batches).
* ``cv`` — cleanlab's expensive upper bound: 4-fold cross-validated predicted probabilities, each fold
  trained for the run's best-validation-accuracy (WT) number of epochs (``--cv-runs``).
* ``retrain`` — does cleaning pay: retrain from scratch without the samples the monitor flags at WT, and
  without cleanlab's (in-sample) issues at WT; test accuracy at the best validation loss epoch, beside
  the run on all samples (``--retrain-runs``).
* ``score`` — AUROC and precision@k (k = flipped count) for the flipped labels at WT, onset and OF of
  every score of ``lightning_interp.dynamics`` (way (a) and (b)), per-sample loss, the ``aum`` package,
  cleanlab in-sample and 4-fold; flagged-set precision/recall; alarms (validation loss, the flagged
  samples' fit rate, Label Wave, gradient disparity; rules fixed a priori, not tuned) against the
  onset, early alarms and false alarms; retraining. ``experiments/results/sample_dynamics.{json,md}``.

    python experiments/sample_dynamics.py --data ../shared/data/cifar10 --out runs/samdyn
    python experiments/sample_dynamics.py --tiny        # seconds, generated data (make test)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overfitting_signals import load_cifar, noisy_labels, splits  # noqa: E402

from lightning_interp.dynamics import SCORES, SampleDynamics, flag_samples, label_wave_alarm, suspect_scores  # noqa: E402
from lightning_interp.models import LeNet5, SimpleCNN, resnet20_cifar  # noqa: E402
from lightning_interp.overfitting import onset_epoch, precision_at_k, rise_alarm  # noqa: E402

MODELS = {
    "simple_cnn": lambda: SimpleCNN(in_channels=3),
    "lenet5": lambda: LeNet5(in_channels=3),
    "resnet20": lambda: resnet20_cifar(),
}
RESULTS = Path(__file__).resolve().parent / "results" / "sample_dynamics"
GD_BATCHES = 5


# ---- training ------------------------------------------------------------------------------------
def run_name(model: str, noise: float, seed: int, clean: bool = False) -> str:
    return f"{model}_{'clean_aug' if clean else f'noise{int(round(noise * 100)):02d}'}_seed{seed}"


@torch.no_grad()
def logits_of(model, x, batch=500) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-pixel-padded crop and horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4), mode="reflect")
    dx = torch.randint(0, 9, (n,), generator=g)
    dy = torch.randint(0, 9, (n,), generator=g)
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


def gradient_disparity(model, x, y, g: torch.Generator, batch: int) -> float:
    """Mean pairwise L2 distance between the parameter gradients of ``GD_BATCHES`` random mini-batches."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for _ in range(GD_BATCHES):
        idx = torch.randperm(len(x), generator=g)[:batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        grads.append(torch.cat([t.flatten() for t in torch.autograd.grad(loss, params)]))
    G = torch.stack(grads)
    d = torch.cdist(G[None], G[None])[0]
    return float(d[torch.triu_indices(len(G), len(G), 1).unbind()].mean())


def fit(args, data, model_name: str, y_given: torch.Tensor, keep: torch.Tensor | None, seed: int, run: Path,
        *, clean: bool = False, record: bool = True, max_epochs: int | None = None, evaluate: bool = True) -> dict:
    """Train one run (resumable); with ``record`` store every epoch's training logits (ways a and b);
    without ``evaluate`` (cleanlab's folds) no val/test pass and it trains exactly ``max_epochs``."""
    run.mkdir(parents=True, exist_ok=True)
    metrics_path = run / "metrics.json"
    log = json.loads(metrics_path.read_text()) if metrics_path.exists() else {"epochs": [], "done": False}
    if log["done"]:
        return log
    max_epochs = max_epochs or args.max_epochs
    torch.manual_seed(seed)
    model = MODELS[model_name]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4 if clean else 0.0)
    g = torch.Generator().manual_seed(seed)
    if log["epochs"] and (run / "last.pt").exists():
        state = torch.load(run / "last.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        g.set_state(state["gen"])
    x_all = data["train_x"]
    train_idx = torch.arange(len(x_all)) if keep is None else keep.nonzero().squeeze(1)
    n = len(train_idx)
    for epoch in range(len(log["epochs"]) + 1, max_epochs + 1):
        t0 = time.time()
        model.train()
        logits_a = torch.zeros(len(x_all), 10)
        perm = train_idx[torch.randperm(n, generator=g)]
        for i in range(0, n, args.batch):
            idx = perm[i : i + args.batch]
            xb = augment(x_all[idx], g) if clean else x_all[idx]
            out = model(xb)
            loss = F.cross_entropy(out, y_given[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            logits_a[idx] = out.detach()
        train_seconds = time.time() - t0
        entry = {"epoch": epoch, "train_seconds": train_seconds}
        for split in ("val", "test") if evaluate else ():
            z = logits_of(model, data[f"{split}_x"])
            entry[f"{split}_loss"] = F.cross_entropy(z, data[f"{split}_y"]).item()
            entry[f"{split}_acc"] = (z.argmax(1) == data[f"{split}_y"]).double().mean().item()
        if record:
            t1 = time.time()
            logits_b = logits_of(model, x_all)
            entry["eval_pass_seconds"] = time.time() - t1
            entry["gd"] = gradient_disparity(model, x_all[train_idx], y_given[train_idx], g, args.batch)
            np.savez_compressed(run / f"epoch_{epoch:03d}.npz", a=logits_a.half().numpy(), b=logits_b.half().numpy())
        log["epochs"].append(entry)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "gen": g.get_state()}, run / "last.pt")
        best = int(np.argmin([e.get("val_loss", 0.0) for e in log["epochs"]])) + 1
        log["done"] = (evaluate and epoch - best >= args.past_best) or epoch == max_epochs
        metrics_path.write_text(json.dumps(log, indent=1))
        if evaluate:
            print(f"[{run.name}] epoch {epoch}: val {entry['val_loss']:.3f}/{entry['val_acc']:.3f} "
                  f"test {entry['test_loss']:.3f}/{entry['test_acc']:.3f} ({train_seconds:.1f}s)", flush=True)
        else:
            print(f"[{run.name}] epoch {epoch} ({train_seconds:.1f}s)", flush=True)
        if log["done"]:
            break
    return log


def runs_of(args) -> list[tuple[str, float, int, bool]]:
    out = [(m, nz, s, False) for m in args.models for nz in args.noise for s in args.seeds]
    out += [(m, 0.0, s, True) for m in args.models for s in args.seeds] if args.clean else []
    return out


def given_labels(data, noise: float, seed: int) -> torch.Tensor:
    return noisy_labels(data["train_y"], noise, seed) if noise > 0 else data["train_y"].clone()


# ---- offline replay of the monitor ---------------------------------------------------------------
def load_logits(run: Path, epochs: int) -> tuple[np.ndarray, np.ndarray]:
    a, b = [], []
    for e in range(1, epochs + 1):
        z = np.load(run / f"epoch_{e:03d}.npz")
        a.append(z["a"].astype(np.float32))
        b.append(z["b"].astype(np.float32))
    return np.stack(a), np.stack(b)


def replay(logits: np.ndarray, y: torch.Tensor, upto: int, subset: torch.Tensor | None = None) -> SampleDynamics:
    """The monitor's state after epochs ``1..upto`` from stored logits (``E x N x C``)."""
    pos = torch.arange(len(y)) if subset is None else subset
    dyn = SampleDynamics(len(pos))
    for e in range(upto):
        dyn.observe(torch.arange(len(pos)), torch.from_numpy(logits[e][pos.numpy()]), y[pos])
        dyn.end_epoch(e)
    return dyn


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    ok = np.isfinite(scores)
    if positives[ok].all() or not positives[ok].any():
        return float("nan")
    return float(roc_auc_score(positives[ok], scores[ok]))


def aum_package(logits: np.ndarray, y: torch.Tensor, upto: int) -> np.ndarray:
    """AUM as the ``aum`` package computes it (Pleiss et al.'s reference code), from the same logits."""
    from aum import AUMCalculator

    calc = AUMCalculator(tempfile.mkdtemp(prefix="aum_"), compressed=True)
    ids = list(range(len(y)))
    for e in range(upto):
        calc.update(torch.from_numpy(logits[e]), y, ids)
    return np.array([calc.sums[i] / calc.counts[i] for i in ids])


def cleanlab_scores(y: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's label-quality score (negated: higher = more suspect) and its ``find_label_issues`` mask."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = probs / probs.sum(1, keepdims=True)
    return -get_label_quality_scores(y, probs), find_label_issues(y, probs)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


# ---- cleanlab 4-fold and retraining ---------------------------------------------------------------
def cv_probs(args, data, model_name, noise, seed, run: Path, epochs: int) -> np.ndarray:
    path = run / f"cv_probs_e{epochs}.npy"
    if path.exists():
        return np.load(path)
    y = given_labels(data, noise, seed)
    n = len(y)
    fold = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % 4
    probs = np.zeros((n, 10), dtype=np.float32)
    t0 = time.time()
    for k in range(4):
        log = fit(args, data, model_name, y, fold != k, seed, run / f"cv_fold{k}", record=False, max_epochs=epochs,
                  evaluate=False)
        assert log["done"]
        model = MODELS[model_name]()
        model.load_state_dict(torch.load(run / f"cv_fold{k}" / "last.pt")["model"])
        held = (fold == k).nonzero().squeeze(1)
        probs[held.numpy()] = logits_of(model, data["train_x"][held]).softmax(1).numpy()
    (run / "cv_seconds.txt").write_text(f"{time.time() - t0:.1f}")
    np.save(path, probs)
    return probs


def cv_train_seconds(run: Path) -> float:
    """The training time of cleanlab's four folds (summed per epoch, so a resumed fold counts once)."""
    return float(sum(e["train_seconds"] for k in range(4)
                     for e in json.loads((run / f"cv_fold{k}" / "metrics.json").read_text())["epochs"]))


def wt_epoch(log: dict) -> int:
    return int(np.argmax([e["val_acc"] for e in log["epochs"]])) + 1


def best_val_loss_test_acc(log: dict) -> float:
    e = int(np.argmin([e["val_loss"] for e in log["epochs"]]))
    return log["epochs"][e]["test_acc"]


def retrain(args, data, model_name, noise, seed, run: Path, score: str, rule) -> dict:
    log = json.loads((run / "metrics.json").read_text())
    wt = wt_epoch(log)
    y = given_labels(data, noise, seed)
    a, b = load_logits(run, wt)
    dyn = replay(a, y, wt)
    ours = flag_samples(suspect_scores(dyn)[score], rule)
    _, cl = cleanlab_scores(y.numpy(), softmax(b[wt - 1]))
    cl = torch.from_numpy(cl)
    out = {"wt": wt, "all": best_val_loss_test_acc(log)}
    for name, flags in (("monitor", ours), ("cleanlab", cl)):
        sub = fit(args, data, model_name, y, ~flags, seed, run / f"retrain_{name}", record=False)
        out[name] = best_val_loss_test_acc(sub)
        out[f"{name}_removed"] = int(flags.sum())
        flipped = (y != data["train_y"])
        out[f"{name}_removed_flipped"] = int((flags & flipped).sum())
    return out


# ---- scoring -------------------------------------------------------------------------------------
def alarm_series(a: np.ndarray, b: np.ndarray, y: torch.Tensor, log: dict, score: str, rule) -> dict[str, list]:
    """Per epoch, the label-free signals the monitor logs (way a), and the validation loss."""
    dyn = SampleDynamics(len(y))
    flips, fit_flagged = [], []
    for e in range(len(a)):
        dyn.observe(torch.arange(len(y)), torch.from_numpy(a[e]), y)
        stats = dyn.end_epoch(e)
        flips.append(stats["flips"])
        flags = flag_samples(suspect_scores(dyn)[score], rule)
        fit_flagged.append(float((dyn.last_pred[flags] == y[flags]).double().mean()) if flags.any() else float("nan"))
    return {"val_loss": [e["val_loss"] for e in log["epochs"]], "flips": flips, "flagged_fit": fit_flagged,
            "gd": [e["gd"] for e in log["epochs"]], "test_loss": [e["test_loss"] for e in log["epochs"]]}


def alarms_of(series: dict[str, list], epochs: list[int]) -> dict[str, int | None]:
    """Alarm epochs (1-based), rules fixed a priori: no alarm before epoch 3."""
    first = next((i for i, e in enumerate(epochs) if e >= 3), len(epochs))

    def at(i):
        return None if i is None else epochs[i]

    return {
        "val_loss": at(rise_alarm(series["val_loss"], rel=0.01, patience=2, min_index=first)),
        "flagged_fit": at(rise_alarm(series["flagged_fit"], rel=0.0, margin=0.05, patience=2, min_index=first)),
        "label_wave": at(label_wave_alarm(series["flips"], patience=2, min_index=first)),
        "gd": at(rise_alarm(series["gd"], rel=0.05, patience=2, min_index=first)),
    }


def score_run(args, data, model_name, noise, seed, clean, run: Path) -> dict | None:
    log = json.loads((run / "metrics.json").read_text())
    epochs = [e["epoch"] for e in log["epochs"]]
    if not epochs or not log["done"]:  # a run still training (or stopped) is not scored
        return None
    y = given_labels(data, noise, seed)
    flipped = (y != data["train_y"]).numpy()
    a, b = load_logits(run, len(epochs))
    series = alarm_series(a, b, y, log, args.score, args.rule)
    onset = onset_epoch(epochs, series["test_loss"], min_rise=0.05)
    out = {"model": model_name, "noise": noise, "seed": seed, "clean": clean, "epochs": epochs, "onset": onset,
           "series": series, "alarms": alarms_of(series, epochs),
           "train_seconds": float(np.mean([e["train_seconds"] for e in log["epochs"]])),
           "eval_pass_seconds": float(np.mean([e.get("eval_pass_seconds", np.nan) for e in log["epochs"]]))}
    if not flipped.any():
        return out
    k = int(flipped.sum())
    points = {"WT": wt_epoch(log), "onset": onset, "OF": epochs[-1]}
    out["points"] = points
    out["at"] = {}
    subset = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[: min(args.track_size, len(y))]
    for name, t in points.items():
        if t is None:
            continue
        res = {}
        for way, logits, sub in (("a", a, None), ("b", b, None), ("b_subset", b, subset)):
            dyn = replay(logits, y, t, sub)
            pos = flipped if sub is None else flipped[sub.numpy()]
            for s, v in suspect_scores(dyn).items():
                if way == "b_subset" and s != args.score:
                    continue
                v = v.numpy()
                res[f"{s}/{way}"] = {"auroc": auroc(v, pos), "p@k": precision_at_k(v, pos, int(pos.sum()))}
            if way == "a":
                flags = flag_samples(suspect_scores(dyn)[args.score], args.rule).numpy()
                res["flags/a"] = {"n": int(flags.sum()), "precision": float(pos[flags].mean()) if flags.any() else np.nan,
                                  "recall": float(flags[pos].mean())}
                ours = -suspect_scores(dyn)["aum"].numpy()
        pkg = aum_package(a, y, t)
        res["aum_package"] = {"auroc": auroc(-pkg, flipped), "p@k": precision_at_k(-pkg, flipped, k),
                              "max_abs_diff_to_ours": float(np.max(np.abs(pkg - ours)))}
        cl_score, cl_flags = cleanlab_scores(y.numpy(), softmax(b[t - 1]))
        res["cleanlab_in_sample"] = {"auroc": auroc(cl_score, flipped), "p@k": precision_at_k(cl_score, flipped, k),
                                     "n": int(cl_flags.sum()), "precision": float(flipped[cl_flags].mean()) if cl_flags.any() else np.nan,
                                     "recall": float(cl_flags[flipped].mean())}
        cv = sorted(run.glob(f"cv_probs_e{points['WT']}.npy"))
        if cv and name == "WT":
            cl_score, cl_flags = cleanlab_scores(y.numpy(), np.load(cv[0]))
            res["cleanlab_4fold"] = {"auroc": auroc(cl_score, flipped), "p@k": precision_at_k(cl_score, flipped, k),
                                     "n": int(cl_flags.sum()), "precision": float(flipped[cl_flags].mean()),
                                     "recall": float(cl_flags[flipped].mean()),
                                     "seconds": cv_train_seconds(run)}
        fit_flip = float((b[t - 1].argmax(1)[flipped] == y.numpy()[flipped]).mean())
        res["flipped_fit_rate"] = fit_flip
        out["at"][name] = res
    return out


def summarise(runs: list[dict], retrains: list[dict], args) -> str:
    lines = [f"Settings: {json.dumps({k: v for k, v in vars(args).items() if k not in ('data', 'out')})}", ""]
    lines += ["### Runs", "", "| run | epochs | onset (test loss) | WT | flipped fit at WT / OF | s per epoch | eval pass over all training samples, s |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        fits = " / ".join(f"{r['at'][p]['flipped_fit_rate']:.2f}" for p in ("WT", "OF") if p in r.get("at", {}))
        lines.append(f"| {name_of(r)} | {r['epochs'][-1]} | {r['onset']} | {r.get('points', {}).get('WT', '—')} | "
                     f"{fits or '—'} | {r['train_seconds']:.1f} | {r['eval_pass_seconds']:.1f} |")
    noisy = [r for r in runs if "at" in r]
    cols = [f"{s}/a" for s in SCORES] + [f"{args.score}/b", f"{args.score}/b_subset", "loss/b", "aum_package",
                                          "cleanlab_in_sample", "cleanlab_4fold"]
    lines += ["", "### AUROC for the flipped labels (precision@k in brackets), at WT / onset / OF", "",
              "| score | " + " | ".join(name_of(r) for r in noisy) + " |", "| --- |" + " --- |" * len(noisy)]
    for c in cols:
        cells = []
        for r in noisy:
            vals = []
            for p in ("WT", "onset", "OF"):
                v = r["at"].get(p, {}).get(c)
                vals.append("—" if v is None else f"{v['auroc']:.3f} ({v['p@k']:.2f})")
            cells.append(" / ".join(vals))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", f"### Flags ({args.score}, rule {args.rule!r}) vs cleanlab's find_label_issues (n, precision, recall) at WT / onset / OF", "",
              "| run | monitor (way a) | cleanlab in-sample | cleanlab 4-fold (WT; cost) |", "| --- | --- | --- | --- |"]
    for r in noisy:
        def f(key, p, r=r):
            v = r["at"].get(p, {}).get(key)
            return "—" if v is None else f"{v['n']}, {v['precision']:.2f}, {v['recall']:.2f}"
        cv = r["at"].get("WT", {}).get("cleanlab_4fold")
        lines.append(f"| {name_of(r)} | " + " / ".join(f("flags/a", p) for p in ("WT", "onset", "OF")) + " | "
                     + " / ".join(f("cleanlab_in_sample", p) for p in ("WT", "onset", "OF")) + " | "
                     + ("—" if cv is None else f"{cv['n']}, {cv['precision']:.2f}, {cv['recall']:.2f}; {cv['seconds']:.0f} s") + " |")
    lines += ["", "### Alarms (epoch; onset = the test loss' last minimum; rules fixed a priori, never tuned)", "",
              "| run | onset | validation loss | flagged fit rate | Label Wave | gradient disparity |", "| --- | --- | --- | --- | --- | --- |"]
    for r in runs:
        al = r["alarms"]
        lines.append(f"| {name_of(r)} | {r['onset']} | {al['val_loss']} | {al['flagged_fit']} | {al['label_wave']} | {al['gd']} |")
    lines += ["", "| alarm | on time (±2) | fired > 2 epochs early | no alarm | false alarms (runs that do not overfit) |",
              "| --- | --- | --- | --- | --- |"]
    quality = {}
    for name in ("val_loss", "flagged_fit", "label_wave", "gd"):
        q = {"on_time": 0, "early": 0, "missed": 0, "false": 0, "overfitting": 0, "not_overfitting": 0}
        for r in runs:
            fire = r["alarms"][name]
            if r["onset"] is None:
                q["not_overfitting"] += 1
                q["false"] += fire is not None
            else:
                q["overfitting"] += 1
                q["missed"] += fire is None
                q["on_time"] += fire is not None and abs(fire - r["onset"]) <= 2
                q["early"] += fire is not None and fire < r["onset"] - 2
        quality[name] = q
        lines.append(f"| {name} | {q['on_time']}/{q['overfitting']} | {q['early']} | {q['missed']} | {q['false']}/{q['not_overfitting']} |")
    if retrains:
        lines += ["", "### Does cleaning pay? Test accuracy (best validation-loss epoch) after retraining from scratch", "",
                  "| run | all samples | without the monitor's flags at WT (removed, of them flipped) | without cleanlab's issues at WT (removed, flipped) |",
                  "| --- | --- | --- | --- |"]
        for r in retrains:
            lines.append(f"| {r['run']} | {r['all']:.3f} | {r['monitor']:.3f} ({r['monitor_removed']}, {r['monitor_removed_flipped']}) | "
                         f"{r['cleanlab']:.3f} ({r['cleanlab_removed']}, {r['cleanlab_removed_flipped']}) |")
    return "\n".join(lines), quality


def name_of(r: dict) -> str:
    return run_name(r["model"], r["noise"], r["seed"], r["clean"])


def tiny_data(n: int = 96, size: int = 16) -> dict[str, torch.Tensor]:
    """Generated stand-in for CIFAR-10 (--tiny): class-dependent colour blobs plus noise."""
    g = torch.Generator().manual_seed(0)

    def make(m):
        y = torch.randint(0, 10, (m,), generator=g)
        x = torch.randn(m, 3, size, size, generator=g) * 0.5
        x[:, y % 3, : size // 2] += (y[:, None, None].float() / 5 - 1)
        return x, y

    out = {}
    for split, m in (("train", n), ("val", n // 2), ("test", n // 2)):
        out[f"{split}_x"], out[f"{split}_y"] = make(m)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--out", default="runs/samdyn")
    p.add_argument("--stage", choices=["train", "cv", "retrain", "score", "all"], default="all")
    p.add_argument("--models", nargs="+", default=["simple_cnn"], choices=list(MODELS))
    p.add_argument("--noise", nargs="*", type=float, default=[0.2, 0.4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--clean", action=argparse.BooleanOptionalAction, default=True,
                   help="also train clean runs with augmentation and weight decay (false-alarm counts)")
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--max-epochs", type=int, default=25)
    p.add_argument("--past-best", type=int, default=6)
    p.add_argument("--track-size", type=int, default=1024, help="way (b)'s tracked subset (the monitor's default)")
    p.add_argument("--score", default="aum", choices=list(SCORES))
    p.add_argument("--rule", default="gmm")
    p.add_argument("--cv-runs", nargs="*", default=None, help="run names for cleanlab 4-fold (default: every noisy run)")
    p.add_argument("--retrain-runs", nargs="*", default=None, help="run names to retrain (default: every noisy run)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--cache", default="runs/cifar10_uint8.pt")
    p.add_argument("--tiny", action="store_true", help="seconds, generated data, outputs in a temp dir (make test)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        tmp = Path(tempfile.mkdtemp(prefix="samdyn_tiny_"))
        args.out, args.results = str(tmp / "runs"), str(tmp / "results")
        args.max_epochs, args.past_best, args.batch, args.track_size = 3, 1, 32, 48
        args.models, args.noise = ["simple_cnn"], [0.4]
        data = tiny_data()
    else:
        data = splits(load_cifar(args.data, Path(args.cache)), args.train_size)
    noisy_names = [run_name(m, nz, s) for m, nz, s, c in runs_of(args) if not c]
    cv_runs = noisy_names if args.cv_runs is None else args.cv_runs
    retrain_runs = noisy_names if args.retrain_runs is None else args.retrain_runs
    rule = args.rule if args.rule == "gmm" else (float(args.rule) if "." in args.rule else int(args.rule))
    args.rule = rule
    root = Path(args.out)
    retrains = []
    for m, nz, s, clean in runs_of(args):
        run = root / run_name(m, nz, s, clean)
        if args.stage in ("train", "all"):
            fit(args, data, m, given_labels(data, nz, s), None, s, run, clean=clean)
        if not (run / "metrics.json").exists():
            continue
        log = json.loads((run / "metrics.json").read_text())
        if args.stage in ("cv", "all") and run.name in cv_runs and log["done"]:
            cv_probs(args, data, m, nz, s, run, wt_epoch(log))
        if args.stage in ("retrain", "all") and run.name in retrain_runs and log["done"]:
            r = retrain(args, data, m, nz, s, run, args.score, rule)
            retrains.append({"run": run.name, **r})
    if args.stage in ("score", "all"):
        runs = [r for m, nz, s, c in runs_of(args)
                if (root / run_name(m, nz, s, c) / "metrics.json").exists()
                and (r := score_run(args, data, m, nz, s, c, root / run_name(m, nz, s, c))) is not None]
        if args.stage == "score":
            for name in retrain_runs:
                path = root / name / "retrain.json"
                if path.exists():
                    retrains.append(json.loads(path.read_text()))
        text, quality = summarise(runs, retrains, args)
        out = Path(args.results)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()},
                                                        "runs": runs, "retrain": retrains, "alarms": quality},
                                                       indent=1, default=float))
        out.with_suffix(".md").write_text(text + "\n")
        print(text)
    for r in retrains:
        (root / r["run"] / "retrain.json").write_text(json.dumps(r))


if __name__ == "__main__":
    main()
