"""Anomaly filters vs overfitting: thesis tables 6-2, 6-3 and 6-5 on the embedded data and CIFAR-10.

For each (model, data) pair the model is trained until it overfits (label noise on the
embedded data; plain training on CIFAR-10) with `AnomalyFilterMonitor` watching its conv
layers every epoch. WT = the epoch with the best validation accuracy, OF = the last epoch.

* Table 6-2: anomaly filters at WT and at OF (monitor history; λ = 0.1·probe, α = 0.2, β = 1,
  θ = 0.1 — not the thesis' exp. 1, whose λ = 50 is an absolute count;
  ``experiments/overfitting_signals.py`` runs tables 6-2..6-5 at the thesis' settings).
* Table 6-3: mean per-sample gradient magnitude of outlier vs normal probe samples on the WT
  and OF models (exp. 2 setting λ = 5).
* Table 6-5: validation-accuracy change when one anomaly filter of the OF model is masked,
  averaged over the flagged filters, vs one random filter of the same layers, averaged over
  `--random-trials` draws (exp. 3 settings λ = 20, θ = 0.5). Train-accuracy changes too.

    python experiments/anomaly_overfitting.py --cifar ../shared/data/cifar10 --out runs/anomaly
    python experiments/anomaly_overfitting.py --only digits --epochs 20      # embedded data only
    python experiments/anomaly_overfitting.py --tiny       # generated images, 2 epochs: the smoke run of make test

Writes `<out>/results.json` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_interp.batch import default_batch_adapter
from lightning_interp.callbacks import AnomalyFilterMonitor
from lightning_interp.data import (
    DigitsDataModule,
    ImageFolderDataModule,
    ShapesDataModule,
    write_toy_imagefolder,
)
from lightning_interp.gradients import per_sample_gradient_magnitude
from lightning_interp.masking import FilterMask
from lightning_interp.models import ImageClassifier, LeNet5, SimpleCNN

LAYERS = {"simple_cnn": ["relu1", "relu2", "relu3"], "lenet5": ["relu1", "relu2"]}


class KeepBestState(Callback):
    """Keeps a copy of the weights at the best validation accuracy (the WT model)."""

    def __init__(self, key: str = "val/acc"):
        self.key, self.best, self.state, self.epoch = key, -1.0, None, None

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking or self.key not in trainer.callback_metrics:
            return
        acc = float(trainer.callback_metrics[self.key])
        if acc > self.best:
            self.best, self.epoch = acc, trainer.current_epoch
            self.state = copy.deepcopy(pl_module.state_dict())


@torch.no_grad()
def accuracy(module, loader, max_batches=None) -> float:
    module.eval()
    correct = total = 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        b = default_batch_adapter(batch)
        correct += (module(b.x).argmax(1) == b.y).sum().item()
        total += len(b.y)
    return correct / total


def make_data(name: str, cifar_root: str | None, seed: int):
    if name == "digits":
        return DigitsDataModule(image_size=32, label_noise=0.3, batch_size=64, seed=seed), 1
    if name == "shapes":
        return ShapesDataModule(num_train=2000, num_val=1000, label_noise=0.3, batch_size=64, seed=seed), 3
    return ImageFolderDataModule(cifar_root, image_size=32, batch_size=128, seed=seed), 3


def make_model(name: str, in_channels: int, num_classes: int):
    if name == "simple_cnn":
        return SimpleCNN(in_channels=in_channels, num_classes=num_classes)
    return LeNet5(in_channels=in_channels, num_classes=num_classes, image_size=32)


def run(model_name: str, data_name: str, args) -> dict:
    pl.seed_everything(args.seed)
    data, in_ch = make_data(data_name, args.cifar, args.seed)
    data.setup("fit")
    num_classes = data.num_classes
    module = ImageClassifier(make_model(model_name, in_ch, num_classes), lr=args.lr)
    layers = [f"model.{n}" for n in LAYERS[model_name]]
    monitor = AnomalyFilterMonitor(
        layers, probe_size=args.probe_size, min_cluster_size=0.1, alpha=0.2, beta=1.0, theta=0.1, seed=args.seed,
        every_n_epochs=args.every_n_epochs, num_outlier_images=0, num_scatter=0,
    )
    keep = KeepBestState()
    epochs = args.epochs or (12 if data_name == "cifar10" else 25)
    out_dir = os.path.join(args.out, f"{model_name}-{data_name}")
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=pl.loggers.CSVLogger(out_dir, name=""),
        callbacks=[monitor, keep], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0,
    )
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    train_time = time.perf_counter() - t0

    device = module.device
    probe = monitor.probe.to(device)
    of_state = copy.deepcopy(module.state_dict())
    result = {
        "model": model_name, "data": data_name, "epochs": epochs, "train_seconds": round(train_time, 1),
        "wt_epoch": keep.epoch, "wt_val_acc": keep.best, "final_val_acc": monitor.val_history[-1].get("val_acc"),
        "monitor_epochs": [h["epoch"] for h in monitor.history],
        "count_curve": [h["interp/anomaly/count"] for h in monitor.history],
        "val_acc_curve": [e.get("val_acc") for e in monitor.val_history],
    }

    # Table 6-2 (exp. 1 settings, the monitor's) on the WT and OF weights, and table 6-3: outlier vs
    # normal per-sample gradient magnitude (exp. 2 setting λ = 5).
    grad_monitor = AnomalyFilterMonitor(layers, probe_size=args.probe_size, min_cluster_size=5, seed=args.seed)
    for tag, state in (("wt", keep.state), ("of", of_state)):
        module.load_state_dict(state)
        result[f"{tag}_count"] = sum(monitor.detect(module, layer, probe.x).count for layer in layers)
        outliers = torch.zeros(len(probe), dtype=torch.bool, device=device)
        for layer in layers:
            outliers |= grad_monitor.detect(module, layer, probe.x).sample_is_outlier
        grads = per_sample_gradient_magnitude(module, probe.x, probe.y)
        result[f"{tag}_outliers"] = int(outliers.sum())
        result[f"{tag}_outlier_grad"] = grads[outliers].mean().item() if outliers.any() else None
        result[f"{tag}_normal_grad"] = grads[~outliers].mean().item() if (~outliers).any() else None

    # Table 6-5: mask one anomaly filter of the OF model vs one random filter (λ = 20, θ = 0.5).
    module.load_state_dict(of_state)
    mask_monitor = AnomalyFilterMonitor(
        layers, probe_size=args.probe_size, min_cluster_size=20, theta=0.5, seed=args.seed
    )
    exp3 = {layer: mask_monitor.detect(module, layer, probe.x) for layer in layers}
    flagged = [(layer, k) for layer, res in exp3.items() for k in res.flagged]
    val_loader, train_loader = data.val_dataloader(), data.train_dataloader()
    eval_batches = args.eval_batches
    base_val = accuracy(module, val_loader)
    base_train = accuracy(module, train_loader, eval_batches)

    def masked_change(layer, k):
        with FilterMask(module, {layer: [k]}):
            return accuracy(module, val_loader) - base_val, accuracy(module, train_loader, eval_batches) - base_train

    g = torch.Generator().manual_seed(args.seed)
    chosen = [flagged[i] for i in torch.randperm(len(flagged), generator=g)[: args.max_masked].tolist()]
    anomaly_changes = [masked_change(layer, k) for layer, k in chosen]
    widths = {layer: res.anomaly.numel() for layer, res in exp3.items()}
    pool = [(layer, k) for layer in layers for k in range(widths[layer])]
    random_changes = [masked_change(*pool[i]) for i in torch.randint(len(pool), (args.random_trials,), generator=g).tolist()]

    def mean(values):
        return sum(values) / len(values) if values else None

    result.update({
        "of_flagged_exp3": len(flagged),
        "masked_anomaly_filters": len(chosen),
        "anomaly_val_change": mean([c[0] for c in anomaly_changes]),
        "anomaly_train_change": mean([c[1] for c in anomaly_changes]),
        "random_val_change": mean([c[0] for c in random_changes]),
        "random_train_change": mean([c[1] for c in random_changes]),
        "anomaly_train_down": sum(c[1] < 0 for c in anomaly_changes),
        "anomaly_val_up": sum(c[0] > 0 for c in anomaly_changes),
        "base_val_acc": base_val,
    })
    print(json.dumps(result, indent=1), flush=True)
    return result


def fmt(v, pct=False, digits=3):
    if v is None:
        return "–"
    return f"{100 * v:+.2f}%" if pct else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | data | epochs | WT epoch (val acc) | OF val acc | anomaly WT | anomaly OF | grad outlier/normal WT | grad outlier/normal OF | Δval mask anomaly | Δval mask random | Δtrain mask anomaly | Δtrain mask random |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['data']} | {r['epochs']} | {r['wt_epoch']} ({fmt(r['wt_val_acc'])}) | "
            f"{fmt(r['final_val_acc'])} | {r['wt_count']} | {r['of_count']} | "
            f"{fmt(r['wt_outlier_grad'])} / {fmt(r['wt_normal_grad'])} | {fmt(r['of_outlier_grad'])} / {fmt(r['of_normal_grad'])} | "
            f"{fmt(r['anomaly_val_change'], True)} (n={r['masked_anomaly_filters']}) | {fmt(r['random_val_change'], True)} | "
            f"{fmt(r['anomaly_train_change'], True)} | {fmt(r['random_train_change'], True)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cifar", default=None, help="CIFAR-10 in ImageFolder layout (root/train, root/val)")
    parser.add_argument("--only", nargs="*", default=None, help="data sets to run: digits shapes cifar10")
    parser.add_argument("--models", nargs="*", default=["simple_cnn", "lenet5"])
    parser.add_argument("--epochs", type=int, default=None, help="default 25 (embedded data), 12 (CIFAR-10)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--probe-size", type=int, default=512)
    parser.add_argument("--every-n-epochs", type=int, default=2, help="cadence of the live monitor (count curve)")
    parser.add_argument("--max-masked", type=int, default=20, help="anomaly filters masked one at a time (sampled)")
    parser.add_argument("--random-trials", type=int, default=20)
    parser.add_argument("--eval-batches", type=int, default=20, help="training batches used for train accuracy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/anomaly_experiment")
    parser.add_argument("--tiny", action="store_true", help="both models on a generated 10-class image folder, 2 "
                        "epochs, probe 24, outputs in a temporary folder (make test)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="anomaly-overfitting-tiny-") as tmp:
        if args.tiny:
            args.cifar, args.only, args.out = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(4, 2)), ["cifar10"], tmp
            args.epochs, args.probe_size, args.every_n_epochs, args.max_masked, args.random_trials = 2, 24, 1, 2, 2
        datasets = args.only or (["digits", "shapes"] + (["cifar10"] if args.cifar else []))
        if "cifar10" in datasets and not args.cifar:
            parser.error("--cifar DIR is needed to run cifar10")
        run_all(datasets, args)


def run_all(datasets: list[str], args) -> None:
    os.makedirs(args.out, exist_ok=True)
    results = []
    for data_name in datasets:
        for model_name in args.models:
            results.append(run(model_name, data_name, args))
            with open(os.path.join(args.out, "results.json"), "w") as fh:
                json.dump(results, fh, indent=1)
    print(markdown(results))


if __name__ == "__main__":
    main()
