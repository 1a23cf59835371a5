"""Which filters hold what a noisy run memorised? Masking them against the peers' rankings (issue 22).

Noisy CIFAR-10 runs (SimpleCNN, ``--noise`` of the training labels flipped, seeded), trained on the
CPU with ``overfitting_signals.py``'s data loading and fixed split (training subset; the shared
``val/`` folder halved into *val*, used for the onset, and *test*, used only to report). Per epoch
the logits of the training forward passes are kept (AUM, Pleiss et al. 2020, from the logits the
optimiser saw) and a checkpoint is written.

At two points of each run — the **onset proxy** (the epoch of the lowest *val* loss: no test data)
and **OF** (the last epoch) — two suspect sets:

* ``oracle``: flipped and fitted to the flipped label (what the run memorised);
* ``aum``: label-free, fitted now with a negative AUM over the epochs so far (the given label was
  mostly not the prediction before it was fitted).

Per watched layer and k in {1/32, 1/16, 1/8} of its filters, masking (``FilterMask``) by each score:
the memorisation scores (``lightning_interp.memorisation``, every variant, from each suspect set),
Torch-Pruning's L1 (lowest and highest), Taylor (lowest and highest) and LAMP (lowest), TIP's SoU
(highest), the thesis' anomaly flags (``anomaly``: ``scan_anomaly_filters``, what ``AnomalyFilterMonitor``
scans, in exact mode on a 512-sample training probe; the flagged filters first, then the others by their
CH index, so any k can be taken), random filters (5 seeds). BN scale needs BatchNorm, which these runs
keep off (``--batch-norm`` turns it on) so that the numbers stay those of the runs measured before; it
is compared in ``memorisation_pruning.py``'s clean BatchNorm runs.

Reported per mask: fit (prediction = given label) of the oracle and aum suspects, of all flipped
samples, of clean fitted samples (up to 1000), test accuracy — without and, at k = 1/8, with a
short fine-tune (``lightning_interp.finetune.fine_tune``, masks held on) on the training samples
the label-free flag does not flag (the unmasked model fine-tuned the same way is the baseline) — for
the scores in ``FINETUNED`` and two random seeds (the CPU budget).

The issue's target (at k = 1/8: the memorisation score removes >= 50 % of the memorised fit — the
oracle suspects' — with test accuracy not below the unmasked model, and removes more per point of
test accuracy lost than every peer, on every noisy run) is checked per score and printed.

    python experiments/memorisation_filters.py                      # CIFAR-10, ~25 min on one CPU core
    python experiments/memorisation_filters.py --tiny --out /tmp/m  # generated data, seconds (tests)

Resumable: each run's training and each (run, point) evaluation is stored under ``--out``; the
summary goes to ``experiments/results/memorisation_filters.json`` (real mode only) and the tables
to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overfitting_signals as ofs  # noqa: E402

from lightning_interp.dynamics import margins  # noqa: E402
from lightning_interp.finetune import fine_tune  # noqa: E402
from lightning_interp.importance import importance_scores  # noqa: E402
from lightning_interp.masking import FilterMask  # noqa: E402
from lightning_interp.memorisation import VARIANTS, memorisation_scores  # noqa: E402
from lightning_interp.metrics.anomaly import scan_anomaly_filters  # noqa: E402
from lightning_interp.metrics.tip import sou  # noqa: E402
from lightning_interp.models import SimpleCNN  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memorisation_filters.json"
FRACTIONS = (1 / 32, 1 / 16, 1 / 8)
RANDOM_SEEDS = 5
PEERS = ("l1_low", "l1_high", "taylor_low", "taylor_high", "lamp_low", "sou_high", "anomaly")
#: Also fine-tuned at k = 1/8 (with the first ``--finetune-random`` random seeds): the CPU budget.
FINETUNED = ("mem_taylor/oracle", *(f"mem_{v}/aum" for v in VARIANTS), "l1_low", "l1_high", "taylor_low", "sou_high", "anomaly")


# ---- data and training -------------------------------------------------------------------------
def tiny_data() -> dict[str, torch.Tensor]:
    """Generated 3 x 16 x 16 images whose class is a colour blob's position (learnable in seconds)."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
        for i, c in enumerate(y.tolist()):
            r, col = divmod(c, 2)
            x[i, c % 3, 8 * r : 8 * r + 8, 8 * col : 8 * col + 8] += 1.5
        return x, y

    out = {}
    for split, n in (("train", 160), ("val", 80), ("test", 80)):
        out[f"{split}_x"], out[f"{split}_y"] = make(n)
    return out


def build(args) -> nn.Module:
    return SimpleCNN(in_channels=3, num_classes=args.classes, width=tuple(args.width),
                     batch_norm=getattr(args, "batch_norm", False))


def train(args, data, seed: int) -> Path:
    """Adam (``--lr``, 1e-3), batch 128, ``--epochs`` epochs; per epoch: val loss/acc, the training passes' logits, a checkpoint."""
    bn = "_bn" if getattr(args, "batch_norm", False) else ""
    name = f"simple_cnn{bn}_noise{int(round(args.noise * 100)):02d}_seed{seed}"
    run = Path(args.out) / (f"tiny_{name}" if args.tiny else name)  # never resumes a real run's files
    run.mkdir(parents=True, exist_ok=True)
    log_path = run / "metrics.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {"epochs": [], "done": False}
    if log["done"]:
        return run
    torch.manual_seed(seed)
    model = build(args)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    x, y = data["train_x"], noisy_labels(args, data["train_y"], seed)
    n = len(y)
    logits_hist = []
    if log["epochs"]:  # resume after the last finished epoch
        state = torch.load(run / "last.pt")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])
        logits_hist = list(state["logits"])
    for epoch in range(len(log["epochs"]) + 1, args.epochs + 1):
        t0 = time.time()
        model.train()
        seen = torch.zeros(n, args.classes)
        perm = torch.randperm(n)
        for i in range(0, n, 128):
            idx = perm[i : i + 128]
            out = model(x[idx])
            loss = F.cross_entropy(out, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen[idx] = out.detach()
        logits_hist.append(seen.half())
        vl, va, _ = ofs.evaluate(model, data["val_x"], data["val_y"])
        fit = (seen.argmax(1) == y).double().mean().item()
        log["epochs"].append({"epoch": epoch, "train_fit_given": fit, "val_loss": vl, "val_acc": va,
                              "seconds": time.time() - t0})
        torch.save(model.state_dict(), run / f"epoch_{epoch:03d}.pt")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state(),
                    "logits": torch.stack(logits_hist)}, run / "last.pt")
        log["done"] = epoch == args.epochs
        log_path.write_text(json.dumps(log, indent=1))
        print(f"[{run.name}] epoch {epoch}: fit(given) {fit:.3f} val {vl:.3f}/{va:.3f} ({time.time() - t0:.1f}s)", flush=True)
    return run


def noisy_labels(args, y: torch.Tensor, seed: int) -> torch.Tensor:
    if args.classes == 10:
        return ofs.noisy_labels(y, args.noise, seed)
    g = torch.Generator().manual_seed(10_000 + seed)
    idx = torch.randperm(len(y), generator=g)[: int(round(args.noise * len(y)))]
    out = y.clone()
    out[idx] = (y[idx] + torch.randint(1, args.classes, (len(idx),), generator=g)) % args.classes
    return out


# ---- evaluation --------------------------------------------------------------------------------
def sequential(model: SimpleCNN) -> nn.Sequential:
    """SimpleCNN without BatchNorm runs its children in order: split it at a layer to reuse the head."""
    return nn.Sequential(*model.children())


@torch.no_grad()
def predictions(fn, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([fn(x[i : i + batch]).argmax(1) for i in range(0, len(x), batch)])


def fits(pred_train: torch.Tensor, pred_test: torch.Tensor, sets: dict[str, torch.Tensor], y_given, y_test) -> dict:
    out = {name: (pred_train[idx] == y_given[idx]).double().mean().item() if len(idx) else math.nan
           for name, idx in sets.items()}
    out["test_acc"] = (pred_test == y_test).double().mean().item()
    return out


def flagged_first(ch_index: torch.Tensor, flagged: list[int]) -> torch.Tensor:
    """A ranking (higher first) of the anomaly scan's filters: the flagged ones first, each group by its CH
    index (the scan's score), so any k can be taken when the scan flags fewer or more than k."""
    ch = ch_index.double().nan_to_num(nan=0.0)
    rank = torch.argsort(torch.argsort(ch, stable=True), stable=True).double()  # 0 .. K-1, by CH
    rank[list(flagged)] += len(ch)
    return rank


def anomaly_ranking(args, model, layers, probe: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The thesis' anomaly scan (``scan_anomaly_filters``, what ``AnomalyFilterMonitor`` runs; ``--scan-mode``,
    default criteria: λ = 0.1 of the probe) of each layer on ``probe``: (``flagged_first`` ranking, flags)."""
    scores, flags = {}, {}
    for layer in layers:
        res = scan_anomaly_filters(model, layer, probe, mode=args.scan_mode, seed=0)
        flags[layer] = res.flagged
        scores[layer] = flagged_first(res.ch_index, res.flagged)
    return scores, flags


def rankings(args, model, layers, x, y_given, suspects: dict[str, torch.Tensor], example, sample,
             probe: torch.Tensor) -> tuple[dict[str, dict], dict[str, list[int]]]:
    """``{score name: {layer: K scores}}``, higher = mask first; and the anomaly scan's flags."""
    out = {}
    for set_name, mask in suspects.items():
        if mask.sum() == 0:
            continue
        for variant in VARIANTS:
            s = memorisation_scores(model, layers, x, y_given, mask, variant=variant, seed=0)
            out[f"mem_{variant}/{set_name}"] = dict(s.scores)
    xs, ys = x[sample], y_given[sample]
    for crit in ("l1", "taylor", "lamp"):
        s = importance_scores(model, layers, example, crit, inputs=xs, labels=ys)
        out[f"{crit}_low"] = {k: -v for k, v in s.scores.items()}
        if crit != "lamp":
            out[f"{crit}_high"] = dict(s.scores)
    model.eval()
    out["sou_high"] = {layer: sou(model, layer, xs, ys).detach().cpu() for layer in layers}
    out["anomaly"], flags = anomaly_ranking(args, model, layers, probe)
    for r in range(RANDOM_SEEDS):
        g = torch.Generator().manual_seed(1000 + r)
        out[f"random/{r}"] = {layer: torch.rand(len(out["l1_low"][layer]), generator=g) for layer in layers}
    return out, flags


class Scale(nn.Module):
    """Multiplies by a fixed 0/1 channel mask (what ``FilterMask`` does, on cached activations)."""

    def __init__(self, keep: torch.Tensor):
        super().__init__()
        self.keep = keep

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return a * self.keep


def top(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(-scores.double(), stable=True)[:k].tolist())


def aum(run: Path, epoch: int, y_given: torch.Tensor) -> torch.Tensor:
    """AUM over epochs 1..``epoch``: the given-label margin of the logits the training passes produced, averaged."""
    hist = torch.load(run / "last.pt")["logits"][:epoch].float()
    return torch.stack([margins(h, y_given) for h in hist]).mean(0)


def aum_suspects(run: Path, epoch: int, y_given: torch.Tensor, fitted: torch.Tensor) -> torch.Tensor:
    """The label-free suspects at ``epoch``: fitted now, with a negative AUM."""
    return fitted & (aum(run, epoch, y_given) < 0)


def finetune_loader(x: torch.Tensor, y_given: torch.Tensor, flagged: torch.Tensor, seed: int) -> DataLoader:
    """The fine-tune's data: the training samples not ``flagged``, batch 128, shuffled (seeded)."""
    return DataLoader(TensorDataset(x[~flagged], y_given[~flagged]), batch_size=128, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def evaluate_point(args, data, run: Path, seed: int, epoch: int, point: str) -> dict:
    cache = run / f"eval_{point}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.time()
    model = build(args)
    model.load_state_dict(torch.load(run / f"epoch_{epoch:03d}.pt"))
    model.eval()
    x, y_true = data["train_x"], data["train_y"]
    y_given = noisy_labels(args, y_true, seed)
    pred = predictions(model, x)
    fitted = pred == y_given
    flipped = y_given != y_true
    suspects = {"oracle": flipped & fitted, "aum": aum_suspects(run, epoch, y_given, fitted)}
    g = torch.Generator().manual_seed(seed)
    clean = torch.nonzero(fitted & ~flipped & ~suspects["aum"]).flatten()
    clean = clean[torch.randperm(len(clean), generator=g)[: args.clean_eval]]
    sets = {"oracle": torch.nonzero(suspects["oracle"]).flatten(), "aum": torch.nonzero(suspects["aum"]).flatten(),
            "flipped": torch.nonzero(flipped).flatten(), "clean": clean}
    ev_idx = torch.unique(torch.cat(list(sets.values())))
    local = {name: torch.searchsorted(ev_idx, idx) for name, idx in sets.items()}  # positions in the eval subset
    x_ev, y_ev = x[ev_idx], y_given[ev_idx]
    x_test, y_test = data["test_x"], data["test_y"]
    flagged_aum = suspects["aum"]
    sample = torch.randperm(len(x), generator=g)[: args.score_samples]
    layers = list(args.layers)
    seq = sequential(model)
    with torch.no_grad():
        assert torch.allclose(seq(x[:4]), model(x[:4]), atol=1e-5)
    names = [n for n, _ in model.named_children()]
    probe = x[torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[: args.probe_size]]
    ranked, anomaly_flags = rankings(args, model, layers, x, y_given, suspects, x[:2], sample, probe)

    def evaluate(fn):
        return fits(predictions(fn, x_ev), predictions(fn, x_test), local, y_ev, y_test)

    base = evaluate(model)
    ft_loader = finetune_loader(x, y_given, flagged_aum, seed)

    def tuned(filters: dict[str, list[int]]) -> dict:
        net = copy.deepcopy(model)
        with FilterMask(net, filters):
            fine_tune(net, ft_loader, epochs=args.finetune_epochs, lr=args.finetune_lr)
            net.eval()
            return evaluate(net)

    result = {"epoch": epoch, "point": point, "unmasked": base, "unmasked_finetuned": tuned({}),
              "counts": {k: int(len(v)) for k, v in sets.items()}, "anomaly_flagged": anomaly_flags, "masks": {}}
    for layer in layers:
        i = names.index(layer)
        head, tail = seq[: i + 1], seq[i + 1 :]
        with torch.no_grad():
            a_ev = torch.cat([head(x_ev[j : j + 500]) for j in range(0, len(x_ev), 500)])
            a_test = torch.cat([head(x_test[j : j + 500]) for j in range(0, len(x_test), 500)])
        num = a_ev.shape[1]
        for frac in FRACTIONS:
            k = max(1, int(math.floor(frac * num + 0.5)))
            for name, per_layer in ranked.items():
                filt = top(per_layer[layer], k)
                keep = torch.ones(1, num, *([1] * (a_ev.dim() - 2)))
                keep[:, filt] = 0
                masked = nn.Sequential(Scale(keep), tail)
                entry = fits(predictions(masked, a_ev), predictions(masked, a_test), local, y_ev, y_test)
                entry["filters"] = filt
                if frac == FRACTIONS[-1] and (name in FINETUNED or name.startswith("random/")
                                              and int(name.split("/")[1]) < args.finetune_random):
                    entry["finetuned"] = tuned({layer: filt})
                result["masks"][f"{layer}|{k}|{name}"] = entry
        print(f"[{run.name}] {point} (epoch {epoch}) {layer}: {time.time() - t0:.0f}s", flush=True)
    result["seconds"] = time.time() - t0
    cache.write_text(json.dumps(result, indent=1))
    return result


# ---- summary -----------------------------------------------------------------------------------
def removed(base: dict, entry: dict) -> float:
    """Share of the memorised (oracle suspects') fit removed."""
    return (base["oracle"] - entry["oracle"]) / base["oracle"] if base["oracle"] > 0 else math.nan


def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Memorisation removed per point of test accuracy lost: (removed, lost) ``a`` better than ``b``.
    A mask that loses no accuracy beats one that does; two that lose none compare what they remove."""
    (ra, la), (rb, lb) = a, b
    if la <= 0:
        return lb > 0 or ra > rb
    return lb > 0 and ra / la > rb / lb


def aggregate(entries: dict, layer: str, k: int, base: dict, key: str | None = None) -> dict[str, dict]:
    """Per score (random: mean over seeds) the metrics; ``key="finetuned"`` for the fine-tuned ones."""
    out, rand = {}, []
    for mk, e in entries.items():
        lyr, kk, name = mk.split("|")
        if lyr != layer or int(kk) != k:
            continue
        e = e.get(key) if key else e
        if e is None:
            continue
        if name.startswith("random/"):
            rand.append(e)
        else:
            out[name] = e
    if rand:
        out["random"] = {m: sum(r[m] for r in rand) / len(rand) for m in base}
    return out


def summarise(results: list[dict], layers: list[str]) -> dict:
    rows, targets = [], {}
    for res in results:
        for layer in layers:
            ks = sorted({int(mk.split("|")[1]) for mk in res["masks"] if mk.startswith(layer + "|")})
            for k in ks:
                for tuned in (False, True):
                    base = res["unmasked_finetuned"] if tuned else res["unmasked"]
                    agg = aggregate(res["masks"], layer, k, base, "finetuned" if tuned else None)
                    if not agg:
                        continue
                    for name, e in agg.items():
                        rows.append({"run": res["run"], "point": res["point"], "epoch": res["epoch"], "layer": layer,
                                     "k": k, "finetuned": tuned, "score": name,
                                     **{m: e[m] for m in ("oracle", "aum", "flipped", "clean", "test_acc")},
                                     "removed": removed(base, e), "test_lost": base["test_acc"] - e["test_acc"]})
                    if k != ks[-1] or tuned:
                        continue
                    peers = [p for p in (*PEERS, "random") if p in agg]
                    for name, e in agg.items():
                        if not name.startswith("mem_"):
                            continue
                        r, lost = removed(base, e), base["test_acc"] - e["test_acc"]
                        best = all(beats((r, lost), (removed(base, agg[p]), base["test_acc"] - agg[p]["test_acc"]))
                                   for p in peers)
                        targets.setdefault(name, []).append({
                            "run": res["run"], "point": res["point"], "layer": layer, "k": k, "removed": r,
                            "test_lost": lost, "half_removed": r >= 0.5, "test_kept": lost <= 0, "beats_peers": best,
                            "met": r >= 0.5 and lost <= 0 and best})
    return {"rows": rows, "target": {name: {"met_everywhere": all(t["met"] for t in ts), "cases": ts}
                                     for name, ts in targets.items()}}


def print_tables(summary: dict, results: list[dict]) -> None:
    for res in results:
        c, b = res["counts"], res["unmasked"]
        print(f"\n### {res['run']}, {res['point']} (epoch {res['epoch']}): {c['flipped']} flipped, "
              f"{c['oracle']} memorised (oracle), {c['aum']} flagged by AUM<0, {c['clean']} clean evaluated; unmasked: "
              f"fit oracle {b['oracle']:.2f}, aum {b['aum']:.2f}, flipped {b['flipped']:.2f}, clean {b['clean']:.2f}, "
              f"test {b['test_acc']:.3f}; fine-tuned unmasked: oracle {res['unmasked_finetuned']['oracle']:.2f}, "
              f"test {res['unmasked_finetuned']['test_acc']:.3f}\n")
        print("| layer | k | score | fit oracle | fit aum | fit flipped | fit clean | test acc | removed | "
              "fine-tuned: fit oracle | test acc |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        tuned = {(r["layer"], r["k"], r["score"]): r for r in summary["rows"]
                 if r["run"] == res["run"] and r["point"] == res["point"] and r["finetuned"]}
        for r in summary["rows"]:
            if r["run"] != res["run"] or r["point"] != res["point"] or r["finetuned"]:
                continue
            t = tuned.get((r["layer"], r["k"], r["score"]))
            ft = f"{t['oracle']:.2f} | {t['test_acc']:.3f}" if t else "| "
            print(f"| {r['layer']} | {r['k']} | {r['score']} | {r['oracle']:.2f} | {r['aum']:.2f} | {r['flipped']:.2f} | "
                  f"{r['clean']:.2f} | {r['test_acc']:.3f} | {r['removed']:.0%} | {ft} |")
    print_compact(summary, results)
    print("\n### Target (k = 1/8: >= 50 % of the memorised fit removed, test accuracy not below unmasked, "
          "more removed per point of test accuracy lost than every peer)\n")
    print("| memorisation score | met on every run, point and layer | cases met | >= 50 % removed | test accuracy "
          "not below unmasked | beats every peer | mean removed | mean test change (points) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, t in summary["target"].items():
        cs = t["cases"]
        n = len(cs)

        def count(key, cs=cs, n=n):
            return f"{sum(c[key] for c in cs)}/{n}"

        print(f"| {name} | {'yes' if t['met_everywhere'] else 'no'} | {count('met')} | {count('half_removed')} | "
              f"{count('test_kept')} | {count('beats_peers')} | {sum(c['removed'] for c in cs) / n:.0%} | "
              f"{0.0 - 100 * sum(c['test_lost'] for c in cs) / n:+.1f} |")


def print_compact(summary: dict, results: list[dict]) -> None:
    """At k = 1/8: per score, memorised fit removed / test accuracy change (points), masked and fine-tuned."""
    for tuned in (False, True):
        rows = [r for r in summary["rows"] if r["finetuned"] == tuned]
        cols = []
        for res in results:
            for layer in dict.fromkeys(r["layer"] for r in rows):
                ks = [r["k"] for r in rows if r["run"] == res["run"] and r["point"] == res["point"] and r["layer"] == layer]
                if ks:
                    cols.append((res["run"], res["point"], layer, max(ks)))
        if not cols:
            continue
        what = "after a fine-tune on the unflagged samples (vs the unmasked model fine-tuned alike)" if tuned else "masked"
        print(f"\n### k = 1/8, {what}: share of the memorised fit removed / test accuracy change (points)\n")
        head = [f"{run.replace('simple_cnn_noise30_', '')} {point} {layer} (k={k})" for run, point, layer, k in cols]
        print("| score | " + " | ".join(head) + " |")
        print("| --- |" + " --- |" * len(cols))
        names = list(dict.fromkeys(r["score"] for r in rows))
        for name in names:
            cells = []
            for run, point, layer, k in cols:
                r = next((r for r in rows if (r["run"], r["point"], r["layer"], r["k"], r["score"]) == (run, point, layer, k, name)), None)
                cells.append(f"{r['removed']:.0%} / {0.0 - 100 * r['test_lost']:+.1f}" if r else "")
            print(f"| {name} | " + " | ".join(cells) + " |")


def add_run_options(p: argparse.ArgumentParser, out: str, layers: list[str], results: Path) -> None:
    """The options of a noisy CIFAR-10 run, shared by the scripts that import this one's training (each adds its
    own ``--tiny``, the smoke run of make test)."""
    p.add_argument("--data", default="/work/shared/data/cifar10")
    p.add_argument("--out", default=out)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--noise", type=float, default=0.3)
    p.add_argument("--train-size", type=int, default=2000)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--width", nargs=3, type=int, default=[32, 64, 64])
    p.add_argument("--layers", nargs="+", default=layers)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="runs/cifar10_uint8.pt", help="decoded images (overfitting_signals.py's cache)")
    p.add_argument("--results", default=str(results))


def load_data(args: argparse.Namespace, p: argparse.ArgumentParser, prefix: str, **tiny) -> dict[str, torch.Tensor]:
    """The data of ``args``: with ``--tiny`` the generated images (``tiny`` overrides the options, and the run
    writes nowhere but a temporary folder unless ``--out`` is given), else the CIFAR-10 split (10 classes)."""
    torch.set_num_threads(args.threads)
    if args.tiny:
        if args.out == p.get_default("out"):
            import tempfile

            args.out = tempfile.mkdtemp(prefix=prefix)
        args.classes, args.seeds = 4, args.seeds[:1]
        for name, value in tiny.items():
            setattr(args, name, value)
        return tiny_data()
    args.classes = 10
    return ofs.splits(ofs.load_cifar(args.data, Path(args.cache)), args.train_size)


def parse(argv=None, *, description: str = __doc__, extra=None, defaults: dict | None = None,
          results: Path = RESULTS) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    """The options (``--tiny`` applied) and the data: this script's, and those of a script importing its
    training (``extra(parser)`` adds its options, ``defaults`` changes some of these)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="generated data, a tiny network, seconds; writes only under --out")
    add_run_options(p, "runs/memfilters", ["relu2", "relu3"], results)
    p.add_argument("--clean-eval", type=int, default=1000, help="clean fitted training samples whose fit is reported")
    p.add_argument("--score-samples", type=int, default=1000, help="training samples for Taylor and SoU")
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--finetune-random", type=int, default=2, help="random seeds also fine-tuned at k = 1/8")
    p.add_argument("--probe-size", type=int, default=512, help="training samples the anomaly scan clusters (the thesis' 512)")
    p.add_argument("--scan-mode", default="exact", help="the anomaly scan's mode (exact: the thesis' learning images)")
    p.add_argument("--batch-norm", action="store_true", help="SimpleCNN with BatchNorm after each conv")
    p.add_argument("--train-only", action="store_true", help="train the runs and stop")
    p.set_defaults(**(defaults or {}))
    if extra is not None:
        extra(p)
    args = p.parse_args(argv)
    data = load_data(args, p, "memfilters_tiny_", epochs=60, width=[8, 16, 16], lr=1e-2, clean_eval=40,
                     score_samples=40, finetune_random=1, probe_size=64)
    return args, data


def main(argv=None) -> dict:
    args, data = parse(argv)
    if args.train_only:
        for seed in args.seeds:
            train(args, data, seed)
        return {}
    results = []
    for seed in args.seeds:
        run = train(args, data, seed)
        log = json.loads((run / "metrics.json").read_text())["epochs"]
        onset = min(log, key=lambda e: e["val_loss"])["epoch"]
        for point, epoch in (("onset", onset), ("OF", len(log))):
            res = evaluate_point(args, data, run, seed, epoch, point)
            res["run"] = run.name
            results.append(res)
    summary = summarise(results, args.layers)
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("results",)}
    summary["points"] = [{k: r[k] for k in ("run", "point", "epoch", "counts", "anomaly_flagged", "unmasked",
                                            "unmasked_finetuned")}
                         for r in results]
    print_tables(summary, results)
    return write_summary(args, summary, "summary.json")


def write_summary(args, summary: dict, tiny_name: str) -> dict:
    """``summary`` to ``--results`` (real mode) or to ``tiny_name`` under ``--out`` (``--tiny``)."""
    out = Path(args.out) / tiny_name if args.tiny else Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nwrote {out}")
    return summary


if __name__ == "__main__":
    main()
