"""Decoy experiment: does attention guidance recover what a shortcut costs?

`ShapesDataModule(decoy=True)` puts a patch whose colour gives the label away in every training
image; in validation/test the patch colour is random. Three models with the same architecture
(SimpleCNN), data size, optimiser and epochs, per seed:

* clean   — trained without the decoy (the accuracy there is to lose);
* decoy   — trained with the decoy, plain cross-entropy;
* guided  — trained with the decoy plus `AttentionGuidance` with pixel masks: GAIN's external
            supervision (Grad-CAM of the last conv layer pulled towards the shape's mask,
            `--losses attention_supervision`) and/or Right for the Right Reasons (input gradients
            on the background penalised, `--losses rrr`).

All are evaluated on a decoy-free test set (the same shapes generator without the patch) and
on the random-decoy validation split. Prints a Markdown table and writes `<out>/results.json`.

    python experiments/decoy_guidance.py --seeds 0 1 2 --epochs 8 --out runs/decoy
"""

from __future__ import annotations

import argparse
import json
import os
import time

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_interp.callbacks import AttentionGuidance
from lightning_interp.data import ShapesDataModule, ShapesDataset, make_shapes
from lightning_interp.metrics.aipc import accuracy
from lightning_interp.models import ImageClassifier, SimpleCNN


def train(condition: str, seed: int, args) -> dict:
    pl.seed_everything(seed, workers=True)
    data = ShapesDataModule(num_train=args.num_train, num_val=500, num_test=500, decoy=condition != "clean", seed=seed)
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=data.num_classes), lr=args.lr)
    callbacks = []
    if condition == "guided":
        weights = dict(zip(args.losses, args.weights))
        callbacks.append(AttentionGuidance("model.relu3", weights, probe_size=64))
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    clean_test = DataLoader(ShapesDataset(make_shapes(1000, num_classes=data.num_classes, decoy="none", seed=10_000 + seed)),
                            batch_size=256)
    data_val = data.val_dataloader()
    return {
        "condition": condition, "seed": seed, "seconds": round(seconds, 1),
        "acc_decoy_free": accuracy(module, clean_test),
        "acc_random_decoy_val": accuracy(module, data_val),
        "acc_train": accuracy(module, data.train_dataloader()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--losses", nargs="+", default=["attention_supervision"],
                        help="AttentionGuidance terms of the guided run: attention_supervision, rrr, attention_mining")
    parser.add_argument("--weights", type=float, nargs="+", default=[10.0], help="one weight per loss")
    parser.add_argument("--conditions", nargs="+", default=["clean", "decoy", "guided"])
    parser.add_argument("--out", default="runs/decoy")
    args = parser.parse_args()
    if len(args.losses) != len(args.weights):
        parser.error("give one --weights value per --losses name")
    os.makedirs(args.out, exist_ok=True)
    results = []
    for seed in args.seeds:
        for condition in args.conditions:
            results.append(train(condition, seed, args))
            print(json.dumps(results[-1]), flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as fh:
                json.dump(results, fh, indent=1)

    def stats(cond, key):
        values = torch.tensor([r[key] for r in results if r["condition"] == cond])
        return f"{values.mean():.3f} ± {values.std(unbiased=False):.3f}"

    print("\n| training | decoy-free test acc | random-decoy val acc | train acc | seconds/run |")
    print("| --- | --- | --- | --- | --- |")
    for cond in args.conditions:
        secs = sum(r["seconds"] for r in results if r["condition"] == cond) / len(args.seeds)
        print(f"| {cond} | {stats(cond, 'acc_decoy_free')} | {stats(cond, 'acc_random_decoy_val')} | "
              f"{stats(cond, 'acc_train')} | {secs:.0f} |")
    if not {"clean", "decoy", "guided"} <= set(args.conditions):
        return
    lost = [c["acc_decoy_free"] - d["acc_decoy_free"] for c, d in zip(
        [r for r in results if r["condition"] == "clean"], [r for r in results if r["condition"] == "decoy"])]
    regained = [g["acc_decoy_free"] - d["acc_decoy_free"] for g, d in zip(
        [r for r in results if r["condition"] == "guided"], [r for r in results if r["condition"] == "decoy"])]
    lost_m, regained_m = sum(lost) / len(lost), sum(regained) / len(regained)
    share = regained_m / lost_m if lost_m > 0 else float("nan")
    print(f"\nAccuracy lost to the decoy: {lost_m:+.3f}; recovered by guidance: {regained_m:+.3f} ({share:.0%} of the loss)")


if __name__ == "__main__":
    main()
