"""Epoch time with and without the default monitors: the overhead of leaving them on.

Trains on random CIFAR-sized data (3 x 32 x 32, 10 classes) for a few epochs twice, the same
model and data: once plain, once with the default monitors scanning every epoch —
`LearningImageLogger`, `TIPMonitor` and `AnomalyFilterMonitor` on the last block, the latter two
in ``--mode sketch`` (P = ``--num-projections``) or ``exact``. Prints the mean epoch time of each (first epoch dropped as warm-up) and
the ratio. GPU: resnet18_cifar with bf16 mixed precision (scans run in float32), 50,000
samples; CPU: SimpleCNN, 5,000 samples.

    python benchmarks/overhead.py                 # the GPU case where there is one, else the CPU case
    python benchmarks/overhead.py --device cpu --samples 2000 --epochs 3
"""

from __future__ import annotations

import argparse
import os
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import AnomalyFilterMonitor, LearningImageLogger, TIPMonitor
from lightning_interp.models import ImageClassifier, SimpleCNN, resnet18_cifar


class EpochTimer(Callback):
    """Wall time of each training epoch, monitors' epoch-end scans included (put it last)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def run(monitored: bool, args, device: str) -> list[float]:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(args.samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    gpu = device == "cuda"
    net = resnet18_cifar() if gpu else SimpleCNN(in_channels=3)
    layer = "model.layer4" if gpu else "model.relu3"
    module = ImageClassifier(net, lr=1e-3)
    callbacks = []
    if monitored:
        callbacks += [
            LearningImageLogger(layer, probe_size=32, rectify=False, max_filters=16),
            TIPMonitor(layer, probe_size=args.probe_size, mode=args.mode, num_projections=args.num_projections,
                       top_filters=0),
            AnomalyFilterMonitor(layer, probe_size=args.probe_size, mode=args.mode, num_projections=args.num_projections,
                                 min_cluster_size=0.04, num_scatter=0, num_outlier_images=0),
        ]
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=device, devices=1, logger=pl.loggers.CSVLogger(args.out),
        callbacks=[*callbacks, timer], limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        precision="bf16-mixed" if gpu else "32-true",
        profiler=SimpleProfiler(dirpath=args.profile, filename=f"{args.mode}_monitored") if args.profile and monitored else None,
    )
    trainer.fit(module, loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--probe-size", type=int, default=256)
    parser.add_argument("--mode", choices=["sketch", "exact"], default="sketch", help="the TIP and anomaly monitors' mode")
    parser.add_argument("--num-projections", type=int, default=32)
    parser.add_argument("--out", default="runs/overhead")
    parser.add_argument("--profile", default=None, help="write Lightning's SimpleProfiler report of the monitored run here")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.samples = args.samples or (50_000 if gpu else 5_000)
    args.batch_size = args.batch_size or (256 if gpu else 128)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("WANDB_MODE", "disabled")
    plain = run(False, args, args.device)
    monitored = run(True, args, args.device)
    mean_plain = sum(plain[1:]) / max(1, len(plain) - 1)
    mean_mon = sum(monitored[1:]) / max(1, len(monitored) - 1)
    model = "resnet18_cifar" if gpu else "SimpleCNN"
    print(f"{model} on {args.device}, {args.samples} samples/epoch, probe {args.probe_size}, epochs {args.epochs}, "
          f"monitors in {args.mode} mode" + (f" (P={args.num_projections})" if args.mode == "sketch" else ""))
    print(f"plain epoch      {mean_plain:8.2f} s   {[round(t, 2) for t in plain]}")
    print(f"monitored epoch  {mean_mon:8.2f} s   {[round(t, 2) for t in monitored]}")
    print(f"overhead ratio   {mean_mon / mean_plain:8.3f}x  (target on the GPU: <= 1.10x)")


if __name__ == "__main__":
    main()
