"""Masking memorisation filters live, from the epoch after the validation-loss alarm (issue 22, item 5).

Noisy CIFAR-10 runs in the setting of ``memorisation_filters.py`` (SimpleCNN 32/64/64, 2,000 training
images with ``--noise`` 30 % of the labels flipped, Adam 1e-3, batch 128, 30 epochs; the overfitting
benchmark's fixed split: ``val`` decides the alarm and the best epoch, ``test`` is only reported), trained
with Lightning's ``Trainer``. Every run carries ``SampleDynamicsMonitor(source="batches", alarm="val_loss")``;
per seed, the same seed with:

* ``none``: no masking (the run the user has today);
* ``memorisation``: the live chain — ``MemorisationScorer(monitor, module, relu2/relu3)`` and
  ``FilterMasking(scorer, select=Selection("taylor", amount=1/8), start_on="interp/samples/overfit_alarm")``:
  from the epoch after the alarm, the 1/8 of each layer's filters that carry most of the flagged samples'
  fit are masked (re-scored every epoch); the suspects are the flagged samples the model fits to their given
  labels (``fitted_only=True``, the default);
* ``memorisation_flagged``: the same with every flagged sample a suspect (``fitted_only=False``; the most suspect
  by AUM are mostly not fitted yet at the alarm);
* ``random``: ``FilterMasking`` of 1/8 random filters per layer (seeded), from the same epoch
  (``start_on`` the same key);
* ``early_stop``: the user's alternative, ``EarlyStopping`` on the alarm key (stops at the end of the alarm
  epoch). The run is the ``none`` run up to the alarm (same seed, same callbacks, nothing differs before
  the alarm; the script checks the validation losses agree), so it is read from the ``none`` run's epochs:
  the model at the alarm epoch, and with the best checkpoint restored (the best validation epoch up to it).

Reported per run: the alarm epoch, test accuracy at the end (masks in force), test accuracy at the best
validation epoch, and the fit of the flipped training samples to their wrong (given) labels at the end.
Every number is on the ``test`` half the run never saw, except the alarm and the best epoch (``val``).

    python experiments/live_masking.py                       # CIFAR-10, ~4 min per run on one CPU core
    python experiments/live_masking.py --tiny --out /tmp/lm  # generated data, seconds (tests)

Resumable: each run trains under ``--out/<run>/`` with ``ModelCheckpoint(save_last=True)`` and resumes from
``last.ckpt``; a finished run's ``result.json`` is reused. The summary goes to
``experiments/results/live_masking.json`` (real mode only) and the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memorisation_filters as mf  # noqa: E402

from lightning_interp.callbacks import FilterMasking, MemorisationScorer, SampleDynamicsMonitor  # noqa: E402
from lightning_interp.data import with_index  # noqa: E402
from lightning_interp.models import ImageClassifier  # noqa: E402
from lightning_interp.scores import Selection  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "live_masking.json"
ARMS = ("none", "memorisation", "memorisation_flagged", "random")
ALARM_KEY = "interp/samples/overfit_alarm"
FRACTION = 1 / 8


class Outcomes(Callback):
    """Per epoch, after the validation (masks in force): test loss/accuracy and the flipped samples' fit to their given labels."""

    def __init__(self, data: dict[str, torch.Tensor], y_given: torch.Tensor, flipped: torch.Tensor):
        self.data, self.y_given, self.flipped = data, y_given, flipped
        self.epochs: list[dict[str, Any]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        was = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            test = torch.cat([pl_module(self.data["test_x"][i : i + 500]) for i in range(0, len(self.data["test_x"]), 500)])
            x_f = self.data["train_x"][self.flipped]
            pred_f = torch.cat([pl_module(x_f[i : i + 500]).argmax(1) for i in range(0, len(x_f), 500)])
        pl_module.train(was)
        val_loss = trainer.callback_metrics.get("val/loss")
        entry = {"epoch": trainer.current_epoch,
                 "val_loss": float(val_loss) if val_loss is not None else None,
                 "test_loss": torch.nn.functional.cross_entropy(test, self.data["test_y"]).item(),
                 "test_acc": (test.argmax(1) == self.data["test_y"]).double().mean().item(),
                 "flipped_fit": (pred_f == self.y_given[self.flipped]).double().mean().item()}
        masking = next((cb for cb in trainer.callbacks if isinstance(cb, FilterMasking)), None)
        entry["num_masked"] = masking.history[-1]["num_masked"] if masking is not None and masking.history else 0
        self.epochs = [e for e in self.epochs if e["epoch"] != entry["epoch"]] + [entry]

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": list(self.epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.epochs = list(state_dict.get("epochs", []))


def random_filters(args, module: ImageClassifier, seed: int) -> dict[str, list[int]]:
    g = torch.Generator().manual_seed(1000 + seed)
    out = {}
    for layer in args.layers:
        num = _channels(module, layer)
        k = max(1, int(math.floor(FRACTION * num + 0.5)))
        out[layer] = sorted(torch.randperm(num, generator=g)[:k].tolist())
    return out


def _channels(module: ImageClassifier, layer: str) -> int:
    """Channels of a ``model.reluN`` output: those of the conv before it."""
    return getattr(module.model, "conv" + layer.rsplit("relu", 1)[1]).out_channels


def train_arm(args, data, seed: int, arm: str) -> dict:
    run = Path(args.out) / f"{'tiny_' if args.tiny else ''}noise{int(round(args.noise * 100)):02d}_seed{seed}_{arm}"
    run.mkdir(parents=True, exist_ok=True)
    done = run / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    y_given = mf.noisy_labels(args, data["train_y"], seed)
    flipped = y_given != data["train_y"]
    pl.seed_everything(seed, workers=True, verbose=False)
    module = ImageClassifier(mf.build(args), lr=args.lr)
    monitor = SampleDynamicsMonitor(source="batches", alarm="val_loss", num_images=0)
    outcomes = Outcomes(data, y_given, flipped)
    callbacks: list[Callback] = [monitor]
    if arm.startswith("memorisation"):
        scorer = MemorisationScorer(monitor, module, args.layers, max_suspects=args.max_suspects,
                                    fitted_only=arm == "memorisation")
        callbacks.append(FilterMasking(scorer, select=Selection("taylor", amount=FRACTION), start_on=ALARM_KEY))
    elif arm == "random":
        callbacks.append(FilterMasking(filters=random_filters(args, module, seed), start_on=ALARM_KEY))
    callbacks += [outcomes, ModelCheckpoint(dirpath=run, save_last=True)]
    train = DataLoader(with_index(TensorDataset(data["train_x"], y_given)), batch_size=128, shuffle=True)
    val = DataLoader(TensorDataset(data["val_x"], data["val_y"]), batch_size=500)
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, default_root_dir=run, logger=False,
                         callbacks=callbacks, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0)
    last = run / "last.ckpt"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(module, train, val, ckpt_path=str(last) if last.exists() else None)
    epochs = outcomes.epochs
    masking = next((cb for cb in callbacks if isinstance(cb, FilterMasking)), None)
    result = {"run": run.name, "seed": seed, "arm": arm, "alarm_epoch": monitor.alarm_epoch,
              "masking_alarm_epoch": masking.alarm_epoch if masking is not None else None,
              "first_masked_epoch": next((e["epoch"] for e in epochs if e["num_masked"]), None),
              "masked": masking.history[-1]["filters"] if masking is not None and masking.history else {},
              "flipped": int(flipped.sum()), "epochs": epochs}
    done.write_text(json.dumps(result, indent=1))
    print(f"[{run.name}] alarm {result['alarm_epoch']}, first masked epoch {result['first_masked_epoch']}, "
          f"test acc at the end {epochs[-1]['test_acc']:.3f}", flush=True)
    return result


def outcome(epochs: list[dict], upto: int | None = None) -> dict:
    """End-of-run (or end-of-epoch ``upto``) numbers and those at the best validation epoch (up to ``upto``)."""
    kept = [e for e in epochs if upto is None or e["epoch"] <= upto]
    end = kept[-1]
    best = min((e for e in kept if e["val_loss"] is not None), key=lambda e: e["val_loss"])
    return {"end_epoch": end["epoch"], "test_acc_end": end["test_acc"], "flipped_fit_end": end["flipped_fit"],
            "best_val_epoch": best["epoch"], "test_acc_at_best_val": best["test_acc"],
            "flipped_fit_at_best_val": best["flipped_fit"]}


def summarise(results: list[dict]) -> dict:
    rows, checks = [], []
    for seed in sorted({r["seed"] for r in results}):
        arms = {r["arm"]: r for r in results if r["seed"] == seed}
        base = arms["none"]
        alarm = base["alarm_epoch"]
        for arm in ARMS:
            if arm in arms:
                r = arms[arm]
                rows.append({"seed": seed, "arm": arm, "alarm_epoch": r["alarm_epoch"],
                             "first_masked_epoch": r["first_masked_epoch"], **outcome(r["epochs"])})
        if alarm is not None:
            rows.append({"seed": seed, "arm": "early_stop", "alarm_epoch": alarm, "first_masked_epoch": None,
                         **outcome(base["epochs"], upto=alarm)})
        # Nothing differs before the alarm: the masked runs' validation losses match the unmasked run's up to it.
        for arm in ARMS[1:]:
            if arm in arms and alarm is not None:
                a = [e["val_loss"] for e in arms[arm]["epochs"] if e["epoch"] <= alarm]
                b = [e["val_loss"] for e in base["epochs"] if e["epoch"] <= alarm]
                checks.append({"seed": seed, "arm": arm, "same_alarm": arms[arm]["alarm_epoch"] == alarm,
                               "max_val_loss_difference_before_alarm": max(abs(x - y) for x, y in zip(a, b))})
    means = {}
    for arm in (*ARMS, "early_stop"):
        mine = [r for r in rows if r["arm"] == arm]
        if mine:
            means[arm] = {m: sum(r[m] for r in mine) / len(mine)
                          for m in ("test_acc_end", "test_acc_at_best_val", "flipped_fit_end")}
    return {"rows": rows, "means": means, "same_until_alarm": checks}


def print_table(summary: dict) -> None:
    print("\n| seed | run | alarm epoch | first masked epoch | test acc at the end | best val epoch | "
          "test acc at best val epoch | flipped fit at the end |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in summary["rows"]:
        end = f"{r['test_acc_end']:.3f}" + (f" (epoch {r['end_epoch']})" if r["arm"] == "early_stop" else "")
        print(f"| {r['seed']} | {r['arm']} | {r['alarm_epoch']} | {r['first_masked_epoch']} | {end} | "
              f"{r['best_val_epoch']} | {r['test_acc_at_best_val']:.3f} | {r['flipped_fit_end']:.3f} |")
    print("\n| run | mean test acc at the end | mean test acc at best val epoch | mean flipped fit at the end |")
    print("| --- | --- | --- | --- |")
    for arm, m in summary["means"].items():
        print(f"| {arm} | {m['test_acc_end']:.3f} | {m['test_acc_at_best_val']:.3f} | {m['flipped_fit_end']:.3f} |")
    for c in summary["same_until_alarm"]:
        print(f"seed {c['seed']} {c['arm']}: same alarm epoch as unmasked: {c['same_alarm']}; largest val-loss "
              f"difference up to the alarm: {c['max_val_loss_difference_before_alarm']:.2e}")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="generated data, a tiny network, seconds; writes only under --out")
    mf.add_run_options(p, "runs/live_masking", ["model.relu2", "model.relu3"], RESULTS)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--max-suspects", type=int, default=512)
    args = p.parse_args(argv)
    data = mf.load_data(args, p, "live_masking_tiny_", epochs=8, width=[8, 16, 16], lr=3e-2)
    results = [train_arm(args, data, seed, arm) for seed in args.seeds for arm in args.arms]
    summary = summarise(results)
    summary["settings"] = {k: v for k, v in vars(args).items() if k != "results"}
    summary["runs"] = results
    print_table(summary)
    out = Path(args.out) / "summary.json" if args.tiny else Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1, default=float))
    print(f"\nwrote {out}")
    return summary


if __name__ == "__main__":
    main()
