"""The ``lightning-interp`` command line.

    lightning-interp fit --config recipes/demo.yaml [--trainer.max_epochs 3 ...]
    lightning-interp validate|test|predict --config ... --ckpt_path ...
    lightning-interp scan CHECKPOINT --layers model.relu3 --datamodule DigitsDataModule [--monitors anomaly tip]
    lightning-interp prune CHECKPOINT --report REPORT.json --out PRUNED.pt [--datamodule digits]
        [--model_class my_pkg.MyModule --model_attr net] [--round_to 8] [--device cuda]
    lightning-interp prune CHECKPOINT --criterion l1 --layers [model.relu2] --amount 0.3 --out PRUNED.pt ...

``fit``/``validate``/``test``/``predict`` are Lightning's own :class:`~lightning.pytorch.cli.LightningCLI`
subcommands: the model, the datamodule, the trainer and every callback (the monitors included,
under ``trainer.callbacks``) are configured from YAML and flags the way Lightning users know
(``class_path``/``init_args``, ``--print_config``). ``scan`` runs monitors once on a trained
checkpoint and writes the same reports as a training run, without training. ``prune`` loads a
checkpoint of ``--model_class`` (default :class:`~lightning_interp.models.ImageClassifier`, trained with
``arch=...`` so it can be rebuilt; your own class must rebuild its network in ``__init__`` from its
saved hyperparameters), takes the network at ``--model_attr`` (default ``model``), removes the filters
an anomaly report (or any saved :class:`~lightning_interp.scores.FilterScores` file: a memorisation
score, a TIP property) flags — or the ``--amount`` least important by a Torch-Pruning criterion
(``--criterion``, :mod:`lightning_interp.importance`) — with Torch-Pruning and saves its weights with the
pruning plan, no pickle (:func:`~lightning_interp.pruning.save_pruned`); it then rebuilds the file into a
fresh ``--model_class`` module (:func:`~lightning_interp.pruning.load_pruned`) and checks the outputs
agree. It prints parameters, MACs and latency before and after on ``--device`` (the GPU when there is
one), and with a datamodule validation accuracy.

``--datamodule`` takes a LightningDataModule class (``DigitsDataModule``, a dotted path) with its
arguments as ``--datamodule.<arg> value``, or the short names ``digits``, ``shapes``, ``imagefolder``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Literal

import lightning.pytorch as pl
import torch

from .importance import CRITERIA
from .nns import SCAN_MODES

if TYPE_CHECKING:
    from .scores import FilterScores

#: Short names accepted by ``--datamodule``.
DATAMODULES = {
    "digits": "lightning_interp.data.DigitsDataModule",
    "shapes": "lightning_interp.data.ShapesDataModule",
    "imagefolder": "lightning_interp.data.ImageFolderDataModule",
}

#: Monitors ``scan`` can run, by name.
MONITORS = {
    "anomaly": "AnomalyFilterMonitor",
    "learning_images": "LearningImageLogger",
    "tip": "TIPMonitor",
    "fq": "FeatureQuantityMonitor",
}

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def lightning_cli(args: list[str] | None = None, run: bool = True):
    """Lightning's CLI over any LightningModule and LightningDataModule (``class_path`` in YAML)."""
    from lightning.pytorch.cli import LightningCLI

    import lightning_interp.callbacks  # noqa: F401  (short class names resolve once imported)
    import lightning_interp.data  # noqa: F401
    import lightning_interp.models  # noqa: F401

    return LightningCLI(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        args=args, run=run, save_config_kwargs={"overwrite": True},
        parser_kwargs={"prog": "lightning-interp"} if run else None,
    )


def _expand_aliases(argv: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(argv):
        if i > 0 and argv[i - 1] == "--datamodule" and arg in DATAMODULES:
            arg = DATAMODULES[arg]
        if arg == "--data-root":
            arg = "--datamodule.root"
        elif arg.startswith("--data-root="):
            arg = "--datamodule.root=" + arg.split("=", 1)[1]
        out.append(arg)
    return out


def _parser(command: str):
    from jsonargparse import ActionConfigFile, ArgumentParser

    import lightning_interp.data  # noqa: F401

    parser = ArgumentParser(prog=f"lightning-interp {command}", description=(scan_command if command == "scan" else prune_command).__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="YAML with any of these options")
    parser.add_argument("checkpoint", type=str, help="a Lightning checkpoint (.ckpt)")
    parser.add_argument("--model_class", type=str, default="lightning_interp.models.ImageClassifier",
                        help="LightningModule class the checkpoint is loaded with (load_from_checkpoint)")
    parser.add_subclass_arguments(pl.LightningDataModule, "datamodule", required=command == "scan",
                                  help=f"data module class (or one of {list(DATAMODULES)})")
    if command == "scan":
        parser.add_argument("--layers", type=list[str], required=True, help="module paths, e.g. model.relu3")
        parser.add_argument("--monitors", type=list[Literal[tuple(MONITORS)]], default=["anomaly", "learning_images"])
        parser.add_argument("--probe_size", type=int | None, default=None, help="probe samples (monitor default when unset)")
        parser.add_argument("--probe_split", type=Literal["train", "val"], default="train")
        parser.add_argument("--mode", type=Literal[SCAN_MODES], default="exact",
                            help="anomaly/TIP scan mode (one scan of a checkpoint: exact, the reference, by default; "
                                 "TIP has no pooled mode and runs sketch mode then)")
        parser.add_argument("--min_cluster_size", type=int | float, default=0.1, help="λ of the anomaly monitor")
        parser.add_argument("--val_acc_key", type=str, default="val/acc",
                            help="the key your validation_step logs the accuracy under (e.g. val_acc)")
        parser.add_argument("--val_loss_key", type=str, default="val/loss",
                            help="the key your validation_step logs the loss under (e.g. val_loss)")
        parser.add_argument("--max_eval_batches", type=int | None, default=None,
                            help="validation batches per AIPC point / masking evaluation (all when unset)")
        parser.add_argument("--out", type=str | None, default=None, help="run directory (default: <checkpoint>_scan)")
        parser.add_argument("--accelerator", type=str, default="auto")
        parser.add_argument("--progress", type=bool, default=True, help="show progress bars")
    else:
        parser.add_argument("--report", type=str | None, default=None,
                            help="anomaly_report.json written by AnomalyFilterMonitor, or any saved FilterScores file "
                                 "(e.g. memorisation_scores(...).save(path))")
        parser.add_argument("--criterion", type=Literal[CRITERIA] | None, default=None,
                            help="instead of --report: rank the filters of --layers by Torch-Pruning's importance "
                                 "(taylor: on one training batch of the datamodule); needs --amount")
        parser.add_argument("--layers", type=list[str] | None, default=None, help="with --criterion: e.g. model.relu3")
        parser.add_argument("--amount", type=float | None, default=None,
                            help="instead of the file's flags, prune this many filters per layer (>= 1) or this "
                                 "fraction of them (< 1) by score")
        parser.add_argument("--lowest", type=bool | None, default=None,
                            help="with --amount: the lowest scores (default: highest for --report, lowest for --criterion)")
        parser.add_argument("--out", type=str, required=True,
                            help="where to save the pruned network (weights + pruning plan; load_pruned reads it)")
        parser.add_argument("--round_to", "--round-to", type=int | None, default=None,
                            help="leave a multiple of this many channels per cut layer (default: 8 on CUDA, 1 on CPU)")
        parser.add_argument("--device", type=str, default="auto",
                            help="where to prune and time the network: cpu, cuda, cuda:1 (auto: cuda when available)")
        parser.add_argument("--input_shape", "--input-shape", type=str | None, default=None,
                            help="example input shape without a datamodule, e.g. 1,3,32,32")
        parser.add_argument("--model_attr", "--model-attr", type=str, default="model",
                            help="attribute of the LightningModule holding the network to prune (e.g. net)")
    return parser


def _load_module(class_path: str, checkpoint: str) -> pl.LightningModule:
    import importlib

    if not os.path.isfile(checkpoint):
        raise SystemExit(f"error: no checkpoint at {checkpoint!r}")
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SystemExit(f"error: cannot import --model_class {class_path!r}: {err}") from err
    try:
        return cls.load_from_checkpoint(checkpoint, map_location="cpu")
    except (ValueError, TypeError) as err:
        raise SystemExit(f"error: cannot rebuild the model from {checkpoint} with {class_path}: {err}") from err


def _instantiate_datamodule(parser, cfg):
    if cfg.get("datamodule") is None:
        return None
    return parser.instantiate(cfg).datamodule


def scan_command(cfg, parser) -> dict:
    """Run monitors once on a trained checkpoint (no training) and write the anomaly and HTML reports."""
    from . import callbacks as cbs
    from .checkpoint_scan import scan_once

    module = _load_module(cfg.model_class, cfg.checkpoint)
    data = _instantiate_datamodule(parser, cfg)
    out = cfg.out or os.path.splitext(cfg.checkpoint)[0] + "_scan"
    common = {"probe_split": cfg.probe_split}
    if cfg.probe_size is not None:
        common["probe_size"] = cfg.probe_size
    monitors = []
    for name in dict.fromkeys(cfg.monitors):
        cls = getattr(cbs, MONITORS[name])
        extra = {}
        if name == "anomaly":
            extra = {"mode": cfg.mode, "min_cluster_size": cfg.min_cluster_size,
                     "report_path": os.path.join(out, "anomaly_report.json"),
                     "val_acc_key": cfg.val_acc_key, "val_loss_key": cfg.val_loss_key}
        elif name == "tip":
            extra = {"mode": "sketch" if cfg.mode == "pooled" else cfg.mode, "aipc_max_batches": cfg.max_eval_batches}
        elif name == "fq":
            extra = {"eval_max_batches": cfg.max_eval_batches}
        try:
            monitors.append(cls(cfg.layers, **common, **extra))
        except ValueError as err:
            raise SystemExit(f"error: {MONITORS[name]}: {err}") from err
    result = scan_once(module, data, monitors, out, accelerator=cfg.accelerator, show_progress=cfg.progress)
    print(json.dumps({"validation": result["validation"], "report": result["report"],
                      "anomaly_report": os.path.join(out, "anomaly_report.json") if "anomaly" in cfg.monitors else None},
                     indent=2, default=str))
    return result


def _criterion_scores(cfg, net: torch.nn.Module, example: torch.Tensor, data) -> FilterScores:
    """Torch-Pruning's importance of the filters of ``--layers`` (named inside the LightningModule)."""
    from .batch import default_batch_adapter
    from .importance import importance_scores

    prefix = f"{cfg.model_attr}."
    layers = [layer[len(prefix):] if layer.startswith(prefix) else layer for layer in cfg.layers]
    inputs = labels = None
    if cfg.criterion == "taylor":
        if data is None:
            raise ValueError("--criterion taylor needs --datamodule (its gradients come from a training batch)")
        batch = default_batch_adapter(next(iter(data.train_dataloader())))
        inputs, labels = batch.x, batch.y
    return importance_scores(net.cpu(), layers, example.cpu(), cfg.criterion, inputs=inputs, labels=labels)


def prune_command(cfg, parser) -> dict:
    """Prune the filters an anomaly report flags from an ImageClassifier checkpoint."""
    from .batch import default_batch_adapter
    from .callbacks.prune import network_at
    from .metrics.aipc import accuracy
    from .pruning import load_pruned, prune_filters, save_pruned
    from .scores import FilterScores

    module = _load_module(cfg.model_class, cfg.checkpoint)
    try:
        net = network_at(module, cfg.model_attr)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if (cfg.report is None) == (cfg.criterion is None):
        raise SystemExit(f"error: give either --report FILE or --criterion {{{','.join(CRITERIA)}}} --layers ... --amount ...")
    if cfg.criterion is not None and (not cfg.layers or cfg.amount is None):
        raise SystemExit("error: --criterion needs --layers (e.g. model.relu3) and --amount (filters or fraction per layer)")
    data = _instantiate_datamodule(parser, cfg)
    if data is not None:
        data.setup("fit")
        example = default_batch_adapter(next(iter(data.val_dataloader()))).x[:2]
    elif cfg.input_shape:
        example = torch.randn(*[int(s) for s in cfg.input_shape.split(",")])
    else:
        raise SystemExit("error: give --datamodule or --input-shape (e.g. 1,3,32,32) to trace the model")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    net, example = net.to(device), example.to(device)
    try:
        scores = FilterScores.load(cfg.report) if cfg.report else _criterion_scores(cfg, net, example, data)
        if cfg.amount is not None:
            lowest = cfg.lowest if cfg.lowest is not None else cfg.criterion is not None
            scores = scores.select(int(cfg.amount) if cfg.amount >= 1 else cfg.amount, lowest=lowest)
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    filters = scores.strip_prefix(f"{cfg.model_attr}.").flags()
    if not filters:
        raise SystemExit(f"error: {cfg.report or cfg.criterion} flags no filters; nothing to prune")
    try:
        pruned, summary = prune_filters(net, filters, example, round_to=cfg.round_to)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    result = summary.as_dict()
    if data is not None:
        loader = data.val_dataloader()
        result["val_acc_before"] = accuracy(net, loader)
        result["val_acc_after"] = accuracy(pruned, loader)
    save_pruned(cfg.out, pruned, result, model_attr=cfg.model_attr, report=cfg.report, checkpoint=cfg.checkpoint)
    # What a user does next, done once here so a file that would not load is never left behind silently.
    rebuilt, _ = load_pruned(cfg.out, _load_module(cfg.model_class, cfg.checkpoint).to(device))
    with torch.no_grad():
        agree = torch.allclose(getattr(rebuilt, cfg.model_attr).eval()(example), pruned.eval()(example), atol=1e-5, rtol=1e-4)
    if not agree:
        raise SystemExit(f"error: {cfg.out} rebuilt with --model_class {cfg.model_class} gives other outputs than the "
                         "pruned network; its forward depends on more than the saved weights")
    record = os.path.splitext(cfg.out)[0] + "_summary.json"
    with open(record, "w") as fh:
        json.dump(result, fh, indent=2)
    print(prune_summary_text(result))
    print(f"saved {cfg.out}; load it with load_pruned({cfg.out!r}, <a fresh {type(net).__name__}>) (rebuilt and "
          f"checked here); the full record (every pruned index) is in {record}")
    return result


def prune_summary_text(result: dict) -> str:
    """A few lines for the terminal from :meth:`PruneSummary.as_dict <lightning_interp.pruning.PruneSummary.as_dict>`
    (plus ``val_acc_before/after``): filters removed per layer, parameters, MACs, latency, accuracy."""

    def change(before: float, after: float, fmt: str = ",") -> str:
        rel = f" ({(after - before) / before:+.1%})" if before else ""
        return f"{before:{fmt}} -> {after:{fmt}}{rel}"

    layers = [f"  {layer}: {before} -> {after} channels" for layer, (before, after) in result.get("channels", {}).items()]
    lines = [f"pruned {sum(len(v) for v in result.get('pruned', {}).values())} filters in {len(layers)} layers:", *layers,
             f"parameters {change(result['params_before'], result['params_after'])}",
             f"MACs {change(int(result['macs_before']), int(result['macs_after']))}"]
    if result.get("latency_ms_before") is not None:
        lines.append(f"latency {change(result['latency_ms_before'], result['latency_ms_after'], '.2f')} ms "
                     f"({result.get('latency_device')}, batch {result.get('latency_batch')})")
    if result.get("val_acc_before") is not None:
        lines.append(f"validation accuracy {change(result['val_acc_before'], result['val_acc_after'], '.4f')}")
    return "\n".join(lines)


USAGE = """usage: lightning-interp {fit,validate,test,predict,scan,prune} ...

  fit|validate|test|predict  Lightning's CLI: lightning-interp fit --config recipes/demo.yaml
  scan CHECKPOINT            run monitors once on a trained checkpoint, write the reports
  prune CHECKPOINT           prune the filters an anomaly report flags

`lightning-interp <command> --help` describes each command's options."""


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command = argv[0]
    if command in LIGHTNING_COMMANDS:
        lightning_cli(None if from_command_line else argv)  # None: LightningCLI reads sys.argv itself
        return 0
    if command in ("scan", "prune"):
        parser = _parser(command)
        cfg = parser.parse_args(_expand_aliases(argv[1:]))
        (scan_command if command == "scan" else prune_command)(cfg, parser)
        return 0
    print(f"error: unknown command {command!r}; expected one of {[*LIGHTNING_COMMANDS, 'scan', 'prune']}\n\n{USAGE}",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
