"""Peak resident memory of a monitored vs an unmonitored fit of torchvision ``vgg11_bn``.

The issue this answers: ``AnomalyFilterMonitor`` on ``vgg11_bn`` (128.8 M parameters) once vmapped
full-parameter gradients over 32 probe samples at a time (≈ 16.5 GB) and the kernel killed the run.
Scans now size their chunks from :func:`lightning_interp.memory.scan_budget`; this script checks
the promise "the monitors add at most 2 GB".

Each fit runs in a fresh subprocess (peak RSS = ``ru_maxrss`` of that process): the same plain
user-style LightningModule (``self.net``, logs ``train_loss``/``val_loss``/``val_acc``), Adam,
random CIFAR-sized data (3 x 32 x 32, 10 classes), one epoch of ``--batches`` batches on the CPU.
The monitored fit adds ``AnomalyFilterMonitor`` (probe ``--probe``, exact mode, its per-sample
gradient comparison included), ``LearningImageLogger`` and ``InterpReport``.

    python benchmarks/memory.py                  # both fits, then the table
    python benchmarks/memory.py --width 0.25     # a quarter-width VGG (quick check)
    python benchmarks/memory.py --tiny           # a VGG of 4-32 filters a layer: the smoke run of make test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def fit(monitored: bool, args) -> dict:
    import lightning.pytorch as pl
    import torch
    import torchvision
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    class UserModule(pl.LightningModule):
        def __init__(self):
            super().__init__()
            cfg = [int(c * args.width) if c != "M" else c for c in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]]
            if args.width == 1.0 and args.hidden == 4096:
                self.net = torchvision.models.vgg11_bn(weights=None, num_classes=10)
            else:
                self.net = torchvision.models.VGG(torchvision.models.vgg.make_layers(cfg, batch_norm=True), num_classes=10)
                self.net.classifier[0] = nn.Linear(cfg[-2] * 7 * 7, args.hidden)  # the narrower last block
                self.net.classifier[3] = nn.Linear(args.hidden, args.hidden)
                self.net.classifier[6] = nn.Linear(args.hidden, 10)

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return loss

        def validation_step(self, batch, batch_idx):
            x, y = batch
            logits = self(x)
            self.log("val_loss", F.cross_entropy(logits, y))
            self.log("val_acc", (logits.argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    g = torch.Generator().manual_seed(0)
    n = args.batch_size * args.batches
    x, y = torch.rand(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    train = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x[: args.batch_size], y[: args.batch_size]), batch_size=args.batch_size)
    module = UserModule()
    callbacks: list = []
    if monitored:
        from lightning_interp.callbacks import AnomalyFilterMonitor, InterpReport, LearningImageLogger

        callbacks = [
            AnomalyFilterMonitor(args.layer, probe_size=args.probe, k_max=4, min_cluster_size=0.2,
                                 val_acc_key="val_acc", val_loss_key="val_loss", num_outlier_images=8),
            LearningImageLogger(args.layer, probe_size=4, num_images=2, top_filters=2, max_filters=8),
            InterpReport(),
        ]
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(default_root_dir=root, accelerator="cpu", max_epochs=1, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             num_sanity_val_steps=0, limit_val_batches=1, callbacks=callbacks)
        start = time.perf_counter()
        trainer.fit(module, train, val)
        seconds = time.perf_counter() - start
        extra = {}
        if monitored:
            history = callbacks[0].history[-1] if callbacks[0].history else {}
            extra = {"outlier_grad_measured": "interp/anomaly/outlier_grad" in history}
    params = sum(p.numel() for p in module.parameters())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"monitored": monitored, "params": params, "peak_rss_bytes": peak, "seconds": seconds, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=float, default=1.0, help="VGG width multiplier (1.0 = torchvision vgg11_bn)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probe", type=int, default=64, help="AnomalyFilterMonitor probe size")
    parser.add_argument("--layer", default="net.features.2", help="layer the monitors watch")
    parser.add_argument("--hidden", type=int, default=4096, help="width of the classifier's hidden layers (vgg11_bn: 4096)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tiny", action="store_true",
                        help="width 1/16, hidden 64, two batches of 8, probe 16, one thread (make test)")
    parser.add_argument("--child", choices=["plain", "monitored"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tiny:
        args.width, args.hidden, args.batches, args.batch_size, args.probe, args.threads = 1 / 16, 64, 2, 8, 16, 1
    if args.child:
        print(json.dumps(fit(args.child == "monitored", args)))
        return
    results = {}
    for kind in ("plain", "monitored"):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", kind, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"{kind} fit failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    plain, mon = results["plain"]["peak_rss_bytes"], results["monitored"]["peak_rss_bytes"]
    gib = 2**30
    print(f"vgg11_bn width {args.width}, hidden {args.hidden} ({results['plain']['params'] / 1e6:.1f} M parameters), "
          f"{args.batches} batches of {args.batch_size}, probe {args.probe}, layer {args.layer}, CPU")
    print(f"{'fit':<12}{'peak RSS (GiB)':>16}{'seconds':>10}")
    print(f"{'plain':<12}{plain / gib:>16.2f}{results['plain']['seconds']:>10.1f}")
    print(f"{'monitored':<12}{mon / gib:>16.2f}{results['monitored']['seconds']:>10.1f}")
    print(f"monitors add {(mon - plain) / gib:.2f} GiB (target <= 2 GiB); per-sample gradients measured: "
          f"{results['monitored'].get('outlier_grad_measured')}")


if __name__ == "__main__":
    main()
