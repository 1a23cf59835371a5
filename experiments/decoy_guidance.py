"""Decoy experiment: does attention guidance recover what a shortcut costs?

`ShapesDataModule(decoy=True)` puts a 5×5 patch whose colour gives the label away in every training
image; in validation/test the patch colour is random. Per seed, models with the same architecture,
data size, optimiser and epochs:

* clean   — trained without the decoy (the accuracy there is to lose);
* decoy   — trained with the decoy, plain cross-entropy;
* guided  — trained with the decoy plus `AttentionGuidance` with the shapes' pixel masks, one row per
            ``--guided`` spec, e.g. ``attention_supervision=10`` (GAIN's external supervision:
            Grad-CAM of ``--layer`` pulled towards the mask), ``attention_supervision=10,attention_mining=1``
            (full GAIN_ext) or ``rrr=1`` (Right for the Right Reasons: input gradients of the
            log-probabilities outside the mask penalised) or ``cam_background=1`` (every class's signed,
            unnormalised evidence map S_c = Σ_k A_k ⊙ ∂z_c/∂A_k of ``--layer`` kept off the cells that
            hold no shape pixel: the one that recovers nearly all the decoy's cost, see
            experiments/results/decoy.json and decoy_cam_background_sweep.json) or
            ``cam_background_share=10`` (the same as the background's share of the squared evidence).
            The stored results predate the rename and keep the old keys: their ``cam_background_raw`` is
            today's ``cam_background``, their ``cam_background`` today's ``cam_background_share``.

The model is SimpleCNN (with BatchNorm unless ``--no-batch-norm``) behind a fixed input
standardisation ((x − 0.45) / 0.25) — without both the clean model learns the shapes too slowly
for the comparison to mean anything (see the report in the commit history). All conditions get the
same model, data size, optimiser and budget.

All are evaluated on a decoy-free test set (1,000 images of the same generator without the patch)
and on the random-decoy validation split; the CAM/mask IoU of ``--layer`` on 200 decoy-free test
images is recorded too. Prints a Markdown table and writes ``<out>/results.json``.

    python experiments/decoy_guidance.py --seeds 0 1 2 --guided attention_supervision=10 rrr=1 --out runs/decoy
    python experiments/decoy_guidance.py --tiny      # one seed, 96 images, one epoch: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import OrderedDict

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_interp.callbacks import AttentionGuidance
from lightning_interp.cam import cam_iou, grad_cam
from lightning_interp.data import ShapesDataModule, ShapesDataset, make_shapes
from lightning_interp.losses import LOSSES
from lightning_interp.metrics.aipc import accuracy
from lightning_interp.models import ImageClassifier, SimpleCNN


class Standardize(nn.Module):
    """Fixed ``(x − mean) / std`` in front of the network (images of the shapes set are in [0, 1])."""

    def __init__(self, mean: float = 0.45, std: float = 0.25):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def parse_spec(spec: str) -> dict[str, float]:
    """``"attention_supervision=10,attention_mining=1"`` → ``{"attention_supervision": 10.0, ...}``."""
    weights = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name not in LOSSES or not value:
            raise argparse.ArgumentTypeError(f"Expected NAME=WEIGHT[,NAME=WEIGHT...] with NAME in {list(LOSSES)} but got {spec!r}.")
        weights[name] = float(value)
    return weights


def build_model(num_classes: int, args) -> nn.Module:
    cnn = SimpleCNN(in_channels=3, num_classes=num_classes, batch_norm=args.batch_norm)
    if not args.standardize:
        return cnn
    return nn.Sequential(OrderedDict(standardize=Standardize(), cnn=cnn))


def train(condition: str, seed: int, args, weights: dict[str, float] | None = None) -> dict:
    pl.seed_everything(seed, workers=True)
    data = ShapesDataModule(num_train=args.num_train, num_val=args.num_eval // 2, num_test=args.num_eval // 2,
                            decoy=condition != "clean", seed=seed)
    module = ImageClassifier(build_model(data.num_classes, args), lr=args.lr)
    layer = ("model.cnn." if args.standardize else "model.") + args.layer
    callbacks = [AttentionGuidance(layer, weights, probe_size=min(64, args.num_train))] if weights else []
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="auto", devices=1, logger=False, callbacks=callbacks,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - t0
    clean = make_shapes(args.num_eval, num_classes=data.num_classes, decoy="none", seed=10_000 + seed)
    module.eval()
    n_cam = args.num_eval // 5
    cam = grad_cam(module, layer, clean["image"][:n_cam], clean["label"][:n_cam])
    guidance = {k.rsplit("/", 1)[-1].removesuffix("_epoch"): round(float(v), 5) for k, v in trainer.callback_metrics.items()
                if "guidance" in k and k.endswith("_epoch")}
    return {
        "condition": condition, "seed": seed, "weights": weights or {}, "seconds": round(seconds, 1),
        "acc_decoy_free": accuracy(module, DataLoader(ShapesDataset(clean), batch_size=256)),
        "acc_random_decoy_val": accuracy(module, data.val_dataloader()),
        "acc_train": accuracy(module, data.train_dataloader()),
        "cam_iou_decoy_free": round(cam_iou(cam, clean["mask"][:n_cam]).item(), 4),
        "guidance_terms_last_epoch": guidance,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--layer", default="relu3", help="SimpleCNN layer of the CAM terms and of the IoU")
    parser.add_argument("--batch-norm", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--standardize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--guided", nargs="+", type=parse_spec, default=None,
                        help="one guided condition per spec NAME=WEIGHT[,NAME=WEIGHT...], NAME in " + ", ".join(LOSSES))
    parser.add_argument("--baselines", nargs="*", default=["clean", "decoy"], choices=["clean", "decoy"])
    parser.add_argument("--num-eval", type=int, default=1000,
                        help="decoy-free test images (the CAM IoU on a fifth of them); val and test splits of half as many")
    parser.add_argument("--out", default="runs/decoy")
    parser.add_argument("--tiny", action="store_true", help="seed 0, 96 training and 100 test images, one epoch, "
                        "outputs in a temporary folder (make test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="decoy-tiny-") as tmp:
        if args.tiny:
            args.seeds, args.epochs, args.num_train, args.num_eval, args.out = [0], 1, 96, 100, tmp
        run_all(args)


def run_all(args) -> None:
    guided = args.guided if args.guided is not None else [{"attention_supervision": 10.0}]
    conditions = [(c, None) for c in args.baselines] + [
        ("guided " + ",".join(f"{k}={v:g}" for k, v in w.items()), w) for w in guided]
    os.makedirs(args.out, exist_ok=True)
    results = []
    for seed in args.seeds:
        for condition, weights in conditions:
            results.append(train(condition, seed, args, weights))
            print(json.dumps(results[-1]), flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as fh:
                json.dump({"args": {k: v for k, v in vars(args).items() if k != "guided"} | {"guided": guided},
                           "results": results}, fh, indent=1)
    summarize(results, [c for c, _ in conditions])


def summarize(results: list[dict], conditions: list[str]) -> None:
    def values(cond, key):
        return torch.tensor([float(r[key]) for r in results if r["condition"] == cond])

    def stats(cond, key):
        v = values(cond, key)
        return f"{v.mean():.3f} ± {v.std(unbiased=False):.3f}"

    print("\n| training | seeds | decoy-free test acc | random-decoy val acc | train acc | CAM/mask IoU | seconds/run |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for cond in conditions:
        rows = [r for r in results if r["condition"] == cond]
        seeds = ", ".join(str(r["seed"]) for r in rows)
        print(f"| {cond} | {seeds} | {stats(cond, 'acc_decoy_free')} | {stats(cond, 'acc_random_decoy_val')} | "
              f"{stats(cond, 'acc_train')} | {stats(cond, 'cam_iou_decoy_free')} | {values(cond, 'seconds').mean():.0f} |")
    if not {"clean", "decoy"} <= set(conditions):
        return
    # Paired by seed: what the decoy costs, and how much of it each guided run gets back.
    by = {(r["condition"], r["seed"]): r["acc_decoy_free"] for r in results}
    for cond in conditions:
        if not cond.startswith("guided"):
            continue
        seeds = [s for (c, s) in by if c == cond and ("clean", s) in by and ("decoy", s) in by]
        if not seeds:
            continue
        lost = sum(by["clean", s] - by["decoy", s] for s in seeds) / len(seeds)
        regained = sum(by[cond, s] - by["decoy", s] for s in seeds) / len(seeds)
        share = regained / lost if lost > 0 else float("nan")
        print(f"{cond}: accuracy lost to the decoy {lost:+.3f}; recovered {regained:+.3f} ({share:.0%} of the loss)")


if __name__ == "__main__":
    main()
