"""Every exported callback under real DDP: 2 CPU processes (gloo), ranks with different validation
data (one runs a batch fewer), flags, masks and probes decided on rank 0 and identical everywhere."""

import json
import os
import subprocess
import sys

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp", "run_ddp.py")
TIMEOUT_S = 480  # a deadlocked collective fails the test instead of hanging the suite (a normal run: ~1 min)


def run(out, devices):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, SCRIPT, str(out), str(devices)], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(devices)]


def test_all_callbacks_under_ddp_agree_across_ranks_and_with_one_process(tmp_path):
    from callback_factories import exported_callback_classes

    rank0, rank1 = run(tmp_path / "ddp", 2)
    assert rank0["callbacks"] == sorted(cls.__name__ for cls in exported_callback_classes())
    # The case is real: the ranks ran different numbers of validation batches.
    assert rank0["val_batches"] == [3] and rank1["val_batches"] == [2]
    for key in ("anomaly_history", "flagged", "val_history", "wt_epoch", "probe", "probe_indices", "val_probe",
                "val_probe_indices", "tip_history", "masking", "masks_in_force", "lil_history", "fq_history",
                "dynamics_subset", "dynamics_batches", "dynamics_history"):
        assert rank0[key] == rank1[key], key
    # Each rank trained on half the samples; the summed observations cover every sample once an epoch.
    assert rank0["dynamics_batches"]["epochs"] == [2] * 96
    assert rank0["dynamics_subset"]["epochs"] == [2] * 24
    assert [h["epoch"] for h in rank0["anomaly_history"]] == [0, 1]
    # The loose criteria flag filters at epoch 0, which are masked from epoch 1: what is compared is not empty.
    assert rank0["masking"][1]["num_masked"] > 0 and rank0["masks_in_force"]
    assert any(k.startswith("interp/tip/") for k in rank0["tip_history"][0])
    # Only rank 0 writes files: one report.
    reports = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "ddp") for f in fs if f == "anomaly_report.json"]
    assert len(reports) == 1
    (single,) = run(tmp_path / "single", 1)
    assert single["probe_indices"] == rank0["probe_indices"], "the probe is the same samples as in a single-process run"
    assert abs(single["probe"] - rank0["probe"]) <= 1e-9 * abs(rank0["probe"])
    assert single["val_probe_indices"] == rank0["val_probe_indices"], "rank 0's validation probe"
