"""Every callback under real DDP: 2 CPU processes (gloo), one rank with a batch fewer."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp", "run_ddp.py")


def run(out, devices):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(out), str(devices)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(devices)]


def test_all_callbacks_under_ddp_agree_across_ranks_and_with_one_process(tmp_path):
    rank0, rank1 = run(tmp_path / "ddp", 2)
    for key in ("anomaly_history", "probe", "tip_history", "masking", "lil_history", "fq_history"):
        assert rank0[key] == rank1[key], key
    assert [h["epoch"] for h in rank0["anomaly_history"]] == [0, 1]
    assert any(k.startswith("interp/tip/") for k in rank0["tip_history"][0])
    # Only rank 0 writes files: one report, one metrics file.
    reports = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ddp") for f in fs if f == "anomaly_report.json"]
    assert len(reports) == 1
    (single,) = run(tmp_path / "single", 1)
    assert single["probe_indices"] == rank0["probe_indices"], "the probe is the same samples as in a single-process run"
    assert abs(single["probe"] - rank0["probe"]) <= 1e-9 * abs(rank0["probe"])
