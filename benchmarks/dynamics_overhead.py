"""What SampleDynamicsMonitor costs a training epoch, in a real Lightning fit, beside the same fit without it.

Three fits of SimpleCNN (Adam, batch 128, no validation so that only the training epoch is timed), repeated
and interleaved (plain, then each monitor) so that a slow spell of a shared machine hits all of them:

* ``plain`` — no callback;
* ``batches`` — ``SampleDynamicsMonitor(source="batches")``: logits of the training forward passes, every
  training sample tracked (the dataset wrapped by ``with_index``);
* ``subset`` — ``SampleDynamicsMonitor(source="subset")`` at its default ``track_size`` (1,024): an
  eval-mode pass over the tracked subset after every epoch.

Printed: seconds per epoch (median over the epochs after the first, over repeats) and the ratio to the
plain epoch — targets 1.05x (batches) and 1.10x (subset), issue 21.

    python benchmarks/dynamics_overhead.py --samples 3000 --epochs 3 --repeats 3
    python benchmarks/dynamics_overhead.py --data ../shared/data/cifar10 --samples 3000
    python benchmarks/dynamics_overhead.py --tiny
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lightning_interp.callbacks import SampleDynamicsMonitor
from lightning_interp.data import with_index
from lightning_interp.models import ImageClassifier, SimpleCNN


class EpochTimer(Callback):
    """Wall time and this process' CPU time of every training epoch, the epoch-end work of the callbacks
    before it included. CPU time counts the work done whatever else the machine runs (a shared machine
    stretches wall time, not the work)."""

    def __init__(self):
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module):
        self._t0, self._c0 = time.perf_counter(), time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(time.perf_counter() - self._t0)
        self.cpu_seconds.append(time.process_time() - self._c0)


def data(args) -> TensorDataset:
    if args.data:
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import ToTensor

        folder = ImageFolder(os.path.join(args.data, "train"), transform=ToTensor())
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(folder), generator=g)[: args.samples].tolist()
        xs, ys = zip(*(folder[i] for i in idx))
        return TensorDataset(torch.stack(xs), torch.tensor(ys))
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (args.samples,), generator=g)
    x = torch.randn(args.samples, 3, args.size, args.size, generator=g) + y[:, None, None, None] / 10
    return TensorDataset(x, y)


def fit(args, dataset, kind: str) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = EpochTimer()
    callbacks = [] if kind == "plain" else [SampleDynamicsMonitor(source=kind, num_images=16)]
    train = with_index(dataset) if kind == "batches" else dataset
    trainer = pl.Trainer(
        accelerator=args.device, devices=1, max_epochs=args.epochs, callbacks=[*callbacks, timer], logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=args.out,
    )
    module = ImageClassifier(SimpleCNN(in_channels=3, num_classes=10), lr=1e-3)
    trainer.fit(module, DataLoader(train, batch_size=128, shuffle=True))
    skip = 1 if len(timer.seconds) > 1 else 0  # the first epoch warms up
    return timer.seconds[skip:], timer.cpu_seconds[skip:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=3000, help="training samples per epoch")
    p.add_argument("--size", type=int, default=32, help="image side of the random data")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the CPU-time ratio counts the work)")
    p.add_argument("--data", default=None, help="an ImageFolder root (e.g. ../shared/data/cifar10) instead of random data")
    p.add_argument("--out", default=None)
    p.add_argument("--tiny", action="store_true", help="seconds: 64 random 16x16 images, 2 epochs, 1 repeat")
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.size, args.epochs, args.repeats, args.data = 64, 16, 2, 1, None
    args.out = args.out or tempfile.mkdtemp(prefix="dynamics_overhead_")
    os.environ.setdefault("WANDB_MODE", "disabled")
    dataset = data(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    wall: dict[str, list[float]] = {"plain": [], "batches": [], "subset": []}
    cpu: dict[str, list[float]] = {k: [] for k in wall}
    for _ in range(args.repeats):
        for kind in wall:
            w, c = fit(args, dataset, kind)
            wall[kind] += w
            cpu[kind] += c
    print(f"SampleDynamicsMonitor overhead: SimpleCNN, {args.samples} samples/epoch "
          f"({'CIFAR-10 ' + args.data if args.data else f'random {args.size}x{args.size}'}), {args.device}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; median of {len(wall['plain'])} epochs; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| fit | wall s / epoch | wall ratio | CPU s / epoch (this process) | CPU ratio | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    targets = {"plain": "", "batches": "<= 1.05x", "subset": "<= 1.10x"}
    base_w, base_c = statistics.median(wall["plain"]), statistics.median(cpu["plain"])
    for kind in wall:
        w, c = statistics.median(wall[kind]), statistics.median(cpu[kind])
        print(f"| {kind} | {w:.3f} | {w / base_w:.3f}x | {c:.3f} | {c / base_c:.3f}x | {targets[kind]} |")


if __name__ == "__main__":
    main()
