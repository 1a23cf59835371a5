"""Epoch time with and without the default monitors: the overhead of leaving them on.

Trains on random CIFAR-sized data (3 x 32 x 32, 10 classes) for a few epochs twice, the same
model and data: once plain, once with the monitors scanning every epoch — `LearningImageLogger`
(probe 32, the 16 most active filters), `TIPMonitor` and `AnomalyFilterMonitor` on the last block,
the latter two with **their defaults** unless ``--mode`` (``exact``, ``sketch`` with P =
``--num-projections``, ``pooled``) or ``--probe-size`` is given. Prints the mean epoch time of each
(first epoch dropped as warm-up), the ratio, and where the monitored time goes: per monitor and per
part, each the *self* time of the functions named beside it (a part called inside another is not
counted twice), per epoch and as a multiple of the plain epoch:

* features — the anomaly scan's learning-image features and activations
  (``metrics.anomaly.anomaly_features``, ``layer_activations``), TIP's properties with AVoU and SoU
  (``layer_properties``), the learning-image logger's activations and knowledge quantities;
* PCA — ``metrics.anomaly.project_filters_2d``; GMM — ``metrics.anomaly.gmm_sweep``;
* per-sample gradients — the outlier vs normal gradient magnitudes (``grouped_gradient_magnitude``);
  per-sample loss — the hardest probe samples (``per_sample_loss``);
* logging — the pictures (``viz`` helpers, the heatmaps' learning images) and ``log_image``,
  ``log_table``, ``log_scalars`` of every monitor; other — the rest of the monitor's epoch end.

Also the peak memory of each run (the process' peak RSS on the CPU, ``max_memory_allocated`` on a
GPU) and, as the anchor, Cockpit's published "economy" overheads (Schneider et al. 2021, CIFAR-10
3C3D). GPU: resnet18_cifar with bf16 mixed precision (scans run in float32), 50,000 samples; CPU:
SimpleCNN, 5,000 samples.

    python benchmarks/overhead.py                 # the GPU case where there is one, else the CPU case
    python benchmarks/overhead.py --device cpu --epochs 4 --mode exact
    python benchmarks/overhead.py --budget 0.1 --epochs 6 --data ../shared/data/cifar10   # defaults vs the budget
    python benchmarks/overhead.py --budget 0.1 --epochs 2 --sizes 20000 --models mobilenet_v3_small --no-defaults

``--budget`` prints, per model and size, the whole-fit ratio (monitored / plain) of wall time and of the
process' CPU time (``time.process_time``; on a shared machine the wall time of either fit stretches with the
other jobs' load, the CPU time much less), and each budgeted fit's scanned epochs and pilots.
    python benchmarks/overhead.py --tiny          # seconds, generated images: the smoke run of make test
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from collections import defaultdict
from functools import wraps

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.profilers import SimpleProfiler
from torch.utils.data import DataLoader, TensorDataset

import lightning_interp.callbacks.anomaly as anomaly_cb
import lightning_interp.callbacks.learning_images as li_cb
import lightning_interp.callbacks.tip as tip_cb
import lightning_interp.metrics.anomaly as anomaly_metrics
from lightning_interp.callbacks import AnomalyFilterMonitor, LearningImageLogger, TIPMonitor
from lightning_interp.callbacks.base import InterpCallback
from lightning_interp.data import write_toy_imagefolder
from lightning_interp.models import ImageClassifier, SimpleCNN, resnet18_cifar
from lightning_interp.nns import SCAN_MODES

#: Cockpit's "economy" configuration, epoch-time factor on CIFAR-10 3C3D by tracking cadence
#: (Schneider, Dangel, Hennig: "Cockpit", NeurIPS 2021, their benchmark data): the anchor.
COCKPIT_ECONOMY = {"every 64th step": 1.02, "every 16th step": 1.04, "every step": 1.51}

#: part -> (module or class, attribute) whose self time it is: the names the monitors' epoch-end scans
#: call (a rename there fails the ``--tiny`` run in ``make test``, see ``PartTimer.patch``).
PARTS = {
    "features": [(anomaly_metrics, "anomaly_features"), (anomaly_metrics, "layer_activations"),
                 (tip_cb, "layer_properties"), (li_cb, "layer_activations"), (li_cb, "iter_filter_learning_images"),
                 (li_cb, "reduce_knowledge_quantity"), (li_cb, "layer_knowledge_quantity")],
    "PCA": [(anomaly_metrics, "project_filters_2d")],
    "GMM": [(anomaly_metrics, "gmm_sweep")],
    "per-sample gradients": [(anomaly_cb, "grouped_gradient_magnitude")],
    "per-sample loss": [(anomaly_cb, "per_sample_loss")],
    "logging": [(anomaly_cb, "cluster_scatter"), (anomaly_cb, "labelled_image_grid"), (tip_cb, "heatmap"),
                (tip_cb, "image_grid"), (tip_cb, "filter_learning_images"), (li_cb, "heatmap"), (li_cb, "image_grid"),
                (li_cb, "display_inputs"), (li_cb, "layer_learning_image"), (li_cb, "filter_learning_images"),
                (InterpCallback, "log_image"), (InterpCallback, "log_table"), (InterpCallback, "log_scalars")],
}


class PartTimer:
    """Self time of named functions, per monitor (``monitor``) and part; nested parts are not counted twice."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.times: dict[tuple[str, str], float] = defaultdict(float)
        self.stack: list[float] = []
        self.monitor = "?"
        self.patched: list[tuple[object, str, object]] = []
        self.called: set[str] = set()  # "owner.name" of the patched functions that ran

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(self, part: str, fn, label: str):
        @wraps(fn)
        def wrapper(*args, **kwargs):
            self.called.add(label)
            start = self._now()
            self.stack.append(0.0)
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = self._now() - start
                self.times[(self.monitor, part)] += elapsed - self.stack.pop()
                if self.stack:
                    self.stack[-1] += elapsed
        return wrapper

    def patch(self) -> None:
        for part, targets in PARTS.items():
            for owner, name in targets:
                if not hasattr(owner, name):
                    raise AttributeError(f"{owner.__name__}.{name} is gone: update benchmarks/overhead.py PARTS")
                original = getattr(owner, name)
                self.patched.append((owner, name, original))
                setattr(owner, name, self.timed(part, original, f"{owner.__name__}.{name}"))

    def never_called(self) -> list[str]:
        """The patched names no scan called: a part whose function the monitors stopped using reads 0 s."""
        return [f"{o.__name__}.{n}" for o, n, _ in self.patched if f"{o.__name__}.{n}" not in self.called]

    def unpatch(self) -> None:
        for owner, name, original in reversed(self.patched):
            setattr(owner, name, original)
        self.patched.clear()

    def watch(self, callback: Callback, name: str) -> None:
        """Time ``callback``'s epoch-end scan as monitor ``name`` (an instance attribute Lightning calls)."""
        hook = callback.on_train_epoch_end

        def on_train_epoch_end(trainer, pl_module):
            self.monitor = name
            self.stack = []
            start = self._now()
            try:
                hook(trainer, pl_module)
            finally:
                self.times[(name, "total")] += self._now() - start
                self.monitor = "?"

        callback.on_train_epoch_end = on_train_epoch_end


class EpochTimer(Callback):
    """Wall time of each training epoch, monitors' epoch-end scans included (put it last).
    The part timer starts over at the second epoch, so parts and epochs drop the same warm-up."""

    def __init__(self, parts: PartTimer | None = None):
        self.times: list[float] = []
        self.parts = parts
        self.whole_fit = float("nan")  # seconds of the whole trainer.fit, set by run()

    def on_train_epoch_start(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if self.parts is not None and trainer.current_epoch == 1:
            self.parts.times.clear()
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t)


def peak_memory(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**20:.0f} MiB allocated (max_memory_allocated)"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (peak RSS of the process so far)"


def cifar10(root: str, n: int, cache: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` of a seeded shuffle of ``root/train`` (an ImageFolder of CIFAR-10), standardised:
    real images, so the scans flag filters and draw their pictures as in a user's run (random data does
    not). Decoded once into ``cache`` (``runs/cifar10_uint8.pt``: the overfitting benchmark's cache)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import overfitting_signals as ofs

    raw = ofs.load_cifar(root, Path(cache))
    idx = torch.randperm(len(raw["train_y"]), generator=torch.Generator().manual_seed(0))[:n]
    x = (raw["train_x"][idx].float() / 255 - ofs.MEAN) / ofs.STD
    return x, raw["train_y"][idx].clone()


def run(monitored: bool, args, device: str, parts: PartTimer | None = None) -> EpochTimer:
    pl.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    if args.data:
        x, y = cifar10(args.data, args.samples, args.cache)
    else:
        x = torch.rand(args.samples, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (args.samples,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True)
    gpu = device == "cuda"
    net = resnet18_cifar() if gpu else SimpleCNN(in_channels=3)
    layer = "model.layer4" if gpu else "model.relu3"
    module = ImageClassifier(net, lr=1e-3)
    callbacks = []
    if monitored:
        # Only what was asked for on the command line overrides the monitors' defaults.
        given = {k: v for k, v in (("probe_size", args.probe_size), ("num_projections", args.num_projections)) if v}
        tip_mode = {"mode": "sketch" if args.mode == "pooled" else args.mode} if args.mode else {}
        callbacks += [
            LearningImageLogger(layer, probe_size=32, rectify=False, max_filters=16),
            TIPMonitor(layer, **given, **tip_mode),
            AnomalyFilterMonitor(layer, **given, **({"mode": args.mode} if args.mode else {})),
        ]
        if parts is not None:
            for cb in callbacks:
                parts.watch(cb, type(cb).__name__)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timer = EpochTimer(parts)
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator=device, devices=1, logger=pl.loggers.CSVLogger(args.out),
        callbacks=[*callbacks, timer], limit_val_batches=0, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False,
        precision="bf16-mixed" if gpu else "32-true",
        profiler=SimpleProfiler(dirpath=args.profile, filename=f"{args.mode or 'default'}_monitored") if args.profile and monitored else None,
    )
    start = time.perf_counter()
    trainer.fit(module, loader)
    if device == "cuda":
        torch.cuda.synchronize()
    timer.whole_fit = time.perf_counter() - start
    return timer


# ---- defaults vs the time budget (issue 23 item 3): `--budget 0.1` ----------------------------------------

#: network builder and the layer the monitors watch, for the budget comparison (CIFAR-sized inputs).
BUDGET_MODELS = {
    "SimpleCNN": (lambda: SimpleCNN(in_channels=3), "model.relu3"),
    "mobilenet_v3_small": (lambda: __import__("torchvision").models.mobilenet_v3_small(weights=None, num_classes=10),
                           "model.features.8"),
}


def budget_fit(model: str, samples: int, budget: float | None, monitored: bool, args) -> tuple[float, float]:
    """Wall and CPU seconds (this process, ``time.process_time``: what the machine's other jobs do not inflate
    as much) of one whole ``trainer.fit`` (setup, scans and fit-end analyses included) of ``model`` on
    ``samples`` images an epoch, plain or with the README's three monitors at their defaults, or with
    ``max_overhead=budget`` on each (one shared budget)."""
    pl.seed_everything(0)
    if args.data:
        x, y = cifar10(args.data, samples, args.cache)
    else:
        g = torch.Generator().manual_seed(0)
        x, y = torch.rand(samples, 3, 32, 32, generator=g), torch.randint(0, 10, (samples,), generator=g)
    build, layer = BUDGET_MODELS[model]
    module = ImageClassifier(build(), lr=1e-3)
    callbacks = []
    if monitored:
        given = {} if budget is None else {"max_overhead": budget}
        callbacks = [LearningImageLogger(layer, probe_size=32, rectify=False, max_filters=16, **given),
                     TIPMonitor(layer, **given), AnomalyFilterMonitor(layer, **given)]
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1, logger=False, callbacks=callbacks,
                         default_root_dir=os.path.join(args.out, "budget"),
                         limit_val_batches=0, enable_progress_bar=False, enable_model_summary=False,
                         enable_checkpointing=False)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size or 128, shuffle=True)
    start, cpu = time.perf_counter(), time.process_time()
    trainer.fit(module, loader)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    if monitored:
        scans = {type(cb).__name__: [h["epoch"] for h in cb.history if "fit_end" not in h] for cb in callbacks}
        pilots = "" if budget is None else "; pilot s / estimated scan s " + str(
            {type(cb).__name__: (round(cb.pilot_seconds or 0.0, 2), round(cb.scan_estimate or 0.0, 1)) for cb in callbacks})
        print(f"    {model} {samples} {'defaults' if budget is None else f'max_overhead={budget:g}'}: {seconds:.1f} s "
              f"(CPU {cpu:.1f} s); scanned epochs {scans}{pilots}", flush=True)
    return seconds, cpu


def budget_table(args) -> None:
    """The whole-fit ratio (monitored / plain, one run each, in this order in one process, after one warm-up fit
    per model) at each size, for each model: the monitors' defaults (a scan every epoch; left out with
    ``--no-defaults``) vs ``max_overhead=args.budget``, of wall time and of this process' CPU time."""
    sizes = [int(n) for n in args.sizes.split(",")]
    models = args.models.split(",")
    rows = []
    for model in models:
        budget_fit(model, min(sizes), None, False, argparse.Namespace(**{**vars(args), "epochs": 1}))  # warm-up, not counted
        for n in sizes:
            plain = budget_fit(model, n, None, False, args)
            print(f"    {model} {n} plain: {plain[0]:.1f} s (CPU {plain[1]:.1f} s)", flush=True)
            defaults = None if args.no_defaults else budget_fit(model, n, None, True, args)
            budgeted = budget_fit(model, n, args.budget, True, args)
            rows.append((model, n, plain, defaults, budgeted))
    print(f"\nwhole fit, {args.epochs} epochs, CPU ({torch.get_num_threads()} threads), "
          f"{'CIFAR-10' if args.data else 'random'} images; ratio = monitored / plain fit, of wall time and of the "
          "process' CPU time:")
    budget = f"max_overhead={args.budget:g}"
    print(f"| {'model':18s} | {'images/epoch':>12s} | {'plain fit, s':>12s} | {'plain CPU, s':>12s} | "
          f"{'defaults':>8s} | {'defaults CPU':>12s} | {budget:>16s} | {budget + ' CPU':>20s} |")
    print(f"| {'-' * 18} | {'-' * 11}: | {'-' * 11}: | {'-' * 11}: | {'-' * 7}: | {'-' * 11}: | {'-' * 15}: | {'-' * 19}: |")
    for model, n, plain, d, b in rows:
        dw, dc = ("-", "-") if d is None else (f"{d[0] / plain[0]:.2f}x", f"{d[1] / plain[1]:.2f}x")
        print(f"| {model:18s} | {n:12,d} | {plain[0]:12.1f} | {plain[1]:12.1f} | {dw:>8s} | {dc:>12s} | "
              f"{b[0] / plain[0]:15.2f}x | {b[1] / plain[1]:19.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data", default=None,
                        help="a CIFAR-10 ImageFolder root (e.g. ../shared/data/cifar10) for real images; random data when omitted")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--probe-size", type=int, default=None, help="both scans' probe (monitor defaults when unset)")
    parser.add_argument("--mode", choices=list(SCAN_MODES), default=None,
                        help="the anomaly monitor's mode, TIP's too (TIP runs sketch for pooled); monitor defaults when unset")
    parser.add_argument("--num-projections", type=int, default=None)
    parser.add_argument("--out", default="runs/overhead")
    parser.add_argument("--profile", default=None, help="write Lightning's SimpleProfiler report of the monitored run here")
    parser.add_argument("--budget", type=float, default=None,
                        help="instead of the overhead breakdown: whole-fit ratios at --sizes for --models, the monitors' "
                             "defaults vs max_overhead=BUDGET (CPU)")
    parser.add_argument("--sizes", default="320,3000,20000", help="with --budget: images per epoch")
    parser.add_argument("--no-defaults", action="store_true",
                        help="with --budget: leave out the fit with the monitors' defaults (plain and budgeted only)")
    parser.add_argument("--models", default=",".join(BUDGET_MODELS), help=f"with --budget: of {list(BUDGET_MODELS)}")
    parser.add_argument("--cache", default="runs/cifar10_uint8.pt", help="decoded --data images (written on the first run)")
    parser.add_argument("--tiny", action="store_true",
                        help="seconds on a generated 10-class image folder, outputs in a temporary folder (make test)")
    args = parser.parse_args()
    if args.budget is not None and not args.tiny:
        os.environ.setdefault("WANDB_MODE", "disabled")
        budget_table(args)
        return
    with tempfile.TemporaryDirectory(prefix="overhead-tiny-") as tmp:
        if args.tiny:
            args.data = write_toy_imagefolder(os.path.join(tmp, "cifar10"), images=(8, 2))
            args.cache, args.out = os.path.join(tmp, "cifar10_uint8.pt"), os.path.join(tmp, "overhead")
            args.samples, args.batch_size, args.epochs, args.probe_size = 64, 32, 2, 16
        measure(args)
        if args.tiny:  # the --budget table too, on 160 random images (the monitors' default probes fit)
            budget_table(argparse.Namespace(**{**vars(args), "data": None, "sizes": "160", "models": "SimpleCNN",
                                               "budget": 0.1, "no_defaults": True}))


def measure(args) -> None:
    gpu = args.device == "cuda"
    args.samples = args.samples or (50_000 if gpu else 5_000)
    args.batch_size = args.batch_size or (256 if gpu else 128)
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.environ.setdefault("WANDB_MODE", "disabled")
    plain_run = run(False, args, args.device)
    plain = plain_run.times
    memory_plain = peak_memory(args.device)
    parts = PartTimer(gpu)
    parts.patch()
    try:
        monitored_run = run(True, args, args.device, parts)
        monitored = monitored_run.times
    finally:
        parts.unpatch()
    memory_monitored = peak_memory(args.device)
    mean_plain = sum(plain[1:]) / max(1, len(plain) - 1)
    mean_mon = sum(monitored[1:]) / max(1, len(monitored) - 1)
    measured = max(1, len(monitored) - 1)
    model = "resnet18_cifar" if gpu else "SimpleCNN"
    print(f"{model} on {args.device} ({torch.get_num_threads()} threads), {args.samples} {'CIFAR-10' if args.data else 'random'} samples/epoch, epochs "
          f"{args.epochs}; monitors: {'their defaults' if not (args.mode or args.probe_size or args.num_projections) else ''}"
          f"{f' mode={args.mode}' if args.mode else ''}{f' probe={args.probe_size}' if args.probe_size else ''}"
          f"{f' P={args.num_projections}' if args.num_projections else ''}")
    print(f"plain epoch      {mean_plain:8.2f} s   {[round(t, 2) for t in plain]}")
    print(f"monitored epoch  {mean_mon:8.2f} s   {[round(t, 2) for t in monitored]}")
    print(f"overhead ratio   {mean_mon / mean_plain:8.3f}x  (targets: <= 1.5x on a 2-core CPU, <= 1.10x on the GPU)")
    print(f"peak memory      plain run {memory_plain}; monitored run {memory_monitored}")
    fit_plain, fit_mon = plain_run.whole_fit, monitored_run.whole_fit
    print(f"whole fit        plain {fit_plain:.2f} s, monitored {fit_mon:.2f} s: {fit_mon / fit_plain:.3f}x over "
          f"{args.epochs} epochs (setup, the first epoch's warm-up and the fit-end analyses included: the "
          "exact anomaly rescan; no AIPC here, the benchmark has no validation data)")
    print(f"\nwhere the monitored time goes (per epoch, epochs 2..{args.epochs}; x = multiple of the plain epoch):")
    print(f"| {'monitor':22s} | {'part':22s} | {'s/epoch':>8s} | {'x plain':>8s} |")
    print(f"| {'-' * 22} | {'-' * 22} | {'-' * 8}: | {'-' * 8}: |")
    for name in ("LearningImageLogger", "TIPMonitor", "AnomalyFilterMonitor"):
        total = parts.times.get((name, "total"), 0.0) / measured
        named = 0.0
        for part in PARTS:
            t = parts.times.get((name, part), 0.0) / measured
            named += t
            if t > 0:
                print(f"| {name:22s} | {part:22s} | {t:8.3f} | {t / mean_plain:8.3f} |")
        print(f"| {name:22s} | {'other':22s} | {total - named:8.3f} | {(total - named) / mean_plain:8.3f} |")
        print(f"| {name:22s} | {'**total**':22s} | {total:8.3f} | {total / mean_plain:8.3f} |")
    print("\nanchor: Cockpit's economy instruments on CIFAR-10 3C3D (published): "
          + ", ".join(f"{k} {v:.2f}x" for k, v in COCKPIT_ECONOMY.items()))
    if parts.never_called():
        print(f"timed but never called in this run (0 s above): {', '.join(parts.never_called())}")


if __name__ == "__main__":
    main()
