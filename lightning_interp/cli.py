"""The ``lightning-interp`` command line.

    lightning-interp prune CHECKPOINT --report REPORT.json --out PRUNED.pt [--datamodule digits]

``prune`` loads an :class:`~lightning_interp.models.ImageClassifier` checkpoint (trained with
``arch=...`` so it can be rebuilt), removes the filters the anomaly report flags with
Torch-Pruning and saves the smaller network whole (:func:`~lightning_interp.callbacks.prune.load_pruned`).
With a datamodule it prints validation accuracy before and after.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

DATAMODULES = ("digits", "shapes", "imagefolder")


def _datamodule(name: str, root: str | None):
    from .data import DigitsDataModule, ImageFolderDataModule, ShapesDataModule

    if name == "digits":
        return DigitsDataModule()
    if name == "shapes":
        return ShapesDataModule()
    if root is None:
        raise SystemExit("error: --data-root is required with --datamodule imagefolder")
    return ImageFolderDataModule(root)


def prune_command(args: argparse.Namespace) -> dict:
    from .batch import default_batch_adapter
    from .callbacks.prune import save_pruned
    from .metrics.aipc import accuracy
    from .models import ImageClassifier
    from .pruning import prune_filters
    from .report import read_anomaly_report

    try:
        module = ImageClassifier.load_from_checkpoint(args.checkpoint, map_location="cpu")
    except ValueError as err:
        raise SystemExit(f"error: cannot rebuild the model from {args.checkpoint}: {err}") from err
    net = module.model
    filters = read_anomaly_report(args.report, strip_prefix="model.")
    if not filters:
        raise SystemExit(f"error: the report {args.report} flags no filters; nothing to prune")
    data = _datamodule(args.datamodule, args.data_root) if args.datamodule else None
    if data is not None:
        data.setup("fit")
        example = default_batch_adapter(next(iter(data.val_dataloader()))).x[:2]
    elif args.input_shape:
        example = torch.randn(*[int(s) for s in args.input_shape.split(",")])
    else:
        raise SystemExit("error: give --datamodule or --input-shape (e.g. 1,3,32,32) to trace the model")
    pruned, summary = prune_filters(net, filters, example)
    result = summary.as_dict()
    if data is not None:
        loader = data.val_dataloader()
        result["val_acc_before"] = accuracy(net, loader)
        result["val_acc_after"] = accuracy(pruned, loader)
    save_pruned(args.out, pruned, result, report=args.report, checkpoint=args.checkpoint)
    print(json.dumps(result, indent=2))
    print(f"saved {args.out}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lightning-interp", description="lightning_interp command line")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prune", help="prune the filters an anomaly report flags from a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--report", required=True, help="anomaly_report.json written by AnomalyFilterMonitor")
    p.add_argument("--out", required=True, help="where to save the pruned network (whole, torch.save)")
    p.add_argument("--datamodule", choices=DATAMODULES, default=None, help="evaluate accuracy before/after on it")
    p.add_argument("--data-root", default=None, help="ImageFolder root for --datamodule imagefolder")
    p.add_argument("--input-shape", default=None, help="example input shape without a datamodule, e.g. 1,3,32,32")
    p.set_defaults(func=prune_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
