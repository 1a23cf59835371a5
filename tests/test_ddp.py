"""Every exported callback under real DDP: 2 CPU processes (gloo), ranks with different validation
data (one runs a batch fewer), flags, masks and probes decided on rank 0 and identical everywhere."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "ddp", "run_ddp.py")
#: A run whose ranks write no line for this long is stuck (a deadlocked collective, a lost rank): its stacks
#: are dumped into the rank logs and it fails. A slow run on a loaded machine keeps writing heartbeats.
STALL_S = 300
#: Backstop for the whole run (a normal one: ~1 min; 1.5 min at load 11 on a 2-core machine).
TIMEOUT_S = 900
LAUNCH_VARIABLES = {"MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "GLOBAL_RANK", "RANK", "WORLD_SIZE",
                    "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID"}


def _logs(out) -> dict[str, str]:
    return {name: open(os.path.join(out, name), errors="replace").read()
            for name in sorted(os.listdir(out)) if name.endswith(".log")} if os.path.isdir(out) else {}


def _report(out, why: str) -> str:
    tails = "".join(f"\n----- {name} (last 6000 characters) -----\n{text[-6000:]}" for name, text in _logs(out).items())
    return f"{why}{tails}"


def run(out, devices):
    """``run_ddp.py`` in its own process group; fails with every rank's log when it fails or stalls.

    Rendezvous goes through a TCP port that Lightning picks by binding port 0 and closing it before the
    store binds it again: on a busy machine another process can take it in between ("Address already in
    use", the known race of free-port pickers, e.g. pytorch/pytorch#30676). That one error is retried once
    with a new port; any other failure fails at once."""
    try:
        return _run(out, devices)
    except pytest.fail.Exception as failure:
        if "address already in use" not in str(failure).lower():
            raise
        warnings.warn(f"DDP rendezvous port was taken (Address already in use); retrying once:\n{str(failure)[:2000]}",
                      stacklevel=2)
        return _run(f"{out}_retry", devices)


def _run(out, devices):
    # Rank variables from the caller's environment would make the launcher join another job (or wait for
    # ranks that never come): each run picks its own free port and starts its own ranks.
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    env.update(WANDB_MODE="disabled", PYTHONWARNINGS="ignore")
    os.makedirs(out)
    with open(os.path.join(out, "launcher.log"), "w") as launcher:
        proc = subprocess.Popen([sys.executable, SCRIPT, str(out), str(devices)], env=env, stdout=launcher,
                                stderr=subprocess.STDOUT, start_new_session=True)
        start = last_change = time.monotonic()
        seen = None
        while proc.poll() is None:
            time.sleep(1)
            sizes = {name: os.path.getsize(os.path.join(out, name)) for name in os.listdir(out) if name.endswith(".log")}
            if sizes != seen:
                seen, last_change = sizes, time.monotonic()
            stalled = time.monotonic() - last_change > STALL_S
            if stalled or time.monotonic() - start > TIMEOUT_S:
                os.killpg(proc.pid, signal.SIGUSR1)  # every rank dumps its threads' stacks into its log
                time.sleep(5)
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                why = f"no output for {STALL_S} s" if stalled else f"still running after {TIMEOUT_S} s"
                pytest.fail(_report(out, f"DDP run {why} (stacks dumped at the end of each rank log)"))
    if proc.returncode != 0:
        pytest.fail(_report(out, f"DDP run exited with {proc.returncode} after {time.monotonic() - start:.0f} s"))
    return [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(devices)]


def test_all_callbacks_under_ddp_agree_across_ranks_and_with_one_process(tmp_path):
    from callback_factories import exported_callback_classes

    rank0, rank1 = run(tmp_path / "ddp", 2)
    assert rank0["callbacks"] == sorted(cls.__name__ for cls in exported_callback_classes())
    # The case is real: the ranks ran different numbers of validation batches.
    assert rank0["val_batches"] == [3] and rank1["val_batches"] == [2]
    for key in ("anomaly_history", "flagged", "val_history", "wt_epoch", "probe", "probe_indices", "val_probe",
                "val_probe_indices", "tip_history", "masking", "masks_in_force", "lil_history", "fq_history",
                "dynamics_subset", "dynamics_batches", "dynamics_history", "alarm_epochs", "live_masking"):
        assert rank0[key] == rank1[key], (key, rank0[key], rank1[key])
    # Each rank trained on half the samples; the summed observations cover every sample once an epoch.
    assert rank0["dynamics_batches"]["epochs"] == [3] * 96
    assert rank0["dynamics_subset"]["epochs"] == [3] * 24
    assert [h["epoch"] for h in rank0["anomaly_history"]] == [0, 1, 2]
    # Rank 0's key rose at epoch 1 (rank 1's never did): the alarm and the live masking are rank 0's everywhere.
    assert rank0["alarm_epochs"] == [1, 1]
    assert [h["num_masked"] for h in rank0["live_masking"]] == [0, 0, 2]
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
