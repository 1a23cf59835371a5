"""The README's "Your own LightningModule", run as a user would, timed against the same fit without monitors.

A plain LightningModule holding torchvision's ``mobilenet_v3_small`` in ``self.net`` and logging
``val_loss``/``val_acc`` (README, "Your own LightningModule"), trained on real CIFAR-10 images (a seeded
subset of ``--data``/train, a seeded random 1,000 of val) with the README's callbacks: an
``AnomalyFilterMonitor`` on ``net.features.3`` and ``net.features.6`` (probe 256, λ = 0.05), a
``TIPMonitor``, a ``LearningImageLogger``, ``FilterMasking`` of the live flags (evaluation only), pruning
by the anomaly flags and by the lowest quarter of SoU, and the HTML report listing that quarter. Prints
the mean epoch time (first epoch dropped) and the whole fit with and without the callbacks, the
alarm, the flags, the pruned sizes and the report path.

    python benchmarks/user_module.py --data ../shared/data/cifar10 --epochs 4
    python benchmarks/user_module.py --tiny       # generated images, 2 epochs, probe 16: the smoke run of make test
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torchvision
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp import Selection
from lightning_interp.callbacks import (
    AnomalyFilterMonitor,
    FilterMasking,
    InterpReport,
    LearningImageLogger,
    PruneFlaggedFilters,
    TIPMonitor,
    load_pruned,
)
from lightning_interp.data import write_toy_imagefolder


class MyModule(pl.LightningModule):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.save_hyperparameters()
        self.net = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[0], batch[1]
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


class EpochTimer(pl.Callback):
    def __init__(self):
        self.times = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):  # placed last: the monitors' scans are included
        self.times.append(time.perf_counter() - self._t)


def fit(monitored: bool, args, train, val) -> tuple[list[float], float, list]:
    pl.seed_everything(0)
    callbacks = []
    if monitored:
        anomaly = AnomalyFilterMonitor(["net.features.3", "net.features.6"], probe_size=args.probe_size, min_cluster_size=0.05,
                                       val_acc_key="val_acc", val_loss_key="val_loss")
        tip = TIPMonitor("net.features.6", probe_size=min(64, args.probe_size))
        least = Selection("sou", amount=0.25, lowest=True)
        out = Path(args.out)
        callbacks = [anomaly, tip, LearningImageLogger("net.features.6", probe_size=min(32, args.probe_size)),
                     FilterMasking(anomaly, start_epoch=2, when="eval_only"),
                     PruneFlaggedFilters(monitor=anomaly, model_attr="net", out_path=str(out / "pruned_anomaly.pt")),
                     PruneFlaggedFilters(tip, select=least, model_attr="net", out_path=str(out / "pruned_sou.pt")),
                     InterpReport(scores=[(tip, least)])]
    timer = EpochTimer()
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[*callbacks, timer], default_root_dir=args.out,
                         logger=pl.loggers.CSVLogger(args.out), enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    start = time.perf_counter()
    trainer.fit(MyModule(), train, val)
    return timer.times, time.perf_counter() - start, callbacks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10")
    p.add_argument("--train-size", type=int, default=3000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--out", default="runs/user_module")
    p.add_argument("--cache", default="runs/cifar10_uint8.pt", help="decoded --data images (written on the first run)")
    p.add_argument("--probe-size", type=int, default=256, help="the anomaly monitor's probe (TIP's is at most 64, the logger's 32)")
    p.add_argument("--tiny", action="store_true", help="a generated 10-class image folder, 40 training images, "
                   "2 epochs, probe 16, outputs in a temporary folder (make test)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="user-module-tiny-") as tmp:
        if args.tiny:
            args.data = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(4, 2))
            args.cache, args.out = os.path.join(tmp, "cifar10_uint8.pt"), os.path.join(tmp, "user_module")
            args.train_size, args.epochs, args.probe_size = 40, 2, 16
        measure(args)


def measure(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import overfitting_signals as ofs

    raw = ofs.load_cifar(args.data, Path(args.cache))
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(len(raw["train_y"]), generator=g)[: args.train_size]
    va = torch.randperm(len(raw["val_y"]), generator=g)[:1000]

    def norm(x):
        return (x.float() / 255 - ofs.MEAN) / ofs.STD

    train = DataLoader(TensorDataset(norm(raw["train_x"][tr]), raw["train_y"][tr]), batch_size=64, shuffle=True)
    val = DataLoader(TensorDataset(norm(raw["val_x"][va]), raw["val_y"][va]), batch_size=256)
    plain, plain_fit, _ = fit(False, args, train, val)
    monitored, mon_fit, callbacks = fit(True, args, train, val)
    mean = lambda t: sum(t[1:]) / max(1, len(t) - 1)  # noqa: E731
    print(f"mobilenet_v3_small in a user module, {args.train_size} CIFAR-10 images/epoch, {args.epochs} epochs")
    print(f"epoch (mean of 2..)  plain {mean(plain):.2f} s, monitored {mean(monitored):.2f} s: {mean(monitored) / mean(plain):.2f}x")
    print(f"whole fit            plain {plain_fit:.1f} s, monitored {mon_fit:.1f} s: {mon_fit / plain_fit:.2f}x "
          "(fit end: AIPC, the exact anomaly rescan, two prunings with evaluation, the report)")
    anomaly = callbacks[0]
    print("anomaly summary", anomaly.summary())
    print("exact flags at fit end", anomaly.filter_scores().flags())
    for cb in callbacks:
        if isinstance(cb, PruneFlaggedFilters) and cb.saved_to:
            _, s = load_pruned(cb.saved_to, MyModule())
            print(f"pruned {cb.saved_to}: parameters {s['params_before']} -> {s['params_after']}, "
                  f"val acc {s.get('val_acc_before'):.3f} -> {s.get('val_acc_after'):.3f}")
    print("report", callbacks[-1].path)


if __name__ == "__main__":
    main()
