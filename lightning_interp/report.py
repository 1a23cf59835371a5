"""The anomaly report: the JSON file the monitor writes and the pruning step reads.

Format ``lightning_interp.anomaly_report/1``::

    {
      "format": "lightning_interp.anomaly_report/1",
      "epoch": 11,                       # last scanned epoch
      "wt_epoch": 6, "wt_count": 3,      # best validation accuracy, anomaly count then
      "final_count": 9,
      "settings": {"min_cluster_size": 51, "k_max": 10, "alpha": 0.2, "beta": 1.0, "theta": 0.1},
      "layers": {
        "model.relu3": {"num_filters": 64, "flagged": [
            {"filter": 12, "epoch": 11, "num_clusters": 4, "ch_index": 812.3,
             "outlier_clusters": 2, "cluster_sizes": [480, 20, 9, 3], "activation": 0.41}, ...]}
      },
      "history": [{"epoch": 0, "count": 2, "counts": {"model.relu3": 2}, "overfit_alarm": 0,
                   "val_acc": 0.91, "val_loss": 0.33}, ...]
    }

Layer names are module paths of the module the monitor watched (the LightningModule);
:func:`read_anomaly_report` can strip a prefix (``"model."``) to address the bare network.
"""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["REPORT_FORMAT", "write_anomaly_report", "read_anomaly_report"]

REPORT_FORMAT = "lightning_interp.anomaly_report/1"


def write_anomaly_report(path: str, report: dict[str, Any]) -> str:
    """Write ``report`` atomically (temp file + rename) as JSON; returns the path."""
    report = {"format": REPORT_FORMAT, **report}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, path)
    return path


def read_anomaly_report(path: str, *, strip_prefix: str | None = None) -> dict[str, list[int]]:
    """The flagged filters of a report as ``{layer: [filter, ...]}`` (what masking and pruning take).

    Raises:
        ValueError: the file is not an anomaly report of a known format.
    """
    with open(path) as fh:
        report = json.load(fh)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise ValueError(
            f"Expected an anomaly report with format {REPORT_FORMAT!r} at {path} but got "
            f"{report.get('format') if isinstance(report, dict) else type(report).__name__!r}."
        )
    out: dict[str, list[int]] = {}
    for layer, entry in report.get("layers", {}).items():
        name = layer[len(strip_prefix) :] if strip_prefix and layer.startswith(strip_prefix) else layer
        filters = sorted(int(f["filter"]) for f in entry.get("flagged", []))
        if filters:
            out[name] = filters
    return out
