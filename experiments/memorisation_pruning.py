"""Does pruning by the memorisation score pay? Real channel removal against the peers (issue 22, item 4).

Uses the training of ``memorisation_filters.py`` (same runs, same split: the shared ``val/`` halved into
*val*, which picks the best epoch, and *test*, only reported). Every pruned network is cut for real
(``lightning_interp.pruning.prune_filters``: the conv's filters, its BatchNorm channels, the next conv's
inputs; ``round_to=1``) in the masking benchmark's layers (``--layers``, ``relu2`` and ``relu3``) and then
fine-tuned the same way (``lightning_interp.finetune.fine_tune``: ``--finetune-epochs`` epochs of Adam at
``--finetune-lr`` on the training samples that the label-free flag — fitted with AUM < 0 — does not flag).

Stage ``noisy`` (the noisy runs, ``--noise`` flipped, SimpleCNN without BatchNorm as in the masking
benchmark): at OF (the last epoch) the ``--prune-fraction`` (1/8) of each layer's filters with the highest
memorisation score (``taylor`` variant, label-free ``aum`` suspects) are removed, against the unpruned
model at OF, at its best epoch (lowest *val* loss, and highest *val* accuracy), the unpruned OF model
fine-tuned alike (the fine-tune's own gain), the lowest-L1 filters (Torch-Pruning's magnitude) pruned
and fine-tuned, and random filters (``--random-seeds``) pruned and fine-tuned: test and val accuracy, fit
of the flipped samples to their given label, parameters, MACs, and CPU latency (median of
``--latency-repeats`` interleaved rounds, batch 1 and batch 64, every model in one loop, this process).

Stage ``clean`` (clean runs: 0 % noise, SimpleCNN with BatchNorm so BN scale applies, seeds ``--seeds``):
at the last epoch, 10 %, 30 %, 50 % of each layer's filters are removed by each criterion, then
fine-tuned: the memorisation score (highest first; ``aum`` suspects — a clean run leaves almost no
fitted sample with AUM < 0, 1 of 2,000, so its suspects are the ``--min-suspects`` (100) fitted samples of
lowest AUM: the hard or ambiguous ones, excluded from its fine-tune like the noisy runs' flags), the thesis' anomaly flags (``scan_anomaly_filters``, exact mode, a 512-sample training
probe; flagged filters first, then by CH index), TIP's SoU (lowest: SNIP's order), Torch-Pruning's L1,
L2, Taylor, BN scale and LAMP (lowest), random (``--random-seeds`` seeds): test accuracy, parameters, MACs.

    python experiments/memorisation_filters.py --train-only --batch-norm --noise 0   # the clean runs
    python experiments/memorisation_pruning.py                       # both stages (trains what is missing)
    python experiments/memorisation_pruning.py --tiny --out /tmp/mp  # generated data, seconds (tests)

Resumable: each run's arms are stored under ``--out`` as they finish; the summary goes to
``experiments/results/memorisation_pruning.json`` (real mode only) and the tables to stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorisation_filters as mf  # noqa: E402

from lightning_interp.finetune import fine_tune  # noqa: E402
from lightning_interp.importance import importance_scores  # noqa: E402
from lightning_interp.memorisation import memorisation_scores  # noqa: E402
from lightning_interp.metrics.tip import sou  # noqa: E402
from lightning_interp.pruning import compare_latency, prune_filters  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "memorisation_pruning.json"
SPARSITIES = (0.1, 0.3, 0.5)
#: Torch-Pruning's criteria in the clean stage (lowest pruned first); ``bn_scale`` needs the BatchNorm runs.
TP_CRITERIA = ("l1", "l2", "taylor", "bn_scale", "lamp")


def options(p: argparse.ArgumentParser) -> None:
    """This script's options, added to ``memorisation_filters.parse``'s (which has "--tiny", the training's and
    the fine-tune's)."""
    p.add_argument("--stage", choices=("noisy", "clean", "all"), default="all")
    p.add_argument("--clean-seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--prune-fraction", type=float, default=1 / 8, help="noisy stage: filters removed per layer")
    p.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES), help="clean stage")
    p.add_argument("--random-seeds", type=int, default=3)
    p.add_argument("--min-suspects", type=int, default=100,
                   help="when fewer fitted samples have AUM < 0 (a clean run), the suspects are this many fitted "
                        "samples of lowest AUM")
    p.add_argument("--latency-repeats", type=int, nargs=2, default=[200, 30], help="rounds at batch 1 and 64")


# ---- shared pieces -----------------------------------------------------------------------------
def load(args, run: Path, epoch: int) -> torch.nn.Module:
    model = mf.build(args)
    model.load_state_dict(torch.load(run / f"epoch_{epoch:03d}.pt"))
    return model.eval()


def count(n_filters: int, fraction: float) -> int:
    return max(1, int(math.floor(fraction * n_filters + 0.5)))


def accuracy(model, x, y) -> float:
    return (mf.predictions(model.eval(), x) == y).double().mean().item()


class Context:
    """One run at one epoch: its data, given labels, label-free suspects and the fine-tune's loader."""

    def __init__(self, args, data, run: Path, seed: int, epoch: int):
        self.args, self.data, self.run, self.seed, self.epoch = args, data, run, seed, epoch
        self.model = load(args, run, epoch)
        self.x, y_true = data["train_x"], data["train_y"]
        self.y = mf.noisy_labels(args, y_true, seed)
        self.flipped = self.y != y_true
        fitted = mf.predictions(self.model, self.x) == self.y
        self.suspects = mf.aum_suspects(run, epoch, self.y, fitted)
        self.suspect_rule = "fitted, AUM < 0"
        if self.suspects.sum() < args.min_suspects:  # an easy clean run: its hardest fitted samples instead
            a = mf.aum(run, epoch, self.y).masked_fill(~fitted, math.inf)
            self.suspects = torch.zeros_like(fitted)
            self.suspects[torch.argsort(a, stable=True)[: args.min_suspects]] = True
            self.suspect_rule = f"the {args.min_suspects} fitted samples of lowest AUM (fewer had AUM < 0)"
        self.loader = mf.finetune_loader(self.x, self.y, self.suspects, seed)
        self.example = self.x[:1]

    def metrics(self, model) -> dict:
        d = self.data
        out = {"test_acc": accuracy(model, d["test_x"], d["test_y"]), "val_acc": accuracy(model, d["val_x"], d["val_y"])}
        if self.flipped.any():
            out["flipped_fit"] = accuracy(model, self.x[self.flipped], self.y[self.flipped])
        return out

    def tuned(self, model) -> torch.nn.Module:
        fine_tune(model, self.loader, epochs=self.args.finetune_epochs, lr=self.args.finetune_lr)
        return model.eval()

    def prune(self, filters: dict[str, list[int]]):
        return prune_filters(self.model, filters, self.example, latency=False, round_to=1)

    def memorisation(self) -> dict[str, torch.Tensor]:
        return dict(memorisation_scores(self.model, self.args.layers, self.x, self.y, self.suspects,
                                        variant="taylor", seed=0).scores)


def top_filters(scores: dict[str, torch.Tensor], fraction: float) -> dict[str, list[int]]:
    """Per layer, the ``fraction`` of its filters with the highest score (ties: lower index)."""
    return {layer: mf.top(s, count(len(s), fraction)) for layer, s in scores.items()}


def resumable(path: Path) -> tuple[dict, Callable[[], None]]:
    """What is stored at ``path`` (a dict, empty at first) and a function that stores it again."""
    done = json.loads(path.read_text()) if path.exists() else {}

    def save():
        path.write_text(json.dumps(done, indent=1))

    return done, save


# ---- stage noisy -------------------------------------------------------------------------------
def noisy_stage(args, data, seed: int) -> dict:
    run = mf.train(args, data, seed)
    log = json.loads((run / "metrics.json").read_text())["epochs"]
    cache = run / "pruning.json"
    if cache.exists():
        return json.loads(cache.read_text())
    t0 = time.time()
    of = len(log)
    best_loss = min(log, key=lambda e: e["val_loss"])["epoch"]
    best_acc = max(log, key=lambda e: (e["val_acc"], -e["epoch"]))["epoch"]
    ctx = Context(args, data, run, seed, of)
    mem = top_filters(ctx.memorisation(), args.prune_fraction)
    l1 = importance_scores(ctx.model, args.layers, ctx.example, "l1")
    arms = {f"best epoch (val loss, {best_loss})": load(args, run, best_loss),
            f"best epoch (val acc, {best_acc})": load(args, run, best_acc),
            "OF": ctx.model, "OF fine-tuned": ctx.tuned(copy.deepcopy(ctx.model))}
    plans = {"memorisation": mem, "l1": top_filters({k: -v for k, v in l1.scores.items()}, args.prune_fraction)}
    for r in range(args.random_seeds):
        g = torch.Generator().manual_seed(2000 + r)
        plans[f"random/{r}"] = top_filters({k: torch.rand(len(v), generator=g) for k, v in l1.scores.items()},
                                           args.prune_fraction)
    rows, summaries = {}, {}
    for name, filters in plans.items():
        pruned, summary = ctx.prune(filters)
        summaries[name] = summary
        rows[f"{name} pruned"] = {**ctx.metrics(pruned), "filters": filters}
        arms[f"{name} pruned, fine-tuned"] = ctx.tuned(pruned)
    models = list(arms.values())
    lat = {b: compare_latency(*models, example_inputs=data["test_x"][:b], repeats=reps, warmup=3)
           for b, reps in zip((1, 64), args.latency_repeats)}
    for i, (name, model) in enumerate(arms.items()):
        plan = name.split(" pruned")[0] if " pruned" in name else None
        s = summaries.get(plan)
        base = next(iter(summaries.values()))
        rows[name] = {**ctx.metrics(model), "params": s.params_after if s else base.params_before,
                      "macs": s.macs_after if s else base.macs_before,
                      "latency_ms_b1": lat[1][i], "latency_ms_b64": lat[64][i]}
    out = {"run": run.name, "OF": of, "best_val_loss_epoch": best_loss, "best_val_acc_epoch": best_acc,
           "flagged": int(ctx.suspects.sum()), "suspects": ctx.suspect_rule, "finetune_samples": int((~ctx.suspects).sum()),
           "flipped": int(ctx.flipped.sum()), "rows": rows, "seconds": time.time() - t0}
    cache.write_text(json.dumps(out, indent=1))
    print(f"[{run.name}] pruning stage: {out['seconds']:.0f}s", flush=True)
    return out


# ---- stage clean -------------------------------------------------------------------------------
def criteria_scores(args, ctx: Context) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, list[int]]]:
    """``{criterion: {layer: K scores}}``, higher = pruned first; and the anomaly scan's flags."""
    g = torch.Generator().manual_seed(ctx.seed)
    sample = torch.randperm(len(ctx.x), generator=g)[: args.score_samples]
    probe = ctx.x[torch.randperm(len(ctx.x), generator=torch.Generator().manual_seed(ctx.seed))[: args.probe_size]]
    out = {"memorisation": ctx.memorisation()}
    out["anomaly"], flags = mf.anomaly_ranking(args, ctx.model, args.layers, probe)
    xs, ys = ctx.x[sample], ctx.y[sample]
    out["sou"] = {layer: -sou(ctx.model, layer, xs, ys).detach().cpu() for layer in args.layers}
    for crit in TP_CRITERIA:
        s = importance_scores(ctx.model, args.layers, ctx.example, crit, inputs=xs, labels=ys)
        out[crit] = {k: -v for k, v in s.scores.items()}
    for r in range(args.random_seeds):
        gr = torch.Generator().manual_seed(2000 + r)
        out[f"random/{r}"] = {k: torch.rand(len(v), generator=gr) for k, v in out["l1"].items()}
    return out, flags


def clean_stage(args, data, seed: int) -> dict:
    run = mf.train(args, data, seed)
    log = json.loads((run / "metrics.json").read_text())["epochs"]
    done, save = resumable(run / "pruning.json")
    if done.get("complete"):
        return done
    t0 = time.time()
    ctx = Context(args, data, run, seed, len(log))
    scores, flags = criteria_scores(args, ctx)
    done.update(run=run.name, epoch=len(log), flagged=int(ctx.suspects.sum()), suspects=ctx.suspect_rule,
                finetune_samples=int((~ctx.suspects).sum()), anomaly_flagged=flags)
    done.setdefault("rows", {})
    if "unpruned" not in done["rows"]:
        _, s = ctx.prune({})
        done["rows"]["unpruned"] = {**ctx.metrics(ctx.model), "params": s.params_before, "macs": s.macs_before}
        done["rows"]["unpruned, fine-tuned"] = {**ctx.metrics(ctx.tuned(copy.deepcopy(ctx.model))),
                                               "params": s.params_before, "macs": s.macs_before}
        save()
    for frac in args.sparsities:
        for crit, per_layer in scores.items():
            key = f"{crit}|{frac}"
            if key in done["rows"]:
                continue
            filters = top_filters(per_layer, frac)
            pruned, s = ctx.prune(filters)
            before = ctx.metrics(pruned)
            after = ctx.metrics(ctx.tuned(pruned))
            done["rows"][key] = {**after, "test_acc_before_finetune": before["test_acc"], "params": s.params_after,
                                 "macs": s.macs_after, "filters": filters}
            save()
        print(f"[{run.name}] sparsity {frac}: {time.time() - t0:.0f}s", flush=True)
    done["complete"] = True
    done["seconds"] = done.get("seconds", 0) + time.time() - t0
    save()
    return done


# ---- summary -----------------------------------------------------------------------------------
def print_noisy(results: list[dict]) -> None:
    for res in results:
        rows = res["rows"]
        print(f"\n### {res['run']}: OF = epoch {res['OF']}, {res['flipped']} flipped, {res['flagged']} suspects "
              f"({res['suspects']}), fine-tune on {res['finetune_samples']} samples\n")
        print("| model | test acc | val acc | fit of flipped | params | MACs | latency b1 (ms) | latency b64 (ms) |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for name, r in {**rows, **random_mean(rows)}.items():
            if "params" not in r:
                continue
            print(f"| {name} | {r['test_acc']:.3f} | {r['val_acc']:.3f} | {r.get('flipped_fit', math.nan):.2f} | "
                  f"{r['params']:,.0f} | {r['macs']:,.0f} | {r['latency_ms_b1']:.3f} | {r['latency_ms_b64']:.2f} |")
        before = [(n, r) for n, r in rows.items() if "params" not in r]
        print("\nbefore the fine-tune: " + ", ".join(f"{n}: test {r['test_acc']:.3f}, fit of flipped "
                                                     f"{r.get('flipped_fit', math.nan):.2f}" for n, r in before))


def random_mean(rows: dict[str, dict]) -> dict[str, dict]:
    """The random arms' rows averaged over the seeds, named ``random (mean of N) ...``."""
    groups: dict[str, list[dict]] = {}
    for name, r in rows.items():
        if name.startswith("random/"):
            groups.setdefault(name.split(" ", 1)[1], []).append(r)
    return {f"random (mean of {len(rs)}) {rest}": {k: sum(r[k] for r in rs) / len(rs) for k in rs[0] if k != "filters"}
            for rest, rs in groups.items()}


def clean_table(results: list[dict], sparsities) -> dict:
    """Per criterion × sparsity, mean over runs (random: over its seeds too) of test accuracy after the fine-tune."""
    table = {}
    for frac in sparsities:
        for res in results:
            for key, r in res["rows"].items():
                if "|" not in key or float(key.split("|")[1]) != frac:
                    continue
                crit = key.split("|")[0].split("/")[0]
                cell = table.setdefault(crit, {}).setdefault(str(frac), {"test_acc": [], "before": [], "params": [],
                                                                         "macs": []})
                cell["test_acc"].append(r["test_acc"])
                cell["before"].append(r["test_acc_before_finetune"])
                cell["params"].append(r["params"])
                cell["macs"].append(r["macs"])
    return {crit: {f: {k: sum(v) / len(v) for k, v in cell.items()} | {"n": len(cell["test_acc"])}
                   for f, cell in per.items()} for crit, per in table.items()}


def print_clean(results: list[dict], table: dict, sparsities) -> None:
    for res in results:
        u, t = res["rows"]["unpruned"], res["rows"]["unpruned, fine-tuned"]
        print(f"\n{res['run']} (epoch {res['epoch']}): unpruned test {u['test_acc']:.3f}, fine-tuned {t['test_acc']:.3f}; "
              f"{res['flagged']} suspects ({res['suspects']}); anomaly flags {res['anomaly_flagged']}")
    print("\n### Equal sparsity: test accuracy after the fine-tune (before it), mean over the clean runs\n")
    print("| criterion | " + " | ".join(f"{f:.0%}" for f in sparsities) + " |")
    print("| --- |" + " --- |" * len(sparsities))
    u, t = (sum(r["rows"][k]["test_acc"] for r in results) / len(results) for k in ("unpruned", "unpruned, fine-tuned"))
    print("| none (unpruned) | " + " | ".join(f"{t:.3f} ({u:.3f})" for _ in sparsities) + " |")
    for crit, per in table.items():
        cells = [f"{per[str(f)]['test_acc']:.3f} ({per[str(f)]['before']:.3f})" if str(f) in per else ""
                 for f in sparsities]
        print(f"| {crit} | " + " | ".join(cells) + " |")
    print("\n### Per run (" + " / ".join(r["run"] for r in results) + "): test accuracy after the fine-tune\n")
    per_run = [clean_table([r], sparsities) for r in results]
    print("| criterion | " + " | ".join(f"{f:.0%}" for f in sparsities) + " |")
    print("| --- |" + " --- |" * len(sparsities))
    for crit in table:
        cells = [" / ".join(f"{t[crit][str(f)]['test_acc']:.3f}" for t in per_run if str(f) in t.get(crit, {}))
                 for f in sparsities]
        print(f"| {crit} | " + " | ".join(cells) + " |")
    any_crit = next(iter(table.values()), {})
    print("\nparams / MACs per sparsity: " + ", ".join(
        f"{float(f):.0%}: {c['params']:,.0f} / {c['macs']:,.0f}" for f, c in any_crit.items()))


def main(argv=None) -> dict:
    args, data = mf.parse(argv, description=__doc__, extra=options, results=RESULTS,
                          defaults={"finetune_epochs": 2})
    if args.tiny:
        args.latency_repeats, args.random_seeds, args.clean_seeds = [3, 3], 1, args.clean_seeds[:1]
    summary = {"settings": {k: v for k, v in vars(args).items() if k != "results"}}
    if args.stage in ("noisy", "all"):
        noisy = [noisy_stage(args, data, seed) for seed in args.seeds]
        print_noisy(noisy)
        summary["noisy"] = noisy
    if args.stage in ("clean", "all"):
        clean_args = argparse.Namespace(**{**vars(args), "noise": 0.0, "batch_norm": True})
        clean = [clean_stage(clean_args, data, seed) for seed in args.clean_seeds]
        table = clean_table(clean, args.sparsities)
        print_clean(clean, table, args.sparsities)
        summary["clean"], summary["clean_table"] = clean, table
    return mf.write_summary(args, summary, "pruning_summary.json")


if __name__ == "__main__":
    main()
